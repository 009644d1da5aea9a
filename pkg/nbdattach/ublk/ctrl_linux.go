//go:build linux

package ublk

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ControlPath is the ublk driver's control node.
const ControlPath = "/dev/ublk-control"

// ErrNoUblk: the kernel has no ublk driver loaded (modprobe ublk_drv).
var ErrNoUblk = errors.New("ublk: " + ControlPath + " missing (modprobe ublk_drv; Linux >= 6.6 for zoned devices)")

// Control sends control commands (URING_CMD on /dev/ublk-control, which
// needs 128-byte SQEs). Commands are serialised: START_DEV blocks until
// every queue has fetched, so a device being started wants a Control of
// its own.
type Control struct {
	mu   sync.Mutex
	f    *os.File
	ring *Ring
	seq  uint64
	// arg is the command's argument buffer. The kernel runs control
	// commands in an io-wq worker and copies to and from it there, while
	// this goroutine may be between two io_uring_enter calls (EINTR from
	// the runtime's preemption signal): a buffer on the goroutine's stack
	// could have moved by then (stack growth or shrinking) and the
	// kernel's answer land in the old copy. A heap object never moves.
	arg []byte
}

// ctrlArgMax is the largest control argument: struct ublk_params.
const ctrlArgMax = 256

// OpenControl opens /dev/ublk-control.
func OpenControl() (*Control, error) {
	f, err := os.OpenFile(ControlPath, os.O_RDWR, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, ErrNoUblk
		}
		return nil, err
	}
	r, err := NewRing(4, SetupSQE128)
	if err != nil {
		f.Close()
		return nil, err
	}
	return &Control{f: f, ring: r, arg: make([]byte, ctrlArgMax)}, nil
}

// Close releases the control node.
func (c *Control) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ring.Close()
	return c.f.Close()
}

// CmdError is a control command the kernel refused.
type CmdError struct {
	Cmd   string
	DevID uint32
	Err   error
}

func (e *CmdError) Error() string {
	return fmt.Sprintf("ublk %s (dev %d): %v", e.Cmd, int32(e.DevID), e.Err)
}
func (e *CmdError) Unwrap() error { return e.Err }

func (c *Control) do(name string, op uint32, hdr ctrlCmd, buf []byte) (int32, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(buf) > len(c.arg) {
		return 0, &CmdError{name, hdr.DevID, fmt.Errorf("argument of %d bytes", len(buf))}
	}
	if len(buf) > 0 {
		copy(c.arg, buf)
		hdr.Addr = uint64(uintptr(unsafe.Pointer(&c.arg[0])))
		hdr.Len = uint16(len(buf))
	}
	c.seq++
	sqe := SQE{Opcode: OpURingCmd, Fd: int32(c.f.Fd()), Off: uint64(op), UserData: c.seq}
	hdr.encode(sqe.Cmd[:])
	if err := c.ring.Push(&sqe); err != nil {
		return 0, err
	}
	var cqe CQE
	got := false
	for !got {
		if _, err := c.ring.Submit(1); err != nil {
			return 0, &CmdError{name, hdr.DevID, err}
		}
		c.ring.Reap(func(x CQE) {
			if x.UserData == c.seq {
				cqe, got = x, true
			}
		})
	}
	runtime.KeepAlive(c.arg)
	copy(buf, c.arg)
	if err := cqe.Err(); err != nil {
		return cqe.Res, &CmdError{name, hdr.DevID, err}
	}
	return cqe.Res, nil
}

const anyDev = ^uint32(0)

// AddDev creates /dev/ublkcN. info.DevID = ^0 lets the kernel choose; the
// kernel's answer (negotiated flags, the device id) is returned.
func (c *Control) AddDev(info DevInfo) (DevInfo, error) {
	buf := make([]byte, devInfoSize)
	info.encode(buf)
	if _, err := c.do("ADD_DEV", cmdAddDev, ctrlCmd{DevID: info.DevID, QueueID: 0xffff}, buf); err != nil {
		return DevInfo{}, err
	}
	return decodeDevInfo(buf), nil
}

// GetDevInfo returns the device's info (state, server pid, flags).
func (c *Control) GetDevInfo(id uint32) (DevInfo, error) {
	buf := make([]byte, devInfoSize)
	if _, err := c.do("GET_DEV_INFO", cmdGetDevInfo, ctrlCmd{DevID: id, QueueID: 0xffff}, buf); err != nil {
		return DevInfo{}, err
	}
	return decodeDevInfo(buf), nil
}

// SetParams sets the queue limits; only before START_DEV.
func (c *Control) SetParams(id uint32, p Params) error {
	buf := make([]byte, paramsLen)
	p.encode(buf)
	_, err := c.do("SET_PARAMS", cmdSetParams, ctrlCmd{DevID: id, QueueID: 0xffff}, buf)
	return err
}

