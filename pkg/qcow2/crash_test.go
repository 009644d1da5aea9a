package qcow2

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// crashChildEnv makes the test binary act as a writer that the parent kills.
const crashChildEnv = "ZQ_QCOW2_CRASH_CHILD"

func pattern(i int, n int) []byte {
	b := bytes.Repeat([]byte{byte(i*7 + 1)}, n)
	copy(b, fmt.Sprintf("rec%08d", i))
	return b
}

// TestCrashChild is the child side of TestKill9KeepsAcknowledgedWrites.
func TestCrashChild(t *testing.T) {
	path := os.Getenv(crashChildEnv)
	if path == "" {
		t.Skip("helper process for TestKill9KeepsAcknowledgedWrites; runs only when that test starts it")
	}
	im, err := Open(path, OpenOptions{})
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	for i := 0; ; i++ {
		// Spread writes so that allocation, L2 creation and refcount
		// block creation all happen while we may be killed.
		off := int64(i%4096) * 3 * 4096 * 7 % (60 << 20)
		off &^= 4095
		if _, err := im.WriteAt(pattern(i, 12288), off); err != nil {
			fmt.Println("ERR", err)
			os.Exit(1)
		}
		fmt.Printf("ACK %d %d\n", i, off) // acknowledged: must survive kill -9
	}
}

// TestKill9KeepsAcknowledgedWrites kills a writer mid-workload and checks
// that every acknowledged write is readable after reopen and that the image
// is consistent (the dirty bit triggers a refcount rebuild).
func TestKill9KeepsAcknowledgedWrites(t *testing.T) {
	for round := 0; round < 3; round++ {
		path := filepath.Join(t.TempDir(), "crash.qcow2")
		if _, err := Create(path, CreateOptions{Size: 64 << 20, ClusterSize: 4096, RefcountBits: 16}); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(os.Args[0], "-test.run", "^TestCrashChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), crashChildEnv+"="+path)
		stdout, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		acked := map[int64]int{}
		var mu sync.Mutex
		done := make(chan struct{})
		go func() {
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				var i int
				var off int64
				if n, _ := fmt.Sscanf(sc.Text(), "ACK %d %d", &i, &off); n == 2 {
					mu.Lock()
					acked[off] = i
					mu.Unlock()
				}
			}
			close(done)
		}()
		time.Sleep(time.Duration(150+100*round) * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		<-done
		if len(acked) == 0 {
			t.Fatal("the child acknowledged nothing before it was killed")
		}
		// Reopen read-write: dirty image → refcounts rebuilt.
		im, err := Open(path, OpenOptions{})
		if err != nil {
			t.Fatalf("reopen after kill -9: %v", err)
		}
		buf := make([]byte, 12288)
		for off, i := range acked {
			if _, err := im.ReadAt(buf, off); err != nil {
				t.Fatal(err)
			}
			// A later unacknowledged write may have overwritten the
			// record; it must then be a complete newer record or the
			// acknowledged one, never garbage from an unrelated place.
			var got int
			if _, err := fmt.Sscanf(string(buf[:11]), "rec%08d", &got); err != nil || got < i {
				t.Fatalf("round %d: acknowledged record %d at %d lost: found %q", round, i, off, buf[:11])
			}
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		res, err := Check(path, CheckOptions{})
		if err != nil || res.ExitCode() != 0 {
			t.Fatalf("round %d: check after crash recovery: %+v %v", round, res, err)
		}
		t.Logf("round %d: %d acknowledged records verified", round, len(acked))
	}
}

// TestConcurrentIO runs writers and readers in parallel over shared and
// disjoint regions; run with -race. Each writer owns a set of 4 KiB slots.
func TestConcurrentIO(t *testing.T) {
	path := filepath.Join(t.TempDir(), "conc.qcow2")
	const size = 32 << 20
	if _, err := Create(path, CreateOptions{Size: size, ClusterSize: 65536}); err != nil {
		t.Fatal(err)
	}
	im, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	const workers, slot = 8, 4096
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			buf := make([]byte, slot)
			for i := 0; i < 400; i++ {
				s := (i*workers + w) * 37 % (size / slot)
				s = s - s%workers + w // slot owned by w
				off := int64(s) * slot
				want := pattern(w*100000+i, slot)
				if _, err := im.WriteAt(want, off); err != nil {
					errs <- err
					return
				}
				if _, err := im.ReadAt(buf, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(buf, want) {
					errs <- fmt.Errorf("worker %d: slot %d read back wrong data", w, s)
					return
				}
				if i%50 == 0 {
					if err := im.Discard(off, slot); err != nil {
						errs <- err
						return
					}
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if res, err := Check(path, CheckOptions{}); err != nil || res.ExitCode() != 0 {
		t.Fatalf("check: %+v %v", res, err)
	}
}

var _ = strconv.Itoa
