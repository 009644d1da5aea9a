package qcow2

import (
	"errors"
	"fmt"
	"os"
	"strings"
)

// Image locking, by the protocol qemu's file-posix driver uses, so that
// zq-csi and qemu (qemu-img, qemu-io, qemu-nbd, a VM) keep each other off an
// image the other one is writing.
//
// qemu describes what an opener does with a node as block permissions
// (include/block/block-common.h: BLK_PERM_CONSISTENT_READ 0x01,
// BLK_PERM_WRITE 0x02, BLK_PERM_WRITE_UNCHANGED 0x04, BLK_PERM_RESIZE 0x08;
// BLK_PERM_ALL 0x0f since qemu 6.2 dropped BLK_PERM_GRAPH_MOD 0x10). In
// block/file-posix.c (RAW_LOCK_PERM_BASE 100, RAW_LOCK_SHARED_BASE 200,
// raw_apply_lock_bytes, raw_check_lock_bytes) an opener holding permission
// bit i takes a shared (F_RDLCK) OFD lock on byte 100+i, and one that does
// not share bit i with others takes one on byte 200+i. It then tests, with
// F_OFD_GETLK for an exclusive lock, byte 200+i for every permission it
// wants ("Failed to get \"write\" lock": someone refuses to share it) and
// byte 100+i for every permission it refuses to share ("Failed to get shared
// \"write\" lock": someone holds it). Two openers racing both see each
// other's bytes and both fail, never both succeed. The locks belong to the
// open file description: they go when the file is closed (or the process
// dies), and a second open of the same image in the same process is a second
// holder, exactly as for qemu.
//
// What zq-csi takes, as qemu's qcow2 driver takes on its file child
// (block.c bdrv_default_perms_for_storage: a format driver never shares
// WRITE or RESIZE of the file that holds its metadata):
//   - writable open: consistent read, write and resize; shares consistent
//     read and write-unchanged. Every other writer is refused, qemu's or ours,
//     and so is `qemu-io -f raw` on a zoned image, which would bypass the
//     write pointers; readers that do not force sharing are refused too
//     (qemu-img info without -U on an image qemu-io writes fails the same way).
//   - read-only open: consistent read; shares consistent read and
//     write-unchanged, so readers share with readers and writers are refused.
//   - read-only with ForceShare (qemu-img -U): consistent read, shares
//     everything; for inspecting an image someone else writes.

// Perm is a set of qemu block permissions.
type Perm uint8

// The permission bits, numbered as qemu numbers them.
const (
	PermConsistentRead Perm = 0x01
	PermWrite          Perm = 0x02
	PermWriteUnchanged Perm = 0x04
	PermResize         Perm = 0x08
	PermAll            Perm = 0x0f
)

const (
	lockPermBase   = 100 // RAW_LOCK_PERM_BASE
	lockSharedBase = 200 // RAW_LOCK_SHARED_BASE
	permBits       = 4   // PERM_FOREACH over BLK_PERM_ALL
)

// String names the permissions as qemu's bdrv_perm_names does.
func (p Perm) String() string {
	names := []string{"consistent read", "write", "write unchanged", "resize"}
	var s []string
	for i := range permBits {
		if p&(1<<i) != 0 {
			s = append(s, names[i])
		}
	}
	return strings.Join(s, ", ")
}

// ErrLocked: another process (or another open of the same image) holds a
// lock that conflicts with the open. A LockError says which.
var ErrLocked = errors.New("qcow2: image is locked")

// LockError is a refused lock, worded as qemu words it.
type LockError struct {
	Path   string
	Perm   Perm // the permission that conflicts
	Shared bool // we refused to share Perm and someone holds it (else: we want Perm and someone refuses to share it)
	Err    error
}

func (e *LockError) Error() string {
	s := ""
	if e.Shared {
		s = "shared "
	}
	msg := fmt.Sprintf("Failed to get %s%q lock", s, e.Perm.String())
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	return msg + "\nIs another process using the image [" + e.Path + "]?"
}

func (e *LockError) Unwrap() []error {
	if e.Err == nil {
		return []error{ErrLocked}
	}
	return []error{ErrLocked, e.Err}
}

// lockPerms returns the permissions an open with o holds and shares.
func lockPerms(o OpenOptions) (perm, shared Perm) {
	switch {
	case !o.ReadOnly:
		return PermConsistentRead | PermWrite | PermResize, PermConsistentRead | PermWriteUnchanged
	case o.ForceShare:
		return PermConsistentRead, PermAll
	}
	return PermConsistentRead, PermConsistentRead | PermWriteUnchanged
}

// LockFile takes qemu's lock bytes on f for an opener holding perm and
// sharing shared, or returns a *LockError (the file is then left without
// any of our locks). The locks last until f is closed. For files that are
// not qcow2 images (raw images in the image tool).
func LockFile(f *os.File, perm, shared Perm) error {
	if err := applyLockBytes(f, perm, shared); err != nil {
		unlockBytes(f)
		return err
	}
	if err := checkLockBytes(f, perm, shared); err != nil {
		unlockBytes(f)
		return err
	}
	return nil
}

// LockFileFor is LockFile with the permissions Open takes for o.
func LockFileFor(f *os.File, o OpenOptions) error {
	perm, shared := lockPerms(o)
	return LockFile(f, perm, shared)
}
