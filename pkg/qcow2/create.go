package qcow2

import (
	"errors"
	"fmt"
	"math/bits"
	"os"
	"path/filepath"
)

// Create makes a new image at path. It validates every option before
// touching the file system and removes what it made if a later step fails.
// Warnings say which zone limits were clamped.
func Create(path string, o CreateOptions) (warnings []string, err error) {
	if o.ClusterSize == 0 {
		o.ClusterSize = DefaultClusterSize
	}
	if o.RefcountBits == 0 {
		o.RefcountBits = DefaultRefcountBits
	}
	if o.Version == 0 {
		o.Version = 3
	}
	optErr := func(name string, v any, rule string) error {
		return &OptionError{Name: name, Value: fmt.Sprint(v), Rule: rule}
	}
	cs := o.ClusterSize
	if cs < 1<<MinClusterBits || cs > 1<<MaxClusterBits || cs&(cs-1) != 0 {
		return nil, optErr("cluster_size", cs, "must be a power of two between 512 and 2097152 (2M)")
	}
	rb := o.RefcountBits
	if rb > 64 || rb&(rb-1) != 0 {
		return nil, optErr("refcount_bits", rb, "must be a power of two between 1 and 64")
	}
	switch o.Version {
	case 2:
		if o.LazyRefcounts {
			return nil, optErr("lazy_refcounts", "on", "needs compat=1.1 (qcow2 version 3)")
		}
		if rb != 16 {
			return nil, optErr("refcount_bits", rb, "must be 16 with compat=0.10 (qcow2 version 2)")
		}
		if o.Zoned != nil {
			return nil, optErr("zone.mode", "host-managed", "needs compat=1.1 (qcow2 version 3)")
		}
	case 3:
	default:
		return nil, optErr("compat", o.Version, "must be 0.10 (version 2) or 1.1 (version 3)")
	}
	switch o.BackingFormat {
	case "", "qcow2", "raw":
	default:
		return nil, optErr("backing_fmt", o.BackingFormat, "must be qcow2 or raw")
	}
	if o.BackingFormat != "" && o.BackingFile == "" {
		return nil, optErr("backing_fmt", o.BackingFormat, "needs backing_file")
	}
	if len(o.BackingFile) > maxBackingFileLength {
		return nil, optErr("backing_file", o.BackingFile, "must be at most 1023 bytes")
	}
	if o.BackingFile != "" {
		bpath := o.BackingFile
		if !filepath.IsAbs(bpath) {
			bpath = filepath.Join(filepath.Dir(path), bpath)
		}
		bsize, bfmt, err := probeSize(bpath, o.BackingFormat)
		if err != nil {
			return nil, optErr("backing_file", o.BackingFile, "must name a readable image: "+err.Error())
		}
		if o.Size == 0 {
			o.Size = bsize
		}
		if o.BackingFormat == "" {
			o.BackingFormat = bfmt
		}
	}
	if o.Size > 1<<61 {
		return nil, optErr("size", o.Size, "must be at most 2^61 bytes")
	}
	o.Size = alignUp(o.Size, 512)
	clusterBits := uint32(bits.TrailingZeros32(cs))
	l2Cover := uint64(cs) * uint64(cs/8)
	l1Size := (o.Size + l2Cover - 1) / l2Cover
	if l1Size*8 > 32<<20 {
		return nil, optErr("size", o.Size, fmt.Sprintf("needs an L1 table over 32 MiB with cluster_size %d; use a larger cluster size", cs))
	}
	var z *ZonedExt
	if o.Zoned != nil {
		if z, warnings, err = resolveZoned(o.Zoned, o.Size); err != nil {
			return nil, err
		}
	}

	// Truncate only once the lock is ours: an existing image someone has
	// open stays as it is (qemu's raw_co_create locks before truncating
	// too), and a file we did not get to touch is not removed.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	created := err == nil
	if errors.Is(err, os.ErrExist) {
		f, err = os.OpenFile(path, os.O_RDWR, 0)
	}
	if err != nil {
		return nil, err
	}
	if err := LockFileFor(f, OpenOptions{}); err != nil {
		f.Close()
		if created {
			os.Remove(path)
		}
		return nil, err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(path)
		}
	}()
	if err = f.Truncate(0); err != nil {
		return nil, err
	}
	h := &header{
		version:          uint32(o.Version),
		clusterBits:      clusterBits,
		size:             o.Size,
		refcountOffset:   uint64(cs),
		refcountClusters: 1,
		refcountOrder:    uint32(bits.TrailingZeros32(rb)),
		backingFile:      o.BackingFile,
		backingFormat:    o.BackingFormat,
		zoned:            z,
	}
	if o.Version == 3 {
		h.headerLength = ourV3HeaderLength
		if o.LazyRefcounts {
			h.compatible |= compatLazyRefcounts
		}
		if z != nil {
			h.incompatible |= incZoned
		}
	} else {
		h.headerLength = v2HeaderLength
	}
	im := &Image{
		f: f, path: path, h: h,
		clusterBits: clusterBits, clusterSize: uint64(cs),
		l2Bits: clusterBits - 3, rcBits: h.refcountOrder,
		dirtySet: true, // a new image: nothing to protect yet
	}
	im.rbBits = clusterBits + 3 - h.refcountOrder
	im.l2cache = newTableCache(16)
	im.rbcache = newTableCache(16)
	// Cluster 0 header, 1 refcount table, 2 refcount block for clusters 0-2.
	im.rt = make([]uint64, cs/8)
	im.rt[0] = 2 * uint64(cs)
	blk := make([]byte, cs)
	for c := uint64(0); c < 3; c++ {
		if c>>im.rbBits == 0 {
			im.rbSet(blk, c, 1)
		}
	}
	im.fileEnd = 3 * uint64(cs)
	if 3>>im.rbBits != 0 { // tiny refcount blocks: let the allocator lay them out
		im.rt[0] = 2 * uint64(cs)
	}
	if _, err = f.WriteAt(blk, 2*int64(cs)); err != nil {
		return nil, err
	}
	rtb := make([]byte, cs)
	putBE64(rtb, im.rt[0])
	if _, err = f.WriteAt(rtb, int64(cs)); err != nil {
		return nil, err
	}
	im.rbcache.put(2*uint64(cs), blk)
	if err = im.writeHeader(); err != nil {
		return nil, err
	}
	// Clusters 1 and 2 may lie outside the first block when blocks are tiny
	// (512-byte clusters, 64-bit refcounts hold 64 entries: still fine);
	// every supported combination covers at least 64 clusters per block.
	h.l1Size = uint32(l1Size)
	if l1Size > 0 {
		n := alignUp(l1Size*8, uint64(cs)) / uint64(cs)
		c, err := im.allocClusters(n)
		if err != nil {
			return nil, err
		}
		h.l1Offset = c << clusterBits
		if _, err := f.WriteAt(make([]byte, n*uint64(cs)), int64(h.l1Offset)); err != nil {
			return nil, err
		}
	}
	if z != nil {
		n := alignUp(z.MetaSize, uint64(cs)) / uint64(cs)
		c, err := im.allocClusters(n)
		if err != nil {
			return nil, err
		}
		z.MetaOffset = c << clusterBits
		tbl := make([]byte, n*uint64(cs))
		for i := uint32(0); i < z.NrZones; i++ {
			z.encodeWP(tbl[i*8:], z.zoneStart(i), i < z.ConventionalZones)
		}
		if _, err := f.WriteAt(tbl, int64(z.MetaOffset)); err != nil {
			return nil, err
		}
	}
	if err = im.writeHeader(); err != nil {
		return nil, err
	}
	if err = f.Truncate(int64(im.fileEnd)); err != nil {
		return nil, err
	}
	if err = syncFile(f); err != nil {
		return nil, err
	}
	if err = f.Close(); err != nil {
		return nil, err
	}
	return warnings, nil
}

// probeSize returns the virtual size and format of an image file.
func probeSize(path, format string) (uint64, string, error) {
	if format == "" || format == "qcow2" {
		im, err := Open(path, OpenOptions{ReadOnly: true})
		if err == nil {
			defer im.Close()
			return im.Size(), "qcow2", nil
		}
		if format == "qcow2" || !errors.Is(err, ErrNotQcow2) {
			return 0, "", err
		}
	}
	st, err := os.Stat(path)
	if err != nil {
		return 0, "", err
	}
	return uint64(st.Size()), "raw", nil
}

func putBE64(b []byte, v uint64) {
	for i := 0; i < 8; i++ {
		b[i] = byte(v >> (56 - 8*i))
	}
}
