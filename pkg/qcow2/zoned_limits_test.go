package qcow2

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestZonedNrZonesLimit covers the spec §2 rule "nr_zones > 2^20": an image
// with exactly 2^20 zones is created and opens; one more zone is refused at
// create with the option at fault, and an image whose header claims
// 2^20 + 1 zones (every other field consistent with that) is refused at
// open with the field, its value and the rule.
func TestZonedNrZonesLimit(t *testing.T) {
	dir := t.TempDir()
	const zs = 4096
	// Exactly the limit: accepted.
	atLimit := filepath.Join(dir, "limit.qcow2")
	o := CreateOptions{Size: MaxZones * zs, ClusterSize: 65536, Zoned: &ZonedOptions{ZoneSize: u64(zs), MaxAppendBytes: u64(0)}}
	if _, err := Create(atLimit, o); err != nil {
		t.Fatalf("create with %d zones: %v", MaxZones, err)
	}
	im, err := Open(atLimit, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("open with %d zones: %v", MaxZones, err)
	}
	if n := im.Info().Zoned.NrZones; n != MaxZones {
		t.Fatalf("nr_zones %d, want %d", n, MaxZones)
	}
	im.Close()

	// One zone more at create.
	o.Size += zs
	_, err = Create(filepath.Join(dir, "over.qcow2"), o)
	var oe *OptionError
	const wantCreate = "size 4294971392 / zone.size gives 1048577 zones, more than the limit 1048576"
	if !errors.As(err, &oe) || oe.Name != "zone.size" || !strings.Contains(err.Error(), wantCreate) {
		t.Fatalf("create with %d zones: got %v\nwant an OptionError for zone.size containing %q", MaxZones+1, err, wantCreate)
	}

	// One zone more in an image's header. Create a valid image of the
	// right virtual size with few large zones, then rewrite the zone
	// fields so that they describe 2^20 + 1 zones of 1 KiB consistently
	// (nr_zones = ceil(size / zone_size), zonedmeta_size = 8 × nr_zones,
	// max_append_bytes + 512 < capacity): only the limit is broken.
	const small = 1024
	base := filepath.Join(dir, "base.qcow2")
	if _, err := Create(base, CreateOptions{Size: MaxZones*small + small, ClusterSize: 65536, Zoned: &ZonedOptions{ZoneSize: u64(1 << 20)}}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	const ext = 112 + 8 // the zoned extension's data: first after the header
	if binary.BigEndian.Uint32(b[112:]) != extZoned || binary.BigEndian.Uint32(b[116:]) != zonedLenA {
		t.Fatal("the zoned extension (layout A) is not the first extension")
	}
	be := binary.BigEndian
	be.PutUint64(b[ext+4:], small)           // zone_size
	be.PutUint64(b[ext+12:], small)          // zone_capacity
	be.PutUint32(b[ext+24:], MaxZones+1)     // nr_zones
	be.PutUint32(b[ext+36:], 0)              // max_append_bytes
	be.PutUint64(b[ext+40:], 8*(MaxZones+1)) // zonedmeta_size
	bad := filepath.Join(dir, "bad.qcow2")
	if err := os.WriteFile(bad, b, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = Open(bad, OpenOptions{ReadOnly: true})
	var fe *FormatError
	const wantOpen = "zoned extension: nr_zones = 1048577: must not exceed 1048576 (size / zone.size)"
	if !errors.As(err, &fe) || !strings.Contains(err.Error(), wantOpen) {
		t.Fatalf("open with nr_zones %d: got %v\nwant a FormatError containing %q", MaxZones+1, err, wantOpen)
	}
	if _, err := Check(bad, CheckOptions{}); err == nil || !strings.Contains(err.Error(), wantOpen) {
		t.Fatalf("check with nr_zones %d: got %v, want the same refusal", MaxZones+1, err)
	}
}
