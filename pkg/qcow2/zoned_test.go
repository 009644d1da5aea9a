package qcow2

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// seedOptions are the options of the seed patch's example command line.
func seedOptions() CreateOptions {
	return CreateOptions{Size: 768 << 20, Zoned: &ZonedOptions{
		ZoneSize: u64(64 << 20), ZoneCapacity: u64(64 << 20), ConventionalZones: u32(0),
		MaxAppendBytes: u64(4096), MaxOpenZones: u32(6), MaxActiveZones: u32(8),
	}}
}

func TestZonedCreateAndReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "zbc.qcow2")
	if _, err := Create(path, seedOptions()); err != nil {
		t.Fatal(err)
	}
	im, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	z := im.Info().Zoned
	if z == nil || z.NrZones != 12 || z.ZoneSize != 64<<20 || z.MaxOpenZones != 6 || z.MaxActiveZones != 8 ||
		z.MaxAppendBytes != 4096 || z.MetaSize != 96 || z.Layout != LayoutA || z.MetaOffset%65536 != 0 {
		t.Fatalf("zoned extension after reopen: %+v", z)
	}
	wps, conv, err := im.WritePointers()
	if err != nil {
		t.Fatal(err)
	}
	for i, wp := range wps {
		if wp != uint64(i)*64<<20 || conv[i] {
			t.Fatalf("zone %d: wp %d conv %v", i, wp, conv[i])
		}
	}
	if err := im.SetWritePointer(3, 3*64<<20+4096); err != nil {
		t.Fatal(err)
	}
	im.Close()
	im, err = Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	wps, _, _ = im.WritePointers()
	if wps[3] != 3*64<<20+4096 {
		t.Fatalf("write pointer not persisted: %d", wps[3])
	}
	im.Close()
	if res, err := Check(path, CheckOptions{}); err != nil || res.ExitCode() != 0 {
		t.Fatalf("check of a zoned image: %+v %v", res, err)
	}
}

func TestZonedOptionErrors(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		mod  func(*ZonedOptions)
		name string
	}{
		{func(z *ZonedOptions) { z.ZoneCapacity = u64(128 << 20) }, "zone.capacity"},
		{func(z *ZonedOptions) { z.ZoneSize = u64(3 << 20) }, "zone.size"},
		{func(z *ZonedOptions) { z.ZoneSize = u64(0) }, "zone.size"},
		{func(z *ZonedOptions) { z.ZoneCapacity = u64(1000) }, "zone.capacity"},
		{func(z *ZonedOptions) { z.MaxAppendBytes = u64(1000) }, "zone.max_append_bytes"},
		{func(z *ZonedOptions) { z.MaxAppendBytes = u64(64 << 20) }, "zone.max_append_bytes"},
		{func(z *ZonedOptions) { z.ConventionalZones = u32(12) }, "zone.conventional_zones"},
	} {
		o := seedOptions()
		tc.mod(o.Zoned)
		path := filepath.Join(dir, "bad.qcow2")
		_, err := Create(path, o)
		var oe *OptionError
		if !errors.As(err, &oe) || oe.Name != tc.name || !errors.Is(err, ErrInvalidOption) {
			t.Errorf("want an OptionError naming %s, got %v", tc.name, err)
		}
		if _, serr := os.Stat(path); serr == nil {
			t.Errorf("%s: a file was left behind", tc.name)
		}
	}
	// Too-large limits are clamped with a warning.
	o := seedOptions()
	o.Zoned.MaxActiveZones = u32(100)
	o.Zoned.MaxOpenZones = u32(50)
	w, err := Create(filepath.Join(dir, "clamp.qcow2"), o)
	if err != nil || len(w) != 2 {
		t.Fatalf("clamp: warnings %q err %v", w, err)
	}
}

