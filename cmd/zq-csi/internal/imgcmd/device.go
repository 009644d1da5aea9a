package imgcmd

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

const (
	fmtQcow2 = "qcow2"
	fmtRaw   = "raw"
)

var qcow2Magic = []byte{'Q', 'F', 'I', 0xfb}

// detectFormat looks at the magic: qcow2 images start with "QFI\xfb", all
// other files are raw (as qemu-img's probing concludes for our two formats).
func detectFormat(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	var m [4]byte
	n, err := io.ReadFull(f, m[:])
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return "", err
	}
	if n == 4 && bytes.Equal(m[:], qcow2Magic) {
		return fmtQcow2, nil
	}
	return fmtRaw, nil
}

// resolveFormat checks a -f argument against the file, or detects it.
func resolveFormat(path, want string) (string, error) {
	got, err := detectFormat(path)
	if err != nil {
		return "", err
	}
	switch want {
	case "":
		return got, nil
	case fmtQcow2:
		if got != fmtQcow2 {
			return "", errors.New("Image is not in qcow2 format")
		}
		return fmtQcow2, nil
	case fmtRaw:
		return fmtRaw, nil
	}
	return "", fmt.Errorf("Unknown file format '%s'", want)
}

// device is what the io, convert and map commands need from an image.
// *qcow2.Image implements it; rawDevice does for plain files.
type device interface {
	io.ReaderAt
	io.WriterAt
	Size() uint64
	Discard(off, n int64) error
	WriteZeroes(off, n int64, unmap bool) error
	Flush() error
	Close() error
}

var _ device = (*qcow2.Image)(nil)

// openDevice opens path in format f ("" detects it).
func openDevice(path, f string, readOnly bool) (device, string, error) {
	f, err := resolveFormat(path, f)
	if err != nil {
		return nil, "", err
	}
	if f == fmtQcow2 {
		im, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: readOnly})
		if err != nil {
			return nil, "", err
		}
		return im, f, nil
	}
	rd, err := openRaw(path, readOnly)
	return rd, f, err
}

// rawDevice is a plain file used as a disk.
type rawDevice struct {
	f        *os.File
	readOnly bool
}

func openRaw(path string, readOnly bool) (*rawDevice, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err
	}
	return &rawDevice{f: f, readOnly: readOnly}, nil
}

func (r *rawDevice) Size() uint64 {
	fi, err := r.f.Stat()
	if err != nil {
		return 0
	}
	return uint64(fi.Size())
}

func (r *rawDevice) ReadAt(p []byte, off int64) (int, error) {
	n, err := r.f.ReadAt(p, off)
	if errors.Is(err, io.EOF) && off+int64(len(p)) <= int64(r.Size()) {
		err = nil
	}
	return n, err
}

func (r *rawDevice) WriteAt(p []byte, off int64) (int, error) { return r.f.WriteAt(p, off) }
func (r *rawDevice) Flush() error                             { return r.f.Sync() }
func (r *rawDevice) Close() error                             { return r.f.Close() }

// Discard punches a hole where the system can, so the range reads as zeros
// either way (qemu's raw driver does the same with discard=unmap).
func (r *rawDevice) Discard(off, n int64) error { return r.WriteZeroes(off, n, true) }

func (r *rawDevice) WriteZeroes(off, n int64, unmap bool) error {
	if punchHole(r.f, off, n) == nil {
		return nil
	}
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		c := min(n, int64(len(buf)))
		if _, err := r.f.WriteAt(buf[:c], off); err != nil {
			return err
		}
		off += c
		n -= c
	}
	return nil
}

// isZoned reports whether path is a qcow2 image with the zoned extension.
func isZoned(path string) (bool, error) {
	im, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		return false, err
	}
	defer im.Close()
	return im.Info().Zoned != nil, nil
}

// openIODevice opens path for "img io": a zoned image through the zone
// engine, so that every read, write and discard follows the zone rules,
// anything else as openDevice does. zdev is nil unless the image is zoned.
func openIODevice(path, f string, readOnly bool) (dev device, zdev *zoned.Device, err error) {
	f, err = resolveFormat(path, f)
	if err != nil {
		return nil, nil, err
	}
	if f == fmtQcow2 {
		z, err := isZoned(path)
		if err != nil {
			return nil, nil, err
		}
		if z {
			zd, err := zoned.Open(path, zoned.OpenOptions{ReadOnly: readOnly})
			if err != nil {
				return nil, nil, err
			}
			return zonedDevice{zd}, zd, nil
		}
	}
	dev, _, err = openDevice(path, f, readOnly)
	return dev, nil, err
}

// warnClamped prints the zone limits the engine clamped when it opened d
// (docs/zoned-format.md §2: too-large limits are clamped with a warning,
// the header is left as it is), as create prints its own warnings.
func warnClamped(w io.Writer, d *zoned.Device) {
	for _, m := range d.Warnings() {
		fmt.Fprintf(w, "warning: %s\n", m)
	}
}

// zonedDevice is a zoned image as a device: writes must follow the zone
// rules, reads past a write pointer return zeros, and a discard is a TRIM
// (whole sequential zones are reset, partial ranges ignored; spec §6).
type zonedDevice struct{ d *zoned.Device }

func (z zonedDevice) ReadAt(p []byte, off int64) (int, error)  { return z.d.ReadAt(p, off) }
func (z zonedDevice) WriteAt(p []byte, off int64) (int, error) { return z.d.WriteAt(p, off, false) }
func (z zonedDevice) Size() uint64                             { return uint64(z.d.Size()) }
func (z zonedDevice) Discard(off, n int64) error               { return z.d.Trim(off, n) }
func (z zonedDevice) Flush() error                             { return z.d.Flush() }
func (z zonedDevice) Close() error                             { return z.d.Close() }

func (z zonedDevice) WriteZeroes(off, n int64, unmap bool) error {
	return z.d.WriteZeroes(off, n, !unmap)
}
