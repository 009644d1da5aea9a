package qcow2

import (
	"fmt"
	"os"
	"sync"
)

// Guest I/O. Requests are split at L2-region boundaries; within a region the
// entries for the clusters touched are copied out under meta and the data is
// moved outside it, coalescing clusters that are contiguous on the host.

var zeroCluster = make([]byte, 1<<MaxClusterBits)

var clusterPool = sync.Pool{New: func() any { b := make([]byte, 1<<MaxClusterBits); return &b }}

func (im *Image) regionShift() uint32 { return im.clusterBits + im.l2Bits }

func (im *Image) checkRange(off int64, n int) error {
	if im.closed {
		return ErrClosed
	}
	if off < 0 || n < 0 || uint64(off)+uint64(n) > im.h.size {
		return fmt.Errorf("%w: offset %d length %d, image size %d", ErrOutOfRange, off, n, im.h.size)
	}
	return nil
}

// forEachRegion calls fn for each L2-region piece of [off, off+n).
func (im *Image) forEachRegion(off uint64, n uint64, fn func(l1idx, pos, length uint64) error) error {
	for n > 0 {
		l1idx := off >> im.regionShift()
		end := (l1idx + 1) << im.regionShift()
		l := min(n, end-off)
		if err := fn(l1idx, off, l); err != nil {
			return err
		}
		off += l
		n -= l
	}
	return nil
}

// entriesFor copies the L2 entries covering [pos, pos+length) of region l1idx.
func (im *Image) entriesFor(l1idx, pos, length uint64) ([]l2Entry, error) {
	im.meta.Lock()
	defer im.meta.Unlock()
	toff, t, err := im.l2For(l1idx)
	if err != nil {
		return nil, err
	}
	first := (pos >> im.clusterBits) & (1<<im.l2Bits - 1)
	last := ((pos + length - 1) >> im.clusterBits) & (1<<im.l2Bits - 1)
	return im.l2Entries(toff, t, first, last-first+1)
}

// ReadAt reads len(p) bytes at guest offset off.
func (im *Image) ReadAt(p []byte, off int64) (int, error) {
	if err := im.checkRange(off, len(p)); err != nil {
		return 0, err
	}
	done := 0
	err := im.forEachRegion(uint64(off), uint64(len(p)), func(l1idx, pos, length uint64) error {
		lk := im.regions.get(l1idx)
		lk.RLock()
		defer lk.RUnlock()
		ents, err := im.entriesFor(l1idx, pos, length)
		if err != nil {
			return err
		}
		buf := p[done : done+int(length)]
		if err := im.readEntries(buf, pos, ents); err != nil {
			return err
		}
		done += int(length)
		return nil
	})
	if err != nil {
		return done, err
	}
	return len(p), nil
}

// readEntries fills buf (guest range starting at pos) from the entries of
// the clusters it covers.
func (im *Image) readEntries(buf []byte, pos uint64, ents []l2Entry) error {
	cs := im.clusterSize
	i := 0
	for len(buf) > 0 {
		e := ents[i]
		in := pos & (cs - 1)
		n := min(uint64(len(buf)), cs-in)
		switch e.kind() {
		case kindNormal:
			// Extend over following clusters contiguous on the host.
			j := i + 1
			for n < uint64(len(buf)) && j < len(ents) && ents[j].kind() == kindNormal && ents[j].offset() == e.offset()+uint64(j-i)*cs {
				n += min(uint64(len(buf))-n, cs)
				j++
			}
			if _, err := im.f.ReadAt(buf[:n], int64(e.offset()+in)); err != nil {
				return fmt.Errorf("reading data cluster at %d: %w", e.offset(), err)
			}
			i = j - 1
		case kindZero:
			clear(buf[:n])
		case kindUnallocated:
			j := i + 1
			for n < uint64(len(buf)) && j < len(ents) && ents[j].kind() == kindUnallocated {
				n += min(uint64(len(buf))-n, cs)
				j++
			}
			if err := im.readBacking(buf[:n], pos); err != nil {
				return err
			}
			i = j - 1
		case kindCompressed:
			bp := clusterPool.Get().(*[]byte)
			c := (*bp)[:cs]
			err := im.readCompressed(e, c)
			if err == nil {
				copy(buf[:n], c[in:])
			}
			clusterPool.Put(bp)
			if err != nil {
				return err
			}
		}
		buf = buf[n:]
		pos += n
		i++
	}
	return nil
}

