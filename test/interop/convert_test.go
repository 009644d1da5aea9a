package interop

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestConvertRefusesItsInput (issue 13): `img convert` into its own input
// (the same path, a symbolic or hard link, or a file of the input's
// backing chain) is refused before anything is written; it used to
// truncate the source to 256 KiB.
func TestConvertRefusesItsInput(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "s.qcow2", "16M")
	mustRun(t, dir, "qemu-io", "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 8M 64k", "s.qcow2")
	mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "-b", "s.qcow2", "-F", "qcow2", "top.qcow2")
	if err := os.Symlink("s.qcow2", filepath.Join(dir, "sym.qcow2")); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(filepath.Join(dir, "s.qcow2"), filepath.Join(dir, "hard.qcow2")); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(filepath.Join(dir, "s.qcow2"))
	for _, args := range [][]string{
		{"convert", "-O", "qcow2", "s.qcow2", "s.qcow2"},
		{"convert", "-O", "raw", "s.qcow2", "./s.qcow2"},
		{"convert", "-O", "qcow2", "s.qcow2", "sym.qcow2"},
		{"convert", "-O", "qcow2", "sym.qcow2", "hard.qcow2"},
		{"convert", "-O", "qcow2", "top.qcow2", "s.qcow2"},
	} {
		r := zq(t, dir, args...)
		if r.code != 1 || !strings.Contains(r.stderr, "same inode") {
			t.Errorf("img %s: want a refusal naming the same inode, got %v", strings.Join(args, " "), r)
		}
		if now, _ := os.ReadFile(filepath.Join(dir, "s.qcow2")); !bytes.Equal(now, before) {
			t.Fatalf("img %s changed the source", strings.Join(args, " "))
		}
	}
	mustRun(t, dir, "qemu-img", "check", "s.qcow2")
	mustRun(t, dir, "qemu-io", "-r", "-c", "read -P 0xab 0 1M", "-c", "read -P 0xcd 8M 64k", "s.qcow2")
	leftovers(t, dir)
}

// leftovers fails if a convert left a temporary file behind.
func leftovers(t *testing.T, dir string) {
	t.Helper()
	if m, _ := filepath.Glob(filepath.Join(dir, ".*.convert-*")); len(m) > 0 {
		t.Errorf("temporary files left: %v", m)
	}
}

// TestConvertReplacesOutputAtTheEnd (issue 13): an existing output is
// replaced only by a finished copy; a convert refused after its checks
// leaves it as it was (it used to be truncated before the copy).
func TestConvertReplacesOutputAtTheEnd(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "src.qcow2", "32M")
	mustRun(t, dir, "qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 13M 64k", "src.qcow2")
	mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "out.qcow2", "4M")
	mustRun(t, dir, "qemu-io", "-c", "write -P 0x99 0 64k", "out.qcow2")
	before, _ := os.ReadFile(filepath.Join(dir, "out.qcow2"))
	// 13M lies past the 4M capacity of zone 1 [8M, 16M): refused after
	// the source was opened and the options parsed.
	r := zq(t, dir, "convert", "-O", "qcow2", "-o", "zone.mode=host-managed,zone.size=8M,zone.capacity=4M", "src.qcow2", "out.qcow2")
	if r.code != 1 || !strings.Contains(r.stderr, "data at offset 13631488, in zone 1 past its capacity") {
		t.Errorf("convert with data past a zone's capacity: %v", r)
	}
	if now, _ := os.ReadFile(filepath.Join(dir, "out.qcow2")); !bytes.Equal(now, before) {
		t.Fatal("the refused convert changed the existing output")
	}
	leftovers(t, dir)
	mustZq(t, dir, "convert", "-O", "qcow2", "src.qcow2", "out.qcow2")
	if r := run(t, dir, "qemu-img", "compare", "src.qcow2", "out.qcow2"); r.code != 0 || r.stdout != "Images are identical.\n" {
		t.Errorf("qemu-img compare after the convert: %v", r)
	}
	mustRun(t, dir, "qemu-img", "check", "out.qcow2")
	leftovers(t, dir)
}

type zoneInfo struct {
	Start, WP uint64
	Condition string
}

func zonesOf(t *testing.T, dir, img string) []zoneInfo {
	t.Helper()
	var info struct {
		Zoned struct {
			Zones []struct {
				Start     uint64 `json:"start"`
				WP        uint64 `json:"wp"`
				Condition string `json:"condition"`
			} `json:"zones"`
		} `json:"zoned"`
	}
	r := mustZq(t, dir, "info", "--output=json", img)
	if err := json.Unmarshal([]byte(r.stdout), &info); err != nil {
		t.Fatalf("img info --output=json %s: %v", img, err)
	}
	var out []zoneInfo
	for _, z := range info.Zoned.Zones {
		out = append(out, zoneInfo{z.Start, z.WP, z.Condition})
	}
	return out
}

