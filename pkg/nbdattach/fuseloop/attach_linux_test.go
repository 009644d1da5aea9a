package fuseloop

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
	"github.com/zq-csi/zq-csi/pkg/qcow2"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

const zoneSize = 4 << 20

// need skips the test naming what is missing, or fails it with
// ZQ_REQUIRE_PEERS=1 (as in CI).
func need(t *testing.T, what string, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if os.Getenv("ZQ_REQUIRE_PEERS") == "1" {
		t.Fatalf("%s unavailable (ZQ_REQUIRE_PEERS=1): %v", what, err)
	}
	t.Skipf("SKIP: %s unavailable: %v", what, err)
}

func newAttacher(t *testing.T) *Attacher {
	t.Helper()
	if os.Geteuid() != 0 {
		need(t, "root (FUSE mount, loop devices)", errors.New("not running as root"))
	}
	need(t, "/dev/fuse and /dev/loop-control", Available())
	a, err := New(Options{StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Shutdown(context.Background()) })
	return a
}

// zonedVolume creates a zoned image (1 conventional zone, then sequential
// zones of zoneSize) and opens it as a backend.
func zonedVolume(t *testing.T, zones int) (nbdattach.ZonedBackend, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "z.qcow2")
	zs, conv := uint64(zoneSize), uint32(1)
	if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: uint64(zones) * zs, ClusterSize: 65536,
		Zoned: &qcow2.ZonedOptions{ZoneSize: &zs, ConventionalZones: &conv}}); err != nil {
		t.Fatal(err)
	}
	d, err := zoned.Open(path, zoned.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return nbdattach.ZonedBackend{D: d}, path
}

func openDirect(t *testing.T, dev string) *os.File {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// aligned returns n bytes aligned for O_DIRECT, filled with b.
func aligned(n int, b byte) []byte {
	buf := make([]byte, n+4096)
	off := 4096 - int(uintptr(unsafe.Pointer(&buf[0]))&4095)
	buf = buf[off : off+n]
	for i := range buf {
		buf[i] = b
	}
	return buf
}

func wp(b nbdattach.ZonedBackend, zone int) (uint64, zoned.Cond) {
	r := b.D.Report(zone, 1)[0]
	return r.WP - r.Start, r.Cond
}

func checkGone(t *testing.T, a *Attacher, att *nbdattach.Attachment) {
	t.Helper()
	mnt := a.mountPoint(att.VolumeID)
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mounts), mnt) {
		t.Errorf("mount %s still present after Detach", mnt)
	}
	if b, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/loop/backing_file", att.Index)); err == nil {
		t.Errorf("%s still bound to %q after Detach", att.DevicePath, strings.TrimSpace(string(b)))
	}
	if _, err := os.Stat(mnt); err == nil {
		t.Errorf("mount point %s left behind", mnt)
	}
	if recs, _ := a.store.List(); len(recs) != 0 {
		t.Errorf("records left: %v", recs)
	}
}