// readBacking reads guest range [pos, pos+len(buf)) from the backing file;
// zeros where there is none or it is shorter.
func (im *Image) readBacking(buf []byte, pos uint64) error {
	if im.backing == nil {
		clear(buf)
		return nil
	}
	bs := im.backing.Size()
	n := uint64(len(buf))
	if pos >= bs {
		clear(buf)
		return nil
	}
	if pos+n > bs {
		clear(buf[bs-pos:])
		n = bs - pos
	}
	_, err := im.backing.ReadAt(buf[:n], int64(pos))
	return err
}

// readCluster returns the current contents of the guest cluster with entry
// e starting at guest offset gpos, into c (one cluster).
func (im *Image) readCluster(e l2Entry, gpos uint64, c []byte) error {
	switch e.kind() {
	case kindNormal:
		_, err := im.f.ReadAt(c, int64(e.offset()))
		return err
	case kindZero:
		clear(c)
		return nil
	case kindCompressed:
		return im.readCompressed(e, c)
	}
	return im.readBacking(c, gpos)
}

// WriteAt writes p at guest offset off.
func (im *Image) WriteAt(p []byte, off int64) (int, error) {
	n, err := im.writeAt(p, off)
	return n, im.noteFailure(err)
}

func (im *Image) writeAt(p []byte, off int64) (int, error) {
	if im.ro {
		return 0, ErrReadOnly
	}
	if err := im.checkRange(off, len(p)); err != nil {
		return 0, err
	}
	done := 0
	err := im.forEachRegion(uint64(off), uint64(len(p)), func(l1idx, pos, length uint64) error {
		buf := p[done : done+int(length)]
		lk := im.regions.get(l1idx)
		// Fast path: every cluster is ours and allocated; write in place
		// under the shared lock.
		lk.RLock()
		ok, err := im.overwrite(l1idx, pos, buf)
		lk.RUnlock()
		if err != nil {
			return err
		}
		if !ok {
			lk.Lock()
			err = im.writeRegion(l1idx, pos, buf)
			lk.Unlock()
			if err != nil {
				return err
			}
		}
		done += int(length)
		return nil
	})
	if err != nil {
		return done, err
	}
	return len(p), nil
}

// overwrite writes buf in place if every cluster it touches is allocated
// with refcount 1 (COPIED). It reports false, having written nothing,
// otherwise.
func (im *Image) overwrite(l1idx, pos uint64, buf []byte) (bool, error) {
	im.meta.Lock()
	if im.l1[l1idx]&oflagCopied == 0 {
		im.meta.Unlock()
		return false, nil
	}
	toff, t, err := im.l2For(l1idx)
	if err != nil {
		im.meta.Unlock()
		return false, err
	}
	first := (pos >> im.clusterBits) & (1<<im.l2Bits - 1)
	last := ((pos + uint64(len(buf)) - 1) >> im.clusterBits) & (1<<im.l2Bits - 1)
	ents, err := im.l2Entries(toff, t, first, last-first+1)
	if err == nil {
		for _, e := range ents {
			if e.kind() != kindNormal || !e.copied() {
				im.meta.Unlock()
				return false, nil
			}
		}
		err = im.checkDataWrite(ents)
	}
	im.meta.Unlock()
	if err != nil {
		return false, err
	}
	return true, im.writeInPlace(buf, pos, ents)
}

// writeInPlace writes buf over allocated clusters, coalescing host runs.
func (im *Image) writeInPlace(buf []byte, pos uint64, ents []l2Entry) error {
	cs := im.clusterSize
	i := 0
	for len(buf) > 0 {
		e := ents[i]
		in := pos & (cs - 1)
		n := min(uint64(len(buf)), cs-in)
		j := i + 1
		for n < uint64(len(buf)) && j < len(ents) && ents[j].offset() == e.offset()+uint64(j-i)*cs {
			n += min(uint64(len(buf))-n, cs)
			j++
		}
		if _, err := im.f.WriteAt(buf[:n], int64(e.offset()+in)); err != nil {
			return err
		}
		buf, pos, i = buf[n:], pos+n, j
	}
	return nil
}

