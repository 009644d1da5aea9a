package qcow2

import (
	"encoding/binary"
	"fmt"
)

// Refcounts: a refcount table of block offsets, each refcount block an array
// of refcount_bits-wide big-endian entries (sub-byte widths packed from the
// least significant bit, as qemu does). Everything below runs under meta.

func (im *Image) refMax() uint64 {
	if im.rcBits == 6 {
		return ^uint64(0)
	}
	return 1<<(1<<im.rcBits) - 1
}

func (im *Image) rbGet(b []byte, i uint64) uint64 {
	switch w := uint64(1) << im.rcBits; w {
	case 1, 2, 4:
		per := 8 / w
		return uint64(b[i/per]>>((i%per)*w)) & (1<<w - 1)
	case 8:
		return uint64(b[i])
	case 16:
		return uint64(binary.BigEndian.Uint16(b[i*2:]))
	case 32:
		return uint64(binary.BigEndian.Uint32(b[i*4:]))
	default:
		return binary.BigEndian.Uint64(b[i*8:])
	}
}

// rbSet stores v at index i and returns the byte range it touched.
func (im *Image) rbSet(b []byte, i, v uint64) (lo, hi uint64) {
	switch w := uint64(1) << im.rcBits; w {
	case 1, 2, 4:
		per := 8 / w
		sh := (i % per) * w
		m := byte((1<<w - 1) << sh)
		b[i/per] = b[i/per]&^m | byte(v<<sh)&m
		return i / per, i/per + 1
	case 8:
		b[i] = byte(v)
		return i, i + 1
	case 16:
		binary.BigEndian.PutUint16(b[i*2:], uint16(v))
		return i * 2, i*2 + 2
	case 32:
		binary.BigEndian.PutUint32(b[i*4:], uint32(v))
		return i * 4, i*4 + 4
	default:
		binary.BigEndian.PutUint64(b[i*8:], v)
		return i * 8, i*8 + 8
	}
}

// refcount returns the refcount of cluster c.
func (im *Image) refcount(c uint64) (uint64, error) {
	idx := c >> im.rbBits
	if idx >= uint64(len(im.rt)) || im.rt[idx] == 0 {
		return 0, nil
	}
	b, err := im.loadTable(im.rbcache, im.rt[idx])
	if err != nil {
		return 0, err
	}
	return im.rbGet(b, c&(1<<im.rbBits-1)), nil
}

// addRefcount adds delta to the refcounts of clusters [c, c+n); the
// refcount blocks must exist unless delta > 0 (then they are created).
func (im *Image) addRefcount(c, n uint64, delta int64) error {
	// Any refcount change may be cut short by a crash between it and the
	// mapping change it goes with: the dirty bit makes the next open repair.
	if err := im.markDirty(); err != nil {
		return err
	}
	created := 0
	for n > 0 {
		idx := c >> im.rbBits
		if idx >= uint64(len(im.rt)) || im.rt[idx] == 0 {
			if delta < 0 {
				return corruptf(int64(c<<im.clusterBits), "freeing cluster %d that has no refcount block", c)
			}
			if created++; created > maxAllocRounds {
				return corruptf(int64(im.h.refcountOffset), "creating the refcount blocks for clusters from %d made no progress in %d rounds", c, maxAllocRounds)
			}
			if err := im.newRefBlock(idx); err != nil {
				return err
			}
			continue
		}
		boff := im.rt[idx]
		if err := im.checkOverlap(boff, im.clusterSize, writeRefBlock, boff); err != nil {
			return err
		}
		b, err := im.loadTable(im.rbcache, boff)
		if err != nil {
			return err
		}
		first := c & (1<<im.rbBits - 1)
		cnt := min(n, 1<<im.rbBits-first)
		// On an error part way, the entries already changed are still
		// written, so that the cached block never differs from the file.
		lo, hi := ^uint64(0), uint64(0)
		var ferr error
		for i := first; i < first+cnt; i++ {
			v := im.rbGet(b, i)
			nv := int64(v) + delta
			if delta < 0 && v == 0 || nv < 0 {
				ferr = corruptf(int64(boff), "refcount of cluster %d would drop below zero", (idx<<im.rbBits)+i)
				break
			}
			if uint64(nv) > im.refMax() {
				ferr = fmt.Errorf("%w: refcount of cluster %d would exceed %d (refcount_bits %d)", ErrUnsupported, (idx<<im.rbBits)+i, im.refMax(), 1<<im.rbBits)
				break
			}
			l, h := im.rbSet(b, i, uint64(nv))
			lo, hi = min(lo, l), max(hi, h)
			if nv == 0 {
				ci := (idx << im.rbBits) + i
				im.freeHint = min(im.freeHint, ci)
			}
		}
		if lo < hi {
			if _, err := im.f.WriteAt(b[lo:hi], int64(boff+lo)); err != nil {
				return err
			}
		}
		if ferr != nil {
			return ferr
		}
		c += cnt
		n -= cnt
	}
	return nil
}

