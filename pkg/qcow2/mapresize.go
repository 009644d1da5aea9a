package qcow2

import (
	"fmt"
)

// Map reports the allocation status of [off, off+n) as qemu-img map does:
// extents of uniform status, with the host offset where data lives.
func (im *Image) Map(off, n uint64) ([]Extent, error) {
	if err := im.checkRange(int64(off), 0); err != nil {
		return nil, err
	}
	size := im.Size()
	if off+n > size || off+n < off {
		n = size - off
	}
	var out []Extent
	push := func(e Extent) {
		if k := len(out) - 1; k >= 0 {
			p := &out[k]
			if p.Start+p.Length == e.Start && p.Depth == e.Depth && p.Present == e.Present && p.Zero == e.Zero &&
				p.Data == e.Data && p.HasOffset == e.HasOffset && p.Compressed == e.Compressed && p.File == e.File &&
				(!p.HasOffset || p.Offset+p.Length == e.Offset) {
				p.Length += e.Length
				return
			}
		}
		out = append(out, e)
	}
	cs := im.clusterSize
	err := im.forEachRegion(off, n, func(l1idx, pos, length uint64) error {
		lk := im.regions.get(l1idx)
		lk.RLock()
		ents, err := im.entriesFor(l1idx, pos, length)
		lk.RUnlock()
		if err != nil {
			return err
		}
		for i, e := range ents {
			cstart := max(pos, (pos&^(cs-1))+uint64(i)*cs)
			cend := min(pos+length, (pos&^(cs-1))+uint64(i+1)*cs)
			ext := Extent{Start: cstart, Length: cend - cstart, File: im.path}
			switch e.kind() {
			case kindNormal:
				ext.Present, ext.Data = true, true
				ext.Offset, ext.HasOffset = e.offset()+cstart%cs, true
			case kindZero:
				ext.Present, ext.Zero = true, true
				if o := e.offset(); o != 0 {
					ext.Offset, ext.HasOffset = o+cstart%cs, true
				}
			case kindCompressed:
				ext.Present, ext.Data, ext.Compressed = true, true, true
			case kindUnallocated:
				sub, err := im.mapBacking(cstart, cend-cstart)
				if err != nil {
					return err
				}
				for _, s := range sub {
					push(s)
				}
				continue
			}
			push(ext)
		}
		return nil
	})
	return out, err
}

// mapBacking maps an unallocated range through the backing chain.
func (im *Image) mapBacking(pos, n uint64) ([]Extent, error) {
	switch b := im.backing.(type) {
	case *Image:
		bs := b.Size()
		var out []Extent
		if pos < bs {
			sub, err := b.Map(pos, min(n, bs-pos))
			if err != nil {
				return nil, err
			}
			for _, s := range sub {
				s.Depth++
				out = append(out, s)
			}
		}
		if pos+n > bs {
			s := max(pos, bs)
			out = append(out, Extent{Start: s, Length: pos + n - s, Depth: 1, Zero: true})
		}
		return out, nil
	case *rawFile:
		if pos >= b.size {
			return []Extent{{Start: pos, Length: n, Depth: 1, Zero: true}}, nil
		}
		l := min(n, b.size-pos)
		out := []Extent{{Start: pos, Length: l, Depth: 1, Present: true, Data: true, Offset: pos, HasOffset: true, File: b.f.Name()}}
		if l < n {
			out = append(out, Extent{Start: pos + l, Length: n - l, Depth: 1, Zero: true})
		}
		return out, nil
	}
	return []Extent{{Start: pos, Length: n, Zero: true}}, nil
}

// Resize grows the virtual size. Shrinking is refused (it would drop data);
// zoned images grow through the zone engine, which adds whole zones.
func (im *Image) Resize(newSize uint64) error {
	if im.ro {
		return ErrReadOnly
	}
	newSize = alignUp(newSize, 512)
	// Lock order is region stripes, then meta: quiesce all guest I/O.
	for i := range im.regions.s {
		im.regions.s[i].Lock()
		defer im.regions.s[i].Unlock()
	}
	im.meta.Lock()
	defer im.meta.Unlock()
	if im.closed {
		return ErrClosed
	}
	if newSize < im.h.size {
		return fmt.Errorf("%w: shrinking from %d to %d bytes is not supported", ErrUnsupported, im.h.size, newSize)
	}
	if im.h.zoned != nil {
		return fmt.Errorf("%w: a zoned image is resized by adding zones (zone engine), not here", ErrUnsupported)
	}
	if len(im.snapshots) > 0 {
		return fmt.Errorf("%w: resizing an image with internal snapshots", ErrUnsupported)
	}
	cs := im.clusterSize
	l2Cover := cs << im.l2Bits
	need := (newSize + l2Cover - 1) / l2Cover
	if need*8 > 32<<20 {
		return fmt.Errorf("%w: size %d needs an L1 table over 32 MiB", ErrUnsupported, newSize)
	}
	if need > uint64(len(im.l1)) {
		oldClusters := alignUp(uint64(len(im.l1))*8, cs) / cs
		newClusters := alignUp(need*8, cs) / cs
		nl1 := make([]uint64, need)
		copy(nl1, im.l1)
		if newClusters > oldClusters || im.h.l1Offset == 0 {
			c, err := im.allocClusters(newClusters)
			if err != nil {
				return err
			}
			buf := make([]byte, newClusters*cs)
			for i, e := range nl1 {
				putBE64(buf[i*8:], e)
			}
			if _, err := im.f.WriteAt(buf, int64(c<<im.clusterBits)); err != nil {
				return err
			}
			if err := syncFile(im.f); err != nil {
				return err
			}
			oldOff := im.h.l1Offset
			im.h.l1Offset = c << im.clusterBits
			im.h.l1Size = uint32(need)
			im.l1 = nl1
			im.h.size = newSize
			if err := im.writeHeader(); err != nil {
				return err
			}
			if oldOff != 0 {
				return im.freeClusters(oldOff>>im.clusterBits, oldClusters)
			}
			return nil
		}
		im.l1 = nl1
		im.h.l1Size = uint32(need)
	}
	im.h.size = newSize
	return im.writeHeader()
}