// TestZonedAgainstQemu: qemu-img (no zoned support) must refuse the image by
// name; with the bit cleared it must see exactly the write-pointer table as
// leaked clusters, since it does not know that extension's clusters.
func TestZonedAgainstQemu(t *testing.T) {
	qimg := needTool(t, "qemu-img", "qemu-utils")
	dir := t.TempDir()
	path := filepath.Join(dir, "zbc.qcow2")
	o := seedOptions()
	o.ClusterSize = 512 // 96-byte table... use many zones below to span clusters
	o.Size = 64 << 20
	o.Zoned.ZoneSize = u64(64 << 10)
	o.Zoned.ZoneCapacity = u64(64 << 10)
	o.Zoned.ConventionalZones = u32(4)
	if _, err := Create(path, o); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(qimg, "info", path).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "Unsupported qcow2 feature(s): zoned format") {
		t.Fatalf("qemu-img info should refuse by name, got err=%v:\n%s", err, out)
	}
	b, _ := os.ReadFile(path)
	b[79] &^= 1 << 5
	cp := filepath.Join(dir, "nobit.qcow2")
	os.WriteFile(cp, b, 0o644)
	out, _ = exec.Command(qimg, "check", "--output=json", cp).Output()
	var res struct {
		Leaks       int `json:"leaks"`
		Corruptions int `json:"corruptions"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("qemu-img check json: %v\n%s", err, out)
	}
	im, err := Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	z := im.Info().Zoned
	im.Close()
	wantClusters := int(alignUp(z.MetaSize, 512) / 512) // 1024 zones × 8 B = 16 clusters
	if res.Leaks != wantClusters || res.Corruptions != 0 || wantClusters != 16 {
		t.Fatalf("qemu-img check: leaks=%d corruptions=%d, want %d leaks", res.Leaks, res.Corruptions, wantClusters)
	}
	human, _ := exec.Command(qimg, "check", cp).CombinedOutput()
	re := regexp.MustCompile(`Leaked cluster (\d+) refcount=1 reference=0`)
	ms := re.FindAllStringSubmatch(string(human), -1)
	if len(ms) != wantClusters {
		t.Fatalf("leak lines: %d\n%s", len(ms), human)
	}
	for i, m := range ms {
		c, _ := strconv.Atoi(m[1])
		if uint64(c)*512 != z.MetaOffset+uint64(i)*512 {
			t.Fatalf("leaked cluster %d is not in the write-pointer table at %d", c, z.MetaOffset)
		}
	}
	if res, err := Check(path, CheckOptions{}); err != nil || res.ExitCode() != 0 {
		t.Fatalf("our check of the zoned original: %+v %v", res, err)
	}
}

// TestZonedLaterLayouts converts an image to layouts B and C (as later
// revisions of the series write them: big-endian entries, bit 63 for
// conventional zones) and checks they open, report the same geometry, and
// keep their layout when a write pointer changes.
func TestZonedLaterLayouts(t *testing.T) {
	for _, layout := range []ZoneLayout{LayoutB, LayoutC} {
		path := filepath.Join(t.TempDir(), "z.qcow2")
		o := seedOptions()
		o.Zoned.ConventionalZones = u32(2)
		if _, err := Create(path, o); err != nil {
			t.Fatal(err)
		}
		im, err := Open(path, OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		z := im.h.zoned
		wps, conv, _ := im.WritePointers()
		z.Layout = layout
		if layout == LayoutC {
			z.MaxAppendBytes = 0
		}
		for i := range wps {
			z.encodeWP(im.wpTableBuf[i*8:], wps[i], conv[i])
		}
		if _, err := im.f.WriteAt(im.wpTableBuf, int64(z.MetaOffset)); err != nil {
			t.Fatal(err)
		}
		if err := im.writeHeader(); err != nil {
			t.Fatal(err)
		}
		im.Close()
		raw, _ := os.ReadFile(path)
		if got := raw[z.MetaOffset]; got != 0x80 { // zone 0 conventional: BE bit 63
			t.Fatalf("layout %v: first WP byte 0x%02x, want 0x80", layout, got)
		}
		im, err = Open(path, OpenOptions{})
		if err != nil {
			t.Fatalf("layout %v: %v", layout, err)
		}
		if got := im.Info().Zoned; got.Layout != layout || got.NrZones != 12 || got.ConventionalZones != 2 || got.MaxOpenZones != 6 {
			t.Fatalf("layout %v read back as %+v", layout, got)
		}
		if err := im.SetWritePointer(5, 5*64<<20+8192); err != nil {
			t.Fatal(err)
		}
		im.Close()
		im, err = Open(path, OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		wps2, conv2, _ := im.WritePointers()
		if wps2[5] != 5*64<<20+8192 || !conv2[1] || conv2[2] || im.Info().Zoned.Layout != layout {
			t.Fatalf("layout %v after update: wp5=%d conv=%v", layout, wps2[5], conv2[:3])
		}
		im.Close()
		if res, err := Check(path, CheckOptions{}); err != nil || res.ExitCode() != 0 {
			t.Fatalf("layout %v check: %+v %v", layout, res, err)
		}
	}
}

// TestZonedCorruptRefused: damaged zoned metadata is refused with the byte
// offset, never a panic.
func TestZonedCorruptRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "z.qcow2")
	if _, err := Create(path, seedOptions()); err != nil {
		t.Fatal(err)
	}
	im, _ := Open(path, OpenOptions{ReadOnly: true})
	z := *im.Info().Zoned
	im.Close()
	orig, _ := os.ReadFile(path)
	for name, mut := range map[string]func(b []byte){
		"wp beyond zone":    func(b []byte) { b[z.MetaOffset+8+3] = 0x7f },
		"conventional flag": func(b []byte) { b[z.MetaOffset+7] |= 0x08 },
		"bit without ext":   func(b []byte) { b[112+0] = 0xff }, // break the extension magic
		"ext without bit":   func(b []byte) { b[79] &^= 1 << 5 },
	} {
		b := append([]byte(nil), orig...)
		mut(b)
		os.WriteFile(path, b, 0o644)
		_, err := Open(path, OpenOptions{ReadOnly: true})
		var fe *FormatError
		if !errors.As(err, &fe) {
			t.Errorf("%s: want a FormatError, got %v", name, err)
			continue
		}
		t.Logf("%s: %v", name, err)
	}
}

// TestZonedResizeAddsEmptyZones grows a zoned image past the point where
// its write-pointer table needs another cluster; old write pointers stay,
// new zones are EMPTY, and both checks stay clean.
func TestZonedResizeAddsEmptyZones(t *testing.T) {
	path := filepath.Join(t.TempDir(), "z.qcow2")
	o := CreateOptions{Size: 64 << 20, ClusterSize: 512, Zoned: &ZonedOptions{ZoneSize: u64(1 << 20), ConventionalZones: u32(1)}}
	if _, err := Create(path, o); err != nil {
		t.Fatal(err)
	}
	im, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	im.WriteAt(make([]byte, 4096), 5<<20)
	if err := im.SetWritePointer(5, 5<<20+4096); err != nil {
		t.Fatal(err)
	}
	oldOff := im.Info().Zoned.MetaOffset
	if err := im.Resize(256 << 20); err != nil {
		t.Fatal(err)
	}
	im.Close()
	im, err = Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	z := im.Info().Zoned
	wps, conv, _ := im.WritePointers()
	if z.NrZones != 256 || len(wps) != 256 || z.MetaOffset == oldOff || wps[5] != 5<<20+4096 || !conv[0] || wps[200] != 200<<20 {
		t.Fatalf("after resize: %+v wp5=%d wp200=%d", z, wps[5], wps[200])
	}
	if res, err := Check(path, CheckOptions{}); err != nil || res.ExitCode() != 0 {
		t.Fatalf("check after zoned resize: %+v %v", res, err)
	}
}