// findFree returns the first run of n clusters with refcount 0 at or after
// freeHint. Clusters past the end of the file are free.
func (im *Image) findFree(n uint64) (uint64, error) {
	// Past both the file end and the last refcount block everything is
	// free. Between them a cluster may carry a refcount without data (a
	// crash after allocation, before the write): those stay taken.
	endC := max(im.fileEnd>>im.clusterBits, im.refBlocksEnd()<<im.rbBits)
	start, run := im.freeHint, uint64(0)
	for c := im.freeHint; ; c++ {
		if c >= endC {
			return start, nil
		}
		rc, err := im.refcount(c)
		if err != nil {
			return 0, err
		}
		if rc != 0 {
			if c == im.freeHint {
				im.freeHint = c + 1
			}
			run, start = 0, c+1
			continue
		}
		run++
		if run == n {
			return start, nil
		}
	}
}

// poolBytes is how much the allocator reserves at once when it appends to
// the image: one refcount write then covers many single-cluster
// allocations (the common case of 4 KiB guest writes into new clusters).
const poolBytes = 1 << 20

// allocPool is a run of clusters [next, end) at the end of the image whose
// refcounts were raised to 1 in one refcount write and that nothing
// references yet. They lay past everything allocated when they were
// reserved and have never been written, so they read as zeros. A crash
// leaves them as leaks, harmless and repaired by `img check -r leaks` (and
// by the refcount rebuild that the dirty bit triggers on the next open of a
// v3 image); Close and releasePool give them back.
type allocPool struct{ next, end uint64 }

// maxAllocRounds bounds every retry loop of the allocator. A consistent
// image needs a handful of rounds (each creates one refcount block); a
// damaged one that makes no progress gets an error, never a hang.
const maxAllocRounds = 64

// refBlocksEnd returns 1 + the highest refcount table index holding a
// block. Entries never go back to 0 and only setRT fills one in place, so
// the value is cached and recomputed when the table is replaced (its length
// changes: load, growth, creation).
func (im *Image) refBlocksEnd() uint64 {
	if im.rtTop.n != len(im.rt) {
		im.rtTop.end = 0
		for idx := len(im.rt) - 1; idx >= 0; idx-- {
			if im.rt[idx] != 0 {
				im.rtTop.end = uint64(idx + 1)
				break
			}
		}
		im.rtTop.n = len(im.rt)
	}
	return im.rtTop.end
}

// allocClusters allocates n contiguous clusters (refcount 1) and returns the
// first cluster index. Refcounts are written through before the caller
// writes anything that points to the clusters.
func (im *Image) allocClusters(n uint64) (uint64, error) {
	c, _, err := im.allocFresh(n)
	return c, err
}

// allocFresh is allocClusters that also reports whether the clusters have
// never been written (they read as zeros, so parts of them the caller does
// not cover need no zeros written). Caller holds meta.
func (im *Image) allocFresh(n uint64) (uint64, bool, error) {
	if err := im.markDirty(); err != nil {
		return 0, false, err
	}
	if p := &im.pool; p.end-p.next >= n {
		c := p.next
		p.next += n
		return c, true, nil
	}
	if err := im.releasePool(); err != nil {
		return 0, false, err
	}
	for round := 0; round < maxAllocRounds; round++ {
		s, err := im.findFree(n)
		if err != nil {
			return 0, false, err
		}
		if err := im.checkOverlap(s<<im.clusterBits, n<<im.clusterBits, writeAlloc, 0); err != nil {
			return 0, false, err
		}
		// Appending past everything allocated: reserve a pool's worth.
		fresh := s<<im.clusterBits >= im.fileEnd
		want := n
		if fresh && im.poolMax > n {
			extra, err := im.freeAfter(s+n, im.poolMax-n)
			if err != nil {
				return 0, false, err
			}
			// The pool is handed out unchecked later: check it now.
			if extra > 0 && im.checkOverlap((s+n)<<im.clusterBits, extra<<im.clusterBits, writeAlloc, 0) == nil {
				want += extra
			}
		}
		// Refcount blocks for the run must exist first; creating one uses a
		// free cluster, perhaps inside the run, so search again after.
		created := false
		for idx := s >> im.rbBits; idx <= (s+want-1)>>im.rbBits; idx++ {
			if idx >= uint64(len(im.rt)) || im.rt[idx] == 0 {
				if err := im.newRefBlock(idx); err != nil {
					return 0, false, err
				}
				created = true
				break
			}
		}
		if created {
			continue
		}
		if err := im.addRefcount(s, want, 1); err != nil {
			return 0, false, err
		}
		if end := (s + want) << im.clusterBits; end > im.fileEnd {
			im.fileEnd = end
		}
		if s == im.freeHint {
			im.freeHint = s + want
		}
		if want > n {
			im.pool = allocPool{next: s + n, end: s + want}
		}
		return s, fresh, nil
	}
	return 0, false, corruptf(int64(im.h.refcountOffset), "allocating %d clusters made no progress in %d rounds: the refcount structures are inconsistent", n, maxAllocRounds)
}

