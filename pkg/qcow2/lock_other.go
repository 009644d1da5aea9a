//go:build !linux

package qcow2

import "os"

// Open file description locks are Linux's (qemu falls back to POSIX locks
// elsewhere, which a second open in the same process silently drops). The
// node plugin runs on Linux only; on other systems, where the image tool may
// be built for inspection, images are not locked.
func applyLockBytes(f *os.File, perm, shared Perm) error { return nil }
func checkLockBytes(f *os.File, perm, shared Perm) error { return nil }
func unlockBytes(f *os.File)                             {}
