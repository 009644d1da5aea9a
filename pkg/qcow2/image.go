package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
)

// backingReader is what an image reads unallocated clusters from.
type backingReader interface {
	io.ReaderAt
	Size() uint64
	Close() error
}

// rawFile adapts a raw image file as a backing file.
type rawFile struct {
	f    *os.File
	size uint64
}

func (r *rawFile) ReadAt(p []byte, off int64) (int, error) {
	n, err := r.f.ReadAt(p, off)
	if err == io.EOF {
		clear(p[n:])
		return len(p), nil
	}
	return n, err
}
func (r *rawFile) Size() uint64 { return r.size }
func (r *rawFile) Close() error { unlockBytes(r.f); return r.f.Close() }

// Image is an open qcow2 image. Its methods are safe for concurrent use.
//
// Locking: guest I/O takes the range lock of each L2 region it touches
// (shared for reads and in-place overwrites, exclusive for anything that
// allocates, frees or rewrites mapping entries), then the metadata mutex
// only for the short time it looks up or changes L1/L2/refcount state. Data
// is read and written outside the metadata mutex, so reads and overwrites of
// allocated clusters run in parallel.
type Image struct {
	f    *os.File
	path string
	ro   bool

	h           *header
	clusterBits uint32
	clusterSize uint64
	l2Bits      uint32 // log2(entries per L2 table)
	rcBits      uint32 // refcount_order
	rbBits      uint32 // log2(refcount entries per refcount block)

	regions regionLocks

	meta       sync.Mutex // guards everything below
	l1         []uint64
	l2cache    *tableCache
	rbcache    *tableCache
	rt         []uint64 // refcount table
	fileEnd    uint64   // bytes; first byte past the last allocated (or reserved) cluster
	physEnd    uint64   // bytes the file is known to span (extended ahead of fileEnd)
	freeHint   uint64   // cluster index below which no cluster is free
	dirtySet   bool     // we set the dirty bit this session
	closed     bool
	snapshots  []snapshot
	wpTableBuf []byte // zoned: the write-pointer table as on disk (cached)

	metaClusters  map[uint64]metaRef // active L2 tables and refcount blocks by host cluster (overlap.go)
	snapTableSize uint64             // bytes of the snapshot table
	pool          allocPool          // clusters reserved for allocation (refcount.go)
	failedIO      atomic.Bool        // a write path failed on the file: keep the dirty bit (noteFailure)
	poolMax       uint64             // clusters reserved at a time; 0: no pool
	rtTop         struct {           // cache of refBlocksEnd for a refcount table of n entries
		n   int
		end uint64
	}

	backing backingReader
}

// Open opens the qcow2 image at path.
func Open(path string, o OpenOptions) (*Image, error) {
	return openDepth(path, o, 0)
}

const maxBackingDepth = 16

func openDepth(path string, o OpenOptions, depth int) (*Image, error) {
	if o.ForceShare && !o.ReadOnly {
		return nil, &OptionError{Name: "force-share", Value: "on", Rule: "can only be used with read-only images"}
	}
	flag := os.O_RDWR
	if o.ReadOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err
	}
	// Lock before reading anything: a header read while another writer
	// holds the image may be half-updated (lock.go).
	if err := LockFileFor(f, o); err != nil {
		f.Close()
		return nil, err
	}
	im, err := openFile(f, path, o, depth)
	if err != nil {
		f.Close()
		return nil, err
	}
	return im, nil
}

// OpenOptions control Open.
type OpenOptions struct {
	ReadOnly  bool
	NoBacking bool // do not open the backing file; unallocated clusters read as zeros
	// NoRepair opens a dirty image without rebuilding its refcounts (used by Check).
	NoRepair bool
	// ForceShare (qemu-img -U, read-only opens only) shares every
	// permission with other openers: the image may be inspected while
	// someone else writes it, at the price of reading a moving target.
	// Without it a read-only open is refused while anyone writes the image,
	// and a writable open while anyone else has it open (lock.go).
	ForceShare bool
}

