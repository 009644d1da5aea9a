//go:build linux

package vm

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
	"github.com/zq-csi/zq-csi/pkg/qcow2"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// requireKernel skips (loudly) where the kernel has no nbd, unless we run
// inside the test VM, where that is a failure.
func requireKernel(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/sys/module/nbd"); err != nil {
		if os.Getenv("ZQ_VM") == "1" {
			t.Fatal("the nbd module is not loaded in the test VM")
		}
		t.Skip("SKIPPED: the kernel has no nbd module loaded (modprobe nbd); these tests run in the VM lane: make test-vm")
	}
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: kernel NBD attach needs root")
	}
}

func zqBin(t *testing.T) string {
	t.Helper()
	b := os.Getenv("ZQ_CSI_BIN")
	if b == "" {
		if os.Getenv("ZQ_VM") == "1" {
			t.Fatal("ZQ_CSI_BIN not set in the test VM")
		}
		t.Skip("SKIPPED: ZQ_CSI_BIN (the zq-csi binary) not set")
	}
	return b
}

func mib() int64 {
	if v, err := strconv.Atoi(os.Getenv("ZQ_VM_MIB")); err == nil && v > 0 {
		return int64(v)
	}
	return 64
}

func createImage(t *testing.T, path string, size uint64) {
	t.Helper()
	if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: size}); err != nil {
		t.Fatal(err)
	}
}

func openBackend(path string) (nbdattach.Backend, error) {
	im, err := qcow2.Open(path, qcow2.OpenOptions{})
	if err != nil {
		return nil, err
	}
	return nbdattach.ImageBackend{Img: im}, nil
}

func newAttacher(t *testing.T, state string) *nbdattach.NetlinkAttacher {
	t.Helper()
	nl, err := nbdattach.DialNetlink()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nl.Close() })
	a, err := nbdattach.NewNetlinkAttacher(nl, nbdattach.NetlinkOptions{
		StateDir: state, DeadConnTimeout: 60 * time.Second, RequeueInterval: time.Second,
		OnServeError: func(v string, err error) { t.Logf("serve %s: %v", v, err) },
	})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// alignedBuf is page-aligned memory for O_DIRECT.
func alignedBuf(t *testing.T, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

func blockSize64(t *testing.T, dev string) int64 {
	t.Helper()
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var size uint64
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size))); errno != 0 {
		t.Fatal(errno)
	}
	return int64(size)
}

