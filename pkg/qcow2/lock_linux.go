package qcow2

import (
	"os"

	"golang.org/x/sys/unix"
)

// applyLockBytes is raw_apply_lock_bytes: a shared lock on byte 100+i for
// each permission held, on byte 200+i for each one not shared.
func applyLockBytes(f *os.File, perm, shared Perm) error {
	for i := range permBits {
		bit := Perm(1) << i
		if perm&bit != 0 {
			if err := ofdLock(f, lockPermBase+int64(i), unix.F_RDLCK); err != nil {
				return &LockError{Path: f.Name(), Perm: bit, Err: err}
			}
		}
		if shared&bit == 0 {
			if err := ofdLock(f, lockSharedBase+int64(i), unix.F_RDLCK); err != nil {
				return &LockError{Path: f.Name(), Perm: bit, Shared: true, Err: err}
			}
		}
	}
	return nil
}

// checkLockBytes is raw_check_lock_bytes: nobody else may lock byte 200+i
// of a permission we want, nor byte 100+i of one we do not share.
func checkLockBytes(f *os.File, perm, shared Perm) error {
	for i := range permBits {
		bit := Perm(1) << i
		if perm&bit == 0 {
			continue
		}
		if held, err := ofdLocked(f, lockSharedBase+int64(i)); err != nil || held {
			return &LockError{Path: f.Name(), Perm: bit, Err: err}
		}
	}
	for i := range permBits {
		bit := Perm(1) << i
		if shared&bit != 0 {
			continue
		}
		if held, err := ofdLocked(f, lockPermBase+int64(i)); err != nil || held {
			return &LockError{Path: f.Name(), Perm: bit, Shared: true, Err: err}
		}
	}
	return nil
}

func unlockBytes(f *os.File) {
	for i := range permBits {
		_ = ofdLock(f, lockPermBase+int64(i), unix.F_UNLCK)
		_ = ofdLock(f, lockSharedBase+int64(i), unix.F_UNLCK)
	}
}

// ofdLock is qemu_lock_fd / qemu_unlock_fd on one byte.
func ofdLock(f *os.File, off int64, typ int16) error {
	fl := unix.Flock_t{Type: typ, Whence: 0, Start: off, Len: 1}
	return unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &fl)
}

// ofdLocked is qemu_lock_fd_test(fd, off, 1, true): would an exclusive lock
// on the byte conflict with a lock of another open file description?
func ofdLocked(f *os.File, off int64) (bool, error) {
	fl := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: off, Len: 1}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &fl); err != nil {
		return false, err
	}
	return fl.Type != unix.F_UNLCK, nil
}