func openFile(f *os.File, path string, o OpenOptions, depth int) (*Image, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	fileSize := st.Size()
	// Read the header cluster: its size is known from cluster_bits at 20.
	var cb [24]byte
	if _, err := f.ReadAt(cb[:], 0); err != nil && err != io.EOF {
		return nil, err
	}
	firstLen := int64(1) << MaxClusterBits
	if bits := binary.BigEndian.Uint32(cb[offClusterBits:]); bits >= MinClusterBits && bits <= MaxClusterBits {
		firstLen = 1 << bits
	}
	first := make([]byte, min(firstLen, max(fileSize, v3HeaderLength)))
	n, err := f.ReadAt(first, 0)
	if err != nil && err != io.EOF {
		return nil, err
	}
	h, err := decodeHeader(first[:n], fileSize)
	if err != nil {
		return nil, err
	}
	im := &Image{
		f: f, path: path, ro: o.ReadOnly, h: h,
		clusterBits: h.clusterBits,
		clusterSize: 1 << h.clusterBits,
		l2Bits:      h.clusterBits - 3,
		rcBits:      h.refcountOrder,
	}
	im.rbBits = h.clusterBits + 3 - h.refcountOrder
	im.l2cache = newTableCache(l2CacheBytes / im.clusterSize)
	im.rbcache = newTableCache(rbCacheBytes / im.clusterSize)
	im.fileEnd = alignUp(uint64(fileSize), im.clusterSize)
	im.physEnd = uint64(fileSize)

	if h.incompatible&incCorrupt != 0 && !o.ReadOnly {
		return nil, &FormatError{Offset: offIncompatible, Reason: "the corrupt bit is set: the image may only be opened read-only (repair it with `img check -r all`)", Err: ErrCorrupt}
	}
	if err := im.loadTables(uint64(fileSize)); err != nil {
		return nil, err
	}
	if err := im.loadSnapshots(uint64(fileSize)); err != nil {
		return nil, err
	}
	im.indexMeta()
	if h.zoned != nil {
		if err := im.loadZoned(uint64(fileSize)); err != nil {
			return nil, err
		}
	}
	if h.backingFile != "" && !o.NoBacking {
		if depth >= maxBackingDepth {
			return nil, unsupportedf(offBackingOffset, "backing chain deeper than %d", maxBackingDepth)
		}
		if err := im.openBacking(o, depth); err != nil {
			return nil, err
		}
	}
	if !o.ReadOnly {
		im.poolMax = max(1, uint64(poolBytes)>>im.clusterBits)
		// An image we write must not carry bitmaps we would leave stale:
		// clearing the autoclear bit tells qemu they are invalid (spec:
		// "autoclear_features ... must be cleared by writers that do not
		// understand them").
		if h.autoclear&^autoclearDataFileRaw != 0 {
			h.autoclear &= autoclearDataFileRaw
			if err := im.writeHeader(); err != nil {
				im.closeBacking()
				return nil, err
			}
		}
		if h.incompatible&incDirty != 0 && !o.NoRepair {
			if _, err := im.rebuildRefcounts(); err != nil {
				im.closeBacking()
				return nil, fmt.Errorf("repairing the refcounts of a dirty image: %w", err)
			}
			h.incompatible &^= incDirty
			if err := im.writeHeader(); err != nil {
				im.closeBacking()
				return nil, err
			}
			if err := syncFile(f); err != nil {
				im.closeBacking()
				return nil, err
			}
		}
	}
	return im, nil
}

