package nbdattach

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// ZonesContext is the metadata context that describes zones over NBD
// (spec §6): `nbdinfo --map=zq:zones` shows them.
const ZonesContext = "zq:zones"

// Flags of the zq:zones context. Each extent lies inside one zone and on
// one side of its write pointer:
//
//	bits 0-3  zone condition (Linux blkzoned.h: 0x0 NOT_WP, 0x1 EMPTY,
//	          0x2 IMP_OPEN, 0x3 EXP_OPEN, 0x4 CLOSED, 0xE FULL)
//	bits 4-7  zone type (1 conventional, 2 sequential write required)
//	bit  8    unwritten: the extent lies at or past the write pointer
//	bit  9    zone start: the extent begins a zone
//	bits 12-31 zone index (nr_zones is at most 2^20), so that neighbouring
//	          zones never share flags and clients do not merge them
const (
	ZoneFlagCondMask   = 0xf
	ZoneFlagTypeShift  = 4
	ZoneFlagUnwritten  = 1 << 8
	ZoneFlagZoneStart  = 1 << 9
	ZoneFlagIndexShift = 12
)

// ZonedBackend serves a zoned device: zone rules enforced on every write
// (violations become NBD_EIO), TRIM of whole sequential zones resets them,
// and zones visible through the zq:zones context.
type ZonedBackend struct {
	D *zoned.Device
}

var (
	_ Backend       = ZonedBackend{}
	_ BlockStatuser = ZonedBackend{}
	_ MetaContexter = ZonedBackend{}
	_ Orderer       = ZonedBackend{}
	_ DirectReader  = ZonedBackend{}
)

// OrderKey serializes writes per sequential zone, in arrival order, like
// the zone write lock of a zoned block device: a client (or the kernel)
// with several writes to one zone in flight sees them applied in order.
func (b ZonedBackend) OrderKey(off, length int64) (int64, bool) {
	g := b.D.Geometry()
	i := g.ZoneIndex(uint64(off))
	if i < 0 || g.IsConventional(i) {
		return 0, false
	}
	return int64(i), true
}

// zoneErr attaches the errors a zone engine error is answered with. Spec §6:
// the export returns EIO for violations of the zone rules (§4), and that
// includes the open and active zone limits, which a Linux zoned device
// reports as ETOOMANYREFS and EOVERFLOW: NBD has no ETOOMANYREFS, and its
// EOVERFLOW means a read too large to send unfragmented, which a client
// would take for a length problem. A request the engine finds malformed
// (EINVAL) keeps EINVAL. The Linux errno stays wrapped too, for exporters
// that answer like a zoned block device (FUSE, a custom ErrorMapper);
// DefaultErrorMapper takes the NBD one, which comes first.
func zoneErr(err error) error {
	var ze *zoned.ZoneError
	if !errors.As(err, &ze) {
		return err
	}
	linux := zoned.Errno(err)
	nbd := EIO
	if linux == syscall.EINVAL {
		nbd = EINVAL
	}
	return fmt.Errorf("%w (%w; %w)", err, nbd, linux)
}

func (b ZonedBackend) ReadAt(p []byte, off int64) (int, error) {
	n, err := b.D.ReadAt(p, off)
	return n, zoneErr(err)
}

// ReadDirect lets READ replies go from the image file to the socket, with
// zeros past the write pointers.
func (b ZonedBackend) ReadDirect(off, length int64, fn func(*os.File, []qcow2.DirectExtent) error) error {
	return zoneErr(b.D.ReadDirect(off, length, fn))
}

func (b ZonedBackend) WriteAt(p []byte, off int64, fua bool) (int, error) {
	n, err := b.D.WriteAt(p, off, fua)
	return n, zoneErr(err)
}

// Close closes the device (the attacher closes a backend it is done with).
func (b ZonedBackend) Close() error { return b.D.Close() }

func (b ZonedBackend) Flush() error                 { return zoneErr(b.D.Flush()) }
func (b ZonedBackend) Trim(off, length int64) error { return zoneErr(b.D.Trim(off, length)) }
func (b ZonedBackend) Size() int64                  { return b.D.Size() }

func (b ZonedBackend) WriteZeroes(off, length int64, noHole bool) error {
	return zoneErr(b.D.WriteZeroes(off, length, noHole))
}

// MetaContexts offers the zone map.
func (b ZonedBackend) MetaContexts() []string { return []string{ZonesContext} }

// BlockStatus answers base:allocation (holes and zeros from the image,
// everything past a write pointer reads as zeros) and zq:zones.
func (b ZonedBackend) BlockStatus(ctx string, off, length int64) ([]Extent, error) {
	g := b.D.Geometry()
	end := min(uint64(off+length), g.Size)
	var out []Extent
	add := func(n uint64, flags uint32) {
		if n == 0 {
			return
		}
		if k := len(out) - 1; k >= 0 && out[k].Flags == flags && ctx != ZonesContext {
			out[k].Length += int64(n)
			return
		}
		out = append(out, Extent{Length: int64(n), Flags: flags})
	}
	switch ctx {
	case ZonesContext:
		for a := uint64(off); a < end; {
			i := g.ZoneIndex(a)
			r := b.D.Report(i, 1)[0]
			zEnd := min(end, r.Start+r.Len)
			wp := r.WP
			if r.Type == zoned.TypeConventional {
				wp = r.Start + r.Len
			}
			base := uint32(r.Cond)&ZoneFlagCondMask | uint32(r.Type)<<ZoneFlagTypeShift | uint32(i)<<ZoneFlagIndexShift
			if a == r.Start {
				base |= ZoneFlagZoneStart
			}
			if a < wp {
				add(min(zEnd, wp)-a, base)
				a = min(zEnd, wp)
				base &^= ZoneFlagZoneStart
			}
			if a < zEnd {
				add(zEnd-a, base|ZoneFlagUnwritten)
				a = zEnd
			}
		}
		return out, nil
	default: // base:allocation
		exts, err := b.D.Machine().ReadExtents(uint64(off), end-uint64(off))
		if err != nil {
			return nil, zoneErr(err)
		}
		for _, e := range exts {
			if e.Zero {
				add(e.Length, StateHole|StateZero)
				continue
			}
			m, err := b.D.Image().Map(e.Offset, e.Length)
			if err != nil {
				return nil, err
			}
			for _, x := range m {
				var f uint32
				if !x.Data {
					f |= StateHole
				}
				if x.Zero {
					f |= StateZero
				}
				add(x.Length, f)
			}
		}
		return out, nil
	}
}