func TestZonedVolume(t *testing.T) {
	a := newAttacher(t)
	b, path := zonedVolume(t, 4)
	ctx := context.Background()
	att, err := a.Attach(ctx, nbdattach.AttachRequest{VolumeID: "vol-z", ImagePath: path, Backend: b, BlockSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("attached %s (direct I/O %v)", att.DevicePath, a.vols["vol-z"].dio)
	if again, err := a.Attach(ctx, nbdattach.AttachRequest{VolumeID: "vol-z", ImagePath: path, Backend: b}); err != nil || again.DevicePath != att.DevicePath {
		t.Fatalf("idempotent Attach: %v %v", again, err)
	}
	if l, _ := a.List(ctx); len(l) != 1 || l[0].Kind != "fuse-loop" {
		t.Fatalf("List = %v", l)
	}
	dev := openDirect(t, att.DevicePath)
	var size int64
	if err := ioctlPtr(dev, unix.BLKGETSIZE64, unsafe.Pointer(&size)); err != nil || size != 4*zoneSize {
		t.Fatalf("BLKGETSIZE64 = %d, %v", size, err)
	}
	if bs, err := unix.IoctlGetInt(int(dev.Fd()), unix.BLKSSZGET); err != nil || bs != 4096 {
		t.Errorf("logical block size %d, %v; want 4096", bs, err)
	}
	z1 := int64(zoneSize)
	// Writes at the write pointer of sequential zone 1 succeed.
	for i := 0; i < 4; i++ {
		if _, err := dev.WriteAt(aligned(64<<10, byte(i+1)), z1+int64(i)*64<<10); err != nil {
			t.Fatalf("write %d at the WP: %v", i, err)
		}
	}
	if w, _ := wp(b, 1); w != 256<<10 {
		t.Fatalf("zone 1 WP = %d, want %d", w, 256<<10)
	}
	// A write away from the WP fails with EIO and changes nothing.
	_, err = dev.WriteAt(aligned(4096, 0xEE), z1+1<<20)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("off-WP write: %v, want EIO", err)
	}
	_, err = dev.WriteAt(aligned(4096, 0xEE), z1)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("write behind the WP: %v, want EIO", err)
	}
	if w, _ := wp(b, 1); w != 256<<10 {
		t.Fatalf("zone 1 WP moved to %d after failed writes", w)
	}
	// Data reads back through the device.
	got := aligned(256<<10, 0)
	if _, err := dev.ReadAt(got, z1); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 4; i++ {
		if !bytes.Equal(got[i*64<<10:(i+1)*64<<10], aligned(64<<10, byte(i+1))) {
			t.Fatalf("chunk %d reads back wrong", i)
		}
	}
	// Conventional zone 0 takes writes anywhere.
	if _, err := dev.WriteAt(aligned(4096, 7), 1<<20); err != nil {
		t.Fatalf("conventional write: %v", err)
	}
	if err := dev.Sync(); err != nil {
		t.Fatalf("fsync: %v", err)
	}
	// BLKDISCARD of the whole zone resets it.
	rng := [2]uint64{uint64(z1), zoneSize}
	if err := ioctlPtr(dev, unix.BLKDISCARD, unsafe.Pointer(&rng)); err != nil {
		t.Fatalf("BLKDISCARD: %v", err)
	}
	if w, c := wp(b, 1); w != 0 || c != zoned.CondEmpty {
		t.Fatalf("after BLKDISCARD zone 1 WP=%d cond=%v, want empty", w, c)
	}
	if _, err := dev.ReadAt(got[:4096], z1); err != nil || !bytes.Equal(got[:4096], make([]byte, 4096)) {
		t.Fatalf("reset zone does not read zeros: %v", err)
	}
	if _, err := dev.WriteAt(aligned(4096, 9), z1); err != nil {
		t.Fatalf("write at the start of the reset zone: %v", err)
	}
	dev.Close()
	if err := a.Detach(ctx, "vol-z"); err != nil {
		t.Fatal(err)
	}
	checkGone(t, a, att)
	if err := a.Detach(ctx, "vol-z"); err != nil {
		t.Fatalf("second Detach: %v", err)
	}
}

func ioctlPtr(f *os.File, req uint, p unsafe.Pointer) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), uintptr(req), uintptr(p))
	if e != 0 {
		return e
	}
	return nil
}

func TestPlainImageRoundTrip(t *testing.T) {
	a := newAttacher(t)
	path := filepath.Join(t.TempDir(), "p.qcow2")
	if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: 64 << 20}); err != nil {
		t.Fatal(err)
	}
	img, err := qcow2.Open(path, qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	att, err := a.Attach(ctx, nbdattach.AttachRequest{VolumeID: "vol-p", ImagePath: path, Backend: nbdattach.ImageBackend{Img: img}})
	if err != nil {
		t.Fatal(err)
	}
	want := aligned(16<<20, 0)
	rand.Read(want)
	dev := openDirect(t, att.DevicePath)
	if _, err := dev.WriteAt(want, 1<<20); err != nil {
		t.Fatal(err)
	}
	got := aligned(16<<20, 0)
	if _, err := dev.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("16 MiB round trip: equal=%v err=%v", bytes.Equal(got, want), err)
	}
	dev.Close()
	if err := a.Detach(ctx, "vol-p"); err != nil {
		t.Fatal(err)
	}
	checkGone(t, a, att)
	// The data reached the image.
	img, err = qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	clear(got)
	if _, err := img.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("image after detach: equal=%v err=%v", bytes.Equal(got, want), err)
	}
}

