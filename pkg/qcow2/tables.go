package qcow2

import (
	"container/list"
	"encoding/binary"
	"sync"
)

// L1 and L2 entry bits (docs/interop/qcow2.txt, "Cluster mapping").
const (
	l1OffsetMask = 0x00fffffffffffe00
	l1Reserved   = 0x7f000000000001ff
	oflagCopied  = 1 << 63
	oflagCompr   = 1 << 62
	oflagZero    = 1 << 0
	l2OffsetMask = 0x00fffffffffffe00
	l2Reserved   = 0x3f000000000001fe

	l2CacheBytes = 32 << 20
	rbCacheBytes = 4 << 20
)

// clusterKind classifies an L2 entry.
type clusterKind int

const (
	kindUnallocated clusterKind = iota // reads from the backing file, or zeros
	kindZero                           // zero flag; may keep a preallocated host cluster
	kindNormal                         // data at a host offset
	kindCompressed
)

type l2Entry uint64

func (e l2Entry) kind() clusterKind {
	switch {
	case e&oflagCompr != 0:
		return kindCompressed
	case e&oflagZero != 0:
		return kindZero
	case e&l2OffsetMask != 0:
		return kindNormal
	}
	return kindUnallocated
}

func (e l2Entry) offset() uint64 { return uint64(e) & l2OffsetMask }
func (e l2Entry) copied() bool   { return e&oflagCopied != 0 }

// tableCache is an LRU cache of cluster-sized tables keyed by host offset.
// Tables are written through to the file on every change, so eviction only
// drops memory. Guarded by Image.meta.
type tableCache struct {
	max   int
	lru   *list.List
	items map[uint64]*list.Element
}

type cachedTable struct {
	off  uint64
	data []byte
}

func newTableCache(max uint64) *tableCache {
	if max < 16 {
		max = 16
	}
	return &tableCache{max: int(max), lru: list.New(), items: map[uint64]*list.Element{}}
}

func (c *tableCache) get(off uint64) []byte {
	if el, ok := c.items[off]; ok {
		c.lru.MoveToFront(el)
		return el.Value.(*cachedTable).data
	}
	return nil
}

func (c *tableCache) put(off uint64, data []byte) {
	if el, ok := c.items[off]; ok {
		el.Value.(*cachedTable).data = data
		c.lru.MoveToFront(el)
		return
	}
	c.items[off] = c.lru.PushFront(&cachedTable{off: off, data: data})
	for c.lru.Len() > c.max {
		el := c.lru.Back()
		c.lru.Remove(el)
		delete(c.items, el.Value.(*cachedTable).off)
	}
}

func (c *tableCache) drop(off uint64) {
	if el, ok := c.items[off]; ok {
		c.lru.Remove(el)
		delete(c.items, off)
	}
}

// regionLocks are striped reader/writer locks, one stripe per L2 region
// (the guest range one L2 table maps). A goroutine holds at most one,
// except Resize (all of them) and ReadDirect (those of its range), which
// take them in ascending stripe order.
type regionLocks struct {
	s [64]sync.RWMutex
}

func (r *regionLocks) get(l1idx uint64) *sync.RWMutex { return &r.s[l1idx%uint64(len(r.s))] }

// loadTable returns the cluster at off from cache or file. Caller holds meta.
func (im *Image) loadTable(c *tableCache, off uint64) ([]byte, error) {
	if t := c.get(off); t != nil {
		return t, nil
	}
	t := make([]byte, im.clusterSize)
	if _, err := im.f.ReadAt(t, int64(off)); err != nil {
		return nil, corruptf(int64(off), "reading table cluster: %v", err)
	}
	c.put(off, t)
	return t, nil
}

// l2For returns the L2 table of region l1idx for reading: its host offset
// and contents, or 0/nil when the region is unallocated. Caller holds meta.
func (im *Image) l2For(l1idx uint64) (uint64, []byte, error) {
	e := im.l1[l1idx]
	off := e & l1OffsetMask
	if off == 0 {
		return 0, nil, nil
	}
	t, err := im.loadTable(im.l2cache, off)
	return off, t, err
}

