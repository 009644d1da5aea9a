package qcow2

import (
	"encoding/binary"
	"fmt"
)

// Check walks every structure that references clusters, counts the
// references, and compares them with the stored refcounts, like
// `qemu-img check`. With RepairLeaks it lowers refcounts that are too high;
// with RepairAll it also raises those that are too low.
func Check(path string, o CheckOptions) (*CheckResult, error) {
	repair := o.RepairLeaks || o.RepairAll
	im, err := Open(path, OpenOptions{ReadOnly: !repair, NoBacking: true, NoRepair: true, ForceShare: o.ForceShare && !repair})
	if err != nil {
		return nil, err
	}
	im.dirtySet = true // repairs must not set the dirty bit
	im.meta.Lock()
	res, err := im.checkLocked(o)
	if err == nil && res.LeaksFixed+res.CorruptionsFixed > 0 {
		// Like qemu-img: double-check the repaired image and report what
		// remains, with the counts of what was fixed.
		first := res
		if res, err = im.checkLocked(CheckOptions{}); res != nil {
			res.LeaksFixed, res.CorruptionsFixed = first.LeaksFixed, first.CorruptionsFixed
			res.Messages = append(first.Messages, res.Messages...)
		}
	}
	if err == nil && repair && im.h.incompatible&incDirty != 0 && res.Corruptions == res.CorruptionsFixed && res.Leaks == res.LeaksFixed {
		im.h.incompatible &^= incDirty
		err = im.writeHeaderField(offIncompatible, im.h.incompatible)
	}
	im.meta.Unlock()
	im.dirtySet = false
	if cerr := im.Close(); err == nil && cerr != nil && cerr != ErrClosed {
		err = cerr
	}
	return res, err
}

// refCounter accumulates computed references per cluster.
type refCounter struct {
	im    *Image
	refs  []uint64
	res   *CheckResult
	extra map[uint64]uint64 // references beyond the file end
}

func (r *refCounter) add(off, size uint64, what string) {
	if size == 0 {
		return
	}
	cs := r.im.clusterSize
	for c := off / cs; c <= (off+size-1)/cs; c++ {
		if c >= uint64(len(r.refs)) {
			r.res.Corruptions++
			r.res.Messages = append(r.res.Messages, fmt.Sprintf("ERROR %s at offset %d lies beyond the end of the image file", what, c*cs))
			return
		}
		r.refs[c]++
	}
}

func (im *Image) checkLocked(o CheckOptions) (*CheckResult, error) {
	res := &CheckResult{}
	refs, err := im.countRefs(res)
	if err != nil {
		return res, err
	}
	// Like qemu-img (qcow2_check_refcounts): compare once reporting
	// ("ERROR", "Leaked"), and when repairing and something differs,
	// forget those counts and compare again, repairing ("Repairing").
	var pre CheckResult
	if o.RepairLeaks || o.RepairAll {
		pre = *res
		if err := im.compareRefcounts(refs, CheckOptions{}, res); err != nil {
			return res, err
		}
		if res.Corruptions+res.Leaks > pre.Corruptions+pre.Leaks {
			msgs := res.Messages
			*res = pre
			res.Messages = msgs
			if err := im.compareRefcounts(refs, o, res); err != nil {
				return res, err
			}
		}
	} else if err := im.compareRefcounts(refs, o, res); err != nil {
		return res, err
	}
	// COPIED flags of the active tables must agree with the refcounts.
	for i, e := range im.l1 {
		off := e & l1OffsetMask
		if off == 0 {
			continue
		}
		rc, err := im.refcount(off >> im.clusterBits)
		if err != nil {
			return res, err
		}
		if (rc == 1) != (e&oflagCopied != 0) {
			res.Corruptions++
			res.Messages = append(res.Messages, fmt.Sprintf("%s OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d", repairWord(o), i, e, rc))
			// qemu-img check -r all (check_oflag_copied): COPIED is set
			// exactly when the refcount (repaired above) is 1.
			if o.RepairAll {
				if err := im.setL1(uint64(i), e^oflagCopied); err != nil {
					return res, fmt.Errorf("repairing OFLAG_COPIED of L1 entry %d: %w", i, err)
				}
				res.CorruptionsFixed++
			}
		}
		t, err := im.loadTable(im.l2cache, off)
		if err != nil {
			return res, err
		}
		for j := uint64(0); j < im.clusterSize/8; j++ {
			le := l2Entry(binary.BigEndian.Uint64(t[j*8:]))
			if k := le.kind(); (k == kindNormal || k == kindZero) && le.offset() != 0 {
				rc, err := im.refcount(le.offset() >> im.clusterBits)
				if err != nil {
					return res, err
				}
				if (rc == 1) != le.copied() {
					res.Corruptions++
					res.Messages = append(res.Messages, fmt.Sprintf("%s OFLAG_COPIED data cluster: l2_entry=%x refcount=%d", repairWord(o), uint64(le), rc))
					if o.RepairAll {
						if err := im.setL2(off, t, j, []l2Entry{le ^ oflagCopied}); err != nil {
							return res, fmt.Errorf("repairing OFLAG_COPIED of L2 entry %d of the table at %d: %w", j, off, err)
						}
						res.CorruptionsFixed++
					}
				}
			}
		}
	}
	return res, nil
}

