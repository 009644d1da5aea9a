package zoned

import (
	"os"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

// ReadDirect maps device range [off, off+n) onto the image file like
// qcow2.Image.ReadDirect, with what lies at or beyond a sequential zone's
// write pointer as zero extents (spec §4), and calls fn while the image
// holds the mapping. The write pointers are read first, as ReadAt does.
// When the whole range lies past write pointers fn gets a nil file and one
// zero extent. It returns qcow2.ErrNotDirect, without calling fn, when the
// image cannot map the range directly.
func (d *Device) ReadDirect(off, n int64, fn func(f *os.File, ext []qcow2.DirectExtent) error) error {
	if off < 0 || n < 0 {
		return &ZoneError{Op: OpRead, Zone: -1, Offset: uint64(off), Length: uint64(n), Err: ErrOutOfRange}
	}
	zexts, err := d.m.ReadExtents(uint64(off), uint64(n))
	if err != nil {
		return err
	}
	// The image maps the span that holds data; zeros past the write
	// pointers are not looked up (after a reset they may still be mapped).
	var lo, hi uint64
	data := false
	for _, e := range zexts {
		if e.Zero {
			continue
		}
		if !data {
			lo, data = e.Offset, true
		}
		hi = e.Offset + e.Length
	}
	if !data {
		return fn(nil, zeroExtents(zexts))
	}
	return d.img.ReadDirect(int64(lo), int64(hi-lo), func(f *os.File, iext []qcow2.DirectExtent) error {
		return fn(f, overlay(zexts, lo, iext))
	})
}

func zeroExtents(zexts []Extent) []qcow2.DirectExtent {
	var n int64
	for _, e := range zexts {
		n += int64(e.Length)
	}
	if n == 0 {
		return nil
	}
	return []qcow2.DirectExtent{{Length: n, Zero: true}}
}

// overlay returns the extents of the device range zexts covers: the image
// extents iext (which map [lo, ...)) where the zone engine has data, zeros
// where it has none.
func overlay(zexts []Extent, lo uint64, iext []qcow2.DirectExtent) []qcow2.DirectExtent {
	var out []qcow2.DirectExtent
	add := func(x qcow2.DirectExtent) {
		if k := len(out) - 1; k >= 0 && out[k].Zero == x.Zero &&
			(x.Zero || out[k].HostOffset+out[k].Length == x.HostOffset) {
			out[k].Length += x.Length
			return
		}
		out = append(out, x)
	}
	i, ipos := 0, lo // iext[i] starts at device offset ipos
	for _, z := range zexts {
		if z.Zero {
			add(qcow2.DirectExtent{Length: int64(z.Length), Zero: true})
			continue
		}
		a, b := z.Offset, z.Offset+z.Length
		for a < b {
			for ipos+uint64(iext[i].Length) <= a {
				ipos += uint64(iext[i].Length)
				i++
			}
			x := iext[i]
			skip := int64(a - ipos)
			l := min(x.Length-skip, int64(b-a))
			if x.Zero {
				add(qcow2.DirectExtent{Length: l, Zero: true})
			} else {
				add(qcow2.DirectExtent{Length: l, HostOffset: x.HostOffset + skip})
			}
			a += uint64(l)
		}
	}
	return out
}
