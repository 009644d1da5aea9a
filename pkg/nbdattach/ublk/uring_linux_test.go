//go:build linux

package ublk

import (
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// newTestRing skips loudly where io_uring is missing or disabled
// (kernel.io_uring_disabled, seccomp in containers); ZQ_REQUIRE_URING=1
// turns that into a failure.
func newTestRing(t *testing.T, entries, flags uint32) *Ring {
	t.Helper()
	r, err := NewRing(entries, flags)
	if err != nil {
		if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
			if os.Getenv("ZQ_REQUIRE_URING") == "1" {
				t.Fatalf("io_uring required (ZQ_REQUIRE_URING=1): %v", err)
			}
			t.Skipf("******** SKIPPED: io_uring unavailable here (%v); check /proc/sys/kernel/io_uring_disabled ********", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func TestRingNop(t *testing.T) {
	for _, flags := range []uint32{0, SetupSQE128} {
		r := newTestRing(t, 8, flags)
		for i := range 5 {
			if err := r.Push(&SQE{Opcode: OpNop, UserData: uint64(100 + i)}); err != nil {
				t.Fatal(err)
			}
		}
		n, err := r.Submit(5)
		if err != nil || n != 5 {
			t.Fatalf("flags %#x: Submit = %d, %v", flags, n, err)
		}
		var got []uint64
		r.Reap(func(c CQE) {
			if c.Res != 0 {
				t.Errorf("NOP res %d", c.Res)
			}
			got = append(got, c.UserData)
		})
		if len(got) != 5 || got[0] != 100 || got[4] != 104 {
			t.Fatalf("flags %#x: completions %v", flags, got)
		}
	}
}

func TestRingRead(t *testing.T) {
	r := newTestRing(t, 4, SetupSQE128)
	path := filepath.Join(t.TempDir(), "f")
	want := []byte("0123456789abcdef")
	if err := os.WriteFile(path, want, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 8)
	if err := r.Push(&SQE{Opcode: OpRead, Fd: int32(f.Fd()), Off: 4, Addr: uint64(uintptr(unsafe.Pointer(&buf[0]))), Len: 8, UserData: 7}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Submit(1); err != nil {
		t.Fatal(err)
	}
	runtime.KeepAlive(buf)
	var c CQE
	if r.Reap(func(x CQE) { c = x }) != 1 || c.UserData != 7 || c.Res != 8 {
		t.Fatalf("read completion %+v", c)
	}
	if string(buf) != "456789ab" {
		t.Fatalf("read %q", buf)
	}
}

// A URING_CMD to a file without ->uring_cmd completes with EOPNOTSUPP: the
// 128-byte SQE reached the command dispatcher.
func TestRingURingCmdUnsupported(t *testing.T) {
	r := newTestRing(t, 4, SetupSQE128)
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sqe := SQE{Opcode: OpURingCmd, Fd: int32(f.Fd()), Off: uint64(cmdGetDevInfo), UserData: 9}
	ctrlCmd{DevID: 1, QueueID: 0xffff}.encode(sqe.Cmd[:])
	if err := r.Push(&sqe); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Submit(1); err != nil {
		t.Fatal(err)
	}
	var c CQE
	r.Reap(func(x CQE) { c = x })
	if c.UserData != 9 || !errors.Is(c.Err(), unix.EOPNOTSUPP) && !errors.Is(c.Err(), unix.EINVAL) {
		t.Fatalf("URING_CMD on a regular file: %+v (%v)", c, c.Err())
	}
	t.Logf("URING_CMD on a regular file: %v", c.Err())
}

func TestRingWaitTimeout(t *testing.T) {
	r := newTestRing(t, 4, SetupSQE128)
	if !r.HasExtArg() {
		t.Skip("SKIPPED: kernel without IORING_FEAT_EXT_ARG")
	}
	t0 := time.Now()
	_, err := r.SubmitAndWait(1, 50*time.Millisecond)
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("wait on an idle ring: %v", err)
	}
	if d := time.Since(t0); d < 40*time.Millisecond || d > 2*time.Second {
		t.Fatalf("timeout took %v", d)
	}
	// A completion that is already there returns at once.
	r.Push(&SQE{Opcode: OpNop, UserData: 1})
	if _, err := r.SubmitAndWait(1, time.Second); err != nil {
		t.Fatal(err)
	}
	if r.Ready() != 1 {
		t.Fatalf("ready %d", r.Ready())
	}
}

func TestRingFull(t *testing.T) {
	r := newTestRing(t, 2, SetupSQE128)
	for i := range 2 {
		if err := r.Push(&SQE{Opcode: OpNop, UserData: uint64(i)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.Push(&SQE{Opcode: OpNop}); !errors.Is(err, ErrSQFull) {
		t.Fatalf("third push on a 2-entry ring: %v", err)
	}
	if _, err := r.Submit(2); err != nil {
		t.Fatal(err)
	}
	if n := r.Reap(func(CQE) {}); n != 2 {
		t.Fatalf("reaped %d", n)
	}
	if err := r.Push(&SQE{Opcode: OpNop}); err != nil {
		t.Fatalf("push after submit: %v", err)
	}
}