// openBacking opens the backing file read-only, with the lock a read-only
// open takes (qemu's backing children share no write either, block.c
// bdrv_default_perms_for_cow), forcing share when the top image does.
func (im *Image) openBacking(o OpenOptions, depth int) error {
	bo := OpenOptions{ReadOnly: true, ForceShare: o.ForceShare}
	name := im.h.backingFile
	if !filepath.IsAbs(name) {
		name = filepath.Join(filepath.Dir(im.path), name)
	}
	fmtName := im.h.backingFormat
	if fmtName == "" {
		// Probe, as qemu does for images without a backing format.
		b, err := os.Open(name)
		if err != nil {
			return fmt.Errorf("opening backing file: %w", err)
		}
		var m [4]byte
		if _, err := b.ReadAt(m[:], 0); err == nil && binary.BigEndian.Uint32(m[:]) == magic {
			fmtName = "qcow2"
		} else {
			fmtName = "raw"
		}
		b.Close()
	}
	switch fmtName {
	case "qcow2":
		b, err := openDepth(name, bo, depth+1)
		if err != nil {
			return fmt.Errorf("opening backing file %s: %w", name, err)
		}
		im.backing = b
	case "raw":
		b, err := os.Open(name)
		if err != nil {
			return fmt.Errorf("opening backing file: %w", err)
		}
		if err := LockFileFor(b, bo); err != nil {
			b.Close()
			return fmt.Errorf("opening backing file %s: %w", name, err)
		}
		st, err := b.Stat()
		if err != nil {
			b.Close()
			return err
		}
		im.backing = &rawFile{f: b, size: uint64(st.Size())}
	default:
		return unsupportedf(offBackingOffset, "backing file format %q", fmtName)
	}
	return nil
}

func (im *Image) closeBacking() {
	if im.backing != nil {
		im.backing.Close()
		im.backing = nil
	}
}

// loadTables reads and bounds-checks the L1 and refcount tables.
func (im *Image) loadTables(fileSize uint64) error {
	h := im.h
	cs := im.clusterSize
	// L1 must cover the virtual size.
	l2Cover := cs << im.l2Bits
	need := (h.size + l2Cover - 1) / l2Cover
	if uint64(h.l1Size) < need {
		return corruptf(offL1Size, "l1_size %d too small for virtual size %d (needs %d)", h.l1Size, h.size, need)
	}
	if uint64(h.l1Size) > 32<<20/8*8 { // qemu's limit: 32 MiB of L1
		return corruptf(offL1Size, "l1_size %d exceeds the 32 MiB limit", h.l1Size)
	}
	if err := im.checkTable(offL1Offset, "L1 table", h.l1Offset, uint64(h.l1Size)*8, fileSize); err != nil {
		return err
	}
	buf := make([]byte, uint64(h.l1Size)*8)
	if _, err := im.f.ReadAt(buf, int64(h.l1Offset)); err != nil {
		return fmt.Errorf("reading L1 table at %d: %w", h.l1Offset, err)
	}
	im.l1 = make([]uint64, h.l1Size)
	for i := range im.l1 {
		e := binary.BigEndian.Uint64(buf[i*8:])
		if e&l1Reserved != 0 {
			return corruptf(int64(h.l1Offset)+int64(i)*8, "L1 entry %d has reserved bits set (0x%x)", i, e)
		}
		if off := e & l1OffsetMask; off != 0 {
			if off%cs != 0 || off+cs > alignUp(fileSize, cs) {
				return corruptf(int64(h.l1Offset)+int64(i)*8, "L1 entry %d points to L2 table at %d: unaligned or beyond the end of the file (%d)", i, off, fileSize)
			}
		}
		im.l1[i] = e
	}
	// Refcount table.
	if h.refcountClusters == 0 {
		return corruptf(offRefcountClusters, "refcount_table_clusters is 0")
	}
	rtBytes := uint64(h.refcountClusters) * cs
	if rtBytes > 256<<20 {
		return corruptf(offRefcountClusters, "refcount table of %d clusters is too large", h.refcountClusters)
	}
	if err := im.checkTable(offRefcountOffset, "refcount table", h.refcountOffset, rtBytes, fileSize); err != nil {
		return err
	}
	buf = make([]byte, rtBytes)
	n, err := im.f.ReadAt(buf, int64(h.refcountOffset))
	if err != nil && err != io.EOF {
		return err
	}
	clear(buf[n:])
	im.rt = make([]uint64, rtBytes/8)
	for i := range im.rt {
		e := binary.BigEndian.Uint64(buf[i*8:])
		if e&(cs-1) != 0 {
			return corruptf(int64(h.refcountOffset)+int64(i)*8, "refcount table entry %d (0x%x) is not cluster aligned", i, e)
		}
		if e != 0 && e+cs > alignUp(fileSize, cs) {
			return corruptf(int64(h.refcountOffset)+int64(i)*8, "refcount block %d at %d lies beyond the end of the file (%d)", i, e, fileSize)
		}
		im.rt[i] = e
	}
	return nil
}

