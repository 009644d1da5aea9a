package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

// Sentinel errors of the driver. Handlers build their errors with errorf
// around one of these (or return what a library returned); toStatus, called
// once by the interceptor, is the only place that chooses gRPC codes.
var (
	ErrInvalidArgument    = errors.New("invalid argument")
	ErrNotFound           = errors.New("not found")
	ErrAlreadyExists      = errors.New("already exists")
	ErrBusy               = errors.New("operation already in progress")
	ErrOutOfRange         = errors.New("out of range")
	ErrResourceExhausted  = errors.New("resource exhausted")
	ErrFailedPrecondition = errors.New("failed precondition")
	ErrNotReady           = errors.New("not ready")
	ErrUnimplemented      = errors.New("not implemented")
)

// codedError carries a sentinel and a message meant for the CO's user.
type codedError struct {
	kind error
	msg  string
	err  error // optional cause
}

func (e *codedError) Error() string {
	if e.err != nil {
		return e.msg + ": " + e.err.Error()
	}
	return e.msg
}

func (e *codedError) Is(target error) bool { return target == e.kind }
func (e *codedError) Unwrap() error        { return e.err }

// errorf makes an error of kind with a formatted message. A %w verb keeps
// the cause reachable for errors.Is.
func errorf(kind error, format string, args ...any) error {
	err := fmt.Errorf(format, args...)
	return &codedError{kind: kind, msg: err.Error(), err: errors.Unwrap(err)}
}

// toStatus maps an error to a gRPC status. It is the driver's one mapping
// place (STYLE.md §5): library sentinels and driver sentinels alike.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := err.(interface{ GRPCStatus() *status.Status }); ok {
		return err
	}
	var code codes.Code
	switch {
	case errors.Is(err, ErrInvalidArgument), errors.Is(err, qcow2.ErrInvalidOption):
		code = codes.InvalidArgument
	case errors.Is(err, ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, ErrAlreadyExists):
		code = codes.AlreadyExists
	case errors.Is(err, ErrBusy):
		code = codes.Aborted
	case errors.Is(err, ErrOutOfRange):
		code = codes.OutOfRange
	case errors.Is(err, ErrResourceExhausted), errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		code = codes.ResourceExhausted
	case errors.Is(err, ErrFailedPrecondition), errors.Is(err, qcow2.ErrUnsupported), errors.Is(err, qcow2.ErrReadOnly):
		code = codes.FailedPrecondition
	case errors.Is(err, ErrNotReady):
		code = codes.Unavailable
	case errors.Is(err, ErrUnimplemented):
		code = codes.Unimplemented
	case errors.Is(err, qcow2.ErrCorrupt), errors.Is(err, qcow2.ErrNotQcow2):
		code = codes.DataLoss
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.Is(err, fs.ErrPermission):
		code = codes.PermissionDenied
	default:
		code = codes.Internal
	}
	return status.Error(code, err.Error())
}
