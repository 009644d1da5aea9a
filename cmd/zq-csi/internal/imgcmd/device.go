package imgcmd

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

const (
	fmtQcow2 = "qcow2"
	fmtRaw   = "raw"
)

// probeWarning is what qemu prints when it guesses raw for an image opened
// for writing (block.c, bdrv_open_inherit).
const probeWarning = `WARNING: Image format was not specified for '%s' and probing guessed raw.
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.
         Specify the 'raw' format explicitly to remove the restrictions.
`

// detectFormat probes path: qcow2 images start with "QFI\xfb", a file
// whose first bytes are a qcow2 header under a damaged magic is refused
// (qcow2.Probe), all other files are raw.
func detectFormat(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	b := make([]byte, qcow2.ProbeLen)
	n, err := io.ReadFull(f, b)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return "", err
	}
	q, err := qcow2.Probe(b[:n])
	switch {
	case err != nil:
		return "", err
	case q:
		return fmtQcow2, nil
	}
	return fmtRaw, nil
}

// resolveFormat checks a -f argument against the file, or detects it.
// guessed reports that the format was probed and found raw: such a device
// is restricted as qemu restricts it (see rawDevice.probed).
func resolveFormat(path, want string) (format string, guessed bool, err error) {
	switch want {
	case "":
		got, err := detectFormat(path)
		return got, got == fmtRaw, err
	case fmtQcow2:
		got, err := detectFormat(path)
		if err == nil && got != fmtQcow2 {
			err = errors.New("Image is not in qcow2 format")
		}
		return fmtQcow2, false, err
	case fmtRaw:
		// The user said raw: no probing (a damaged qcow2 header may be
		// read and written as raw bytes on purpose).
		if _, err := os.Stat(path); err != nil {
			return "", false, err
		}
		return fmtRaw, false, nil
	}
	return "", false, fmt.Errorf("Unknown file format '%s'", want)
}

// openMode is how a command opens an image.
type openMode struct {
	format     string    // -f: "" probes
	readOnly   bool      // -r, or a command that only reads
	forceShare bool      // -U: share every permission (read-only only)
	warn       io.Writer // where the probing warning goes (nil: nowhere)
}

func (m openMode) qcow2() qcow2.OpenOptions {
	return qcow2.OpenOptions{ReadOnly: m.readOnly, ForceShare: m.forceShare}
}

// checkShare refuses -U on a writable open, as qemu-img and qemu-io do.
func (m openMode) checkShare() error {
	if m.forceShare && !m.readOnly {
		return errors.New("force-share=on can only be used with read-only images")
	}
	return nil
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

// openDevice opens path as m says.
func openDevice(path string, m openMode) (device, string, error) {
	if err := m.checkShare(); err != nil {
		return nil, "", err
	}
	f, guessed, err := resolveFormat(path, m.format)
	if err != nil {
		return nil, "", err
	}
	if f == fmtQcow2 {
		im, err := qcow2.Open(path, m.qcow2())
		if err != nil {
			return nil, "", err
		}
		return im, f, nil
	}
	rd, err := openRaw(path, m)
	if err != nil {
		return nil, "", err
	}
	if guessed && !m.readOnly {
		rd.probed = true
		if m.warn != nil {
			fmt.Fprintf(m.warn, probeWarning, path)
		}
	}
	return rd, f, nil
}

// rawDevice is a plain file used as a disk.
type rawDevice struct {
	f        *os.File
	readOnly bool
	// probed: the format was guessed, so a write must not make block 0
	// look like another format (qemu's raw driver: raw_co_pwritev refuses
	// with EPERM a write that would change what probing finds).
	probed bool
}

// openRaw opens a raw image with the lock qemu's file-posix driver takes
// for it (the same bytes as for a qcow2 image: qcow2.LockFileFor).
func openRaw(path string, m openMode) (*rawDevice, error) {
	flag := os.O_RDWR
	if m.readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err
	}
	if err := qcow2.LockFileFor(f, m.qcow2()); err != nil {
		f.Close()
		return nil, err
	}
	return &rawDevice{f: f, readOnly: m.readOnly}, nil
}

// lockRaw opens and locks path as openRaw would, for commands that only
// stat a raw image (info): close the file when done.
func lockRaw(path string, m openMode) (*os.File, error) {
	rd, err := openRaw(path, m)
	if err != nil {
		return nil, err
	}
	return rd.f, nil
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

func (r *rawDevice) WriteAt(p []byte, off int64) (int, error) {
	if r.probed && off < qcow2.ProbeLen && len(p) > 0 {
		if err := r.checkProbe(p, off); err != nil {
			return 0, err
		}
	}
	return r.f.WriteAt(p, off)
}

// checkProbe refuses a write into the probed bytes of a guessed-raw image
// after which the image would no longer probe as raw.
func (r *rawDevice) checkProbe(p []byte, off int64) error {
	head := make([]byte, qcow2.ProbeLen)
	n, err := r.f.ReadAt(head, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	head = head[:max(n, int(min(off+int64(len(p)), qcow2.ProbeLen)))]
	copy(head[off:], p)
	if q, err := qcow2.Probe(head); q || err != nil {
		return syscall.EPERM
	}
	return nil
}
func (r *rawDevice) Flush() error { return r.f.Sync() }
func (r *rawDevice) Close() error { return r.f.Close() }

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
//
// It only peeks at the header, so it shares everything: whether the image
// may be opened as asked is for the open that follows to find out (and
// report with the lock qemu would name).
func isZoned(path string) (bool, error) {
	im, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true, NoBacking: true, ForceShare: true})
	if err != nil {
		return false, err
	}
	defer im.Close()
	return im.Info().Zoned != nil, nil
}

// openIODevice opens path for "img io": a zoned image through the zone
// engine, so that every read, write and discard follows the zone rules,
// anything else as openDevice does. zdev is nil unless the image is zoned.
func openIODevice(path string, m openMode) (dev device, zdev *zoned.Device, err error) {
	if err := m.checkShare(); err != nil {
		return nil, nil, err
	}
	f, _, err := resolveFormat(path, m.format)
	if err != nil {
		return nil, nil, err
	}
	if f == fmtQcow2 {
		z, err := isZoned(path)
		if err != nil {
			return nil, nil, err
		}
		if z {
			zd, err := zoned.Open(path, zoned.OpenOptions{ReadOnly: m.readOnly, ForceShare: m.forceShare})
			if err != nil {
				return nil, nil, err
			}
			return zonedDevice{zd}, zd, nil
		}
	}
	dev, _, err = openDevice(path, m)
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