// TestAttachIODetach: netlink attach, 64 MiB written and read back through
// /dev/nbdX with O_DIRECT, flush, discard, detach; the data is in the image.
func TestAttachIODetach(t *testing.T) {
	requireKernel(t)
	ctx := context.Background()
	dir := t.TempDir()
	size := mib() << 20
	img := filepath.Join(dir, "vol.qcow2")
	createImage(t, img, uint64(size))
	a := newAttacher(t, filepath.Join(dir, "state"))
	b, err := openBackend(img)
	if err != nil {
		t.Fatal(err)
	}
	att, err := a.Attach(ctx, nbdattach.AttachRequest{VolumeID: "vol-io", ImagePath: img, Backend: b})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("attached %s (index %d)", att.DevicePath, att.Index)
	if got := blockSize64(t, att.DevicePath); got != size {
		t.Fatalf("%s is %d bytes, want %d", att.DevicePath, got, size)
	}
	if id, _ := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/backend", att.Index)); string(id) != "vol-io\n" {
		t.Fatalf("backend %q, want vol-io", id)
	}
	if to, _ := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/queue/io_timeout", att.Index)); strings.TrimSpace(string(to)) != "1000" {
		t.Errorf("io_timeout %q, want 1000", to)
	}

	f, err := os.OpenFile(att.DevicePath, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	const chunk = 1 << 20
	buf := alignedBuf(t, chunk)
	pattern := func(off int64) {
		r := rand.New(rand.NewPCG(uint64(off), 42))
		for i := 0; i < chunk; i += 8 {
			binary.LittleEndian.PutUint64(buf[i:], r.Uint64())
		}
	}
	start := time.Now()
	for off := int64(0); off < size; off += chunk {
		pattern(off)
		if _, err := f.WriteAt(buf, off); err != nil {
			t.Fatalf("write at %d: %v", off, err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("flush: %v", err)
	}
	wdur := time.Since(start)
	want := make([]byte, chunk)
	start = time.Now()
	for off := int64(0); off < size; off += chunk {
		pattern(off)
		copy(want, buf)
		clear(buf)
		if _, err := f.ReadAt(buf, off); err != nil {
			t.Fatalf("read at %d: %v", off, err)
		}
		if !bytes.Equal(buf, want) {
			t.Fatalf("data at %d differs after read back", off)
		}
	}
	rdur := time.Since(start)
	t.Logf("O_DIRECT 1 MiB: wrote %d MiB in %v (%.1f MiB/s), read in %v (%.1f MiB/s)",
		size>>20, wdur.Round(time.Millisecond), float64(size>>20)/wdur.Seconds(), rdur.Round(time.Millisecond), float64(size>>20)/rdur.Seconds())

	// Discard the first MiB: it reads back as zeros (qcow2 discard).
	rng := [2]uint64{0, chunk}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKDISCARD, uintptr(unsafe.Pointer(&rng))); errno != 0 {
		t.Fatalf("BLKDISCARD: %v", errno)
	}
	if _, err := f.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, make([]byte, chunk)) {
		t.Fatal("discarded range does not read as zeros")
	}
	f.Close()

	if err := a.Detach(ctx, "vol-io"); err != nil {
		t.Fatal(err)
	}
	if recs, _ := a.List(ctx); len(recs) != 0 {
		t.Fatalf("records after detach: %+v", recs)
	}
	if err := a.Detach(ctx, "vol-io"); err != nil {
		t.Fatalf("second detach: %v", err)
	}
	// DESTROY_ON_DISCONNECT: the device goes away.
	gone := false
	for i := 0; i < 100 && !gone; i++ {
		if _, err := os.Stat(fmt.Sprintf("/sys/block/nbd%d", att.Index)); err != nil {
			gone = true
		} else {
			time.Sleep(20 * time.Millisecond)
		}
	}
	if !gone {
		t.Errorf("/sys/block/nbd%d still there after detach", att.Index)
	}

	// The data reached the image.
	im, err := qcow2.Open(img, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	pattern(size - chunk)
	copy(want, buf)
	if _, err := im.ReadAt(buf, size-chunk); err != nil || !bytes.Equal(buf, want) {
		t.Fatalf("image content after detach differs (%v)", err)
	}
}

// server is a "zq-csi nbd attach|recover" child process.
type server struct {
	cmd    *exec.Cmd
	out    *bufio.Scanner
	waited chan error
}

func startServer(t *testing.T, args ...string) *server {
	t.Helper()
	cmd := exec.Command(zqBin(t), append([]string{"nbd"}, args...)...)
	cmd.Stderr = &prefixWriter{t: t, prefix: "server: "}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &server{cmd: cmd, out: bufio.NewScanner(out), waited: make(chan error, 1)}
	return s
}

func (s *server) line(t *testing.T) string {
	t.Helper()
	if !s.out.Scan() {
		t.Fatalf("server exited without output: %v", s.wait(5*time.Second))
	}
	return s.out.Text()
}

func (s *server) drain(t *testing.T) {
	go func() {
		for s.out.Scan() {
			t.Logf("server: %s", s.out.Text())
		}
		s.waited <- s.cmd.Wait()
	}()
}

func (s *server) wait(d time.Duration) error {
	select {
	case err := <-s.waited:
		return err
	case <-time.After(d):
		s.cmd.Process.Kill()
		return errors.New("timed out; killed")
	}
}

type prefixWriter struct {
	t      *testing.T
	prefix string
	mu     sync.Mutex
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		p.t.Log(p.prefix + l)
	}
	return len(b), nil
}

// verifier writes self-describing 4 KiB blocks with O_DIRECT, reads each
// back, and keeps the sequence number of the last acknowledged write of
// every block. A block is corrupt when it does not hold the content of its
// last acknowledged write (or of one still in flight when a check ran).
type verifier struct {
	f      *os.File
	blocks int
	seq    []uint64 // last acknowledged write per block; 0 = never written

	ops, ioErrors, corrupt atomic.Int64
	maxLatency             atomic.Int64 // ns
}

const vblock = 4096

