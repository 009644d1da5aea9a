package nbdattach

import (
	"os"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

// ImageBackend serves a qcow2 image without zones (zoned images go through
// ZonedBackend, so their zone rules are enforced). The image's methods are
// safe for concurrent use, and its Flush is an fsync of the one file, so a
// FLUSH on any connection covers writes made through all of them.
type ImageBackend struct {
	Img *qcow2.Image
	// RO marks the image as opened read-only, so the export says so in its
	// transmission flags instead of failing each write.
	RO bool
}

var (
	_ Backend       = ImageBackend{}
	_ BlockStatuser = ImageBackend{}
	_ ReadOnlyer    = ImageBackend{}
	_ DirectReader  = ImageBackend{}
)

// maxStatusSpan bounds one BLOCK_STATUS walk of the L2 tables; the client
// asks again for the rest (BlockStatuser allows a shorter answer).
const maxStatusSpan = 1 << 30

func (b ImageBackend) ReadAt(p []byte, off int64) (int, error) { return b.Img.ReadAt(p, off) }

// ReadDirect lets READ replies go from the image file to the socket.
func (b ImageBackend) ReadDirect(off, length int64, fn func(*os.File, []qcow2.DirectExtent) error) error {
	return b.Img.ReadDirect(off, length, fn)
}

// flushImage is (*qcow2.Image).Flush; a test wraps it to count the fsyncs
// that FUA and FLUSH cause.
var flushImage = (*qcow2.Image).Flush

// WriteAt writes p; with fua the image is flushed before the reply, which
// is what NBD_CMD_FLAG_FUA asks for.
func (b ImageBackend) WriteAt(p []byte, off int64, fua bool) (int, error) {
	n, err := b.Img.WriteAt(p, off)
	if err != nil || !fua {
		return n, err
	}
	return n, flushImage(b.Img)
}

// Close closes the image (the attacher closes a backend it is done with).
func (b ImageBackend) Close() error { return b.Img.Close() }

func (b ImageBackend) Flush() error                 { return flushImage(b.Img) }
func (b ImageBackend) Trim(off, length int64) error { return b.Img.Discard(off, length) }
func (b ImageBackend) Size() int64                  { return int64(b.Img.Size()) }
func (b ImageBackend) ReadOnly() bool               { return b.RO }

// WriteZeroes maps NBD_CMD_FLAG_NO_HOLE onto qcow2's unmap choice: without
// it whole clusters may be deallocated (qemu-nbd does the same).
func (b ImageBackend) WriteZeroes(off, length int64, noHole bool) error {
	return b.Img.WriteZeroes(off, length, !noHole)
}

// BlockStatus answers base:allocation from the image's map: clusters
// without data are holes, zero clusters and unallocated ones read as zeros.
// The image offers no other context, so every call is base:allocation.
func (b ImageBackend) BlockStatus(_ string, off, length int64) ([]Extent, error) {
	m, err := b.Img.Map(uint64(off), uint64(min(length, maxStatusSpan)))
	if err != nil {
		return nil, err
	}
	out := make([]Extent, 0, len(m))
	for _, x := range m {
		var f uint32
		if !x.Data {
			f |= StateHole
		}
		if x.Zero {
			f |= StateZero
		}
		if k := len(out) - 1; k >= 0 && out[k].Flags == f {
			out[k].Length += int64(x.Length)
			continue
		}
		out = append(out, Extent{Length: int64(x.Length), Flags: f})
	}
	return out, nil
}
