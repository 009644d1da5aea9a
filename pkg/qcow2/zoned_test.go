package qcow2

import (
	"encoding/binary"
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

// TestZonedValidationRules corrupts one field of a seed-layout image per
// rule of spec §2 and checks the exact refusal.
func TestZonedValidationRules(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	o := seedOptions()
	o.Size, o.ClusterSize = 64<<20, 65536
	o.Zoned.ZoneSize, o.Zoned.ZoneCapacity = u64(4<<20), u64(4<<20)
	o.Zoned.ConventionalZones = u32(1)
	if _, err := Create(base, o); err != nil {
		t.Fatal(err)
	}
	orig, _ := os.ReadFile(base)
	const ext = 112 + 8 // the zoned extension's data: first after the header
	if binary.BigEndian.Uint32(orig[112:]) != extZoned {
		t.Fatal("zoned extension is not the first extension")
	}
	put32 := func(off int, v uint32) func([]byte) { return func(b []byte) { binary.BigEndian.PutUint32(b[off:], v) } }
	put64 := func(off int, v uint64) func([]byte) { return func(b []byte) { binary.BigEndian.PutUint64(b[off:], v) } }
	metaOff := binary.BigEndian.Uint64(orig[ext+48:])
	wp := func(zone int, v uint64) func([]byte) {
		return func(b []byte) { binary.LittleEndian.PutUint64(b[metaOff+uint64(zone)*8:], v) }
	}
	for _, tc := range []struct {
		name string
		mut  func([]byte)
		want string
	}{
		{"zone size 0", put64(ext+4, 0), "zone.size = 0: must not be 0"},
		{"zone size not a power of two", put64(ext+4, 3<<20), "zone.size = 3145728: must be a power of two"},
		{"zone size below 512", put64(ext+4, 256), "zone.size = 256: must be a multiple of 512"},
		{"capacity 0", put64(ext+12, 0), "zone.capacity = 0: must not be 0"},
		{"capacity above size", put64(ext+12, 8<<20), "zone.capacity = 8388608: must not exceed zone.size (4194304)"},
		{"capacity unaligned", put64(ext+12, 4<<20-100), "zone.capacity = 4194204: must be a multiple of 512"},
		{"nr_zones wrong", put32(ext+24, 17), "nr_zones = 17: nr_zones field is wrong: must be ceil(size 67108864 / zone.size 4194304) = 16"},
		{"conventional >= nr_zones", put32(ext+20, 16), "zone.conventional_zones = 16: must be less than the number of zones (16)"},
		{"max append unaligned", put32(ext+36, 1000), "zone.max_append_bytes = 1000: must be a multiple of 512"},
		{"max append too large", put32(ext+36, 4<<20), "zone.max_append_bytes = 4194304: must be less than zone.capacity (4194304) minus 512"},
		{"meta size", put64(ext+40, 64), "zonedmeta_size = 64: must be 8 × nr_zones = 128"},
		{"table outside the file", put64(ext+48, 1<<30), "write-pointer table at 1073741824 (+128 bytes) lies beyond the end of the file"},
		{"table unaligned", put64(ext+48, metaOff+8), "write-pointer table offset " + strconv.FormatUint(metaOff+8, 10) + " is not cluster aligned"},
		{"table over the header", put64(ext+48, 0), "write-pointer table at offset 0 overlaps the header"},
		{"table over the L1 table", put64(ext+48, binary.BigEndian.Uint64(orig[offL1Offset:])), "write-pointer table at " + strconv.FormatUint(binary.BigEndian.Uint64(orig[offL1Offset:]), 10) + " overlaps the L1 table"},
		{"table over the refcount table", put64(ext+48, 65536), "write-pointer table at 65536 overlaps the refcount table at 65536"},
		{"conventional flag missing", wp(0, 0), "zone 0: conventional flag false disagrees with conventional_zones 1"},
		{"conventional flag extra", wp(1, 1<<59|4<<20), "zone 1: conventional flag true disagrees with conventional_zones 1"},
		{"wp below zone start", wp(2, 4<<20), "zone 2: write pointer 4194304 outside [8388608, 12582912] or not 512-aligned"},
		{"wp past capacity", wp(2, 12<<20+512), "zone 2: write pointer 12583424 outside [8388608, 12582912] or not 512-aligned"},
		{"wp unaligned", wp(2, 8<<20+100), "zone 2: write pointer 8388708 outside [8388608, 12582912] or not 512-aligned"},
		{"model 0", func(b []byte) { b[ext] = 0 }, "zoned extension with zoned=0 (not zoned) but incompatible bit 5 set"},
		{"model 2", func(b []byte) { b[ext] = 2 }, "zone model 2 (only 1, host-managed, exists)"},
		{"reserved bytes", func(b []byte) { b[ext+2] = 1 }, "zoned extension reserved bytes 1-3 are not zero"},
		{"unknown length", put32(112+4, 40), "zoned extension of 40 bytes is not a known layout (56, 48 or 44 bytes)"},
		{"bit without extension", put32(112, 0x11111111), "zoned format bit 5 set but the image has no zoned extension"},
		{"extension without bit", func(b []byte) { b[79] &^= 1 << 5 }, "zoned extension present but incompatible bit 5 (zoned format) is clear"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := append([]byte(nil), orig...)
			tc.mut(b)
			p := filepath.Join(dir, "bad.qcow2")
			os.WriteFile(p, b, 0o644)
			_, err := Open(p, OpenOptions{ReadOnly: true})
			var fe *FormatError
			if !errors.As(err, &fe) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v\nwant an error containing %q", err, tc.want)
			}
		})
	}
}