func fillBlock(b []byte, blk int, seq uint64) {
	binary.LittleEndian.PutUint64(b[0:], uint64(blk))
	binary.LittleEndian.PutUint64(b[8:], seq)
	r := rand.New(rand.NewPCG(uint64(blk), seq))
	for i := 16; i < vblock-32; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	sum := sha256.Sum256(b[:vblock-32])
	copy(b[vblock-32:], sum[:])
}

// checkBlock returns the sequence number a block holds, or an error if its
// checksum or number is wrong.
func checkBlock(b []byte, blk int) (uint64, error) {
	if bytes.Equal(b, make([]byte, vblock)) {
		return 0, nil
	}
	sum := sha256.Sum256(b[:vblock-32])
	if !bytes.Equal(sum[:], b[vblock-32:]) {
		return 0, errors.New("checksum mismatch")
	}
	if got := binary.LittleEndian.Uint64(b[0:]); got != uint64(blk) {
		return 0, fmt.Errorf("block %d holds block %d", blk, got)
	}
	return binary.LittleEndian.Uint64(b[8:]), nil
}

func (v *verifier) timed(op func() error) error {
	start := time.Now()
	err := op()
	if d := time.Since(start).Nanoseconds(); d > v.maxLatency.Load() {
		v.maxLatency.Store(d)
	}
	v.ops.Add(1)
	return err
}

// run writes and verifies until stop is closed.
func (v *verifier) run(t *testing.T, stop <-chan struct{}) {
	buf := alignedBuf(t, vblock)
	rbuf := alignedBuf(t, vblock)
	var seq uint64
	r := rand.New(rand.NewPCG(1, 2))
	for {
		select {
		case <-stop:
			return
		default:
		}
		blk := r.IntN(v.blocks)
		seq++
		fillBlock(buf, blk, seq)
		err := v.timed(func() error { _, err := v.f.WriteAt(buf, int64(blk)*vblock); return err })
		if err != nil {
			v.ioErrors.Add(1)
			t.Logf("write block %d: %v", blk, err)
			continue
		}
		v.seq[blk] = seq
		// Read back this block and one other.
		for _, b := range []int{blk, r.IntN(v.blocks)} {
			err := v.timed(func() error { _, err := v.f.ReadAt(rbuf, int64(b)*vblock); return err })
			if err != nil {
				v.ioErrors.Add(1)
				t.Logf("read block %d: %v", b, err)
				continue
			}
			if got, err := checkBlock(rbuf, b); err != nil || got != v.seq[b] {
				v.corrupt.Add(1)
				t.Logf("block %d: holds seq %d, want %d (%v)", b, got, v.seq[b], err)
			}
		}
	}
}

// verifyAll reads every block once more.
func (v *verifier) verifyAll(t *testing.T) {
	rbuf := alignedBuf(t, vblock)
	for b := 0; b < v.blocks; b++ {
		if _, err := v.f.ReadAt(rbuf, int64(b)*vblock); err != nil {
			v.ioErrors.Add(1)
			continue
		}
		if got, err := checkBlock(rbuf, b); err != nil || got != v.seq[b] {
			v.corrupt.Add(1)
			t.Logf("final: block %d holds seq %d, want %d (%v)", b, got, v.seq[b], err)
		}
	}
}

