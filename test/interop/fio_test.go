package interop

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
)

// TestFioOverNBDZones drives img serve with fio's nbd engine: random 4 KiB
// writes with crc32c verify on the conventional zones, and sequential
// writes filling each sequential zone (one job per zone, iodepth 8, with
// verify). fio keeps 8 writes in flight on each connection: they are only
// accepted if the server applies writes to a zone in the order they arrive.
func TestFioOverNBDZones(t *testing.T) {
	fio := peer(t, "fio")
	dir := t.TempDir()
	img := filepath.Join(dir, "z.qcow2")
	const zs = 4 << 20
	mustZq(t, dir, "create", "-f", "qcow2", img, "-o", "size=32M,zone.mode=host-managed,zone.size=4M,zone.conventional_zones=4,zone.max_append_bytes=64k")
	s := serve(t, dir, "--shared", "8", "-t", img)
	args := []string{"--ioengine=nbd", "--uri=" + s.uri(), "--verify=crc32c", "--verify_fatal=1",
		"--verify_state_save=0", "--group_reporting", "--output-format=terse",
		// Random writes over the four conventional zones.
		"--name=conventional", "--rw=randwrite", "--bs=4k", "--offset=0", fmt.Sprintf("--size=%d", 4*zs), "--iodepth=8"}
	for z := 4; z < 8; z++ {
		args = append(args, fmt.Sprintf("--name=zone%d", z), "--rw=write", "--bs=64k", "--iodepth=8",
			fmt.Sprintf("--offset=%d", z*zs), fmt.Sprintf("--size=%d", zs))
	}
	r := run(t, dir, fio, args...)
	if r.code != 0 {
		t.Fatalf("fio over NBD on zones failed (exit %d):\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	if strings.Contains(r.stdout+r.stderr, "verify") && strings.Contains(r.stdout+r.stderr, "bad") {
		t.Fatalf("fio reports verify errors:\n%s", r.stdout+r.stderr)
	}
	s.stop(t)
	rep := mustZq(t, dir, "io", "-c", "zrp 0 8", img)
	lines := strings.Split(strings.TrimSpace(rep.stdout), "\n")
	if len(lines) != 8 {
		t.Fatalf("zrp: %q", rep.stdout)
	}
	for z := 4; z < 8; z++ {
		if !strings.Contains(lines[z], "zcond:14") {
			t.Fatalf("zone %d not FULL after fio filled it: %s", z, lines[z])
		}
	}
	mustZq(t, dir, "check", img)
}