// freeAfter counts the clusters with refcount 0 from c on, up to max.
func (im *Image) freeAfter(c, max uint64) (uint64, error) {
	for k := uint64(0); k < max; k++ {
		rc, err := im.refcount(c + k)
		if err != nil || rc != 0 {
			return k, err
		}
	}
	return max, nil
}

// releasePool gives the unused reserved clusters back (refcount 0). When
// they end the image, the image ends before them again, so they stay fresh
// for the next reservation and Close trims them off the file.
func (im *Image) releasePool() error {
	p := im.pool
	if p.end <= p.next {
		return nil
	}
	im.pool = allocPool{}
	if err := im.addRefcount(p.next, p.end-p.next, -1); err != nil {
		return err
	}
	if p.end<<im.clusterBits == im.fileEnd {
		im.fileEnd = p.next << im.clusterBits
	}
	return nil
}

// newRefBlock creates the refcount block for refcount table index idx.
func (im *Image) newRefBlock(idx uint64) error { return im.newRefBlockDepth(idx, 0) }

func (im *Image) newRefBlockDepth(idx uint64, depth int) error {
	if idx >= uint64(len(im.rt)) {
		return im.growRefTable(idx + 1)
	}
	if depth > 8 {
		return corruptf(int64(im.h.refcountOffset), "creating refcount block %d needs refcount blocks nested deeper than 8: the refcount structures are inconsistent", idx)
	}
	for round := 0; round < maxAllocRounds; round++ {
		b, err := im.findFree(1)
		if err != nil {
			return err
		}
		boff := b << im.clusterBits
		if err := im.checkOverlap(boff, im.clusterSize, writeAlloc, 0); err != nil {
			return err
		}
		bidx := b >> im.rbBits
		blk := make([]byte, im.clusterSize)
		if bidx == idx {
			im.rbSet(blk, b&(1<<im.rbBits-1), 1) // the block describes itself
		} else if bidx >= uint64(len(im.rt)) || im.rt[bidx] == 0 {
			if err := im.newRefBlockDepth(bidx, depth+1); err != nil {
				return err
			}
			continue
		}
		if _, err := im.f.WriteAt(blk, int64(boff)); err != nil {
			return err
		}
		if end := boff + im.clusterSize; end > im.fileEnd {
			im.fileEnd = end
		}
		im.rbcache.put(boff, blk)
		if bidx != idx {
			if err := im.addRefcount(b, 1, 1); err != nil {
				return err
			}
		}
		return im.setRT(idx, boff)
	}
	return corruptf(int64(im.h.refcountOffset), "creating refcount block %d made no progress in %d rounds: the refcount structures are inconsistent", idx, maxAllocRounds)
}

