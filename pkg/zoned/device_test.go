package zoned

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

func p64(v uint64) *uint64 { return &v }
func p32(v uint32) *uint32 { return &v }

// mkZoned creates a zoned image: nz zones of zs bytes, conv conventional.
func mkZoned(t testing.TB, nz, conv uint32, zs, zcap uint64, maxOpen, maxActive uint32) string {
	t.Helper()
	return mkZonedIn(t, t.TempDir(), nz, conv, zs, zcap, maxOpen, maxActive)
}

// memDir is a temporary directory on tmpfs when there is one: tests that
// fsync thousands of times (and do not test durability) run there.
func memDir(t testing.TB) string {
	d, err := os.MkdirTemp("/dev/shm", "zq-zoned-test")
	if err != nil {
		return t.TempDir()
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func mkZonedIn(t testing.TB, dir string, nz, conv uint32, zs, zcap uint64, maxOpen, maxActive uint32) string {
	t.Helper()
	path := filepath.Join(dir, fmt.Sprintf("z%d.qcow2", time.Now().UnixNano()))
	_, err := qcow2.Create(path, qcow2.CreateOptions{Size: uint64(nz) * zs, ClusterSize: 4096, Zoned: &qcow2.ZonedOptions{
		ZoneSize: p64(zs), ZoneCapacity: p64(zcap), ConventionalZones: p32(conv),
		MaxOpenZones: p32(maxOpen), MaxActiveZones: p32(maxActive), MaxAppendBytes: p64(8192),
	}})
	if err != nil {
		t.Fatal(err)
	}
	return path
}

func fill(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

func TestDeviceSemanticsAndReopen(t *testing.T) {
	const zs = 1 << 20
	path := mkZoned(t, 8, 1, zs, zs/2, 3, 4)
	d, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Conventional zone: random writes.
	if _, err := d.WriteAt(fill(1, 4096), 8192, false); err != nil {
		t.Fatal(err)
	}
	// Sequential zone 1: must be at the WP.
	if _, err := d.WriteAt(fill(2, 4096), zs+4096, false); !errors.Is(err, ErrNotAtWritePointer) || Errno(err) != syscall.EIO {
		t.Fatalf("write off the WP: %v", err)
	}
	if _, err := d.WriteAt(fill(2, 8192), zs, false); err != nil {
		t.Fatal(err)
	}
	off, err := d.Append(1, fill(3, 4096), false)
	if err != nil || off != zs+8192 {
		t.Fatalf("append: off %d err %v", off, err)
	}
	// Reads past the WP are zeros; data before it is there.
	buf := make([]byte, 16384)
	if _, err := d.ReadAt(buf, zs); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf[:8192], fill(2, 8192)) || !bytes.Equal(buf[8192:12288], fill(3, 4096)) || !bytes.Equal(buf[12288:], make([]byte, 4096)) {
		t.Fatal("zone 1 contents wrong")
	}
	// Writes past capacity fail; finish makes the zone FULL.
	if err := d.Mgmt(OpFinish, 2*zs, zs); err != nil {
		t.Fatal(err)
	}
	if r := d.Report(2, 1)[0]; r.Cond != CondFull {
		t.Fatalf("finish: %+v", r)
	}
	// Zone 3 written then reset: reads zeros, WP at start.
	d.WriteAt(fill(4, 4096), 3*zs, false)
	if err := d.Mgmt(OpReset, 3*zs, zs); err != nil {
		t.Fatal(err)
	}
	d.ReadAt(buf[:4096], 3*zs)
	if !bytes.Equal(buf[:4096], make([]byte, 4096)) {
		t.Fatal("reset zone does not read zeros")
	}
	// TRIM of a whole zone resets it; partial TRIM is ignored.
	d.WriteAt(fill(5, 4096), 4*zs, false)
	if err := d.Trim(4*zs, 4096); err != nil {
		t.Fatal(err)
	}
	if r := d.Report(4, 1)[0]; r.WP != 4*zs+4096 {
		t.Fatalf("partial trim changed the zone: %+v", r)
	}
	if err := d.Trim(4*zs, zs); err != nil {
		t.Fatal(err)
	}
	if r := d.Report(4, 1)[0]; r.WP != 4*zs || r.Cond != CondEmpty {
		t.Fatalf("whole-zone trim did not reset: %+v", r)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path + liveSuffix); !os.IsNotExist(err) {
		t.Fatalf("live table left after a clean close: %v", err)
	}
	// Reopen: WPs persisted, partially written zone 1 is CLOSED.
	d, err = Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	r := d.Report(0, 4)
	if r[1].WP != zs+12288 || r[1].Cond != CondClosed || r[2].Cond != CondFull || r[3].Cond != CondEmpty || r[0].Cond != CondNotWP {
		t.Fatalf("after reopen: %+v", r)
	}
	res, err := qcow2.Check(path, qcow2.CheckOptions{})
	if err != nil || res.ExitCode() != 0 {
		t.Fatalf("check: %+v %v", res, err)
	}
}

// TestOpenClampsLimits: an image whose header has zone limits above what
// the geometry allows (written by another tool) opens with the limits
// clamped as spec §2 says, the device enforces the clamped limits, says
// what it changed in Warnings, and leaves the header alone.
func TestOpenClampsLimits(t *testing.T) {
	const zs = 64 << 10
	path := mkZoned(t, 8, 1, zs, zs, 0, 0)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ext := bytes.Index(b[:4096], []byte{0x00, 0x7a, 0x62, 0x64}) + 8
	if ext < 8 {
		t.Fatal("no zoned extension in the first cluster")
	}
	binary.BigEndian.PutUint32(b[ext+28:], 100) // max_active_zones
	binary.BigEndian.PutUint32(b[ext+32:], 50)  // max_open_zones
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatalf("open with max_active_zones 100 on 8 zones: %v", err)
	}
	g := d.Geometry()
	want := []string{
		"zone.max_active_zones=100 exceeds the number of zones 8; using 8",
		"zone.max_open_zones=50 exceeds the number of sequential zones 7; using 7",
	}
	if g.MaxActive != 8 || g.MaxOpen != 7 || fmt.Sprint(d.Warnings()) != fmt.Sprint(want) {
		t.Fatalf("max_active %d max_open %d warnings %q, want 8, 7, %q", g.MaxActive, g.MaxOpen, d.Warnings(), want)
	}
	// All seven sequential zones can be open at once; the limits are real.
	for z := 1; z < 8; z++ {
		if err := d.Mgmt(OpOpen, uint64(z)*zs, zs); err != nil {
			t.Fatalf("open zone %d: %v", z, err)
		}
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	im, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if z := im.Info().Zoned; z.MaxActiveZones != 100 || z.MaxOpenZones != 50 {
		t.Fatalf("the header changed: max_active %d max_open %d", z.MaxActiveZones, z.MaxOpenZones)
	}
}
