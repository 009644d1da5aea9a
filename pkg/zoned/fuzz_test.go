package zoned

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

// liveFile renders a live write-pointer table as the device writes it.
func liveFile(boot string, wps []uint64) []byte {
	b := make([]byte, liveHeader+8*len(wps))
	copy(b, liveMagic)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(wps)))
	copy(b[16:64], boot)
	for i, wp := range wps {
		binary.LittleEndian.PutUint64(b[liveHeader+8*i:], wp)
	}
	return b
}

// FuzzOpenZoned opens a zoned image through Open with fuzzed bytes in the
// zoned header extension and the write-pointer table, and a fuzzed live
// sidecar (<image>.wplive). Open must not panic or hang; if it succeeds,
// the report must be self-consistent (each WP inside its zone and 512
// aligned, each condition the one its WP implies, conventional zones
// NOT_WP, the closed zones within max_active), a write at a WP must work
// or fail with a typed error, and what a close records must reopen to the
// same report.
func FuzzOpenZoned(f *testing.F) {
	dir := memDir(f)
	base := filepath.Join(dir, "base.qcow2")
	const zs, nz = 64 << 10, 16
	if _, err := qcow2.Create(base, qcow2.CreateOptions{Size: nz * zs, ClusterSize: 4096, Zoned: &qcow2.ZonedOptions{
		ZoneSize: p64(zs), ZoneCapacity: p64(48 << 10), ConventionalZones: p32(2),
		MaxOpenZones: p32(3), MaxActiveZones: p32(4), MaxAppendBytes: p64(8192),
	}}); err != nil {
		f.Fatal(err)
	}
	orig, err := os.ReadFile(base)
	if err != nil {
		f.Fatal(err)
	}
	im, err := qcow2.Open(base, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		f.Fatal(err)
	}
	z := *im.Info().Zoned
	wps, _, _ := im.WritePointers()
	im.Close()
	extAt := bytes.Index(orig[:4096], []byte{0x00, 0x7a, 0x62, 0x64}) + 8
	if extAt < 8 {
		f.Fatal("no zoned extension in the first cluster")
	}
	ext := orig[extAt : extAt+56]
	table := orig[z.MetaOffset : z.MetaOffset+z.MetaSize]
	boot := bootID()

	// Seeds: the valid image with no sidecar, with a valid sidecar of this
	// boot (some zones written), of another boot, and truncated.
	written := append([]uint64(nil), wps...)
	written[2] += 4096
	written[3] += 48 << 10
	written[4] += 512
	// The seed with a live table of this boot must open with its pointers,
	// or the fuzzer would explore refusals only.
	if err := os.WriteFile(base+liveSuffix, liveFile(boot, written), 0o644); err != nil {
		f.Fatal(err)
	}
	if d, err := Open(base, OpenOptions{ReadOnly: true}); err != nil {
		f.Fatal(err)
	} else if r := d.Report(3, 1)[0]; boot != "" && (r.Cond != CondFull || d.Report(2, 1)[0].WP != written[2]) {
		f.Fatalf("the live table seed was not taken: %+v", d.Report(0, nz))
	} else {
		d.Close()
	}
	f.Add(ext, table, []byte(nil))
	f.Add(ext, table, liveFile(boot, written))
	f.Add(ext, table, liveFile("another boot", written))
	f.Add(ext, table, liveFile(boot, written)[:100])
	tw := append([]byte(nil), table...)
	binary.LittleEndian.PutUint64(tw[5*8:], 5*zs+8192)
	f.Add(ext, tw, liveFile(boot, written))

	f.Fuzz(func(t *testing.T, ext, table, live []byte) {
		img := append([]byte(nil), orig...)
		copy(img[extAt:extAt+56], ext)
		copy(img[z.MetaOffset:z.MetaOffset+z.MetaSize], table)
		p := filepath.Join(dir, fmt.Sprintf("f%d.qcow2", os.Getpid()))
		defer os.Remove(p)
		defer os.Remove(p + liveSuffix)
		if err := os.WriteFile(p, img, 0o644); err != nil {
			t.Fatal(err)
		}
		os.Remove(p + liveSuffix)
		if len(live) > 0 {
			if err := os.WriteFile(p+liveSuffix, live, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		d, err := Open(p, OpenOptions{})
		if err != nil {
			return
		}
		rep, err := consistentReport(d)
		if err != nil {
			d.Close()
			t.Fatal(err)
		}
		g := d.Geometry()
		for _, r := range rep {
			if r.Type == TypeSeqWriteRequired && r.Cond != CondFull {
				_, err := d.WriteAt(make([]byte, SectorSize), int64(r.WP), false)
				if err != nil && Errno(err) == 0 {
					t.Fatalf("write at the WP of zone %d: untyped error %v", g.ZoneIndex(r.Start), err)
				}
				break
			}
		}
		rep, _ = consistentReport(d)
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		d, err = Open(p, OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatalf("reopen after a clean close: %v", err)
		}
		defer d.Close()
		again, err := consistentReport(d)
		if err != nil {
			t.Fatal(err)
		}
		for i := range rep {
			if rep[i].WP != again[i].WP || rep[i].Cond != again[i].Cond && rep[i].Cond != CondImpOpen && rep[i].Cond != CondExpOpen {
				t.Fatalf("zone %d: %+v before close, %+v after reopen", i, rep[i], again[i])
			}
		}
	})
}

// consistentReport returns the report of every zone of d, or an error
// naming the first zone that contradicts the geometry.
func consistentReport(d *Device) ([]ZoneReport, error) {
	g := d.Geometry()
	if err := g.Validate(); err != nil {
		return nil, fmt.Errorf("the device accepted an invalid geometry: %v", err)
	}
	rep := d.Report(0, int(g.NrZones))
	if len(rep) != int(g.NrZones) {
		return nil, fmt.Errorf("report of %d zones, geometry has %d", len(rep), g.NrZones)
	}
	closed := uint32(0)
	for i, r := range rep {
		start, end := g.ZoneStart(i), g.WritableEnd(i)
		bad := func(why string) error { return fmt.Errorf("zone %d: %+v: %s", i, r, why) }
		switch {
		case r.Start != start || r.Len != g.ZoneLen(i) || r.Cap != g.ZoneCap(i):
			return nil, bad("start, length or capacity differ from the geometry")
		case g.IsConventional(i):
			if r.Cond != CondNotWP || r.Type != TypeConventional || r.WP != start {
				return nil, bad("a conventional zone must be NOT_WP with its WP at the start")
			}
			continue
		case r.Type != TypeSeqWriteRequired:
			return nil, bad("a sequential zone of the wrong type")
		case r.Cond == CondFull:
			continue
		case r.WP < start || r.WP >= end || r.WP%SectorSize != 0:
			return nil, bad("WP outside the zone or unaligned")
		case r.WP == start && r.Cond != CondEmpty && r.Cond != CondExpOpen:
			return nil, bad("WP at the start but not EMPTY")
		case r.WP > start && r.Cond != CondClosed && r.Cond != CondImpOpen && r.Cond != CondExpOpen:
			return nil, bad("partially written but neither open nor closed")
		}
		if r.Cond == CondClosed || r.Cond == CondImpOpen || r.Cond == CondExpOpen {
			closed++
		}
	}
	if g.MaxActive != 0 && closed > g.MaxActive {
		return nil, fmt.Errorf("%d active zones exceed max_active_zones %d", closed, g.MaxActive)
	}
	return rep, nil
}
