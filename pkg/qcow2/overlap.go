package qcow2

// Metadata overlap checks. The refcounts decide which clusters the allocator
// may hand out, but a damaged image can claim that a cluster holding the
// header, a table or a refcount block is free, or point a data or table
// entry at one. Writing there would destroy the image (and a refcount block
// written over the cluster that describes it never makes progress), so
// every write the engine issues into the file is first checked against the
// metadata it knows of, as qemu does before its writes ("Preventing invalid
// write on metadata"). A hit refuses the write with a FormatError wrapping
// ErrCorrupt that names the structure and its offset; nothing is written.
//
// The fixed structures (header cluster, L1 table, refcount table, snapshot
// table and the snapshots' L1 tables, write-pointer table) are compared by
// range. Active L2 tables and refcount blocks, of which there are many, are
// kept in a map from host cluster index to how many table entries point
// there, maintained where those entries change (setL1, setRT, growRefTable).
// Inactive L2 tables (reachable only from snapshots) are not tracked, as in
// qemu's default "cached" mode: the snapshot's refcount keeps them in use.

// metaRef counts the active references to one host cluster.
type metaRef struct {
	l2 uint32 // L1 entries pointing to it (an L2 table)
	rb uint32 // refcount table entries pointing to it (a refcount block)
}

// metaKind says which structure a checked write belongs to, so that a
// table's write is not refused for overlapping itself.
type metaKind int

const (
	writeAlloc    metaKind = iota // clusters the refcounts say are free
	writeData                     // guest data into an allocated cluster
	writeL1                       // an entry of the active L1 table
	writeRT                       // an entry of the refcount table
	writeL2                       // an entry of the L2 table at self
	writeRefBlock                 // an entry of the refcount block at self
	writeWP                       // an entry of the write-pointer table
	writeFree                     // releasing clusters (their space is punched out)
)

var metaKindWhat = [...]string{
	writeAlloc:    "allocating clusters that the refcounts say are free",
	writeData:     "writing guest data into the data cluster an L2 entry points to",
	writeL1:       "updating the L1 table",
	writeRT:       "updating the refcount table",
	writeL2:       "updating an L2 table",
	writeRefBlock: "updating a refcount block",
	writeWP:       "updating the write-pointer table",
	writeFree:     "releasing clusters that an entry no longer uses",
}

// trackMeta adjusts the reference count of host cluster c (host offset off)
// as an L2 table (l2 true) or refcount block. Caller holds meta.
func (im *Image) trackMeta(off uint64, l2 bool, delta int) {
	if off == 0 {
		return
	}
	if im.metaClusters == nil {
		im.metaClusters = map[uint64]metaRef{}
	}
	c := off >> im.clusterBits
	r := im.metaClusters[c]
	if l2 {
		r.l2 = uint32(int(r.l2) + delta)
	} else {
		r.rb = uint32(int(r.rb) + delta)
	}
	if r.l2 == 0 && r.rb == 0 {
		delete(im.metaClusters, c)
		return
	}
	im.metaClusters[c] = r
}

// indexMeta builds metaClusters from the loaded L1 and refcount tables.
func (im *Image) indexMeta() {
	im.metaClusters = map[uint64]metaRef{}
	for _, e := range im.l1 {
		im.trackMeta(e&l1OffsetMask, true, 1)
	}
	for _, b := range im.rt {
		im.trackMeta(b, false, 1)
	}
}

// checkOverlap refuses a write of n bytes at host offset off that would land
// on metadata other than the structure being written (kind, at host offset
// self for L2 tables and refcount blocks). Caller holds meta.
func (im *Image) checkOverlap(off, n uint64, kind metaKind, self uint64) error {
	if n == 0 {
		return nil
	}
	end := off + n
	hit := func(what string, at, size uint64) error {
		if size == 0 || at >= end || off >= at+size {
			return nil
		}
		return corruptf(int64(max(off, at)), "%s: host range %d+%d overlaps the %s at %d; refused (the image's refcounts or mappings are damaged: run `img check`)", metaKindWhat[kind], off, n, what, at)
	}
	h := im.h
	cs := im.clusterSize
	if err := hit("image header", 0, cs); err != nil {
		return err
	}
	if kind != writeL1 && h.l1Offset != 0 {
		if err := hit("L1 table", h.l1Offset, uint64(h.l1Size)*8); err != nil {
			return err
		}
	}
	if kind != writeRT && h.refcountOffset != 0 {
		if err := hit("refcount table", h.refcountOffset, uint64(h.refcountClusters)*cs); err != nil {
			return err
		}
	}
	if z := h.zoned; z != nil && kind != writeWP && z.MetaOffset != 0 {
		if err := hit("write-pointer table", z.MetaOffset, z.MetaSize); err != nil {
			return err
		}
	}
	if len(im.snapshots) > 0 {
		if err := hit("snapshot table", h.snapshotsOffset, im.snapTableSize); err != nil {
			return err
		}
		for i := range im.snapshots {
			s := &im.snapshots[i]
			if err := hit("L1 table of snapshot "+s.info.ID, s.l1Offset, uint64(s.l1Size)*8); err != nil {
				return err
			}
		}
	}
	if len(im.metaClusters) == 0 {
		return nil
	}
	selfC := ^uint64(0)
	if kind == writeL2 || kind == writeRefBlock {
		selfC = self >> im.clusterBits
	}
	check := func(c uint64, r metaRef) error {
		if c == selfC {
			if kind == writeL2 {
				r.l2--
			} else {
				r.rb--
			}
		}
		if r.l2 > 0 {
			return hit("L2 table", c<<im.clusterBits, cs)
		}
		if r.rb > 0 {
			return hit("refcount block", c<<im.clusterBits, cs)
		}
		return nil
	}
	c0, c1 := off>>im.clusterBits, (end-1)>>im.clusterBits
	if c1-c0+1 > uint64(len(im.metaClusters)) {
		for c, r := range im.metaClusters {
			if c >= c0 && c <= c1 {
				if err := check(c, r); err != nil {
					return err
				}
			}
		}
		return nil
	}
	for c := c0; c <= c1; c++ {
		if r, ok := im.metaClusters[c]; ok {
			if err := check(c, r); err != nil {
				return err
			}
		}
	}
	return nil
}