// TestRecover simulates a restart: a second Attacher over the same state
// directory finds the record, clears the stale device and attaches again.
func TestRecover(t *testing.T) {
	a := newAttacher(t)
	b, path := zonedVolume(t, 2)
	ctx := context.Background()
	att, err := a.Attach(ctx, nbdattach.AttachRequest{VolumeID: "vol-r", ImagePath: path, Backend: b})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	a2, err := New(Options{StateDir: a.dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a2.Shutdown(ctx) })
	atts, err := a2.Recover(ctx, func(rec nbdattach.Attachment) (nbdattach.Backend, error) {
		d, err := zoned.Open(rec.ImagePath, zoned.OpenOptions{})
		return nbdattach.ZonedBackend{D: d}, err
	})
	if err != nil || len(atts) != 1 {
		t.Fatalf("Recover = %v, %v", atts, err)
	}
	if atts[0].DevicePath != att.DevicePath || atts[0].Generation != 2 {
		t.Errorf("recovered %+v, want device %s generation 2", atts[0], att.DevicePath)
	}
	dev := openDirect(t, atts[0].DevicePath)
	if _, err := dev.WriteAt(aligned(4096, 1), zoneSize); err != nil {
		t.Fatalf("write after Recover: %v", err)
	}
	dev.Close()
	if err := a2.Detach(ctx, "vol-r"); err != nil {
		t.Fatal(err)
	}
	checkGone(t, a2, &atts[0])
}

// TestFioSequentialZone runs fio's sequential write over one sequential
// zone at iodepth 1 and 8 and reports whether every write reached the
// backend at the write pointer (the loop device is not zoned, so nothing in
// the kernel keeps a zone's writes in order).
func TestFioSequentialZone(t *testing.T) {
	a := newAttacher(t)
	fio, err := exec.LookPath("fio")
	need(t, "fio (Debian package fio)", err)
	for _, depth := range []int{1, 8} {
		t.Run(fmt.Sprint("iodepth=", depth), func(t *testing.T) {
			b, path := zonedVolume(t, 4)
			ctx := context.Background()
			att, err := a.Attach(ctx, nbdattach.AttachRequest{VolumeID: fmt.Sprint("vol-fio", depth), ImagePath: path, Backend: b, BlockSize: 4096})
			if err != nil {
				t.Fatal(err)
			}
			defer a.Detach(ctx, att.VolumeID)
			out, err := exec.Command(fio, "--name=seq", "--filename="+att.DevicePath, "--direct=1", "--rw=write",
				"--ioengine=libaio", fmt.Sprint("--iodepth=", depth), "--bs=64k",
				fmt.Sprint("--offset=", zoneSize), fmt.Sprint("--size=", zoneSize), "--output-format=json").CombinedOutput()
			w, c := wp(b, 1)
			var res struct {
				Jobs []struct {
					Error int `json:"error"`
					Write struct {
						BWBytes float64 `json:"bw_bytes"`
						IOPS    float64 `json:"iops"`
					} `json:"write"`
				} `json:"jobs"`
			}
			jerr := json.Unmarshal(out[bytes.IndexByte(out, '{'):], &res)
			if err != nil || jerr != nil || len(res.Jobs) != 1 {
				t.Fatalf("fio iodepth=%d: %v %v\n%s\nzone 1 WP=%d cond=%v", depth, err, jerr, out, w, c)
			}
			j := res.Jobs[0]
			t.Logf("fio iodepth=%d: error=%d %.1f MiB/s %.0f IOPS; zone 1 WP=%d cond=%v; failed backend writes: %v",
				depth, j.Error, j.Write.BWBytes/(1<<20), j.Write.IOPS, w, c, a.vols[att.VolumeID].node.lastErr.Load())
			if j.Error != 0 || w != zoneSize || c != zoned.CondFull {
				t.Errorf("iodepth=%d: fio error %d, zone 1 WP=%d cond=%v: writes reached the zone out of order", depth, j.Error, w, c)
			}
		})
	}
}

