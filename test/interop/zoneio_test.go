package interop

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
)

// seedImage creates the seed's zoned image (12 sequential zones of 64 MiB,
// max_open 6, max_active 8, max_append 4096) in a new directory.
func seedImage(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	mustZq(t, dir, seedCreate...)
	return dir
}

// zrpLine is one line of qemu-io's zone_report for a zone of the seed
// image: addresses in 512-byte sectors, condition and type in decimal.
func zrpLine(zone int, wp uint64, cond int) string {
	start := uint64(zone) * seedZoneSize
	return fmt.Sprintf("start: 0x%x, len 0x%x, cap 0x%x, wptr 0x%x, zcond:%d, [type: 2]",
		start>>9, seedZoneSize>>9, seedZoneSize>>9, wp>>9, cond)
}

// zoneIO runs "zq-csi img io" with one -c per command and returns stdout's
// lines, failing the test unless the exit status is want.
func zoneIO(t *testing.T, dir string, want int, cmds ...string) []string {
	t.Helper()
	args := []string{"io"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	r := zq(t, dir, append(args, "zbc.qcow2")...)
	if r.code != want {
		t.Fatalf("img io %q: exit %d, want %d\n%v", cmds, r.code, want, r)
	}
	return strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n")
}

// linesWith keeps the lines that are neither qemu-io's I/O statistics nor
// empty, which is what the zone commands print.
func linesWith(lines []string) []string {
	var out []string
	for _, l := range lines {
		if strings.HasPrefix(l, "wrote ") || strings.HasPrefix(l, "read ") || strings.Contains(l, " ops; ") || l == "" {
			continue
		}
		out = append(out, l)
	}
	return out
}

func diffLines(t *testing.T, what string, got, want []string) {
	t.Helper()
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("%s:\n got:\n%s\nwant:\n%s", what, strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestImgIOZoneCommands drives the seed image through qemu-io's zone
// commands and checks their output line for line: zone reports in sectors,
// writes accepted at the write pointer and refused off it with EIO (as
// qemu-io prints it for a zoned device), zone append returning the sector
// written, management commands and their Linux errnos, reset-all.
func TestImgIOZoneCommands(t *testing.T) {
	dir := seedImage(t)
	const z = seedZoneSize

	var want []string
	for i := 0; i < seedNrZones; i++ {
		want = append(want, zrpLine(i, uint64(i)*z, 1))
	}
	diffLines(t, "zrp 0 12 of a new image", zoneIO(t, dir, 0, "zrp 0 12"), want)
	diffLines(t, "zrp past the last zone", linesWith(zoneIO(t, dir, 0, "zrp 704M 100", "zrp 768M 1")), want[11:])

	out := linesWith(zoneIO(t, dir, 1,
		"write -P 0x11 0 64k", // at the WP: implicitly opens zone 0
		"write -P 0x22 0 4k",  // behind the WP
		"write -P 0x22 128k 4k",
		"write -P 0x22 63M 2M", // crosses into zone 1
		"read -P 0x11 0 64k",   // the refused writes changed nothing
		"read -P 0 64k 64k",    // past the WP reads zeros
		"zrp 0 2",
		"zap -p 64M 4k",
		"zap -p 64M 2k 2k",
		"zap -p 100M 512", // any offset in the zone appends to it
		"zap 64M 8k",      // above max_append_bytes
		"zrp 64M 1",
		"zf 128M 64M", // EMPTY → FULL
		"zo 128M 64M", // open a FULL zone
		"zrs 128M 1M", // not a whole zone
		"zc 0 64M",    // IMP_OPEN → CLOSED
		"zrp 0 3",
		"zrs 0 768M", // reset all
		"zrp 0 3",
	))
	diffLines(t, "zone commands", out, []string{
		"write failed: Input/output error",
		"write failed: Input/output error",
		"write failed: Input/output error",
		zrpLine(0, 64<<10, 2),
		zrpLine(1, z, 1),
		"After zap done, the append sector is 0x20000",
		"After zap done, the append sector is 0x20008",
		"After zap done, the append sector is 0x20010",
		"zone append failed: Input/output error",
		zrpLine(1, z+8192+512, 2),
		"zone open failed: Invalid argument",
		"zone reset failed: Invalid argument",
		zrpLine(0, 64<<10, 4),
		zrpLine(1, z+8192+512, 2),
		zrpLine(2, 3*z, 0xe), // a FULL zone's WP is reported at its end
		zrpLine(0, 0, 1),
		zrpLine(1, z, 1),
		zrpLine(2, 2*z, 1),
	})
}

// TestImgIOZoneResources: explicit opens beyond max_open_zones fail with
// the open-resource errno (ETOOMANYREFS) and beyond max_active_zones with
// the active-resource errno (EOVERFLOW), worded as glibc's strerror.
func TestImgIOZoneResources(t *testing.T) {
	dir := seedImage(t)
	out := linesWith(zoneIO(t, dir, 1,
		"zo 0 384M",                      // zones 0-5 EXP_OPEN: 6 open, 6 active
		"zo 384M 64M",                    // a 7th open zone, no implicitly open one to close
		"zc 0 128M",                      // zones 0, 1 → EMPTY (WP at start): 4 open, 4 active
		"write 384M 4k", "write 448M 4k", // zones 6, 7 IMP_OPEN: 6 open
		"zc 384M 128M",               // → CLOSED: 4 open, 6 active
		"write 0 4k", "write 64M 4k", // zones 0, 1 IMP_OPEN: 6 open, 8 active
		"zo 512M 64M", // a 9th active zone
		"write 512M 4k",
		"zrp 0 9",
	))
	diffLines(t, "resource errors", out, []string{
		"zone open failed: Too many references: cannot splice (max_open_zones=6 reached: all 6 open zones are explicitly open, none can be closed implicitly)",
		"zone open failed: Value too large for defined data type (max_active_zones=8 reached: 6 open, 2 closed: zones 0 IMP_OPEN, 1 IMP_OPEN, 2 EXP_OPEN, 3 EXP_OPEN, 4 EXP_OPEN, 5 EXP_OPEN, 6 CLOSED, 7 CLOSED)",
		"write failed: Value too large for defined data type (max_active_zones=8 reached: 6 open, 2 closed: zones 0 IMP_OPEN, 1 IMP_OPEN, 2 EXP_OPEN, 3 EXP_OPEN, 4 EXP_OPEN, 5 EXP_OPEN, 6 CLOSED, 7 CLOSED)",
		zrpLine(0, 4096, 2), zrpLine(1, seedZoneSize+4096, 2),
		zrpLine(2, 2*seedZoneSize, 3), zrpLine(3, 3*seedZoneSize, 3),
		zrpLine(4, 4*seedZoneSize, 3), zrpLine(5, 5*seedZoneSize, 3),
		zrpLine(6, 6*seedZoneSize+4096, 4), zrpLine(7, 7*seedZoneSize+4096, 4),
		zrpLine(8, 8*seedZoneSize, 1),
	})
}

// TestImgIOZoneStateAcrossProcesses: several -c commands share one open
// device, so open zones are visible between them; open zones live in
// memory only, so the next process sees a partially written zone CLOSED
// and an explicitly opened empty one EMPTY (spec §4).
func TestImgIOZoneStateAcrossProcesses(t *testing.T) {
	dir := seedImage(t)
	out := zoneIO(t, dir, 0, "write -q 64M 64k", "zo 128M 64M", "zrp 64M 2")
	diffLines(t, "same process", out, []string{
		zrpLine(1, seedZoneSize+64<<10, 2), zrpLine(2, 2*seedZoneSize, 3)})
	out = zoneIO(t, dir, 0, "zrp 64M 2", "read -q -P 0xcd 64M 64k")
	diffLines(t, "next process", out, []string{
		zrpLine(1, seedZoneSize+64<<10, 4), zrpLine(2, 2*seedZoneSize, 1)})
	// The reopened CLOSED zone takes writes at its WP again.
	zoneIO(t, dir, 0, "write -q 65600k 4k", "write -q 65604k 4k")
	if r := zq(t, dir, "check", "zbc.qcow2"); r.code != 0 {
		t.Errorf("img check: %v", r)
	}
}

// TestImgIOZoneCommandsElsewhere: zone commands on an image without zones
// fail as qemu-io's do on a device without zone support, and read-only
// sessions refuse zone management.
func TestImgIOZoneCommandsElsewhere(t *testing.T) {
	dir := t.TempDir()
	mustZq(t, dir, "create", "-f", "qcow2", "plain.qcow2", "1M")
	r := zq(t, dir, "io", "-c", "zrp 0 1", "-c", "zo 0 64k", "-c", "zap -p 0 4k", "plain.qcow2")
	diffLines(t, "plain image", strings.Split(strings.TrimSpace(r.stdout), "\n"), []string{
		"zone report failed: Operation not supported",
		"zone open failed: Operation not supported",
		"zone append failed: Operation not supported",
	})
	if r.code != 1 {
		t.Errorf("exit %d, want 1", r.code)
	}
	dir = seedImage(t)
	r = zq(t, dir, "io", "-r", "-c", "zrs 0 768M", "-c", "zrp 0 1", "zbc.qcow2")
	if r.code != 1 || !strings.Contains(r.stderr, "read-only") || strings.TrimSpace(r.stdout) != zrpLine(0, 0, 1) {
		t.Errorf("read-only zrs: %v", r)
	}
	r = zq(t, dir, "io", "-c", "zrp 0 4294967296", "zbc.qcow2")
	if r.code != 1 || strings.TrimSpace(r.stdout) != "Number of zones must be less than 2^32" {
		t.Errorf("zrp with 2^32 zones: %v", r)
	}
}

// TestImgInfoZones: img info shows how many zones are in each condition as
// the engine sees the image on opening it, and --output=json lists every
// zone with Linux's type and condition codes.
func TestImgInfoZones(t *testing.T) {
	dir := seedImage(t)
	zoneIO(t, dir, 0, "write -q 0 64k", "zf 64M 64M", "zo 128M 64M")
	var info struct {
		Zoned struct {
			Conditions map[string]int `json:"zone-conditions"`
			Zones      []struct {
				Start, Length, Capacity, WP uint64
				Type                        string
				TypeCode                    int    `json:"type-code"`
				Condition                   string `json:"condition"`
				ConditionCode               int    `json:"condition-code"`
			} `json:"zones"`
		} `json:"zoned"`
	}
	r := mustZq(t, dir, "info", "--output=json", "zbc.qcow2")
	if err := json.Unmarshal([]byte(r.stdout), &info); err != nil {
		t.Fatalf("%v\n%s", err, r.stdout)
	}
	wantConds := map[string]int{"empty": 10, "imp-open": 0, "exp-open": 0, "closed": 1, "full": 1, "not-wp": 0}
	if fmt.Sprint(info.Zoned.Conditions) != fmt.Sprint(wantConds) {
		t.Errorf("zone-conditions %v, want %v", info.Zoned.Conditions, wantConds)
	}
	if len(info.Zoned.Zones) != seedNrZones {
		t.Fatalf("%d zones listed, want %d", len(info.Zoned.Zones), seedNrZones)
	}
	for i, z := range info.Zoned.Zones {
		start := uint64(i) * seedZoneSize
		wp, cond, code := start, "EMPTY", 1
		switch i {
		case 0:
			wp, cond, code = 64<<10, "CLOSED", 4
		case 1:
			wp, cond, code = start+seedZoneSize, "FULL", 0xe
		}
		if z.Start != start || z.Length != seedZoneSize || z.Capacity != seedZoneSize || z.WP != wp ||
			z.Type != "SEQWRITE_REQ" || z.TypeCode != 2 || z.Condition != cond || z.ConditionCode != code {
			t.Errorf("zone %d: %+v, want wp %#x %s (%d)", i, z, wp, cond, code)
		}
	}
	human := mustZq(t, dir, "info", "zbc.qcow2").stdout
	for _, s := range []string{"zone conditions:\n            EMPTY: 10\n", "CLOSED: 1\n", "FULL: 1\n", "NOT_WP: 0\n"} {
		if !strings.Contains(human, s) {
			t.Errorf("img info lacks %q:\n%s", s, human)
		}
	}
	if m, _ := filepath.Glob(filepath.Join(dir, "*.wplive")); len(m) != 0 {
		t.Errorf("img info left %v behind", m)
	}
}
