package nbdcmd

import (
	"io"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
	"github.com/zq-csi/zq-csi/pkg/qcow2"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// Backend is an image served to the kernel; Close closes the image.
type Backend interface {
	nbdattach.Backend
	io.Closer
}

// OpenImage opens the image at path: a zoned image through its zone engine
// (nbdattach.ZonedBackend: zone rules enforced, writes to a zone applied in
// order), any other qcow2 image through nbdattach.ImageBackend.
func OpenImage(path string, readOnly bool) (Backend, error) {
	im, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: readOnly})
	if err != nil {
		return nil, err
	}
	if im.Info().Zoned == nil {
		return nbdattach.ImageBackend{Img: im, RO: readOnly}, nil
	}
	im.Close()
	d, err := zoned.Open(path, zoned.OpenOptions{ReadOnly: readOnly})
	if err != nil {
		return nil, err
	}
	return nbdattach.ZonedBackend{D: d}, nil
}
