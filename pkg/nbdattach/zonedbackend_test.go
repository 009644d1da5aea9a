package nbdattach

import (
	"path/filepath"
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