// compareRefcounts compares the stored refcounts with refs, also beyond
// the file end where a refcount block covers clusters (the allocation
// reserve lies there), adding to res and repairing what o allows.
func (im *Image) compareRefcounts(refs []uint64, o CheckOptions, res *CheckResult) error {
	// Compare with stored refcounts, also beyond the file end where a
	// refcount block covers clusters.
	limit := uint64(len(refs))
	for idx, b := range im.rt {
		if b != 0 {
			limit = max(limit, uint64(idx+1)<<im.rbBits)
		}
	}
	for c := uint64(0); c < limit; c++ {
		idx := c >> im.rbBits
		if idx >= uint64(len(im.rt)) || im.rt[idx] == 0 {
			if c < uint64(len(refs)) && refs[c] > 0 {
				// fallthrough to comparison with stored 0
			} else {
				c = (idx+1)<<im.rbBits - 1
				continue
			}
		}
		stored, err := im.refcount(c)
		if err != nil {
			return err
		}
		var want uint64
		if c < uint64(len(refs)) {
			want = refs[c]
		}
		if stored > 0 || want > 0 {
			res.ImageEndOffset = max(res.ImageEndOffset, (c+1)*im.clusterSize)
		}
		if stored == want {
			continue
		}
		fix := stored > want && (o.RepairLeaks || o.RepairAll) || stored < want && o.RepairAll
		word := "Leaked"
		if stored < want {
			word = "ERROR"
			res.Corruptions++
		} else {
			res.Leaks++
		}
		if fix {
			word = "Repairing"
		}
		res.Messages = append(res.Messages, fmt.Sprintf("%s cluster %d refcount=%d reference=%d", word, c, stored, want))
		if fix {
			if err := im.addRefcount(c, 1, int64(want)-int64(stored)); err != nil {
				return fmt.Errorf("repairing cluster %d: %w", c, err)
			}
			if stored < want {
				res.CorruptionsFixed++
			} else {
				res.LeaksFixed++
			}
		}
	}
	return nil
}

// repairWord starts a problem line as qemu-img check does: "Repairing"
// when the problem is being fixed, else "ERROR".
func repairWord(o CheckOptions) string {
	if o.RepairAll {
		return "Repairing"
	}
	return "ERROR"
}

