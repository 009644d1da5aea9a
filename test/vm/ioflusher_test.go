//go:build linux

package vm

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
)

// prctl options of linux/prctl.h, and the task flags PR_SET_IO_FLUSHER
// sets (PR_IO_FLUSHER = PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE,
// include/linux/sched.h), which /proc/PID/task/TID/stat shows as field 9:
// PR_GET_IO_FLUSHER only answers for the calling thread.
const (
	prSetIOFlusher = 57
	prGetIOFlusher = 58
	pfIOFlusher    = 0x00080000 | 0x00100000
)

func getIOFlusher(t *testing.T) uintptr {
	t.Helper()
	r, _, errno := unix.Syscall6(unix.SYS_PRCTL, prGetIOFlusher, 0, 0, 0, 0, 0)
	if errno != 0 {
		t.Fatalf("prctl(PR_GET_IO_FLUSHER): %v", errno)
	}
	return r
}

// taskFlags returns the flags of every thread of process pid.
func taskFlags(t *testing.T, pid int) map[int]uint64 {
	t.Helper()
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	out := map[int]uint64{}
	for _, e := range tasks {
		tid, _ := strconv.Atoi(e.Name())
		b, err := os.ReadFile(filepath.Join(fmt.Sprintf("/proc/%d/task", pid), e.Name(), "stat"))
		if err != nil {
			continue // the thread ended
		}
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		flags, err := strconv.ParseUint(f[6], 10, 64) // field 9: state is field 3 = f[0]
		if err != nil {
			t.Fatalf("/proc/%d/task/%d/stat: flags %q: %v", pid, tid, f[6], err)
		}
		out[tid] = flags
	}
	return out
}

// TestIOFlusher: the serving process runs with PR_SET_IO_FLUSHER on every
// thread. First this process, where PR_GET_IO_FLUSHER (58) can be asked:
// not set before, set after nbdattach.SetIOFlusher (what the CLI calls) on
// threads that existed before the call and on threads started after it,
// and /proc's task flags agree with PR_GET_IO_FLUSHER on each; then every
// thread of a running "zq-csi nbd attach", read through /proc.
func TestIOFlusher(t *testing.T) {
	requireKernel(t)
	bin := zqBin(t)
	self := os.Getpid()
	for tid, fl := range taskFlags(t, self) {
		if fl&pfIOFlusher != 0 {
			t.Fatalf("thread %d of the test process already has I/O flusher flags %#x: nothing below would prove anything", tid, fl)
		}
	}

	// "zq-csi nbd attach", started by a process without the flag.
	dir := t.TempDir()
	img := filepath.Join(dir, "f.qcow2")
	createImage(t, img, 4<<20)
	state := filepath.Join(dir, "state")
	srv := startServer(t, "attach", "--state-dir", state, "--volume-id", "flusher", img)
	dev := srv.line(t)
	srv.drain(t)
	pid := srv.cmd.Process.Pid
	threads := taskFlags(t, pid)
	flagged := 0
	for tid, fl := range threads {
		if fl&pfIOFlusher != pfIOFlusher {
			t.Errorf("zq-csi nbd attach (pid %d) thread %d: task flags %#x lack PR_IO_FLUSHER %#x", pid, tid, fl, pfIOFlusher)
		} else {
			flagged++
		}
	}
	if out, err := exec.Command(bin, "nbd", "detach", "--state-dir", state, "flusher").CombinedOutput(); err != nil {
		t.Fatalf("detach: %v\n%s", err, out)
	}
	if err := srv.wait(30 * time.Second); err != nil {
		t.Errorf("zq-csi nbd attach after detach: %v", err)
	}

	// This process: threads locked before and after SetIOFlusher.
	type probe struct {
		tid   int
		get   uintptr
		flags uint64
	}
	check := make(chan chan probe)
	var wg sync.WaitGroup
	startThreads := func(n int) {
		var locked sync.WaitGroup
		for range n {
			wg.Add(1)
			locked.Add(1)
			go func() {
				defer wg.Done()
				runtime.LockOSThread() // this goroutine's thread ends with it
				locked.Done()
				ask := <-check
				tid := syscall.Gettid()
				b, _ := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/stat", tid))
				f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
				fl, _ := strconv.ParseUint(f[6], 10, 64)
				r, _, _ := unix.Syscall6(unix.SYS_PRCTL, prGetIOFlusher, 0, 0, 0, 0, 0)
				ask <- probe{tid, r, fl}
			}()
		}
		locked.Wait()
	}
	startThreads(3)
	if err := nbdattach.SetIOFlusher(); err != nil {
		t.Fatalf("SetIOFlusher: %v", err)
	}
	defer func() {
		if _, _, errno := syscall.AllThreadsSyscall(syscall.SYS_PRCTL, prSetIOFlusher, 0, 0); errno != 0 {
			t.Errorf("clearing PR_SET_IO_FLUSHER: %v", errno)
		}
	}()
	startThreads(3)
	for range 6 {
		ask := make(chan probe)
		check <- ask
		p := <-ask
		if p.get != 1 || p.flags&pfIOFlusher != pfIOFlusher {
			t.Errorf("thread %d after SetIOFlusher: PR_GET_IO_FLUSHER %d, task flags %#x", p.tid, p.get, p.flags)
		}
	}
	wg.Wait()
	runtime.LockOSThread()
	if getIOFlusher(t) != 1 {
		t.Error("PR_GET_IO_FLUSHER on the test goroutine's thread: 0 after SetIOFlusher")
	}
	runtime.UnlockOSThread()
	fmt.Printf("ZQVM: IO-FLUSHER zq-csi nbd attach (%s): %d/%d threads with PF_MEMALLOC_NOIO|PF_LOCAL_THROTTLE; SetIOFlusher in-process: PR_GET_IO_FLUSHER=1 on 6 threads (3 started before, 3 after)\n",
		dev, flagged, len(threads))
}