// GetParams returns the parameters, with the devt numbers filled in.
func (c *Control) GetParams(id uint32) (Params, error) {
	buf := make([]byte, paramsLen)
	le.PutUint32(buf, paramsLen)
	if _, err := c.do("GET_PARAMS", cmdGetParams, ctrlCmd{DevID: id, QueueID: 0xffff}, buf); err != nil {
		return Params{}, err
	}
	return decodeParams(buf), nil
}

// StartDev exposes /dev/ublkbN. It waits until every tag of every queue
// has been fetched, and the kernel reads the zone report (and partition
// table) through the queues before it returns, so they must be served.
// pid is the process that opened /dev/ublkcN.
func (c *Control) StartDev(id uint32, pid int) error {
	_, err := c.do("START_DEV", cmdStartDev, ctrlCmd{DevID: id, QueueID: 0xffff, Data: uint64(pid)}, nil)
	return err
}

// StopDev removes /dev/ublkbN (waiting for its in-flight I/O, which the
// queues must still serve) and completes the queues' pending fetches with
// UBLK_IO_RES_ABORT.
func (c *Control) StopDev(id uint32) error {
	_, err := c.do("STOP_DEV", cmdStopDev, ctrlCmd{DevID: id, QueueID: 0xffff}, nil)
	return err
}

// DelDev removes /dev/ublkcN; it waits until the char device is released.
func (c *Control) DelDev(id uint32) error {
	_, err := c.do("DEL_DEV", cmdDelDev, ctrlCmd{DevID: id, QueueID: 0xffff}, nil)
	return err
}

// DelDevAsync removes /dev/ublkcN without waiting: the device number is
// freed when the last opener of /dev/ublkbN closes it (Linux 6.9+;
// EOPNOTSUPP before).
func (c *Control) DelDevAsync(id uint32) error {
	_, err := c.do("DEL_DEV_ASYNC", cmdDelDevAsync, ctrlCmd{DevID: id, QueueID: 0xffff}, nil)
	return err
}

// DeleteDevice deletes device id without waiting for openers of /dev/ublkbN
// (DEL_DEV_ASYNC, falling back to DEL_DEV before Linux 6.9). A device
// already deleted (by another process) is not an error.
func DeleteDevice(c *Control, id uint32) error {
	err := c.DelDevAsync(id)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) {
		err = c.DelDev(id)
	}
	if errors.Is(err, unix.ENODEV) {
		return nil
	}
	return err
}

// StartUserRecovery prepares a device whose server died (with
// UBLK_F_USER_RECOVERY) for a new server.
func (c *Control) StartUserRecovery(id uint32) error {
	_, err := c.do("START_USER_RECOVERY", cmdStartUserRecovery, ctrlCmd{DevID: id, QueueID: 0xffff}, nil)
	return err
}

// EndUserRecovery hands the device to the new server (pid) once its
// queues have fetched.
func (c *Control) EndUserRecovery(id uint32, pid int) error {
	_, err := c.do("END_USER_RECOVERY", cmdEndUserRecovery, ctrlCmd{DevID: id, QueueID: 0xffff, Data: uint64(pid)}, nil)
	return err
}

// Features returns the UBLK_F_* the driver supports (GET_FEATURES, 6.5+).
func (c *Control) Features() (uint64, error) {
	buf := make([]byte, 8)
	if _, err := c.do("GET_FEATURES", cmdGetFeatures, ctrlCmd{DevID: anyDev, QueueID: 0xffff}, buf); err != nil {
		return 0, err
	}
	return le.Uint64(buf), nil
}

// ErrNoZonedUblk: the ublk driver is loaded but cannot create zoned
// devices.
var ErrNoZonedUblk = errors.New("ublk: the kernel's ublk driver has no zoned devices (UBLK_F_ZONED needs Linux >= 6.6 with CONFIG_BLK_DEV_ZONED)")

// CheckZoned tells whether this kernel can create the devices the
// Attacher makes: /dev/ublk-control present (ErrNoUblk otherwise) and
// UBLK_F_ZONED and UBLK_F_USER_COPY among the driver's features
// (ErrNoZonedUblk otherwise). It returns the features.
func CheckZoned() (uint64, error) {
	c, err := OpenControl()
	if err != nil {
		return 0, err
	}
	defer c.Close()
	f, err := c.Features()
	if err != nil {
		return 0, fmt.Errorf("ublk: asking the driver for its features (GET_FEATURES, Linux >= 6.5): %w", err)
	}
	if f&FlagZoned == 0 || f&FlagUserCopy == 0 {
		return f, fmt.Errorf("%w: features %#x", ErrNoZonedUblk, f)
	}
	return f, nil
}