// l2ForWrite returns a writable L2 table for region l1idx, allocating it or
// copying it away from a snapshot that shares it. Caller holds meta and the
// region's exclusive lock.
func (im *Image) l2ForWrite(l1idx uint64) (uint64, []byte, error) {
	e := im.l1[l1idx]
	off := e & l1OffsetMask
	if off != 0 && e&oflagCopied != 0 {
		if err := im.checkOverlap(off, im.clusterSize, writeL2, off); err != nil {
			return 0, nil, err
		}
		t, err := im.loadTable(im.l2cache, off)
		return off, t, err
	}
	if err := im.markDirty(); err != nil {
		return 0, nil, err
	}
	nc, err := im.allocClusters(1)
	if err != nil {
		return 0, nil, err
	}
	noff := nc << im.clusterBits
	t := make([]byte, im.clusterSize)
	if off != 0 {
		// Shared with a snapshot (refcount > 1): copy, then drop our reference.
		old, err := im.loadTable(im.l2cache, off)
		if err != nil {
			return 0, nil, err
		}
		copy(t, old)
	}
	if _, err := im.f.WriteAt(t, int64(noff)); err != nil {
		return 0, nil, err
	}
	im.l2cache.put(noff, t)
	if err := im.setL1(l1idx, noff|oflagCopied); err != nil {
		return 0, nil, err
	}
	if off != 0 {
		if err := im.addRefcount(off>>im.clusterBits, 1, -1); err != nil {
			return 0, nil, err
		}
	}
	return noff, t, nil
}

// setL1 changes one L1 entry and writes it through. Caller holds meta.
func (im *Image) setL1(idx uint64, v uint64) error {
	at := im.h.l1Offset + idx*8
	if err := im.checkOverlap(at, 8, writeL1, 0); err != nil {
		return err
	}
	im.trackMeta(im.l1[idx]&l1OffsetMask, true, -1)
	im.trackMeta(v&l1OffsetMask, true, 1)
	im.l1[idx] = v
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	_, err := im.f.WriteAt(b[:], int64(at))
	return err
}

// checkDataWrite refuses in-place writes into the data clusters of ents
// (those normal and COPIED, which the caller writes over) that overlap
// metadata. Caller holds meta.
func (im *Image) checkDataWrite(ents []l2Entry) error {
	for _, e := range ents {
		if e.kind() == kindNormal && e.copied() {
			if err := im.checkOverlap(e.offset(), im.clusterSize, writeData, 0); err != nil {
				return err
			}
		}
	}
	return nil
}

// setL2 writes entries[i:] into table t (at host offset toff) starting at
// index first, and writes the changed bytes through. Caller holds meta.
func (im *Image) setL2(toff uint64, t []byte, first uint64, entries []l2Entry) error {
	for i, e := range entries {
		binary.BigEndian.PutUint64(t[(first+uint64(i))*8:], uint64(e))
	}
	lo, hi := first*8, (first+uint64(len(entries)))*8
	_, err := im.f.WriteAt(t[lo:hi], int64(toff+lo))
	return err
}

// l2Entries copies the entries for clusters [first, first+n) of an L2
// table, validating them. t may be nil (unallocated region).
func (im *Image) l2Entries(toff uint64, t []byte, first, n uint64) ([]l2Entry, error) {
	out := make([]l2Entry, n)
	if t == nil {
		return out, nil
	}
	limit := im.fileEnd
	for i := range out {
		e := l2Entry(binary.BigEndian.Uint64(t[(first+uint64(i))*8:]))
		at := int64(toff + (first+uint64(i))*8)
		switch e.kind() {
		case kindNormal, kindZero:
			if uint64(e)&l2Reserved != 0 {
				return nil, corruptf(at, "L2 entry 0x%x has reserved bits set", uint64(e))
			}
			if o := e.offset(); o != 0 && (o%im.clusterSize != 0 || o+im.clusterSize > limit) {
				return nil, corruptf(at, "L2 entry points to data at %d: unaligned or beyond the end of the file (%d)", o, limit)
			}
		case kindCompressed:
			o, sz := im.compressedRange(e)
			if o >= limit || sz == 0 {
				return nil, corruptf(at, "compressed cluster at %d (+%d) lies beyond the end of the file (%d)", o, sz, limit)
			}
		}
		out[i] = e
	}
	return out, nil
}

// compressedRange decodes a compressed L2 entry: host offset and the number
// of bytes that may hold compressed data (qcow2.txt, "Compressed Clusters
// Descriptor").
func (im *Image) compressedRange(e l2Entry) (off, size uint64) {
	x := 62 - (im.clusterBits - 8)
	off = uint64(e) & (1<<x - 1)
	nsec := (uint64(e)>>x)&(1<<(62-x)-1) + 1
	size = nsec*512 - off%512
	return off, size
}