// checkTable bounds a table: cluster aligned, inside the file.
func (im *Image) checkTable(field int64, what string, off, size, fileSize uint64) error {
	if size == 0 {
		return nil
	}
	if off%im.clusterSize != 0 {
		return corruptf(field, "%s offset %d is not cluster aligned", what, off)
	}
	if off == 0 {
		return corruptf(field, "%s at offset 0 overlaps the header", what)
	}
	if off+size < off || off+size > alignUp(fileSize, im.clusterSize) {
		return corruptf(field, "%s at %d (+%d bytes) lies beyond the end of the file (%d)", what, off, size, fileSize)
	}
	return nil
}

// loadZoned validates the zoned extension and reads the write-pointer table.
func (im *Image) loadZoned(fileSize uint64) error {
	z := im.h.zoned
	if r := z.check(im.h.size); r != nil {
		return corruptf(offZonedField(im.h), "zoned extension: %s = %d: %s", r.field, r.value, r.rule)
	}
	if err := im.checkTable(offZonedField(im.h), "write-pointer table", z.MetaOffset, z.MetaSize, fileSize); err != nil {
		return err
	}
	overlaps := func(off, size uint64) bool {
		return size > 0 && z.MetaOffset < off+size && off < z.MetaOffset+z.MetaSize
	}
	switch {
	case overlaps(im.h.l1Offset, uint64(im.h.l1Size)*8):
		return corruptf(offZonedField(im.h), "write-pointer table at %d overlaps the L1 table at %d", z.MetaOffset, im.h.l1Offset)
	case overlaps(im.h.refcountOffset, uint64(im.h.refcountClusters)*im.clusterSize):
		return corruptf(offZonedField(im.h), "write-pointer table at %d overlaps the refcount table at %d", z.MetaOffset, im.h.refcountOffset)
	}
	for i, b := range im.rt {
		if b != 0 && overlaps(b, im.clusterSize) {
			return corruptf(offZonedField(im.h), "write-pointer table at %d overlaps refcount block %d", z.MetaOffset, i)
		}
	}
	buf := make([]byte, z.MetaSize)
	if _, err := im.f.ReadAt(buf, int64(z.MetaOffset)); err != nil {
		return fmt.Errorf("reading the write-pointer table at %d: %w", z.MetaOffset, err)
	}
	for i := uint32(0); i < z.NrZones; i++ {
		wp, conv := z.decodeWP(buf[i*8:])
		at := int64(z.MetaOffset) + int64(i)*8
		wantConv := i < z.ConventionalZones
		if conv != wantConv {
			return corruptf(at, "zone %d: conventional flag %v disagrees with conventional_zones %d", i, conv, z.ConventionalZones)
		}
		if conv {
			continue
		}
		start, end := z.zoneStart(i), z.WritableEnd(i, im.h.size)
		if wp < start || wp > end || wp%512 != 0 {
			return corruptf(at, "zone %d: write pointer %d outside [%d, %d] or not 512-aligned", i, wp, start, end)
		}
	}
	im.wpTableBuf = buf
	return nil
}

// offZonedField is a best-effort file offset for zoned-extension errors: the
// header length, where extensions start.
func offZonedField(h *header) int64 { return int64(h.headerLength) }

// Size returns the virtual size in bytes.
func (im *Image) Size() uint64 {
	im.meta.Lock()
	defer im.meta.Unlock()
	return im.h.size
}

// ClusterSize returns the cluster size in bytes.
func (im *Image) ClusterSize() uint64 { return im.clusterSize }

// Path returns the file name the image was opened with.
func (im *Image) Path() string { return im.path }