// TestRestartSurvival: a verifying writer runs on /dev/nbdX while the
// serving process ("zq-csi nbd attach") is killed (SIGKILL) or stopped
// (SIGTERM) and "zq-csi nbd recover" takes over. Goal: 0 I/O errors, 0
// corrupt blocks, the longest I/O stall under 5 s.
func TestRestartSurvival(t *testing.T) {
	requireKernel(t)
	zqBin(t)
	for _, sig := range []syscall.Signal{syscall.SIGKILL, syscall.SIGTERM} {
		t.Run(strings.TrimPrefix(unix.SignalName(sig), "SIG"), func(t *testing.T) {
			dir := t.TempDir()
			state := filepath.Join(dir, "state")
			img := filepath.Join(dir, "rs.qcow2")
			const blocks = 2048 // 8 MiB
			createImage(t, img, blocks*vblock)
			common := []string{"--state-dir", state, "--dead-conn-timeout", "60s", "--requeue-interval", "1s"}
			srv := startServer(t, append(append([]string{"attach"}, common...), "--volume-id", "rs", img)...)
			dev := srv.line(t)
			srv.drain(t)
			t.Logf("serving %s", dev)

			f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
			if err != nil {
				t.Fatal(err)
			}
			v := &verifier{f: f, blocks: blocks, seq: make([]uint64, blocks)}
			stop := make(chan struct{})
			done := make(chan struct{})
			go func() { v.run(t, stop); close(done) }()

			time.Sleep(1500 * time.Millisecond)
			before := v.ops.Load()
			killed := time.Now()
			srv.cmd.Process.Signal(sig)
			if err := srv.wait(30 * time.Second); err != nil && sig == syscall.SIGTERM {
				t.Errorf("server after SIGTERM: %v", err)
			}
			exited := time.Since(killed)
			rec := startServer(t, append([]string{"recover"}, common...)...)
			first := rec.line(t)
			recovered := time.Since(killed)
			rec.drain(t)
			t.Logf("%s", first)
			// Let the workload run on the new server (a bounded wait, not a timing check).
			giveUp := killed.Add(30 * time.Second)
			for v.ops.Load() < before+200 && time.Now().Before(giveUp) {
				time.Sleep(50 * time.Millisecond)
			}
			time.Sleep(time.Second)
			close(stop)
			<-done
			v.verifyAll(t)
			f.Close()

			stall := time.Duration(v.maxLatency.Load())
			fmt.Printf("ZQVM: RESTART signal=%s io_errors=%d corrupt_blocks=%d stall_seconds=%.2f ops=%d old_exit=%.2fs recovered_after=%.2fs\n",
				strings.TrimPrefix(unix.SignalName(sig), "SIG"), v.ioErrors.Load(), v.corrupt.Load(), stall.Seconds(), v.ops.Load(), exited.Seconds(), recovered.Seconds())
			if v.ioErrors.Load() != 0 || v.corrupt.Load() != 0 {
				t.Errorf("%d I/O errors, %d corrupt blocks", v.ioErrors.Load(), v.corrupt.Load())
			}
			if stall > 5*time.Second {
				t.Errorf("longest I/O took %v (goal: under 5 s)", stall)
			}

			det := exec.Command(zqBin(t), append([]string{"nbd", "detach"}, append(common, "rs")...)...)
			if out, err := det.CombinedOutput(); err != nil {
				t.Fatalf("detach: %v\n%s", err, out)
			}
			if err := rec.wait(30 * time.Second); err != nil {
				t.Errorf("recover process after detach: %v", err)
			}
		})
	}
}

// TestRecoverRefusesForeignBackend: a record naming a device whose backend
// id is someone else's is refused and that device is left alone, while the
// volume's own record is recovered.
func TestRecoverRefusesForeignBackend(t *testing.T) {
	requireKernel(t)
	ctx := context.Background()
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	img := filepath.Join(dir, "mine.qcow2")
	createImage(t, img, 4<<20)
	srv := startServer(t, "attach", "--state-dir", state, "--volume-id", "mine", img)
	dev := srv.line(t)
	srv.drain(t)
	srv.cmd.Process.Kill()
	srv.wait(10 * time.Second)
	idx, _ := strconv.Atoi(strings.TrimPrefix(dev, "/dev/nbd"))

	// A forged record: another volume claiming the same device.
	st, err := nbdattach.NewStateStore(state)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Save(nbdattach.Attachment{VolumeID: "intruder", DevicePath: dev, Index: idx, ImagePath: img, BackendID: "intruder", Generation: 1, Kind: "nbd"}); err != nil {
		t.Fatal(err)
	}
	a := newAttacher(t, state)
	var opened []string
	atts, err := a.Recover(ctx, func(rec nbdattach.Attachment) (nbdattach.Backend, error) {
		opened = append(opened, rec.VolumeID)
		return openBackend(rec.ImagePath)
	})
	if !errors.Is(err, nbdattach.ErrBackendMismatch) {
		t.Fatalf("recover: %v, want ErrBackendMismatch", err)
	}
	t.Logf("refused as expected: %v", err)
	if len(atts) != 1 || atts[0].VolumeID != "mine" || atts[0].Generation != 2 {
		t.Fatalf("recovered %+v", atts)
	}
	if len(opened) != 1 || opened[0] != "mine" {
		t.Fatalf("opened %v: the intruder's image must not be opened", opened)
	}
	if id, _ := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/backend", idx)); string(id) != "mine\n" {
		t.Fatalf("device backend now %q", id)
	}
	// The device works after recovery.
	f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := alignedBuf(t, vblock)
	fillBlock(buf, 3, 9)
	if _, err := f.WriteAt(buf, 3*vblock); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := a.Detach(ctx, "mine"); err != nil {
		t.Fatal(err)
	}
}

