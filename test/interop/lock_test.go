package interop

import (
	"bufio"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Image locking (issue 13): zq-csi takes qemu's lock bytes (pkg/qcow2
// lock.go), so each side refuses an image the other one holds, with
// qemu's words.

// holder is a process that keeps an image open until release.
type holder struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	once  sync.Once
}

// hold starts prog (qemu-io or zq-csi img io, reading commands from
// stdin) on an image and returns once it has the image open: it answers a
// read. The process is released at the end of the test at the latest.
func hold(t *testing.T, dir, prog string, args ...string) *holder {
	t.Helper()
	if prog == "zq-csi" {
		prog, args = zqBin, append([]string{"img", "io"}, args...)
	}
	cmd := exec.Command(prog, args...)
	cmd.Dir = dir
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := &holder{cmd: cmd, stdin: stdin}
	t.Cleanup(h.release)
	if _, err := io.WriteString(stdin, "read 0 512\n"); err != nil {
		t.Fatalf("%s: %v (stderr: %s)", prog, err, stderr.String())
	}
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		ok := false
		for sc.Scan() {
			if !ok && strings.Contains(sc.Text(), "read 512/512 bytes at offset 0") {
				ok = true
				ready <- true
			}
		}
		if !ok {
			ready <- false
		}
	}()
	select {
	case ok := <-ready:
		if !ok {
			h.release()
			t.Fatalf("%s %s did not open the image: %s", prog, strings.Join(args, " "), stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("%s %s: no answer in 30 s", prog, strings.Join(args, " "))
	}
	return h
}

func (h *holder) release() {
	h.once.Do(func() {
		h.stdin.Close()
		h.cmd.Wait()
	})
}

// refused fails unless r failed with want in its error output.
func refused(t *testing.T, what string, r result, want string) {
	t.Helper()
	if r.code == 0 || !strings.Contains(r.stderr, want) {
		t.Errorf("%s: want a failure saying %q, got %v", what, want, r)
	}
}

func succeeded(t *testing.T, what string, r result) {
	t.Helper()
	if r.code != 0 {
		t.Errorf("%s: want success, got %v", what, r)
	}
}

const (
	writeLock       = `Failed to get "write" lock`
	sharedWriteLock = `Failed to get shared "write" lock`
)

// TestLockQemuRefusesWhatZqHolds: while zq-csi writes an image, qemu-io
// cannot write it (nor through -f raw, which would bypass the write
// pointers of a zoned image), qemu-img cannot read it without -U nor
// create over it; while zq-csi only reads it, qemu readers share it.
func TestLockQemuRefusesWhatZqHolds(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	mustZq(t, dir, "create", "-f", "qcow2", "plain.qcow2", "16M")
	mustZq(t, dir, "create", "-f", "qcow2", "-o", "zone.mode=host-managed,zone.size=4M,zone.max_append_bytes=4096", "zoned.qcow2", "16M")

	t.Run("zq writer, plain image", func(t *testing.T) {
		h := hold(t, dir, "zq-csi", "plain.qcow2")
		refused(t, "qemu-io rw", run(t, dir, "qemu-io", "-c", "write 0 512", "plain.qcow2"), writeLock)
		refused(t, "qemu-img info", run(t, dir, "qemu-img", "info", "plain.qcow2"), sharedWriteLock)
		refused(t, "qemu-img create over it", run(t, dir, "qemu-img", "create", "-f", "qcow2", "plain.qcow2", "1M"), writeLock)
		succeeded(t, "qemu-img info -U", run(t, dir, "qemu-img", "info", "-U", "plain.qcow2"))
		succeeded(t, "qemu-io -r -U", run(t, dir, "qemu-io", "-r", "-U", "-c", "read 0 512", "plain.qcow2"))
		h.release()
		succeeded(t, "qemu-io rw after the holder closed", run(t, dir, "qemu-io", "-c", "write 0 512", "plain.qcow2"))
		succeeded(t, "qemu-img check", run(t, dir, "qemu-img", "check", "plain.qcow2"))
	})
	t.Run("zq serve, zoned image", func(t *testing.T) {
		sock := filepath.Join(dir, "z.sock")
		srv := exec.Command(zqBin, "img", "serve", "--socket", sock, "zoned.qcow2")
		srv.Dir = dir
		var serr strings.Builder
		srv.Stderr = &serr
		if err := srv.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { srv.Process.Kill(); srv.Wait() }()
		waitFor(t, func() bool { _, err := os.Stat(sock); return err == nil }, "img serve's socket: "+serr.String())
		refused(t, "qemu-io -f raw rw", run(t, dir, "qemu-io", "-f", "raw", "-c", "write -P 0xff 0 4k", "zoned.qcow2"), writeLock)
		refused(t, "zq-csi img io rw", zq(t, dir, "io", "-c", "write 0 4k", "zoned.qcow2"), writeLock)
		refused(t, "zq-csi img info", zq(t, dir, "info", "zoned.qcow2"), sharedWriteLock)
		succeeded(t, "zq-csi img info -U", zq(t, dir, "info", "-U", "zoned.qcow2"))
		srv.Process.Kill()
		srv.Wait()
		// The refusals were the lock's: once the server is gone the same
		// open succeeds (read only: a raw write would break the zones).
		succeeded(t, "qemu-io -f raw rw open after the server", run(t, dir, "qemu-io", "-f", "raw", "-c", "read 0 4k", "zoned.qcow2"))
		if r := zq(t, dir, "check", "zoned.qcow2"); r.code != 0 {
			t.Errorf("img check after the server: %v", r)
		}
	})
	t.Run("zq reader", func(t *testing.T) {
		h := hold(t, dir, "zq-csi", "-r", "plain.qcow2")
		succeeded(t, "qemu-io -r (readers share)", run(t, dir, "qemu-io", "-r", "-c", "read 0 512", "plain.qcow2"))
		succeeded(t, "qemu-img info (readers share)", run(t, dir, "qemu-img", "info", "plain.qcow2"))
		refused(t, "qemu-io rw", run(t, dir, "qemu-io", "-c", "write 0 512", "plain.qcow2"), writeLock)
		h.release()
	})
}

// TestLockZqRefusesWhatQemuHolds: every zq-csi entry point that opens an
// image refuses one that qemu-io writes, -U lets the read-only ones
// inspect it, and a refused create or convert leaves it as it was.
func TestLockZqRefusesWhatQemuHolds(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "q.qcow2", "16M")
	mustRun(t, dir, "qemu-io", "-c", "write -P 0x5a 0 64k", "q.qcow2")
	before, err := os.ReadFile(filepath.Join(dir, "q.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	h := hold(t, dir, "qemu-io", "q.qcow2")
	refused(t, "img io rw", zq(t, dir, "io", "-c", "write 0 512", "q.qcow2"), writeLock)
	refused(t, "img io -r", zq(t, dir, "io", "-r", "-c", "read 0 512", "q.qcow2"), sharedWriteLock)
	refused(t, "img info", zq(t, dir, "info", "q.qcow2"), sharedWriteLock)
	refused(t, "img map", zq(t, dir, "map", "q.qcow2"), sharedWriteLock)
	refused(t, "img check", zq(t, dir, "check", "q.qcow2"), sharedWriteLock)
	refused(t, "img check -r leaks", zq(t, dir, "check", "-r", "leaks", "q.qcow2"), writeLock)
	refused(t, "img resize", zq(t, dir, "resize", "q.qcow2", "32M"), writeLock)
	refused(t, "img create over it", zq(t, dir, "create", "-f", "qcow2", "q.qcow2", "1M"), writeLock)
	refused(t, "img create -f raw over it", zq(t, dir, "create", "-f", "raw", "q.qcow2", "1M"), writeLock)
	refused(t, "img convert from it", zq(t, dir, "convert", "-O", "raw", "q.qcow2", "out.raw"), sharedWriteLock)
	mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "other.qcow2", "1M")
	refused(t, "img convert over it", zq(t, dir, "convert", "-O", "qcow2", "other.qcow2", "q.qcow2"), writeLock)
	refused(t, "img serve", zq(t, dir, "serve", "--socket", filepath.Join(dir, "s.sock"), "q.qcow2"), writeLock)
	refused(t, "img io -U rw", zq(t, dir, "io", "-U", "-c", "write 0 512", "q.qcow2"), "force-share=on can only be used with read-only images")

	succeeded(t, "img info -U", zq(t, dir, "info", "-U", "q.qcow2"))
	succeeded(t, "img map -U", zq(t, dir, "map", "-U", "q.qcow2"))
	succeeded(t, "img check -U", zq(t, dir, "check", "-U", "q.qcow2"))
	succeeded(t, "img io -r -U", zq(t, dir, "io", "-r", "-U", "-c", "read -P 0x5a 0 64k", "q.qcow2"))
	succeeded(t, "img convert -U", zq(t, dir, "convert", "-U", "-O", "raw", "q.qcow2", "out.raw"))
	h.release()

	after, err := os.ReadFile(filepath.Join(dir, "q.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	if string(before) != string(after) {
		t.Errorf("q.qcow2 changed while qemu-io held it (%d bytes before, %d after)", len(before), len(after))
	}
	mustRun(t, dir, "qemu-img", "check", "q.qcow2")

	// qemu-io as a reader: zq-csi readers share, writers are refused.
	h = hold(t, dir, "qemu-io", "-r", "q.qcow2")
	succeeded(t, "img io -r beside a qemu reader", zq(t, dir, "io", "-r", "-c", "read -P 0x5a 0 64k", "q.qcow2"))
	refused(t, "img io rw beside a qemu reader", zq(t, dir, "io", "-c", "write 0 512", "q.qcow2"), writeLock)
	h.release()
}

// TestLockTwoWriters is the first case: two `img io` writers on
// one image. The second is refused while the first holds it; writers
// started at once never both write, so every write that reported success
// reads back and the image checks clean (before locking, check found 66
// corruptions).
func TestLockTwoWriters(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	mustZq(t, dir, "create", "-f", "qcow2", "-o", "cluster_size=4k", "w.qcow2", "64M")
	h := hold(t, dir, "zq-csi", "w.qcow2")
	refused(t, "second writer", zq(t, dir, "io", "-c", "write -P 1 0 4k", "w.qcow2"), writeLock)
	h.release()

	const writers = 4
	var wg sync.WaitGroup
	res := make([]result, writers)
	for i := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var cmds []string
			for b := range 64 { // interleaved 4 KiB blocks: writer i owns blocks i, i+4, ...
				cmds = append(cmds, "-c", "write -P "+strconv.Itoa(0x10+i)+" "+strconv.Itoa((b*writers+i)*4096)+" 4k")
			}
			res[i] = run(t, dir, "zq-csi", append([]string{"img", "io"}, append(cmds, "w.qcow2")...)...)
		}()
	}
	wg.Wait()
	ok := 0
	for i, r := range res {
		switch {
		case r.code == 0:
			ok++
			for b := range 64 {
				off := (b*writers + i) * 4096
				mustRun(t, dir, "qemu-io", "-r", "-c", "read -P "+strconv.Itoa(0x10+i)+" "+strconv.Itoa(off)+" 4k", "w.qcow2")
			}
		case !strings.Contains(r.stderr, writeLock):
			t.Errorf("writer %d failed without the lock's message: %v", i, r)
		}
	}
	if ok == 0 {
		t.Errorf("no writer succeeded")
	}
	mustRun(t, dir, "qemu-img", "check", "w.qcow2")
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}
