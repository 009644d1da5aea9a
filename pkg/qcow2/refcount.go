package qcow2

import (
	"encoding/binary"
	"fmt"
	"syscall"
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
	for n > 0 {
		idx := c >> im.rbBits
		if idx >= uint64(len(im.rt)) || im.rt[idx] == 0 {
			if delta < 0 {
				return corruptf(int64(c<<im.clusterBits), "freeing cluster %d that has no refcount block", c)
			}
			if err := im.newRefBlock(idx); err != nil {
				return err
			}
			continue
		}
		boff := im.rt[idx]
		b, err := im.loadTable(im.rbcache, boff)
		if err != nil {
			return err
		}
		first := c & (1<<im.rbBits - 1)
		cnt := min(n, 1<<im.rbBits-first)
		lo, hi := ^uint64(0), uint64(0)
		for i := first; i < first+cnt; i++ {
			v := im.rbGet(b, i)
			nv := int64(v) + delta
			if delta < 0 && v == 0 || nv < 0 {
				return corruptf(int64(boff), "refcount of cluster %d would drop below zero", (idx<<im.rbBits)+i)
			}
			if uint64(nv) > im.refMax() {
				return fmt.Errorf("%w: refcount of cluster %d would exceed %d (refcount_bits %d)", ErrUnsupported, (idx<<im.rbBits)+i, im.refMax(), 1<<im.rbBits)
			}
			l, h := im.rbSet(b, i, uint64(nv))
			lo, hi = min(lo, l), max(hi, h)
			if nv == 0 {
				ci := (idx << im.rbBits) + i
				im.freeHint = min(im.freeHint, ci)
			}
		}
		if _, err := im.f.WriteAt(b[lo:hi], int64(boff+lo)); err != nil {
			return err
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
	endC := im.fileEnd >> im.clusterBits
	for idx := len(im.rt) - 1; idx >= 0; idx-- {
		if im.rt[idx] != 0 {
			endC = max(endC, uint64(idx+1)<<im.rbBits)
			break
		}
	}
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

// allocClusters allocates n contiguous clusters (refcount 1) and returns the
// first cluster index. Refcounts are written through before the caller
// writes anything that points to the clusters.
func (im *Image) allocClusters(n uint64) (uint64, error) {
	if err := im.markDirty(); err != nil {
		return 0, err
	}
	for {
		s, err := im.findFree(n)
		if err != nil {
			return 0, err
		}
		// Refcount blocks for the run must exist first; creating one uses a
		// free cluster, perhaps inside the run, so search again after.
		created := false
		for idx := s >> im.rbBits; idx <= (s+n-1)>>im.rbBits; idx++ {
			if idx >= uint64(len(im.rt)) || im.rt[idx] == 0 {
				if err := im.newRefBlock(idx); err != nil {
					return 0, err
				}
				created = true
				break
			}
		}
		if created {
			continue
		}
		if err := im.addRefcount(s, n, 1); err != nil {
			return 0, err
		}
		if end := (s + n) << im.clusterBits; end > im.fileEnd {
			im.fileEnd = end
		}
		if s == im.freeHint {
			im.freeHint = s + n
		}
		return s, nil
	}
}

// newRefBlock creates the refcount block for refcount table index idx.
func (im *Image) newRefBlock(idx uint64) error {
	if idx >= uint64(len(im.rt)) {
		return im.growRefTable(idx + 1)
	}
	for {
		b, err := im.findFree(1)
		if err != nil {
			return err
		}
		bidx := b >> im.rbBits
		blk := make([]byte, im.clusterSize)
		if bidx == idx {
			im.rbSet(blk, b&(1<<im.rbBits-1), 1) // the block describes itself
		} else if bidx >= uint64(len(im.rt)) || im.rt[bidx] == 0 {
			if err := im.newRefBlock(bidx); err != nil {
				return err
			}
			continue
		}
		boff := b << im.clusterBits
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
}

func (im *Image) setRT(idx, v uint64) error {
	im.rt[idx] = v
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	_, err := im.f.WriteAt(b[:], int64(im.h.refcountOffset+idx*8))
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
	for c := start; c < end; c++ {
		idx := c >> im.rbBits
		if idx < uint64(len(oldRT)) && oldRT[idx] != 0 {
			if err := im.addRefcount(c, 1, 1); err != nil {
				im.rt = oldRT
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
	const fallocKeepSize, fallocPunchHole = 0x01, 0x02
	_ = syscall.Fallocate(int(im.f.Fd()), fallocKeepSize|fallocPunchHole, int64(off), int64(n))
}