// Info describes the image.
func (im *Image) Info() Info {
	im.meta.Lock()
	defer im.meta.Unlock()
	h := im.h
	inf := Info{
		Version:       int(h.version),
		VirtualSize:   h.size,
		ClusterSize:   uint32(im.clusterSize),
		RefcountBits:  1 << h.refcountOrder,
		LazyRefcounts: h.compatible&compatLazyRefcounts != 0,
		Corrupt:       h.incompatible&incCorrupt != 0,
		Dirty:         h.incompatible&incDirty != 0,
		ExtendedL2:    h.incompatible&incExtL2 != 0,
		Compression:   "zlib",
		BackingFile:   h.backingFile,
		BackingFormat: h.backingFormat,
		Bitmaps:       h.bitmaps != nil,
	}
	if h.compressionType == 1 {
		inf.Compression = "zstd"
	}
	for _, e := range h.others {
		inf.UnknownExtension = append(inf.UnknownExtension, e.magic)
	}
	for _, s := range im.snapshots {
		inf.Snapshots = append(inf.Snapshots, s.info)
	}
	if h.zoned != nil {
		z := *h.zoned
		inf.Zoned = &z
	}
	return inf
}

// Flush makes everything written so far durable (fdatasync).
func (im *Image) Flush() error {
	if im.ro {
		return nil
	}
	return syncFile(im.f)
}

// Close flushes, clears the dirty bit we set, and closes the image.
func (im *Image) Close() error {
	im.meta.Lock()
	if im.closed {
		im.meta.Unlock()
		return ErrClosed
	}
	im.closed = true
	var errs []error
	if !im.ro {
		// Reserved clusters nothing uses go back, so the image closes
		// without leaks (they end the file, which is trimmed below).
		errs = append(errs, im.releasePool())
		if im.physEnd > im.fileEnd {
			// Give back the zeros extended ahead of allocation.
			if st, err := im.f.Stat(); err == nil && uint64(st.Size()) > im.fileEnd {
				errs = append(errs, im.f.Truncate(int64(im.fileEnd)))
			}
		}
		errs = append(errs, syncFile(im.f))
		// A session whose writes failed on the file (ENOSPC, EIO) may
		// have allocated clusters it never used: the dirty bit stays, so
		// the next writable open repairs the refcounts (the leaks).
		if im.failedIO.Load() || errors.Join(errs...) != nil {
			im.dirtySet = false
		}
		if im.dirtySet {
			im.h.incompatible &^= incDirty
			errs = append(errs, im.writeHeaderField(offIncompatible, im.h.incompatible), syncFile(im.f))
		}
	}
	im.meta.Unlock()
	im.closeBacking()
	// Give up the lock bytes now: Go defers the close(2) itself while
	// another goroutine is still inside a call on the file (a server's
	// fsync for a client that just left), and an open that follows Close
	// must not find the image still held.
	unlockBytes(im.f)
	errs = append(errs, im.f.Close())
	return errors.Join(errs...)
}

// writeHeader rewrites the whole header cluster. Caller holds meta (or owns
// the image exclusively).
func (im *Image) writeHeader() error {
	buf, err := im.h.encode(int(im.clusterSize))
	if err != nil {
		return err
	}
	_, err = im.f.WriteAt(buf, 0)
	return err
}

// writeHeaderField rewrites one big-endian u64 field of the header.
func (im *Image) writeHeaderField(off int64, v uint64) error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	_, err := im.f.WriteAt(b[:], off)
	return err
}

// noteFailure passes err on, remembering a failure of the file itself
// (an errno: ENOSPC, EIO) in a write path, after which the refcounts may
// count clusters nothing references; Close then leaves the dirty bit set.
// Refusals (out of range, read-only, metadata overlap) are not failures.
func (im *Image) noteFailure(err error) error {
	var errno syscall.Errno
	if err != nil && errors.As(err, &errno) {
		im.failedIO.Store(true)
	}
	return err
}

// markDirty sets the dirty bit durably before the first metadata change of a
// session on a v3 image, so that a power loss with refcount updates still
// in the page cache is repaired on the next open (qcow2 spec, bit 0). Caller
// holds meta.
func (im *Image) markDirty() error {
	if im.dirtySet || im.h.version < 3 {
		return nil
	}
	im.h.incompatible |= incDirty
	if err := im.writeHeaderField(offIncompatible, im.h.incompatible); err != nil {
		return err
	}
	if err := syncFile(im.f); err != nil {
		return err
	}
	im.dirtySet = true
	return nil
}

func alignUp(v, a uint64) uint64 { return (v + a - 1) &^ (a - 1) }