// writeRegion writes buf at pos inside region l1idx, allocating clusters as
// needed. Caller holds the region's exclusive lock.
func (im *Image) writeRegion(l1idx, pos uint64, buf []byte) error {
	cs := im.clusterSize
	im.meta.Lock()
	toff, t, err := im.l2ForWrite(l1idx)
	if err != nil {
		im.meta.Unlock()
		return err
	}
	first := (pos >> im.clusterBits) & (1<<im.l2Bits - 1)
	ents, err := im.l2Entries(toff, t, first, ((pos+uint64(len(buf))-1)>>im.clusterBits)-(pos>>im.clusterBits)+1)
	if err == nil {
		err = im.checkDataWrite(ents)
	}
	im.meta.Unlock()
	if err != nil {
		return err
	}
	i := 0
	for len(buf) > 0 {
		in := pos & (cs - 1)
		e := ents[i]
		if e.kind() == kindNormal && e.copied() {
			n := min(uint64(len(buf)), cs-in)
			if _, err := im.f.WriteAt(buf[:n], int64(e.offset()+in)); err != nil {
				return err
			}
			buf, pos, i = buf[n:], pos+n, i+1
			continue
		}
		// A run of clusters that need new host clusters.
		j := i
		covered := uint64(0)
		for j < len(ents) && covered < uint64(len(buf)) && !(ents[j].kind() == kindNormal && ents[j].copied()) {
			covered += cs - ((pos + covered) & (cs - 1))
			j++
		}
		n := min(covered, uint64(len(buf)))
		if err := im.allocWrite(toff, t, first+uint64(i), ents[i:j], pos, buf[:n]); err != nil {
			return err
		}
		buf, pos, i = buf[n:], pos+n, j
	}
	return nil
}

// allocWrite writes data (guest range starting at pos) into newly allocated
// clusters replacing entries old, copying the parts of the first and last
// cluster that data does not cover from their previous contents. Order for
// crash safety: refcounts (allocClusters), data, L2 entry, old refcounts.
func (im *Image) allocWrite(toff uint64, t []byte, l2idx uint64, old []l2Entry, pos uint64, data []byte) error {
	cs := im.clusterSize
	n := uint64(len(old))
	im.meta.Lock()
	// Fresh clusters (past the end of everything allocated so far, or
	// reserved from there: see allocPool) have never been written: they
	// read as zeros once the file covers them, so their zero-filled parts
	// need not be written. The file is extended sparsely ahead of use (by
	// an eighth of its size, 1-64 MiB, so a growing image costs a truncate
	// per many writes, not per write) and trimmed back on Close.
	c0, fresh, err := im.allocFresh(n)
	host := c0 << im.clusterBits
	fresh = fresh && err == nil
	if need := host + n*cs; fresh && need > im.physEnd {
		var st os.FileInfo
		if st, err = im.f.Stat(); err == nil {
			target := alignUp(need+min(max(need/8, 1<<20), 64<<20), 1<<20)
			if target > uint64(st.Size()) {
				err = im.f.Truncate(int64(target))
			}
			im.physEnd = max(target, uint64(st.Size()))
		}
	}
	im.meta.Unlock()
	if err != nil {
		return err
	}
	gstart := pos &^ (cs - 1)
	head := pos - gstart
	tailEnd := head + uint64(len(data)) // bytes from gstart covered
	// Head cluster (partially covered) and tail cluster.
	bp := clusterPool.Get().(*[]byte)
	defer clusterPool.Put(bp)
	c := (*bp)[:cs]
	writeCluster := func(k uint64) error {
		lo, hi := k*cs, (k+1)*cs
		dlo, dhi := max(lo, head), min(hi, tailEnd)
		if kind := old[k].kind(); fresh && (kind == kindZero || kind == kindUnallocated && im.backing == nil) {
			_, err := im.f.WriteAt(data[dlo-head:dhi-head], int64(host+dlo))
			return err
		}
		if err := im.readCluster(old[k], gstart+k*cs, c); err != nil {
			return err
		}
		copy(c[dlo-lo:dhi-lo], data[dlo-head:dhi-head])
		_, err := im.f.WriteAt(c, int64(host+lo))
		return err
	}
	firstFull, lastFull := uint64(0), n // [firstFull, lastFull) fully covered
	if head != 0 || tailEnd < cs {
		if err := writeCluster(0); err != nil {
			return err
		}
		firstFull = 1
	}
	if n > 1 && tailEnd < n*cs {
		if err := writeCluster(n - 1); err != nil {
			return err
		}
		lastFull = n - 1
	}
	if firstFull < lastFull {
		lo, hi := firstFull*cs, lastFull*cs
		if _, err := im.f.WriteAt(data[lo-head:hi-head], int64(host+lo)); err != nil {
			return err
		}
	}
	// Point the L2 entries at the new clusters, then release the old ones.
	ne := make([]l2Entry, n)
	for k := range ne {
		ne[k] = l2Entry(host+uint64(k)*cs) | oflagCopied
	}
	im.meta.Lock()
	defer im.meta.Unlock()
	if err := im.setL2(toff, t, l2idx, ne); err != nil {
		return err
	}
	return im.releaseEntries(old)
}