// countRefs computes the references every cluster should have.
func (im *Image) countRefs(res *CheckResult) ([]uint64, error) {
	st, err := im.f.Stat()
	if err != nil {
		return nil, err
	}
	cs := im.clusterSize
	nb := alignUp(uint64(st.Size()), cs) / cs
	r := &refCounter{im: im, refs: make([]uint64, nb), res: res}
	r.add(0, cs, "header")
	res.TotalClusters = (im.h.size + cs - 1) / cs
	// Active L1 and everything below it.
	if err := im.countL1(r, im.h.l1Offset, im.l1, true); err != nil {
		return nil, err
	}
	// Refcount table and blocks.
	r.add(im.h.refcountOffset, uint64(im.h.refcountClusters)*cs, "refcount table")
	for _, b := range im.rt {
		if b != 0 {
			r.add(b, cs, "refcount block")
		}
	}
	// Snapshots: their table, L1 tables and what those reference.
	if len(im.snapshots) > 0 {
		r.add(im.h.snapshotsOffset, im.snapshotTableSize(), "snapshot table")
		for _, s := range im.snapshots {
			l1, err := im.readL1(s.l1Offset, s.l1Size)
			if err != nil {
				return nil, err
			}
			if err := im.countL1(r, s.l1Offset, l1, false); err != nil {
				return nil, err
			}
		}
	}
	if z := im.h.zoned; z != nil {
		r.add(z.MetaOffset, alignUp(z.MetaSize, cs), "write-pointer table")
	}
	// Persistent dirty bitmaps (qemu's): counted while the extension is
	// valid (autoclear bit 0 set), as qemu does; once a writer that does not
	// maintain them clears the bit, qemu treats their clusters as leaked.
	if im.h.bitmaps != nil && im.h.autoclear&autoclearBitmaps != 0 {
		if err := im.countBitmaps(r); err != nil {
			return nil, err
		}
	}
	return r.refs, nil
}

func (im *Image) readL1(off uint64, n uint32) ([]uint64, error) {
	buf := make([]byte, uint64(n)*8)
	if _, err := im.f.ReadAt(buf, int64(off)); err != nil {
		return nil, fmt.Errorf("reading L1 table at %d: %w", off, err)
	}
	l1 := make([]uint64, n)
	for i := range l1 {
		l1[i] = binary.BigEndian.Uint64(buf[i*8:])
	}
	return l1, nil
}

// countL1 adds the references of an L1 table, its L2 tables and data.
func (im *Image) countL1(r *refCounter, off uint64, l1 []uint64, active bool) error {
	cs := im.clusterSize
	r.add(off, uint64(len(l1))*8, "L1 table")
	for i, e := range l1 {
		nextContiguous := uint64(0) // per L2 table, as qemu-img counts fragmentation
		l2off := e & l1OffsetMask
		if l2off == 0 {
			continue
		}
		if l2off%cs != 0 || l2off >= uint64(len(r.refs))*cs {
			r.res.Corruptions++
			r.res.Messages = append(r.res.Messages, fmt.Sprintf("ERROR l2_offset=%x: L2 table is not cluster aligned or beyond the end of the file; L1 index %d", l2off, i))
			continue
		}
		r.add(l2off, cs, "L2 table")
		t := make([]byte, cs)
		if _, err := im.f.ReadAt(t, int64(l2off)); err != nil {
			return err
		}
		for j := uint64(0); j < cs/8; j++ {
			le := l2Entry(binary.BigEndian.Uint64(t[j*8:]))
			switch le.kind() {
			case kindNormal, kindZero:
				o := le.offset()
				if o == 0 {
					continue
				}
				if o%cs != 0 {
					r.res.Corruptions++
					r.res.Messages = append(r.res.Messages, fmt.Sprintf("ERROR offset=%x: data cluster is not properly aligned; L2 entry corrupted", o))
					continue
				}
				r.add(o, cs, "data cluster")
				if active {
					r.res.AllocatedClusters++
					if nextContiguous != 0 && o != nextContiguous {
						r.res.FragmentedClusters++
					}
					nextContiguous = o + cs
				}
			case kindCompressed:
				o, sz := im.compressedRange(le)
				if end := uint64(len(r.refs)) * cs; o+sz > end && o < end {
					sz = end - o
				}
				r.add(o, sz, "compressed cluster")
				if le.copied() {
					r.res.Corruptions++
					r.res.Messages = append(r.res.Messages, fmt.Sprintf("ERROR: cluster %d: copied flag must never be set for compressed clusters", o>>im.clusterBits))
				}
				if active {
					// Compressed clusters count as fragmented by nature (qemu-img).
					r.res.AllocatedClusters++
					r.res.CompressedClusters++
					r.res.FragmentedClusters++
				}
			}
		}
	}
	return nil
}

