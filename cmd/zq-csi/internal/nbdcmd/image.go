package nbdcmd

import (
	"fmt"
	"math"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

// imageBackend serves a plain qcow2 image. It stands in for the zoned
// device (pkg/zoned), which will take its place behind the same Backend
// interface; *qcow2.Image is safe for concurrent use.
type imageBackend struct {
	im   *qcow2.Image
	size int64
}

var _ nbdattach.Backend = (*imageBackend)(nil)

// OpenImage opens a qcow2 image as an nbdattach.Backend; Close closes it.
func OpenImage(path string, readOnly bool) (*imageBackend, error) {
	im, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: readOnly})
	if err != nil {
		return nil, err
	}
	if im.Size() > math.MaxInt64 {
		im.Close()
		return nil, fmt.Errorf("%s: size %d too large", path, im.Size())
	}
	return &imageBackend{im: im, size: int64(im.Size())}, nil
}

func (b *imageBackend) ReadAt(p []byte, off int64) (int, error) { return b.im.ReadAt(p, off) }

func (b *imageBackend) WriteAt(p []byte, off int64, fua bool) (int, error) {
	n, err := b.im.WriteAt(p, off)
	if err == nil && fua {
		err = b.im.Flush()
	}
	return n, err
}

func (b *imageBackend) Flush() error                 { return b.im.Flush() }
func (b *imageBackend) Trim(off, length int64) error { return b.im.Discard(off, length) }

// WriteZeroes may deallocate unless the client asked for NO_HOLE.
func (b *imageBackend) WriteZeroes(off, length int64, noHole bool) error {
	return b.im.WriteZeroes(off, length, !noHole)
}

func (b *imageBackend) Size() int64  { return b.size }
func (b *imageBackend) Close() error { return b.im.Close() }
