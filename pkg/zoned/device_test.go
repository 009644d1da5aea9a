package zoned

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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

// stamp fills a 512-byte sector so that it names its own offset and the
// write sequence number that put it there.
func stamp(b []byte, off, seq uint64) {
	for s := 0; s < len(b); s += 512 {
		binary.LittleEndian.PutUint64(b[s:], off+uint64(s))
		binary.LittleEndian.PutUint64(b[s+8:], seq)
		for k := 16; k < 512; k++ {
			b[s+k] = byte(seq + uint64(k))
		}
	}
}

const crashChildEnv = "ZQ_ZONED_CRASH_CHILD"

// TestCrashChild is the child of TestKill9ZoneWorkload: a random zone
// workload that prints what was acknowledged.
func TestCrashChild(t *testing.T) {
	path := os.Getenv(crashChildEnv)
	if path == "" {
		t.Skip("helper process for TestKill9ZoneWorkload; runs only when that test starts it")
	}
	d, err := Open(path, OpenOptions{})
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	g := d.Geometry()
	out := bufio.NewWriter(os.Stdout)
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	buf := make([]byte, 64<<10)
	for seq := uint64(1); ; seq++ {
		z := int(g.Conventional) + rng.Intn(int(g.SequentialZones()))
		r := d.Report(z, 1)[0]
		switch k := rng.Intn(40); {
		case k == 0:
			// Announced first: a reset cut short by the kill may or may
			// not have taken effect.
			fmt.Fprintf(out, "TRY-RESET %d\n", z)
			out.Flush()
			if d.Mgmt(OpReset, r.Start, r.Len) == nil {
				fmt.Fprintf(out, "RESET %d\n", z)
			}
		case k == 1:
			if d.Flush() == nil {
				fmt.Fprintf(out, "FLUSH\n")
			}
		default:
			if r.Cond == CondFull {
				continue
			}
			n := uint64(1+rng.Intn(64)) * 512
			n = min(n, r.Start+r.Cap-r.WP)
			b := buf[:n]
			stamp(b, r.WP, seq)
			if _, err := d.WriteAt(b, int64(r.WP), rng.Intn(20) == 0); err != nil {
				continue // e.g. too many open zones
			}
			fmt.Fprintf(out, "ACK %d %d %d\n", z, r.WP, n)
		}
		out.Flush()
	}
}

// TestKill9ZoneWorkload kills a zone workload at random moments; after each
// kill the image opens, checks clean, every acknowledged write reads back,
// every WP is at or beyond the last acknowledged write of its zone, and no
// WP covers a sector that was never written.
func TestKill9ZoneWorkload(t *testing.T) {
	rounds := 50
	if testing.Short() {
		rounds = 10
	}
	const zs = 256 << 10
	path := mkZoned(t, 16, 2, zs, zs-8192, 6, 8)
	rng := rand.New(rand.NewSource(1))
	for round := 0; round < rounds; round++ {
		cmd := exec.Command(os.Args[0], "-test.run", "^TestCrashChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), crashChildEnv+"="+path)
		stdout, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		type rec struct{ off, n uint64 }
		acked := map[int][]rec{}
		tryReset := -1
		var lines []string // the child's output, for a failure's report
		done := make(chan struct{})
		go func() {
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				lines = append(lines, sc.Text())
				var z int
				var off, n uint64
				if c, _ := fmt.Sscanf(sc.Text(), "ACK %d %d %d", &z, &off, &n); c == 3 {
					acked[z] = append(acked[z], rec{off, n})
				} else if c, _ := fmt.Sscanf(sc.Text(), "RESET %d", &z); c == 1 {
					acked[z], tryReset = nil, -1
				} else if c, _ := fmt.Sscanf(sc.Text(), "TRY-RESET %d", &z); c == 1 {
					tryReset = z
				}
			}
			close(done)
		}()
		time.Sleep(time.Duration(20+rng.Intn(150)) * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		<-done
		d, err := Open(path, OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatalf("round %d: reopen: %v", round, err)
		}
		g := d.Geometry()
		for z := int(g.Conventional); z < int(g.NrZones); z++ {
			r := d.Report(z, 1)[0]
			wp := r.WP
			if r.Cond == CondFull {
				wp = r.Start + r.Cap
			}
			if z == tryReset && r.Cond == CondEmpty {
				acked[z] = nil // the interrupted reset took effect
			}
			if recs := acked[z]; len(recs) > 0 {
				last := recs[len(recs)-1]
				if wp < last.off+last.n {
					t.Fatalf("round %d zone %d: WP %d is behind the last acknowledged write [%d,+%d)\n%s", round, z, wp, last.off, last.n, crashReport(path, g, z, lines))
				}
			}
			data := make([]byte, wp-r.Start)
			if _, err := d.ReadAt(data, int64(r.Start)); err != nil {
				t.Fatal(err)
			}
			for s := uint64(0); s < uint64(len(data)); s += 512 {
				if got := binary.LittleEndian.Uint64(data[s:]); got != r.Start+s {
					t.Fatalf("round %d zone %d: the WP %d covers sector %d that holds no write for it (stamp %d)", round, z, wp, r.Start+s, got)
				}
			}
		}
		d.Close()
		if res, err := qcow2.Check(path, qcow2.CheckOptions{}); err != nil || res.ExitCode() != 0 && !(res.Leaks > 0 && res.Corruptions == 0) {
			t.Fatalf("round %d: check: %+v %v", round, res, err)
		}
		// A read-write open repairs the dirty image; the next round goes on from here.
		if d, err := Open(path, OpenOptions{}); err != nil {
			t.Fatalf("round %d: read-write reopen: %v", round, err)
		} else if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		if res, err := qcow2.Check(path, qcow2.CheckOptions{}); err != nil || res.ExitCode() != 0 {
			t.Fatalf("round %d: check after repair: %+v %v", round, res, err)
		}
	}
}

// crashReport describes the state behind a failed crash check: zone z's
// durable and live write pointers, whether the live table as a whole
// would be accepted, and the child's last lines about zone z.
func crashReport(path string, g Geometry, z int, lines []string) string {
	var b strings.Builder
	if im, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true}); err == nil {
		if wps, _, err := im.WritePointers(); err == nil {
			fmt.Fprintf(&b, "durable WP of zone %d: %d\n", z, wps[z])
		}
		im.Close()
	}
	_, live, err := openLiveTable(path+liveSuffix, g.NrZones, true)
	switch {
	case err != nil:
		fmt.Fprintf(&b, "live table: %v\n", err)
	case live == nil:
		fmt.Fprintf(&b, "live table: absent or not of this boot\n")
	default:
		_, merr := NewMachine(g, live)
		fmt.Fprintf(&b, "live WP of zone %d: %d; the live table as a whole: %v\n", z, live[z], merr)
	}
	var mine []string
	tag := fmt.Sprintf(" %d", z)
	for _, l := range lines {
		if strings.HasPrefix(l, "FLUSH") || strings.Contains(l+" ", tag+" ") {
			mine = append(mine, l)
		}
	}
	if len(mine) > 30 {
		mine = mine[len(mine)-30:]
	}
	fmt.Fprintf(&b, "the child's last lines for zone %d (of %d):\n%s", z, len(lines), strings.Join(mine, "\n"))
	return b.String()
}
