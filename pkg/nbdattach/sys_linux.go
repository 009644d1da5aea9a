package nbdattach

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// sysfs is where the attacher reads and tunes nbd devices. Its roots are
// fields so unit tests can point them at a temporary directory.
type sysfs struct {
	sysRoot string // normally /sys
	devRoot string // normally /dev
}

func (s sysfs) blockDir(index int) string {
	return filepath.Join(s.sysRoot, "block", "nbd"+strconv.Itoa(index))
}

func (s sysfs) devicePath(index int) string {
	return filepath.Join(s.devRoot, "nbd"+strconv.Itoa(index))
}

// backend reads /sys/block/nbdN/backend, the NBD_ATTR_BACKEND_IDENTIFIER the
// device was connected with. exists is false when the device is gone.
func (s sysfs) backend(index int) (id string, exists bool, err error) {
	b, err := os.ReadFile(filepath.Join(s.blockDir(index), "backend"))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			// The attribute exists only while a backend id is set; the
			// device directory tells whether the device itself is there.
			if _, serr := os.Stat(s.blockDir(index)); serr == nil {
				return "", true, nil
			}
			return "", false, nil
		}
		return "", false, err
	}
	return strings.TrimRight(string(b), "\n"), true, nil
}

// sectors reads /sys/block/nbdN/size (512-byte sectors).
func (s sysfs) sectors(index int) (uint64, error) {
	b, err := os.ReadFile(filepath.Join(s.blockDir(index), "size"))
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
}

// logicalBlockSize reads queue/logical_block_size.
func (s sysfs) logicalBlockSize(index int) (uint32, error) {
	b, err := os.ReadFile(filepath.Join(s.blockDir(index), "queue", "logical_block_size"))
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 32)
	return uint32(v), err
}

// waitDevice waits until the device has the expected size and its node
// exists: the kernel sets the capacity when CONNECT returns, but devtmpfs or
// udev may create /dev/nbdN a moment later.
func (s sysfs) waitDevice(ctx context.Context, index int, size uint64, limit time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	want := size / 512
	var got uint64
	var err error
	for {
		got, err = s.sectors(index)
		if err == nil && got == want {
			if _, err = os.Stat(s.devicePath(index)); err == nil {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			seen := fmt.Sprintf("last seen %d sectors", got)
			if err != nil {
				seen = fmt.Sprintf("last seen: %v", err)
			}
			return fmt.Errorf("nbd: nbd%d (%s) did not show %d sectors within %v after CONNECT (%s): %w", index, s.devicePath(index), want, limit, seen, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// setIOTimeout sets the block layer's request timer of the device. With
// NBD_ATTR_TIMEOUT 0 the kernel never fails a request on it, but the timer
// is when it notices that a request was sent on a connection that has since
// been replaced, and resends it: the bound on the stall of requests that
// were in flight when the serving process died.
func (s sysfs) setIOTimeout(index int, d time.Duration) error {
	ms := strconv.FormatInt(d.Milliseconds(), 10)
	return os.WriteFile(filepath.Join(s.blockDir(index), "queue", "io_timeout"), []byte(ms), 0)
}

// flushDevice writes back the device's page cache and sends the server a
// FLUSH (fsync on a block device does both).
func (s sysfs) flushDevice(index int) error {
	f, err := os.OpenFile(s.devicePath(index), os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// socketPair returns our end as a net.Conn and the kernel's end as an fd
// the caller must close once the kernel holds it.
func socketPair() (net.Conn, int, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, -1, fmt.Errorf("nbd: socketpair: %w", err)
	}
	f := os.NewFile(uintptr(fds[0]), "nbd-server")
	conn, err := net.FileConn(f) // dups the fd
	f.Close()
	if err != nil {
		unix.Close(fds[1])
		return nil, -1, fmt.Errorf("nbd: socketpair: %w", err)
	}
	return conn, fds[1], nil
}

// peerClosed reports whether the other end of our socketpair is gone, with
// a non-blocking peek: once we have closed our copy of the kernel's end,
// only the kernel can hold it.
func peerClosed(conn net.Conn) (bool, error) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return false, errors.New("nbd: connection has no file descriptor")
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false, err
	}
	var closed bool
	var perr error
	var b [1]byte
	err = rc.Control(func(fd uintptr) {
		n, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		switch {
		case err == unix.EAGAIN:
		case err != nil:
			perr = err
		default:
			closed = n == 0
		}
	})
	if err != nil {
		return false, err
	}
	return closed, perr
}

// SetIOFlusher marks the process as an I/O flusher (prctl PR_SET_IO_FLUSHER,
// Linux >= 5.6): its allocations do not recurse into filesystem or block
// I/O, which could otherwise deadlock when memory reclaim writes back pages
// of the very device this process serves. The flag belongs to each thread,
// so it is set on every thread of the Go runtime at once
// (syscall.AllThreadsSyscall; threads created later inherit it). Builds with
// cgo cannot do that and fall back to the calling thread. Needs
// CAP_SYS_RESOURCE.
func SetIOFlusher() error {
	const prSetIOFlusher = 57 // PR_SET_IO_FLUSHER, linux/prctl.h
	_, _, errno := syscall.AllThreadsSyscall(syscall.SYS_PRCTL, prSetIOFlusher, 1, 0)
	if errno == syscall.ENOTSUP {
		_, _, errno = syscall.Syscall6(syscall.SYS_PRCTL, prSetIOFlusher, 1, 0, 0, 0, 0)
	}
	if errno != 0 {
		return fmt.Errorf("nbd: prctl(PR_SET_IO_FLUSHER): %w", errno)
	}
	return nil
}
