package nbdattach

import (
	"context"
	"errors"
	"fmt"
	"syscall"
)

// Errno is an NBD error value as carried in a reply. proto.md restricts the
// values to the set below; they equal the common Linux errno numbers.
type Errno uint32

// NBD error values (proto.md "Error values").
const (
	EPERM     Errno = 1
	EIO       Errno = 5
	ENOMEM    Errno = 12
	EINVAL    Errno = 22
	ENOSPC    Errno = 28
	EOVERFLOW Errno = 75
	ENOTSUP   Errno = 95
	ESHUTDOWN Errno = 108
)

func (e Errno) String() string {
	switch e {
	case 0:
		return "OK"
	case EPERM:
		return "EPERM"
	case EIO:
		return "EIO"
	case ENOMEM:
		return "ENOMEM"
	case EINVAL:
		return "EINVAL"
	case ENOSPC:
		return "ENOSPC"
	case EOVERFLOW:
		return "EOVERFLOW"
	case ENOTSUP:
		return "ENOTSUP"
	case ESHUTDOWN:
		return "ESHUTDOWN"
	}
	return fmt.Sprintf("Errno(%d)", uint32(e))
}

// Error makes an Errno usable as an error, so a backend may return one
// directly to choose the reply.
func (e Errno) Error() string { return "nbd: " + e.String() }

// ErrorMapper turns a backend error into the NBD error sent to the client.
// It is never called with a nil error and must not return 0.
type ErrorMapper func(error) Errno

// DefaultErrorMapper maps an error by the syscall.Errno it wraps (errors.As),
// or by an Errno it wraps. The mapping follows proto.md: EDQUOT and EFBIG
// become ENOSPC, EROFS becomes EPERM; context cancellation becomes ESHUTDOWN;
// anything unknown becomes EIO.
func DefaultErrorMapper(err error) Errno {
	var ne Errno
	if errors.As(err, &ne) && ne != 0 {
		return ne
	}
	var se syscall.Errno
	if errors.As(err, &se) {
		switch se {
		case syscall.EPERM, syscall.EACCES, syscall.EROFS:
			return EPERM
		case syscall.EIO:
			return EIO
		case syscall.ENOMEM:
			return ENOMEM
		case syscall.EINVAL:
			return EINVAL
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return ENOSPC
		case syscall.EOVERFLOW:
			return EOVERFLOW
		case syscall.ENOTSUP:
			return ENOTSUP
		case syscall.ESHUTDOWN:
			return ESHUTDOWN
		}
		return EIO
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return ESHUTDOWN
	}
	return EIO
}

// replyError is an error decided by the server itself (bad request), with
// the human-readable message sent in a structured error chunk.
type replyError struct {
	errno Errno
	msg   string
}

func (e *replyError) Error() string { return e.errno.String() + ": " + e.msg }

func errorf(errno Errno, format string, args ...any) *replyError {
	return &replyError{errno: errno, msg: fmt.Sprintf(format, args...)}
}

// maxErrorMessage bounds the message in a structured error chunk; proto.md
// allows 4096 bytes, but a backend error may carry long paths.
const maxErrorMessage = 512
