//go:build linux

package ublk

import (
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A minimal io_uring: just what a ublk server needs (one ring per queue
// thread, IORING_OP_URING_CMD in 128-byte SQEs, waits with a timeout).
// Layouts and numbers are those of include/uapi/linux/io_uring.h.

// io_uring_setup flags and features.
const (
	SetupSQE128 = 1 << 10 // IORING_SETUP_SQE128: 128-byte SQEs, 80 bytes of command
	SetupCQE32  = 1 << 11 // IORING_SETUP_CQE32 (not used by ublk)

	featSingleMmap = 1 << 0 // IORING_FEAT_SINGLE_MMAP
	featExtArg     = 1 << 8 // IORING_FEAT_EXT_ARG
)

// Opcodes (enum io_uring_op).
const (
	OpNop      = 0  // IORING_OP_NOP
	OpRead     = 22 // IORING_OP_READ
	OpWrite    = 23 // IORING_OP_WRITE
	OpURingCmd = 46 // IORING_OP_URING_CMD
)

const (
	offSQRing = 0          // IORING_OFF_SQ_RING
	offCQRing = 0x8000000  // IORING_OFF_CQ_RING
	offSQEs   = 0x10000000 // IORING_OFF_SQES

	enterGetEvents = 1 << 0 // IORING_ENTER_GETEVENTS
	enterExtArg    = 1 << 3 // IORING_ENTER_EXT_ARG

	paramsSize = 120 // sizeof(struct io_uring_params)
)

// SQE is struct io_uring_sqe with the 80-byte command area of a
// SQE128 ring. In a 64-byte ring only the first 16 bytes of Cmd exist
// (they are addr3 and __pad2).
type SQE struct {
	Opcode      uint8
	Flags       uint8
	Ioprio      uint16
	Fd          int32
	Off         uint64 // for URING_CMD: cmd_op in the low 32 bits
	Addr        uint64
	Len         uint32
	OpFlags     uint32
	UserData    uint64
	BufIndex    uint16
	Personality uint16
	SpliceFdIn  int32
	Cmd         [80]byte
}

// CQE is struct io_uring_cqe (16 bytes; no CQE32).
type CQE struct {
	UserData uint64
	Res      int32
	Flags    uint32
}

// Err returns the completion's error, nil when Res >= 0.
func (c CQE) Err() error {
	if c.Res < 0 {
		return unix.Errno(-c.Res)
	}
	return nil
}

var (
	// ErrSQFull: every submission slot holds an SQE not yet consumed.
	ErrSQFull = errors.New("io_uring: submission queue full")
	// ErrTimeout: Wait returned without a completion.
	ErrTimeout = errors.New("io_uring: wait timed out")
)

// Ring is one io_uring instance. It is not safe for concurrent use: ublk
// requires all commands of a queue to come from one task anyway, so each
// ring belongs to one OS thread.
type Ring struct {
	fd       int
	sqeSize  int
	features uint32
	sqMem    []byte
	cqMem    []byte // aliases sqMem with IORING_FEAT_SINGLE_MMAP
	sqeMem   []byte

	sqHead, sqTail, sqMask, sqEntries *uint32
	sqArray                           unsafe.Pointer
	cqHead, cqTail, cqMask            *uint32
	cqes                              unsafe.Pointer

	localTail uint32 // SQEs written, published at Submit
}

// NewRing sets up a ring of entries SQEs with the given IORING_SETUP_*
// flags. ENOSYS, EPERM or EACCES mean io_uring is missing or disabled
// (sysctl kernel.io_uring_disabled, seccomp).
func NewRing(entries uint32, flags uint32) (*Ring, error) {
	var p [paramsSize]byte
	le.PutUint32(p[8:], flags)
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p[0])), 0)
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup(%d, %#x): %w", entries, flags, errno)
	}
	r := &Ring{fd: int(fd), sqeSize: 64}
	if flags&SetupSQE128 != 0 {
		r.sqeSize = 128
	}
	if err := r.mmap(p[:]); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

func (r *Ring) mmap(p []byte) error {
	sqEntries := le.Uint32(p[0:])
	cqEntries := le.Uint32(p[4:])
	r.features = le.Uint32(p[20:])
	sq := p[40:80] // struct io_sqring_offsets
	cq := p[80:120]
	sqSize := int(le.Uint32(sq[24:])) + int(sqEntries)*4 // array + entries
	cqSize := int(le.Uint32(cq[20:])) + int(cqEntries)*16
	if r.features&featSingleMmap != 0 {
		sqSize = max(sqSize, cqSize)
		cqSize = sqSize
	}
	var err error
	if r.sqMem, err = unix.Mmap(r.fd, offSQRing, sqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("io_uring: mmap SQ ring: %w", err)
	}
	if r.features&featSingleMmap != 0 {
		r.cqMem = r.sqMem
	} else if r.cqMem, err = unix.Mmap(r.fd, offCQRing, cqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("io_uring: mmap CQ ring: %w", err)
	}
	if r.sqeMem, err = unix.Mmap(r.fd, offSQEs, int(sqEntries)*r.sqeSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("io_uring: mmap SQEs: %w", err)
	}
	u32 := func(mem []byte, off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&mem[off])) }
	r.sqHead, r.sqTail = u32(r.sqMem, le.Uint32(sq[0:])), u32(r.sqMem, le.Uint32(sq[4:]))
	r.sqMask, r.sqEntries = u32(r.sqMem, le.Uint32(sq[8:])), u32(r.sqMem, le.Uint32(sq[12:]))
	r.sqArray = unsafe.Pointer(&r.sqMem[le.Uint32(sq[24:])])
	r.cqHead, r.cqTail = u32(r.cqMem, le.Uint32(cq[0:])), u32(r.cqMem, le.Uint32(cq[4:]))
	r.cqMask = u32(r.cqMem, le.Uint32(cq[8:]))
	r.cqes = unsafe.Pointer(&r.cqMem[le.Uint32(cq[20:])])
	r.localTail = atomic.LoadUint32(r.sqTail)
	return nil
}