// TestAttachRefusesSecondServer: Recover in a second process while the
// first still serves the device is refused by the kernel (no dead
// connection to replace) and does not open the image.
func TestAttachRefusesSecondServer(t *testing.T) {
	requireKernel(t)
	ctx := context.Background()
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	img := filepath.Join(dir, "busy.qcow2")
	createImage(t, img, 4<<20)
	srv := startServer(t, "attach", "--state-dir", state, "--volume-id", "busy", img)
	dev := srv.line(t)
	srv.drain(t)
	// While the first process serves, a second one's Recover must not
	// steal the device: the kernel has no dead connection to replace.
	a := newAttacher(t, state)
	atts, err := a.Recover(ctx, func(rec nbdattach.Attachment) (nbdattach.Backend, error) {
		t.Error("image of a device served elsewhere opened")
		return openBackend(rec.ImagePath)
	})
	if err == nil || len(atts) != 0 || !errors.Is(err, nbdattach.ErrDeviceBusy) {
		t.Fatalf("second recover of a live device: %+v, %v (want ErrDeviceBusy)", atts, err)
	}
	t.Logf("refused as expected: %v", err)
	det := exec.Command(zqBin(t), "nbd", "detach", "--state-dir", state, "busy")
	if out, err := det.CombinedOutput(); err != nil {
		t.Fatalf("detach %s: %v\n%s", dev, err, out)
	}
	if err := srv.wait(30 * time.Second); err != nil {
		t.Errorf("server after detach: %v", err)
	}
}

