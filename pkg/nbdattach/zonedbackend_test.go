package nbdattach

import (
	"bytes"
	"errors"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// newZonedDevice creates an 8 MiB zoned image of 1 MiB zones, the first
// two conventional, and opens it.
func newZonedDevice(t *testing.T) *zoned.Device {
	t.Helper()
	path := filepath.Join(t.TempDir(), "zbc.qcow2")
	zs, conv, open, active := uint64(1<<20), uint32(2), uint32(3), uint32(4)
	o := qcow2.CreateOptions{Size: 8 << 20, Zoned: &qcow2.ZonedOptions{
		ZoneSize: &zs, ZoneCapacity: &zs, ConventionalZones: &conv, MaxOpenZones: &open, MaxActiveZones: &active}}
	if _, err := qcow2.Create(path, o); err != nil {
		t.Fatal(err)
	}
	d, err := zoned.Open(path, zoned.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// TestZonedBackendZoneBoundaries: spec §6 says the zq:zones extents break
// at zone boundaries, so that "nbdinfo --map=zq:zones" shows every zone.
// The client receives one extent per zone only if neighbouring zones'
// flags differ: the server joins equal neighbours (descriptors), and so
// does nbdinfo when it prints. Zones 4..7 are all EMPTY and zones 0-1
// conventional: without the zone index in the flags they would be joined.
func TestZonedBackendZoneBoundaries(t *testing.T) {
	d := newZonedDevice(t)
	if _, err := d.WriteAt(make([]byte, 4096), 3<<20, false); err != nil {
		t.Fatal(err)
	}
	tc, wait := connect(t, &Export{Backend: ZonedBackend{D: d}}, clientOpts{structured: true, contexts: []string{ZonesContext}})
	var id uint32
	for k := range tc.contexts {
		id = k
	}
	r, err := tc.do(request{typ: cmdBlockStatus, handle: 1, length: 8 << 20}, nil)
	if err != nil || r.errno != 0 {
		t.Fatalf("block status: %v %v", err, r.errno)
	}
	starts := map[int64]bool{}
	pos := int64(0)
	for i, e := range r.status[id] {
		starts[pos] = true
		if i > 0 && r.status[id][i-1].Flags == e.Flags {
			t.Errorf("extents %d and %d have equal flags %#x: a client joins them", i-1, i, e.Flags)
		}
		pos += e.Length
	}
	for z := int64(0); z < 8; z++ {
		if !starts[z<<20] {
			t.Errorf("no extent starts at zone %d (offset %#x): %v", z, z<<20, r.status[id])
		}
	}
	tc.send(request{typ: cmdDisc}, nil)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
}

// TestZonedZeroLength: proto.md lets a server treat a zero-length request
// as a no-op, and the server does so for every command, on a zoned export
// too, whose engine refuses a write of no blocks: at a write pointer, off
// it, in a conventional zone and with FUA, each is answered OK and changes
// nothing.
func TestZonedZeroLength(t *testing.T) {
	d := newZonedDevice(t)
	for _, structured := range []bool{false, true} {
		tc, wait := connect(t, &Export{Backend: ZonedBackend{D: d}, MinBlockSize: 4096}, clientOpts{structured: structured})
		for i, req := range []request{
			{typ: cmdWrite, offset: 2 << 20},                    // at the WP of an empty zone
			{typ: cmdWrite, offset: 3<<20 + 64<<10},             // off the WP
			{typ: cmdWrite, flags: cmdFlagFUA, offset: 4 << 20}, // with FUA
			{typ: cmdWrite, offset: 0},                          // conventional
			{typ: cmdRead, offset: 5 << 20},
			{typ: cmdTrim, offset: 2 << 20},
			{typ: cmdWriteZeroes, offset: 2 << 20},
			{typ: cmdCache, offset: 2 << 20},
			{typ: cmdWrite, offset: 8 << 20}, // at the very end
		} {
			req.handle = uint64(i + 1)
			r, err := tc.do(req, nil)
			if err != nil {
				t.Fatal(err)
			}
			if r.errno != 0 || len(r.data) != 0 {
				t.Errorf("structured=%v: zero-length %v at %#x: errno %v (%s), %d bytes", structured, req.typ, req.offset, r.errno, r.msg, len(r.data))
			}
		}
		tc.send(request{typ: cmdDisc}, nil)
		if err := wait(); err != nil {
			t.Fatal(err)
		}
	}
	for _, z := range d.Report(2, 6) {
		if z.WP != z.Start || z.Cond != zoned.CondEmpty {
			t.Errorf("zone at %#x: WP %#x cond %v after zero-length requests, want empty", z.Start, z.WP, z.Cond)
		}
	}
}

// TestZonedViolationsAreEIO: spec §6 says the export answers violations of
// the zone rules with NBD_EIO. That includes running out of active zones,
// which a Linux zoned device reports as EOVERFLOW (§4): over NBD that errno
// means a read too large to send unfragmented. The device has 6 sequential
// zones and max_active_zones 4.
func TestZonedViolationsAreEIO(t *testing.T) {
	d := newZonedDevice(t)
	tc, wait := connect(t, &Export{Backend: ZonedBackend{D: d}}, clientOpts{structured: true})
	block := bytes.Repeat([]byte{0x5a}, 4096)
	write := func(h, off uint64) reply {
		t.Helper()
		r, err := tc.do(request{typ: cmdWrite, handle: h, offset: off, length: 4096}, block)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	for z := uint64(2); z < 6; z++ { // four zones become active
		if r := write(z, z<<20); r.errno != 0 {
			t.Fatalf("write at the WP of zone %d: %v (%s)", z, r.errno, r.msg)
		}
	}
	tests := []struct {
		name string
		off  uint64
		msg  string
	}{
		{"fifth active zone", 6 << 20, "too many active zones"},
		{"behind the write pointer", 2 << 20, "write pointer"},
		{"past the write pointer", 3<<20 + 64<<10, "write pointer"},
	}
	for i, tt := range tests {
		r := write(uint64(10+i), tt.off)
		if r.errno != EIO || !strings.Contains(r.msg, tt.msg) {
			t.Errorf("%s: errno %v (%q), want EIO mentioning %q", tt.name, r.errno, r.msg, tt.msg)
		}
	}
	if z := d.Report(6, 1)[0]; z.Cond != zoned.CondEmpty || z.WP != z.Start {
		t.Errorf("zone 6 after the refused write: cond %v WP %#x, want empty", z.Cond, z.WP)
	}
	r, err := tc.do(request{typ: cmdRead, handle: 20, offset: 6 << 20, length: 4096}, nil)
	if err != nil || r.errno != 0 || !bytes.Equal(r.data, make([]byte, 4096)) {
		t.Errorf("zone 6 after the refused write: %v %v, want zeros", err, r.errno)
	}
	tc.send(request{typ: cmdDisc}, nil)
	if err := wait(); err != nil {
		t.Fatal(err)
	}

	// The Linux errno stays available to exporters that answer like a
	// zoned block device.
	err = zoneErr(&zoned.ZoneError{Op: zoned.OpWrite, Zone: 6, Err: zoned.ErrTooManyActiveZones})
	if DefaultErrorMapper(err) != EIO || !errors.Is(err, syscall.EOVERFLOW) {
		t.Errorf("too many active zones: NBD %v, wraps EOVERFLOW %v", DefaultErrorMapper(err), errors.Is(err, syscall.EOVERFLOW))
	}
	err = zoneErr(&zoned.ZoneError{Op: zoned.OpWrite, Zone: 2, Err: zoned.ErrUnaligned})
	if DefaultErrorMapper(err) != EINVAL {
		t.Errorf("unaligned: NBD %v, want EINVAL", DefaultErrorMapper(err))
	}
}