// Close unmaps and closes the ring. Commands still in flight are
// cancelled by the kernel.
func (r *Ring) Close() error {
	if r.sqeMem != nil {
		unix.Munmap(r.sqeMem)
	}
	if r.cqMem != nil && r.features&featSingleMmap == 0 {
		unix.Munmap(r.cqMem)
	}
	if r.sqMem != nil {
		unix.Munmap(r.sqMem)
	}
	r.sqeMem, r.cqMem, r.sqMem = nil, nil, nil
	if r.fd < 0 {
		return nil
	}
	err := unix.Close(r.fd)
	r.fd = -1
	return err
}

// SQESize is 64 or 128.
func (r *Ring) SQESize() int { return r.sqeSize }

// HasExtArg reports IORING_FEAT_EXT_ARG (timeouts in Wait).
func (r *Ring) HasExtArg() bool { return r.features&featExtArg != 0 }

// Push copies sqe into the next free slot; Submit hands it to the kernel.
func (r *Ring) Push(sqe *SQE) error {
	head := atomic.LoadUint32(r.sqHead)
	if r.localTail-head >= *r.sqEntries {
		return ErrSQFull
	}
	idx := r.localTail & *r.sqMask
	src := (*[128]byte)(unsafe.Pointer(sqe))[:r.sqeSize]
	copy(r.sqeMem[int(idx)*r.sqeSize:], src)
	*(*uint32)(unsafe.Add(r.sqArray, 4*uintptr(idx))) = idx
	r.localTail++
	return nil
}

// Submit publishes pushed SQEs and enters the kernel, waiting for at least
// waitNr completions. EINTR (the Go runtime's preemption signals) is
// retried. It returns the number of SQEs the kernel consumed.
func (r *Ring) Submit(waitNr uint32) (int, error) {
	return r.enter(waitNr, nil)
}

// SubmitAndWait is Submit with a timeout on the wait: ErrTimeout when no
// completion arrived in d (needs IORING_FEAT_EXT_ARG, Linux 5.11).
func (r *Ring) SubmitAndWait(waitNr uint32, d time.Duration) (int, error) {
	ts := unix.NsecToTimespec(int64(d))
	return r.enter(waitNr, &ts)
}

func (r *Ring) enter(waitNr uint32, ts *unix.Timespec) (int, error) {
	atomic.StoreUint32(r.sqTail, r.localTail)
	flags := uintptr(0)
	if waitNr > 0 {
		flags |= enterGetEvents
	}
	var arg [24]byte // struct io_uring_getevents_arg {sigmask, sigmask_sz, pad, ts}
	argp, argsz := uintptr(0), uintptr(0)
	if ts != nil {
		if !r.HasExtArg() {
			return 0, fmt.Errorf("io_uring: wait timeouts need IORING_FEAT_EXT_ARG (Linux 5.11)")
		}
		flags |= enterExtArg
		le.PutUint64(arg[16:], uint64(uintptr(unsafe.Pointer(ts))))
		argp, argsz = uintptr(unsafe.Pointer(&arg[0])), uintptr(len(arg))
	}
	total := 0
	for {
		// Without SQPOLL the kernel consumes SQEs only inside
		// io_uring_enter: whatever lies between its head and our tail is
		// still to submit.
		toSubmit := r.localTail - atomic.LoadUint32(r.sqHead)
		n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit), uintptr(waitNr), flags, argp, argsz)
		runtime.KeepAlive(ts)
		runtime.KeepAlive(&arg)
		switch errno {
		case 0:
			return total + int(n), nil
		case unix.EINTR, unix.EAGAIN, unix.EBUSY:
			// EINTR: the Go runtime's preemption signal; EAGAIN/EBUSY: the
			// CQ ring is momentarily full. Return what is ready, or retry.
			if waitNr > 0 && r.Ready() > 0 {
				return total, nil
			}
			if errno != unix.EINTR {
				time.Sleep(time.Millisecond)
			}
			continue
		case unix.ETIME:
			return total, ErrTimeout
		}
		return total, fmt.Errorf("io_uring_enter: %w", errno)
	}
}

// Ready returns how many completions wait in the CQ ring.
func (r *Ring) Ready() uint32 {
	return atomic.LoadUint32(r.cqTail) - atomic.LoadUint32(r.cqHead)
}

// Reap calls fn for every completion in the CQ ring and consumes them.
func (r *Ring) Reap(fn func(CQE)) int {
	n := 0
	for {
		head := atomic.LoadUint32(r.cqHead)
		if head == atomic.LoadUint32(r.cqTail) {
			return n
		}
		c := *(*CQE)(unsafe.Add(r.cqes, 16*uintptr(head&*r.cqMask)))
		atomic.StoreUint32(r.cqHead, head+1)
		fn(c)
		n++
	}
}