// releaseEntries drops the references that replaced L2 entries held.
func (im *Image) releaseEntries(old []l2Entry) error {
	for _, e := range old {
		switch e.kind() {
		case kindNormal, kindZero:
			if o := e.offset(); o != 0 {
				if err := im.freeClusters(o>>im.clusterBits, 1); err != nil {
					return err
				}
			}
		case kindCompressed:
			o, sz := im.compressedRange(e)
			c0 := o >> im.clusterBits
			c1 := (o + sz - 1) >> im.clusterBits
			if err := im.freeClusters(c0, c1-c0+1); err != nil {
				return err
			}
		}
	}
	return nil
}

// WriteZeroes makes [off, off+n) read as zeros. With unmap, whole clusters
// are deallocated; otherwise allocated clusters keep their host space and
// get the zero flag. Version 2 images, which have no zero flag, get zeros
// written where a backing file would otherwise show through.
func (im *Image) WriteZeroes(off, n int64, unmap bool) error {
	return im.noteFailure(im.writeZeroes(off, n, unmap))
}

func (im *Image) writeZeroes(off, n int64, unmap bool) error {
	if im.ro {
		return ErrReadOnly
	}
	if n < 0 || n > 1<<62 {
		return fmt.Errorf("%w: length %d", ErrOutOfRange, n)
	}
	if err := im.checkRange(off, 0); err != nil {
		return err
	}
	if err := im.checkRange(off+n, 0); err != nil {
		return err
	}
	cs := im.clusterSize
	return im.forEachRegion(uint64(off), uint64(n), func(l1idx, pos, length uint64) error {
		lk := im.regions.get(l1idx)
		lk.Lock()
		defer lk.Unlock()
		end := pos + length
		fs, fe := alignUp(pos, cs), end&^(cs-1)
		if fs >= fe {
			// No whole cluster: one partial cluster, or the ends of two.
			if pos&^(cs-1) == (end-1)&^(cs-1) {
				return im.zeroPartial(l1idx, pos, end-pos)
			}
			if err := im.zeroPartial(l1idx, pos, fs-pos); err != nil {
				return err
			}
			return im.zeroPartial(l1idx, fs, end-fs)
		}
		if pos < fs {
			if err := im.zeroPartial(l1idx, pos, fs-pos); err != nil {
				return err
			}
		}
		if fe < end {
			if err := im.zeroPartial(l1idx, fe, end-fe); err != nil {
				return err
			}
		}
		return im.zeroFull(l1idx, fs, fe-fs, unmap)
	})
}

// zeroPartial zeroes part of one cluster through the write path.
func (im *Image) zeroPartial(l1idx, pos, n uint64) error {
	ents, err := im.entriesFor(l1idx, pos, n)
	if err != nil {
		return err
	}
	if k := ents[0].kind(); k == kindZero || k == kindUnallocated && im.backing == nil {
		return nil
	}
	return im.writeRegion(l1idx, pos, zeroCluster[:n])
}

// zeroFull zeroes whole clusters [pos, pos+n) of region l1idx.
func (im *Image) zeroFull(l1idx, pos, n uint64, unmap bool) error {
	cs := im.clusterSize
	if im.h.version < 3 && im.backing != nil {
		// No zero flag: only real zeros hide the backing file.
		for ; n > 0; n -= cs {
			if err := im.writeRegion(l1idx, pos, zeroCluster[:cs]); err != nil {
				return err
			}
			pos += cs
		}
		return nil
	}
	im.meta.Lock()
	defer im.meta.Unlock()
	if im.l1[l1idx]&l1OffsetMask == 0 && im.backing == nil {
		return nil // the whole region already reads as zeros
	}
	toff, t, err := im.l2ForWrite(l1idx)
	if err != nil {
		return err
	}
	first := (pos >> im.clusterBits) & (1<<im.l2Bits - 1)
	cnt := n / cs
	old, err := im.l2Entries(toff, t, first, cnt)
	if err != nil {
		return err
	}
	ne := make([]l2Entry, cnt)
	var release []l2Entry
	for k, e := range old {
		switch {
		case im.h.version < 3:
			ne[k] = 0 // no backing file here: unallocated reads as zeros
			release = append(release, e)
		case !unmap && e.kind() == kindNormal && e.copied():
			ne[k] = e | oflagZero // keep the preallocated host cluster
		case !unmap && e.kind() == kindZero && e.offset() != 0:
			ne[k] = e
		case e.kind() == kindUnallocated && im.backing == nil:
			ne[k] = 0
		default:
			ne[k] = oflagZero
			release = append(release, e)
		}
	}
	if err := im.setL2(toff, t, first, ne); err != nil {
		return err
	}
	return im.releaseEntries(release)
}

// Discard deallocates [off, off+n); the range reads as zeros afterwards
// (stronger than qemu, which ignores the unaligned parts of a discard).
func (im *Image) Discard(off, n int64) error { return im.WriteZeroes(off, n, true) }