// setRT points refcount table entry idx at a new refcount block at v.
func (im *Image) setRT(idx, v uint64) error {
	at := im.h.refcountOffset + idx*8
	if v == 0 || v%im.clusterSize != 0 {
		// Cluster 0 is the header; 0 in the table means "no block".
		return corruptf(int64(at), "refusing to point refcount table entry %d at %d: not a refcount block location", idx, v)
	}
	if err := im.checkOverlap(at, 8, writeRT, 0); err != nil {
		return err
	}
	im.trackMeta(im.rt[idx], false, -1)
	im.trackMeta(v, false, 1)
	im.rt[idx] = v
	if im.rtTop.n == len(im.rt) {
		im.rtTop.end = max(im.rtTop.end, idx+1)
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	_, err := im.f.WriteAt(b[:], int64(at))
	return err
}

// growRefTable moves the refcount table to the end of the file with room
// for at least minEntries entries, creating the refcount blocks that the
// new table (and those blocks) need.
func (im *Image) growRefTable(minEntries uint64) error {
	cs := im.clusterSize
	perCluster := cs / 8
	entries := max(minEntries, uint64(len(im.rt))*3/2+1)
	start := im.fileEnd >> im.clusterBits
	var tableClusters, nBlocks uint64
	var missing []uint64
	for {
		entries = alignUp(entries, perCluster)
		tableClusters = entries / perCluster
		missing = missing[:0]
		for {
			end := start + tableClusters + nBlocks
			missing = missing[:0]
			for idx := start >> im.rbBits; idx <= (end-1)>>im.rbBits; idx++ {
				if idx >= uint64(len(im.rt)) || im.rt[idx] == 0 {
					missing = append(missing, idx)
				}
			}
			if uint64(len(missing)) == nBlocks {
				break
			}
			nBlocks = uint64(len(missing))
		}
		last := (start + tableClusters + nBlocks - 1) >> im.rbBits
		if last < entries {
			break
		}
		entries = last + 1
	}
	nt := make([]uint64, entries)
	copy(nt, im.rt)
	end := start + tableClusters + nBlocks
	if err := im.checkOverlap(start<<im.clusterBits, (end-start)<<im.clusterBits, writeAlloc, 0); err != nil {
		return err
	}
	// Write the new blocks, each holding the refcounts of the new clusters it covers.
	for i, idx := range missing {
		bc := start + tableClusters + uint64(i)
		nt[idx] = bc << im.clusterBits
		blk := make([]byte, cs)
		lo, hi := idx<<im.rbBits, (idx+1)<<im.rbBits
		for c := max(lo, start); c < min(hi, end); c++ {
			im.rbSet(blk, c-lo, 1)
		}
		if _, err := im.f.WriteAt(blk, int64(bc<<im.clusterBits)); err != nil {
			return err
		}
		im.rbcache.put(bc<<im.clusterBits, blk)
	}
	// New clusters covered by blocks that already exist.
	oldRT := im.rt
	im.rt = nt
	for _, idx := range missing {
		im.trackMeta(nt[idx], false, 1)
	}
	for c := start; c < end; c++ {
		idx := c >> im.rbBits
		if idx < uint64(len(oldRT)) && oldRT[idx] != 0 {
			if err := im.addRefcount(c, 1, 1); err != nil {
				im.rt = oldRT
				for _, idx := range missing {
					im.trackMeta(nt[idx], false, -1)
				}
				return err
			}
		}
	}
	buf := make([]byte, tableClusters*cs)
	for i, v := range nt {
		binary.BigEndian.PutUint64(buf[i*8:], v)
	}
	if _, err := im.f.WriteAt(buf, int64(start<<im.clusterBits)); err != nil {
		return err
	}
	im.fileEnd = max(im.fileEnd, end<<im.clusterBits)
	oldOff, oldClusters := im.h.refcountOffset, uint64(im.h.refcountClusters)
	im.h.refcountOffset = start << im.clusterBits
	im.h.refcountClusters = uint32(tableClusters)
	var hb [12]byte
	binary.BigEndian.PutUint64(hb[0:], im.h.refcountOffset)
	binary.BigEndian.PutUint32(hb[8:], im.h.refcountClusters)
	if _, err := im.f.WriteAt(hb[:], offRefcountOffset); err != nil {
		return err
	}
	return im.freeClusters(oldOff>>im.clusterBits, oldClusters)
}

// freeClusters drops one reference from clusters [c, c+n) and punches holes
// for those that become free, so the file's disk usage shrinks.
func (im *Image) freeClusters(c, n uint64) error {
	if n == 0 {
		return nil
	}
	// Metadata is freed only after nothing points to it any more; a
	// reference from elsewhere (a data entry aimed at the header, say) is
	// damage, and punching the hole would destroy the structure.
	if err := im.checkOverlap(c<<im.clusterBits, n<<im.clusterBits, writeFree, 0); err != nil {
		return err
	}
	if err := im.addRefcount(c, n, -1); err != nil {
		return err
	}
	for i := c; i < c+n; i++ {
		if rc, err := im.refcount(i); err == nil && rc == 0 {
			im.punchHole(i<<im.clusterBits, im.clusterSize)
		}
	}
	return nil
}

// punchHole deallocates file space; best effort (not every filesystem can).
func (im *Image) punchHole(off, n uint64) {
	_ = punchFileHole(im.f, int64(off), int64(n))
}
