package zoned

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"testing"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

// readDirect reads [off, off+n) through Device.ReadDirect: data extents
// with pread of the file it hands out, zero extents as zeros.
func readDirect(t *testing.T, d *Device, off, n int64) ([]byte, []qcow2.DirectExtent) {
	t.Helper()
	var out []byte
	var exts []qcow2.DirectExtent
	err := d.ReadDirect(off, n, func(f *os.File, ext []qcow2.DirectExtent) error {
		exts = append(exts, ext...)
		for _, x := range ext {
			b := make([]byte, x.Length)
			if !x.Zero {
				if f == nil {
					return fmt.Errorf("data extent %+v with no file", x)
				}
				if _, err := f.ReadAt(b, x.HostOffset); err != nil {
					return err
				}
			}
			out = append(out, b...)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("ReadDirect(%d, %d): %v", off, n, err)
	}
	if int64(len(out)) != n {
		t.Fatalf("ReadDirect(%d, %d): extents cover %d bytes", off, n, len(out))
	}
	return out, exts
}

// TestReadDirectWritePointer: direct reads see what ReadAt sees: data
// below a sequential zone's write pointer, zeros at and past it (even where
// the image still maps data), conventional zones as stored.
func TestReadDirectWritePointer(t *testing.T) {
	const zs = 1 << 20
	d, err := Open(mkZoned(t, 8, 2, zs, zs, 4, 4), OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := d.WriteAt(fill(0xc1, 256<<10), 64<<10, false); err != nil { // conventional zone 0
		t.Fatal(err)
	}
	if _, err := d.WriteAt(fill(0x51, 300<<10), 2*zs, false); err != nil { // zone 2: WP at 2M+300K
		t.Fatal(err)
	}
	if _, err := d.WriteAt(fill(0x52, 64<<10), 3*zs, false); err != nil { // zone 3: WP at 3M+64K
		t.Fatal(err)
	}
	// Zone 4 written then reset.
	if _, err := d.WriteAt(fill(0x53, 128<<10), 4*zs, false); err != nil {
		t.Fatal(err)
	}
	if err := d.Mgmt(OpReset, 4*zs, zs); err != nil {
		t.Fatal(err)
	}
	// Data past zone 2's WP in the image (what a crash between the data
	// write and the WP record could leave): it must read as zeros.
	if _, err := d.img.WriteAt(fill(0xee, 128<<10), 2*zs+384<<10); err != nil {
		t.Fatal(err)
	}
	for _, r := range []struct {
		name   string
		off, n int64
		zeroAt int64 // the WP inside the range, -1 if none
	}{
		{"conventional zone", 0, zs, -1},
		{"across zone 2's WP", 2*zs + 100<<10, 1 << 20, 2*zs + 300<<10},
		{"zone 2 past its WP into zone 3", 2*zs + 512<<10, 1 << 20, 2*zs + 300<<10},
		{"only past zone 2's WP", 2*zs + 400<<10, 512 << 10, 2*zs + 400<<10},
		{"reset zone 4", 4 * zs, zs, 4 * zs},
		{"conventional into sequential", zs + 512<<10, zs, 2*zs + 300<<10},
	} {
		got, exts := readDirect(t, d, r.off, r.n)
		want := make([]byte, r.n)
		if _, err := d.ReadAt(want, r.off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s: ReadDirect differs from ReadAt; extents %+v", r.name, exts)
		}
		if r.zeroAt >= 0 {
			// The extent holding the WP's byte must be a zero extent.
			pos := r.off
			for _, x := range exts {
				if pos <= r.zeroAt && r.zeroAt < pos+x.Length && !x.Zero {
					t.Errorf("%s: extent %+v at %d covers the WP %d and is not zero", r.name, x, pos, r.zeroAt)
				}
				pos += x.Length
			}
		}
	}
	if err := d.ReadDirect(-1, 10, func(*os.File, []qcow2.DirectExtent) error { return nil }); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("negative offset: %v", err)
	}
	if err := d.ReadDirect(8*zs-4096, 8192, func(*os.File, []qcow2.DirectExtent) error { return nil }); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("past the end: %v", err)
	}
}
