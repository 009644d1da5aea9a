package qcow2

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every error the engine returns wraps one of them, so the
// driver can map them to gRPC codes with errors.Is.
var (
	// ErrCorrupt: the image violates the qcow2 format (a FormatError says where).
	ErrCorrupt = errors.New("qcow2: corrupt image")
	// ErrUnsupported: a valid image using a feature this engine does not implement.
	ErrUnsupported = errors.New("qcow2: unsupported feature")
	// ErrNotQcow2: the file does not start with the qcow2 magic.
	ErrNotQcow2 = errors.New("qcow2: not a qcow2 image")
	// ErrReadOnly: a write to an image opened read-only.
	ErrReadOnly = errors.New("qcow2: image is read-only")
	// ErrOutOfRange: an I/O request beyond the virtual size.
	ErrOutOfRange = errors.New("qcow2: request beyond the end of the image")
	// ErrClosed: the image was closed.
	ErrClosed = errors.New("qcow2: image is closed")
	// ErrNotDirect: ReadDirect cannot map the range straight onto the image
	// file (compressed clusters, or data from a backing file); use ReadAt.
	ErrNotDirect = errors.New("qcow2: range is not a direct mapping of the image file")
)

// FormatError reports a problem found at a byte offset of the image file.
type FormatError struct {
	Offset int64  // byte offset in the image file the problem was found at
	Reason string // what is wrong, in words
	Err    error  // ErrCorrupt or ErrUnsupported
}

func (e *FormatError) Error() string {
	return fmt.Sprintf("%v at byte offset %d (0x%x): %s", e.Err, e.Offset, e.Offset, e.Reason)
}

func (e *FormatError) Unwrap() error { return e.Err }

func corruptf(off int64, format string, args ...any) error {
	return &FormatError{Offset: off, Reason: fmt.Sprintf(format, args...), Err: ErrCorrupt}
}

func unsupportedf(off int64, format string, args ...any) error {
	return &FormatError{Offset: off, Reason: fmt.Sprintf(format, args...), Err: ErrUnsupported}
}

// syncFile makes a file's data and metadata durable. The fuzz test replaces
// it with a no-op: durability is not what it explores, and fsync under a
// busy disk would starve it.
var syncFile = func(f interface{ Sync() error }) error { return f.Sync() }