// TestFioOrderingExperiment (ZQ_FUSELOOP_EXPERIMENT=1) writes a 64 MiB
// sequential zone in 4 KiB requests at iodepth 8 with several FUSE
// max_background values and reports whether the writes stayed in order.
func TestFioOrderingExperiment(t *testing.T) {
	if os.Getenv("ZQ_FUSELOOP_EXPERIMENT") != "1" {
		t.Skip("set ZQ_FUSELOOP_EXPERIMENT=1 to run the ordering experiment")
	}
	a := newAttacher(t)
	fio, err := exec.LookPath("fio")
	need(t, "fio (Debian package fio)", err)
	defer func(v int) { maxBackground = v }(maxBackground)
	for _, mb := range []int{1, 12, 64} {
		for _, dio := range []bool{true, false} {
			maxBackground = mb
			a.noDIO = !dio
			path := filepath.Join(t.TempDir(), "z.qcow2")
			zs, conv := uint64(64<<20), uint32(1)
			if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: 4 * zs, ClusterSize: 65536,
				Zoned: &qcow2.ZonedOptions{ZoneSize: &zs, ConventionalZones: &conv}}); err != nil {
				t.Fatal(err)
			}
			d, err := zoned.Open(path, zoned.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			b := nbdattach.ZonedBackend{D: d}
			ctx := context.Background()
			att, err := a.Attach(ctx, nbdattach.AttachRequest{VolumeID: "exp", ImagePath: path, Backend: b, BlockSize: 4096})
			if err != nil {
				t.Fatal(err)
			}
			out, ferr := exec.Command(fio, "--name=seq", "--filename="+att.DevicePath, "--direct=1", "--rw=write",
				"--ioengine=libaio", "--iodepth=8", "--bs=4k", fmt.Sprint("--offset=", zs), fmt.Sprint("--size=", zs),
				"--output-format=terse", "--terse-version=3").CombinedOutput()
			r := b.D.Report(1, 1)[0]
			fields := strings.Split(string(out), ";")
			bw := "?"
			if len(fields) > 48 {
				bw = fields[47] + " KiB/s"
			}
			t.Logf("max_background=%d loopDIO=%v: fio err=%v bw=%s writes=%d WP=%d/%d cond=%v lastErr=%v",
				mb, a.vols["exp"].dio, ferr, bw, a.vols["exp"].node.writes.Load(), r.WP-r.Start, zs, r.Cond, a.vols["exp"].node.lastErr.Load())
			a.Detach(ctx, "exp")
		}
	}
}

// memBackend is an in-memory backend whose size can grow.
type memBackend struct {
	mu   sync.Mutex
	data []byte
}

func (m *memBackend) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(p, m.data[off:]), nil
}
func (m *memBackend) WriteAt(p []byte, off int64, _ bool) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.data[off:], p), nil
}
func (m *memBackend) Flush() error            { return nil }
func (m *memBackend) Trim(off, n int64) error { return nil }
func (m *memBackend) WriteZeroes(off, n int64, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+n])
	return nil
}
func (m *memBackend) Size() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return int64(len(m.data))
}

func TestResize(t *testing.T) {
	a := newAttacher(t)
	m := &memBackend{data: make([]byte, 8<<20)}
	ctx := context.Background()
	att, err := a.Attach(ctx, nbdattach.AttachRequest{VolumeID: "vol-g", Backend: m})
	if err != nil {
		t.Fatal(err)
	}
	m.mu.Lock()
	m.data = append(m.data, make([]byte, 8<<20)...)
	m.mu.Unlock()
	if err := a.Resize(ctx, "vol-g", 16<<20); err != nil {
		t.Fatal(err)
	}
	dev := openDirect(t, att.DevicePath)
	var size int64
	if err := ioctlPtr(dev, unix.BLKGETSIZE64, unsafe.Pointer(&size)); err != nil || size != 16<<20 {
		t.Fatalf("after Resize BLKGETSIZE64 = %d, %v", size, err)
	}
	if _, err := dev.WriteAt(aligned(4096, 3), 12<<20); err != nil {
		t.Fatalf("write in the grown part: %v", err)
	}
	m.mu.Lock()
	got := m.data[12<<20]
	m.mu.Unlock()
	if got != 3 {
		t.Fatal("write in the grown part did not reach the backend")
	}
	// Detach while a process still holds the device open: it succeeds,
	// and the kernel unbinds the loop device at the last close.
	start := time.Now()
	if err := a.Detach(ctx, "vol-g"); err != nil {
		t.Fatal(err)
	}
	t.Logf("Detach with the device open took %v", time.Since(start).Round(time.Millisecond))
	dev.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/loop/backing_file", att.Index))
		if err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still bound 5 s after its last close", att.DevicePath)
		}
		time.Sleep(20 * time.Millisecond)
	}
	checkGone(t, a, att)
}

