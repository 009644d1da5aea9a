package qcow2

import (
	"fmt"
	"os"
	"slices"
)

// Direct reads. A server that sends guest data over a socket can hand the
// kernel the image file and host offsets (sendfile) instead of reading the
// data into memory first. ReadDirect maps a guest range onto the file and
// keeps that mapping valid while the caller moves the data.

// DirectExtent is one piece of a range mapped by ReadDirect: Length bytes
// that are either in the image file at HostOffset, or zeros.
type DirectExtent struct {
	Length     int64
	HostOffset int64 // byte offset in the image file; 0 when Zero
	Zero       bool
}

// ReadDirect maps guest range [off, off+n) onto the image file and calls fn
// with the file and the extents covering the range in order: data extents
// (clusters contiguous on the host joined into one) and zero extents (zero
// clusters, unallocated clusters of an image without a backing file). fn
// runs under the same region locks ReadAt holds, so no write, discard or
// resize can move or free those clusters until it returns; it must not call
// back into the image. fn must only read the file: it sees the file, not
// the image's view of it.
//
// When part of the range is not a plain mapping of the file (a compressed
// cluster, or a cluster that shows the backing file) ReadDirect returns
// ErrNotDirect without calling fn: the caller uses ReadAt instead.
func (im *Image) ReadDirect(off, n int64, fn func(f *os.File, ext []DirectExtent) error) error {
	if off < 0 || n < 0 || uint64(off)+uint64(n) > im.h.size {
		return fmt.Errorf("%w: offset %d length %d, image size %d", ErrOutOfRange, off, n, im.h.size)
	}
	if im.closed {
		return ErrClosed
	}
	if n == 0 {
		return fn(im.f, nil)
	}
	// Hold the region stripes of the whole range at once, in ascending
	// stripe order (Resize takes all of them in that order too), so that
	// two holders of several stripes never wait for each other in a cycle.
	firstReg, lastReg := uint64(off)>>im.regionShift(), uint64(off+n-1)>>im.regionShift()
	nstripes := uint64(len(im.regions.s))
	var stripes []int
	if lastReg-firstReg+1 >= nstripes {
		for i := range im.regions.s {
			stripes = append(stripes, i)
		}
	} else {
		for r := firstReg; r <= lastReg; r++ {
			stripes = append(stripes, int(r%nstripes))
		}
		slices.Sort(stripes)
		stripes = slices.Compact(stripes)
	}
	for _, s := range stripes {
		im.regions.s[s].RLock()
	}
	defer func() {
		for _, s := range stripes {
			im.regions.s[s].RUnlock()
		}
	}()

	var ext []DirectExtent
	add := func(length uint64, host uint64, zero bool) {
		if k := len(ext) - 1; k >= 0 && ext[k].Zero == zero &&
			(zero || uint64(ext[k].HostOffset)+uint64(ext[k].Length) == host) {
			ext[k].Length += int64(length)
			return
		}
		if zero {
			host = 0
		}
		ext = append(ext, DirectExtent{Length: int64(length), HostOffset: int64(host), Zero: zero})
	}
	cs := im.clusterSize
	err := im.forEachRegion(uint64(off), uint64(n), func(l1idx, pos, length uint64) error {
		ents, err := im.entriesFor(l1idx, pos, length)
		if err != nil {
			return err
		}
		for _, e := range ents {
			in := pos & (cs - 1)
			l := min(length, cs-in)
			switch e.kind() {
			case kindNormal:
				add(l, e.offset()+in, false)
			case kindZero:
				add(l, 0, true)
			case kindUnallocated:
				if im.backing != nil {
					return fmt.Errorf("%w: guest offset %d shows the backing file", ErrNotDirect, pos)
				}
				add(l, 0, true)
			case kindCompressed:
				return fmt.Errorf("%w: guest offset %d is in a compressed cluster", ErrNotDirect, pos)
			}
			pos += l
			length -= l
		}
		return nil
	})
	if err != nil {
		return err
	}
	return fn(im.f, ext)
}