func TestSetZoneLimits(t *testing.T) {
	path := filepath.Join(t.TempDir(), "z.qcow2")
	if _, err := Create(path, seedOptions()); err != nil {
		t.Fatal(err)
	}
	im, _ := Open(path, OpenOptions{})
	if err := im.SetZoneLimits(9, 8); !errors.Is(err, ErrInvalidOption) {
		t.Fatalf("max_open > max_active accepted: %v", err)
	}
	if err := im.SetZoneLimits(3, 5); err != nil {
		t.Fatal(err)
	}
	im.Close()
	im, _ = Open(path, OpenOptions{ReadOnly: true})
	defer im.Close()
	if z := im.Info().Zoned; z.MaxOpenZones != 3 || z.MaxActiveZones != 5 {
		t.Fatalf("limits not persisted: %+v", z)
	}
}

// TestSetZoneLimitsRefusesBelowActiveZones: lowering max_active_zones below
// the number of partially written zones would leave an image the zone
// engine refuses to restore; the change is refused with the parameter, the
// value and the rule, and the header keeps the old limits. Zones that are
// empty or full do not count.
func TestSetZoneLimitsRefusesBelowActiveZones(t *testing.T) {
	path := filepath.Join(t.TempDir(), "z.qcow2")
	o := seedOptions() // 12 sequential zones of 64 MiB, max_open 6, max_active 8
	if _, err := Create(path, o); err != nil {
		t.Fatal(err)
	}
	im, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	zs := *o.Zoned.ZoneSize
	for i := uint32(0); i < 4; i++ { // zones 0-3 partially written
		if err := im.SetWritePointer(i, uint64(i)*zs+4096); err != nil {
			t.Fatal(err)
		}
	}
	if err := im.SetWritePointer(5, 6*zs); err != nil { // zone 5 full
		t.Fatal(err)
	}
	err = im.SetZoneLimits(2, 3)
	var oe *OptionError
	if !errors.As(err, &oe) || oe.Name != "zone.max_active_zones" || oe.Value != "3" ||
		!strings.Contains(oe.Rule, "4 zones are partially written") || !strings.Contains(oe.Rule, "at least 4") {
		t.Fatalf("max_active 3 with 4 active zones: got %v", err)
	}
	if err := im.SetZoneLimits(7, 6); !errors.As(err, &oe) || oe.Name != "zone.max_open_zones" || oe.Value != "7" {
		t.Fatalf("max_open 7 > max_active 6: got %v", err)
	}
	if err := im.SetZoneLimits(4, 4); err != nil {
		t.Fatalf("max_active 4 with 4 active zones (one full, not counted): %v", err)
	}
	if err := im.SetZoneLimits(0, 0); err != nil {
		t.Fatalf("no limits: %v", err)
	}
	if err := im.SetZoneLimits(2, 3); err == nil {
		t.Fatal("refusal must not depend on the current limit")
	}
	im.Close()
	im, err = Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if z := im.Info().Zoned; z.MaxOpenZones != 0 || z.MaxActiveZones != 0 {
		t.Fatalf("refused changes reached the header: %+v", z)
	}
}