// TestRecoverAfterCrash attaches a volume in a child process, kills it with
// SIGKILL (the FUSE server dies with it), checks that the old device now
// fails I/O, and recovers the attachment in this process.
func TestRecoverAfterCrash(t *testing.T) {
	if dir := os.Getenv("ZQ_FUSELOOP_CHILD"); dir != "" {
		a, err := New(Options{StateDir: dir})
		if err != nil {
			fmt.Println("ERR", err)
			os.Exit(1)
		}
		d, err := zoned.Open(os.Getenv("ZQ_FUSELOOP_IMAGE"), zoned.OpenOptions{})
		if err != nil {
			fmt.Println("ERR", err)
			os.Exit(1)
		}
		att, err := a.Attach(context.Background(), nbdattach.AttachRequest{VolumeID: "vol-c", ImagePath: os.Getenv("ZQ_FUSELOOP_IMAGE"), Backend: nbdattach.ZonedBackend{D: d}})
		if err != nil {
			fmt.Println("ERR", err)
			os.Exit(1)
		}
		fmt.Println("DEV", att.DevicePath)
		select {}
	}
	a := newAttacher(t)
	zb, path := zonedVolume(t, 2)
	zb.D.Close() // the child opens it (the image lock admits one writer)
	cmd := exec.Command(os.Args[0], "-test.run=^TestRecoverAfterCrash$")
	cmd.Env = append(os.Environ(), "ZQ_FUSELOOP_CHILD="+a.dir, "ZQ_FUSELOOP_IMAGE="+path)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var line string
	buf := make([]byte, 4096)
	for !strings.Contains(line, "\n") {
		n, err := stdout.Read(buf)
		if err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("child: %q %v", line, err)
		}
		line += string(buf[:n])
	}
	line = line[strings.LastIndex(line[:strings.Index(line, "\n")], "\n")+1:]
	if !strings.HasPrefix(line, "DEV ") {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("child: %q", line)
	}
	oldDev := strings.TrimSpace(strings.TrimPrefix(line, "DEV "))
	cmd.Process.Kill()
	cmd.Wait()
	// The dead server's device is either already unbound (autoclear at the
	// last close, which was the child's) or fails I/O.
	if f, err := os.OpenFile(oldDev, os.O_RDWR|syscall.O_DIRECT, 0); err == nil {
		_, werr := f.WriteAt(aligned(4096, 1), zoneSize)
		f.Close()
		if werr == nil {
			t.Errorf("write to %s after its server died succeeded", oldDev)
		} else {
			t.Logf("I/O on %s after the crash: %v", oldDev, werr)
		}
	}
	atts, err := a.Recover(context.Background(), func(rec nbdattach.Attachment) (nbdattach.Backend, error) {
		d, err := zoned.Open(rec.ImagePath, zoned.OpenOptions{})
		return nbdattach.ZonedBackend{D: d}, err
	})
	if err != nil || len(atts) != 1 {
		t.Fatalf("Recover = %v, %v", atts, err)
	}
	t.Logf("recovered %s as %s (generation %d)", oldDev, atts[0].DevicePath, atts[0].Generation)
	if atts[0].DevicePath != oldDev {
		t.Errorf("recovered on %s, want the old %s", atts[0].DevicePath, oldDev)
	}
	dev := openDirect(t, atts[0].DevicePath)
	if _, err := dev.WriteAt(aligned(4096, 2), zoneSize); err != nil {
		t.Fatalf("write after Recover: %v", err)
	}
	dev.Close()
	if err := a.Detach(context.Background(), "vol-c"); err != nil {
		t.Fatal(err)
	}
	checkGone(t, a, &atts[0])
}
