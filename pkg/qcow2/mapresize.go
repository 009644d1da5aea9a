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

// Resize grows the virtual size. Shrinking is refused (it would drop data).
// A zoned image grows by whole zones' worth of write pointers: the new zones
// are EMPTY, nr_zones and the size change together in one header write, and
// a write-pointer table that outgrows its clusters moves to new ones.
func (im *Image) Resize(newSize uint64) error {
	return im.noteFailure(im.resize(newSize))
}

func (im *Image) resize(newSize uint64) error {
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
	if newSize == im.h.size {
		return nil
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
	var freeLater [][2]uint64 // clusters to release once the header points elsewhere
	newL1, newL1Off := im.l1, im.h.l1Offset
	if need > uint64(len(im.l1)) {
		oldClusters := alignUp(uint64(len(im.l1))*8, cs) / cs
		newClusters := alignUp(need*8, cs) / cs
		newL1 = make([]uint64, need)
		copy(newL1, im.l1)
		if newClusters > oldClusters || im.h.l1Offset == 0 {
			c, err := im.allocClusters(newClusters)
			if err != nil {
				return err
			}
			buf := make([]byte, newClusters*cs)
			for i, e := range newL1 {
				putBE64(buf[i*8:], e)
			}
			if _, err := im.f.WriteAt(buf, int64(c<<im.clusterBits)); err != nil {
				return err
			}
			newL1Off = c << im.clusterBits
			if im.h.l1Offset != 0 {
				freeLater = append(freeLater, [2]uint64{im.h.l1Offset >> im.clusterBits, oldClusters})
			}
		}
	}
	var nz *ZonedExt
	var tbl []byte
	if z := im.h.zoned; z != nil {
		c := *z
		n := (newSize + z.ZoneSize - 1) / z.ZoneSize
		if n > MaxZones {
			return &OptionError{Name: "size", Value: fmt.Sprint(newSize), Rule: fmt.Sprintf("would need %d zones of %d bytes; the limit is %d", n, z.ZoneSize, MaxZones)}
		}
		c.NrZones, c.MetaSize = uint32(n), 8*n
		if r := c.check(newSize); r != nil {
			return &OptionError{Name: r.field, Value: fmt.Sprint(r.value), Rule: r.rule}
		}
		tbl = make([]byte, alignUp(c.MetaSize, cs))
		copy(tbl, im.wpTableBuf)
		for i := z.NrZones; i < c.NrZones; i++ {
			c.encodeWP(tbl[i*8:], c.zoneStart(i), false)
		}
		if oldC, newC := alignUp(z.MetaSize, cs)/cs, uint64(len(tbl))/cs; newC > oldC {
			nc, err := im.allocClusters(newC)
			if err != nil {
				return err
			}
			c.MetaOffset = nc << im.clusterBits
			freeLater = append(freeLater, [2]uint64{z.MetaOffset >> im.clusterBits, oldC})
		}
		if _, err := im.f.WriteAt(tbl, int64(c.MetaOffset)); err != nil {
			return err
		}
		nz = &c
	}
	// New tables are on disk before the header points to them.
	if err := syncFile(im.f); err != nil {
		return err
	}
	oldH := *im.h
	im.h.size, im.h.l1Offset, im.h.l1Size = newSize, newL1Off, uint32(len(newL1))
	if nz != nil {
		im.h.zoned = nz
	}
	if err := im.writeHeader(); err != nil {
		*im.h = oldH
		return err
	}
	if err := syncFile(im.f); err != nil {
		return err
	}
	im.l1 = newL1
	if nz != nil {
		im.wpTableBuf = tbl[:nz.MetaSize]
	}
	for _, r := range freeLater {
		if err := im.freeClusters(r[0], r[1]); err != nil {
			return err
		}
	}
	return nil
}