// TestZonedThroughKernel serves a zoned image on /dev/nbdX and drives it
// with O_DIRECT I/O: writes at the write pointer succeed, a write elsewhere
// fails with EIO and changes nothing, BLKDISCARD of a whole zone resets it.
// The same off-WP write on a zoned null_blk device (a real host-managed
// block device) must fail with the same errno.
func TestZonedThroughKernel(t *testing.T) {
	requireKernel(t)
	ctx := context.Background()
	dir := t.TempDir()
	img := filepath.Join(dir, "z.qcow2")
	zs := uint64(4 << 20)
	d := openZoned(t, img, 16<<20, zs, 1)
	a := newAttacher(t, filepath.Join(dir, "state"))
	att, err := a.Attach(ctx, nbdattach.AttachRequest{VolumeID: "vol-zoned", ImagePath: img, Backend: nbdattach.ZonedBackend{D: d}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Detach(ctx, "vol-zoned")
	f, err := os.OpenFile(att.DevicePath, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := alignedBuf(t, 64<<10)
	for i := range buf {
		buf[i] = 0xa5
	}
	z2 := int64(2 * zs)
	for k := int64(0); k < 4; k++ { // sequential writes at the WP
		if _, err := f.WriteAt(buf, z2+k*int64(len(buf))); err != nil {
			t.Fatalf("write at the write pointer (+%d): %v", k*int64(len(buf)), err)
		}
	}
	_, err = f.WriteAt(buf, z2+1<<20) // past the WP
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("write off the write pointer: %v, want EIO", err)
	}
	if r := d.Report(2, 1)[0]; r.WP != uint64(z2)+4*uint64(len(buf)) {
		t.Fatalf("after a refused write the WP is %d", r.WP)
	}
	rd := alignedBuf(t, 64<<10)
	if _, err := f.ReadAt(rd, z2+1<<20); err != nil || !bytes.Equal(rd, make([]byte, len(rd))) {
		t.Fatalf("the refused write left data behind (err %v)", err)
	}
	// Conventional zone 0 takes random writes.
	if _, err := f.WriteAt(buf, 1<<20); err != nil {
		t.Fatalf("random write in the conventional zone: %v", err)
	}
	// BLKDISCARD of the whole zone = zone reset.
	rng := [2]uint64{uint64(z2), zs}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKDISCARD, uintptr(unsafe.Pointer(&rng))); errno != 0 {
		t.Fatalf("BLKDISCARD of a zone: %v", errno)
	}
	if r := d.Report(2, 1)[0]; r.Cond != zoned.CondEmpty || r.WP != uint64(z2) {
		t.Fatalf("discard of a whole zone did not reset it: %+v", r)
	}
	if _, err := f.WriteAt(buf, z2); err != nil {
		t.Fatalf("write at the start of the reset zone: %v", err)
	}
	t.Logf("zoned %s: WP writes ok, off-WP write -> EIO, BLKDISCARD resets the zone", att.DevicePath)

	// The same off-WP write on zoned null_blk.
	nbDev := zonedNullBlk(t, d.Geometry(), true)
	nb, err := os.OpenFile(nbDev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer nb.Close()
	// The same writes as above: zone 2 from its start, then off its WP,
	// then a random write in conventional zone 0.
	for k := int64(0); k < 4; k++ {
		if _, err := nb.WriteAt(buf, z2+k*int64(len(buf))); err != nil {
			t.Fatalf("null_blk write at the write pointer (+%d): %v", k*int64(len(buf)), err)
		}
	}
	_, nerr := nb.WriteAt(buf, z2+1<<20)
	if !errors.Is(nerr, syscall.EIO) {
		t.Fatalf("null_blk off-WP write: %v; zq-csi gave EIO", nerr)
	}
	if _, err := nb.WriteAt(buf, 1<<20); err != nil {
		t.Fatalf("null_blk random write in the conventional zone: %v; zq-csi took it", err)
	}
	t.Logf("%s: WP writes ok, off-WP write -> %v, conventional zone takes random writes: same as zq-csi", nullBlkLine(nbDev), nerr)
}

// TestResizeThroughKernel grows an attached image and tells the kernel
// with RECONFIGURE (NetlinkAttacher.Resize, what NodeExpandVolume does):
// /dev/nbdN shows the new size, and the new blocks are written and read
// back through the same connection.
func TestResizeThroughKernel(t *testing.T) {
	requireKernel(t)
	ctx := context.Background()
	dir := t.TempDir()
	img := filepath.Join(dir, "grow.qcow2")
	const before, after = 8 << 20, 24 << 20
	if _, err := qcow2.Create(img, qcow2.CreateOptions{Size: before}); err != nil {
		t.Fatal(err)
	}
	im, err := qcow2.Open(img, qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	a := newAttacher(t, filepath.Join(dir, "state"))
	att, err := a.Attach(ctx, nbdattach.AttachRequest{VolumeID: "vol-grow", ImagePath: img, Backend: nbdattach.ImageBackend{Img: im}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Detach(ctx, "vol-grow")
	if got := blockSize64(t, att.DevicePath); got != before {
		t.Fatalf("%s is %d bytes before the resize, want %d", att.DevicePath, got, before)
	}
	if err := a.Resize(ctx, "vol-grow", after); err == nil {
		t.Fatal("Resize to a size the backend does not have succeeded")
	}
	if err := im.Resize(after); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := a.Resize(ctx, "vol-grow", after); err != nil {
		t.Fatalf("resize: %v", err)
	}
	took := time.Since(t0)
	if got := blockSize64(t, att.DevicePath); got != after {
		t.Fatalf("%s is %d bytes after the resize, want %d", att.DevicePath, got, after)
	}
	f, err := os.OpenFile(att.DevicePath, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := alignedBuf(t, 1<<20)
	for i := range buf {
		buf[i] = byte(i*7 + 3)
	}
	tail := int64(after - len(buf))
	if _, err := f.WriteAt(buf, tail); err != nil {
		t.Fatalf("write in the new blocks: %v", err)
	}
	rd := alignedBuf(t, len(buf))
	if _, err := f.ReadAt(rd, tail); err != nil || !bytes.Equal(rd, buf) {
		t.Fatalf("read back from the new blocks: %v", err)
	}
	fmt.Printf("ZQVM: RESIZE %s %d -> %d MiB with RECONFIGURE in %v; the new tail written and read back\n", att.DevicePath, before>>20, after>>20, took.Round(time.Millisecond))
}
