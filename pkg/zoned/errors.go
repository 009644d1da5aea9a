package zoned

import (
	"errors"
	"fmt"
	"syscall"
)

// Sentinels. Every error the engine returns wraps exactly one of them, so
// callers branch with errors.Is and map to an errno with Errno. Their text
// has no "zoned:" prefix because the engine always returns them inside a
// *ZoneError or *GeometryError, which adds it.
var (
	// ErrNotAtWritePointer: a write to a sequential zone did not start at its
	// write pointer.
	ErrNotAtWritePointer = errors.New("write does not start at the write pointer")
	// ErrZoneFull: a write or append to a FULL zone.
	ErrZoneFull = errors.New("zone is full")
	// ErrBoundary: the I/O crosses a zone boundary or the zone's writable end.
	ErrBoundary = errors.New("I/O crosses the zone boundary or capacity")
	// ErrUnaligned: an offset or length is not a positive multiple of 512, or
	// a management range is not zone aligned.
	ErrUnaligned = errors.New("offset or length not aligned")
	// ErrTooManyOpenZones: max_open_zones reached and no implicitly open zone
	// could be closed to make room.
	ErrTooManyOpenZones = errors.New("too many open zones")
	// ErrTooManyActiveZones: max_active_zones reached.
	ErrTooManyActiveZones = errors.New("too many active zones")
	// ErrConventionalZone: zone append or zone management on a conventional
	// zone.
	ErrConventionalZone = errors.New("operation not supported on a conventional zone")
	// ErrInvalidZoneOp: the zone's condition does not allow the operation
	// (open a FULL zone, close an EMPTY one, ...).
	ErrInvalidZoneOp = errors.New("invalid operation for the zone condition")
	// ErrOutOfRange: offset, length or zone index beyond the device.
	ErrOutOfRange = errors.New("beyond the end of the device")
	// ErrAppendTooLarge: zone append longer than max_append_bytes.
	ErrAppendTooLarge = errors.New("zone append larger than max_append_bytes")
	// ErrInvalidGeometry: wrapped by *GeometryError.
	ErrInvalidGeometry = errors.New("invalid geometry")
	// ErrBadWritePointer: a persisted write-pointer table that cannot have
	// been produced by this engine (spec §2, per-zone checks on open).
	ErrBadWritePointer = errors.New("invalid persisted write pointer")
)

// ZoneError carries the command and zone an error is about. Zone is -1 when
// the command was refused before a zone was chosen.
type ZoneError struct {
	Op     Op
	Zone   int
	Offset uint64
	Length uint64
	Err    error
	// Limit, for ErrTooManyOpenZones and ErrTooManyActiveZones, names the
	// limit that was reached and the zones holding it (e.g.
	// "max_open_zones=6 reached: ..."): the errno alone (ETOOMANYREFS,
	// EOVERFLOW) tells a user nothing.
	Limit string
}

func (e *ZoneError) Error() string {
	where := fmt.Sprintf("offset %d", e.Offset)
	if e.Length != 0 {
		where += fmt.Sprintf(" length %d", e.Length)
	}
	if e.Zone >= 0 {
		where = fmt.Sprintf("zone %d %s", e.Zone, where)
	}
	if e.Limit != "" {
		return fmt.Sprintf("zoned: %s %s: %v (%s)", e.Op, where, e.Err, e.Limit)
	}
	return fmt.Sprintf("zoned: %s %s: %v", e.Op, where, e.Err)
}

func (e *ZoneError) Unwrap() error { return e.Err }

// Errno maps an engine error to the errno Linux returns for the same
// condition, so an exporter (NBD error reply, ublk result) answers like a
// real zoned block device. The block layer's blk_status_t → errno table is
// the reference: BLK_STS_IOERR → EIO, BLK_STS_NOSPC → ENOSPC,
// BLK_STS_ZONE_OPEN_RESOURCE → ETOOMANYREFS, BLK_STS_ZONE_ACTIVE_RESOURCE →
// EOVERFLOW, and blkdev_zone_mgmt's argument checks → EINVAL.
// nil maps to 0; an error that is not ours maps to EIO.
func Errno(err error) syscall.Errno {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrZoneFull):
		// Spec §4: an append to a FULL zone is ENOSPC. A regular write to a
		// FULL zone fails null_blk's "sector == wp" check: EIO.
		var ze *ZoneError
		if errors.As(err, &ze) && ze.Op == OpAppend {
			return syscall.ENOSPC
		}
		return syscall.EIO
	case errors.Is(err, ErrTooManyOpenZones):
		return syscall.ETOOMANYREFS
	case errors.Is(err, ErrTooManyActiveZones):
		return syscall.EOVERFLOW
	case errors.Is(err, ErrUnaligned),
		errors.Is(err, ErrInvalidZoneOp),
		errors.Is(err, ErrOutOfRange),
		errors.Is(err, ErrInvalidGeometry),
		errors.Is(err, ErrBadWritePointer):
		return syscall.EINVAL
	case errors.Is(err, ErrNotAtWritePointer),
		errors.Is(err, ErrBoundary),
		errors.Is(err, ErrConventionalZone), // null_blk: BLK_STS_IOERR
		errors.Is(err, ErrAppendTooLarge):   // blk_check_zone_append: BLK_STS_IOERR
		return syscall.EIO
	}
	return syscall.EIO
}