// TestConvertIntoZoned (issue 13): in each sequential zone of a zoned
// output the write pointer goes to the end of the data copied into it
// (rounded up to a sector), so the data reads back; conventional zones
// copy as they are; what the zone rules cannot hold is refused.
func TestConvertIntoZoned(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	const m = 1 << 20
	mustRun(t, dir, "qemu-img", "create", "-f", "raw", "src.raw", "128M")
	mustRun(t, dir, "qemu-io", "-f", "raw",
		"-c", "write -P 0x01 1M 64k", // zone 0 (conventional)
		"-c", "write -P 0x02 16M 4M", // zone 1: from its start
		"-c", "write -P 0x03 40M 4k", // zone 2: a hole first, then data
		"-c", "write -P 0x04 41M 100", // ... and a last write not sector aligned
		"-c", "write -P 0x05 48M 16M", // zone 3: full
		// zone 4 [64M, 80M): empty
		"-c", "write -P 0x06 127M 1M", // zone 7: its last megabyte
		"src.raw")
	opts := "zone.mode=host-managed,zone.size=16M,zone.conventional_zones=1,zone.max_append_bytes=4096"
	mustZq(t, dir, "convert", "-f", "raw", "-O", "qcow2", "-o", opts, "src.raw", "z.qcow2")

	if r := zq(t, dir, "compare", "-f", "raw", "src.raw", "z.qcow2"); r.code != 0 || r.stdout != "Images are identical.\n" {
		t.Errorf("img compare src.raw z.qcow2: %v", r)
	}
	// The same verdict from qemu-img, on the zoned image converted back.
	mustZq(t, dir, "convert", "-O", "raw", "z.qcow2", "back.raw")
	if r := run(t, dir, "qemu-img", "compare", "-f", "raw", "-F", "raw", "src.raw", "back.raw"); r.code != 0 {
		t.Errorf("qemu-img compare src.raw back.raw: %v", r)
	}
	want := []zoneInfo{
		{0, 0, "NOT_WP"},
		{16 * m, 20 * m, "CLOSED"},
		{32 * m, 41*m + 512, "CLOSED"},
		{48 * m, 64 * m, "FULL"},
		{64 * m, 64 * m, "EMPTY"},
		{80 * m, 80 * m, "EMPTY"},
		{96 * m, 96 * m, "EMPTY"},
		{112 * m, 128 * m, "FULL"},
	}
	got := zonesOf(t, dir, "z.qcow2")
	if len(got) != len(want) {
		t.Fatalf("zones %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("zone %d: %+v, want %+v", i, got[i], want[i])
		}
	}
	if r := zq(t, dir, "check", "z.qcow2"); r.code != 0 {
		t.Errorf("img check z.qcow2: %v", r)
	}
	// The zones are writable where the pointers say: zone 2 goes on at
	// its pointer, a write below it is refused.
	mustZq(t, dir, "io", "-c", "write -P 0x07 "+strconv.Itoa(41*m+512)+" 4k", "z.qcow2")
	if r := zq(t, dir, "io", "-c", "write -P 0x07 40M 4k", "z.qcow2"); !strings.Contains(r.stdout, "write failed: Input/output error") {
		t.Errorf("write below the pointer: %v", r)
	}

	// A zoned source with the same layout keeps its pointers, even over
	// zeros it wrote.
	mustZq(t, dir, "create", "-f", "qcow2", "-o", opts, "zsrc.qcow2", "128M")
	mustZq(t, dir, "io", "-c", "write -P 0 16M 1M", "-c", "write -P 0x08 32M 4k", "zsrc.qcow2")
	mustZq(t, dir, "convert", "-O", "qcow2", "-o", opts, "zsrc.qcow2", "z2.qcow2")
	if z := zonesOf(t, dir, "z2.qcow2"); z[1].WP != 17*m || z[2].WP != 32*m+4096 {
		t.Errorf("zones from a zoned source: %+v, want zone 1 at 17M and zone 2 at 32M+4k", z[:3])
	}
	if r := zq(t, dir, "compare", "zsrc.qcow2", "z2.qcow2"); r.code != 0 {
		t.Errorf("img compare zsrc.qcow2 z2.qcow2: %v", r)
	}

	// Refused: more partially written zones than max_active_zones.
	r := zq(t, dir, "convert", "-f", "raw", "-O", "qcow2", "-o", opts+",zone.max_active_zones=1", "src.raw", "z3.qcow2")
	if r.code != 1 || !strings.Contains(r.stderr, "zone.max_active_zones=1: the copy leaves 2 sequential zones partially written") {
		t.Errorf("convert over max_active_zones: %v", r)
	}
	if _, err := os.Stat(filepath.Join(dir, "z3.qcow2")); !os.IsNotExist(err) {
		t.Errorf("the refused convert left z3.qcow2: %v", err)
	}
	leftovers(t, dir)
}

// TestCompareAsQemu: `img compare` says what `qemu-img compare` says, with
// its exit codes, on images qemu can read.
func TestCompareAsQemu(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "a.qcow2", "4M")
	mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "b.qcow2", "8M")
	mustRun(t, dir, "qemu-io", "-c", "write -P 1 1000 10", "a.qcow2")
	steps := []struct{ io string }{
		{""}, // b lacks a's data: mismatch in the first sector that differs
		{"write -P 1 1000 10"},
		{"write -P 0 6M 10"}, // zeros past a's end: still identical
		{"write -P 9 6M 10"}, // data past a's end
		{"write -P 9 2M 10"}, // and a difference in the common part
	}
	for _, st := range steps {
		if st.io != "" {
			mustRun(t, dir, "qemu-io", "-c", st.io, "b.qcow2")
		}
		for _, args := range [][]string{{"a.qcow2", "b.qcow2"}, {"-s", "a.qcow2", "b.qcow2"}, {"b.qcow2", "a.qcow2"}} {
			q := run(t, dir, "qemu-img", append([]string{"compare"}, args...)...)
			z := zq(t, dir, append([]string{"compare"}, args...)...)
			if q.code != z.code || q.stdout != z.stdout {
				t.Errorf("after %q, compare %v: qemu-img %v\nzq-csi %v", st.io, args, q, z)
			}
		}
	}
}