// snapshotTableSize returns the byte length of the snapshot table.
func (im *Image) snapshotTableSize() uint64 {
	off := im.h.snapshotsOffset
	var hdr [40]byte
	for range im.snapshots {
		if _, err := im.f.ReadAt(hdr[:], int64(off)); err != nil {
			break
		}
		extra := uint64(binary.BigEndian.Uint32(hdr[36:]))
		off = alignUp(off+40+extra+uint64(binary.BigEndian.Uint16(hdr[12:]))+uint64(binary.BigEndian.Uint16(hdr[14:])), 8)
	}
	return off - im.h.snapshotsOffset
}

// rebuildRefcounts repairs the refcounts of a dirty image (one that was not
// closed cleanly) so that they match the references. Caller owns im.
func (im *Image) rebuildRefcounts() (*CheckResult, error) {
	im.meta.Lock()
	defer im.meta.Unlock()
	saved := im.dirtySet
	im.dirtySet = true
	defer func() { im.dirtySet = saved }()
	res, err := im.checkLocked(CheckOptions{RepairAll: true})
	if err != nil {
		return res, err
	}
	if res.Corruptions != res.CorruptionsFixed {
		return res, fmt.Errorf("%w: %d problems could not be repaired", ErrCorrupt, res.Corruptions-res.CorruptionsFixed)
	}
	return res, nil
}

// countBitmaps adds the clusters of the bitmap directory, the bitmap tables
// and their data (qcow2.txt, "Bitmaps extension").
func (im *Image) countBitmaps(r *refCounter) error {
	be := binary.BigEndian
	ext := im.h.bitmaps
	if len(ext) < 24 {
		r.res.Corruptions++
		r.res.Messages = append(r.res.Messages, fmt.Sprintf("ERROR bitmaps extension of %d bytes is too short", len(ext)))
		return nil
	}
	nb, dirSize, dirOff := be.Uint32(ext[0:]), be.Uint64(ext[8:]), be.Uint64(ext[16:])
	if dirSize > 64<<20 || dirOff%im.clusterSize != 0 || nb > 65535 {
		r.res.Corruptions++
		r.res.Messages = append(r.res.Messages, fmt.Sprintf("ERROR bitmap directory at %d (%d bytes, %d bitmaps) is invalid", dirOff, dirSize, nb))
		return nil
	}
	r.add(dirOff, dirSize, "bitmap directory")
	dir := make([]byte, dirSize)
	if _, err := im.f.ReadAt(dir, int64(dirOff)); err != nil {
		return corruptf(int64(dirOff), "reading the bitmap directory: %v", err)
	}
	for i, off := uint32(0), uint64(0); i < nb; i++ {
		if off+24 > dirSize {
			return corruptf(int64(dirOff+off), "bitmap directory entry %d runs past the directory", i)
		}
		tOff, tSize := be.Uint64(dir[off:]), uint64(be.Uint32(dir[off+8:]))
		nameSize, extra := uint64(be.Uint16(dir[off+18:])), uint64(be.Uint32(dir[off+20:]))
		off = alignUp(off+24+extra+nameSize, 8)
		if tSize*8 > 64<<20 {
			return corruptf(int64(dirOff), "bitmap table of %d entries too large", tSize)
		}
		r.add(tOff, tSize*8, "bitmap table")
		tbl := make([]byte, tSize*8)
		if _, err := im.f.ReadAt(tbl, int64(tOff)); err != nil {
			return corruptf(int64(tOff), "reading a bitmap table: %v", err)
		}
		for j := uint64(0); j < tSize; j++ {
			if d := be.Uint64(tbl[j*8:]) & l2OffsetMask; d != 0 {
				r.add(d, im.clusterSize, "bitmap data")
			}
		}
	}
	return nil
}
