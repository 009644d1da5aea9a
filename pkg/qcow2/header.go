package qcow2

import (
	"encoding/binary"
	"fmt"
	"sort"
	"strings"
)

// On-disk header layout (docs/interop/qcow2.txt, "Header").
const (
	magic = 0x514649fb // "QFI\xfb"

	offMagic             = 0
	offVersion           = 4
	offBackingOffset     = 8
	offBackingSize       = 16
	offClusterBits       = 20
	offSize              = 24
	offCryptMethod       = 32
	offL1Size            = 36
	offL1Offset          = 40
	offRefcountOffset    = 48
	offRefcountClusters  = 56
	offNbSnapshots       = 60
	offSnapshotsOffset   = 64
	offIncompatible      = 72
	offCompatible        = 80
	offAutoclear         = 88
	offRefcountOrder     = 96
	offHeaderLength      = 100
	offCompressionType   = 104
	v2HeaderLength       = 72
	v3HeaderLength       = 104
	ourV3HeaderLength    = 112 // with compression_type and padding, as qemu writes
	maxBackingFileLength = 1023
)

// Incompatible feature bits.
const (
	incDirty       = 1 << 0
	incCorrupt     = 1 << 1
	incDataFile    = 1 << 2
	incCompression = 1 << 3
	incExtL2       = 1 << 4
	incZoned       = 1 << 5

	incKnown = incDirty | incCorrupt | incDataFile | incCompression | incExtL2 | incZoned
)

// Compatible and autoclear feature bits.
const (
	compatLazyRefcounts = 1 << 0

	autoclearBitmaps     = 1 << 0
	autoclearDataFileRaw = 1 << 1
	autoclearKnown       = autoclearBitmaps | autoclearDataFileRaw
)

// Header extension magics.
const (
	extEnd          = 0x00000000
	extBackingFmt   = 0xe2792aca
	extFeatureNames = 0x6803f857
	extBitmaps      = 0x23852875
	extCrypto       = 0x0537be77
	extDataFile     = 0x44415441
	extZoned        = 0x007a6264
)

// featureName is one entry of the feature-name table extension.
type featureName struct {
	typ  uint8 // 0 incompatible, 1 compatible, 2 autoclear
	bit  uint8
	name string
}

// ourFeatureNames is the table we write: qemu 7.2's entries plus "zoned format".
var ourFeatureNames = []featureName{
	{0, 0, "dirty bit"},
	{0, 1, "corrupt bit"},
	{0, 2, "external data file"},
	{0, 3, "compression type"},
	{0, 4, "extended L2 entries"},
	{0, 5, "zoned format"},
	{1, 0, "lazy refcounts"},
	{2, 0, "bitmaps"},
	{2, 1, "raw external data"},
}

// rawExt is a header extension kept byte-for-byte.
type rawExt struct {
	magic uint32
	data  []byte
}

// header is the decoded image header with its extensions.
type header struct {
	version          uint32
	backingOffset    uint64
	backingSize      uint32
	clusterBits      uint32
	size             uint64
	cryptMethod      uint32
	l1Size           uint32
	l1Offset         uint64
	refcountOffset   uint64
	refcountClusters uint32
	nbSnapshots      uint32
	snapshotsOffset  uint64
	incompatible     uint64
	compatible       uint64
	autoclear        uint64
	refcountOrder    uint32
	headerLength     uint32
	compressionType  uint8
	tail             []byte // header bytes past 105 up to headerLength, preserved

	backingFile   string
	backingFormat string
	featureNames  []featureName
	zoned         *ZonedExt
	zonedRaw      []byte // the zoned extension as read (layouts B/C are rewritten as read)
	bitmaps       []byte // bitmaps extension, preserved
	others        []rawExt
}

// decodeHeader parses the header cluster. buf holds the first bytes of the
// file (at least one cluster or the whole file if shorter); fileSize bounds
// every offset.
func decodeHeader(buf []byte, fileSize int64) (*header, error) {
	be := binary.BigEndian
	if len(buf) < v2HeaderLength {
		return nil, corruptf(0, "file is %d bytes, shorter than a qcow2 header (72 bytes)", len(buf))
	}
	if be.Uint32(buf[offMagic:]) != magic {
		return nil, fmt.Errorf("%w: magic is 0x%08x, want 0x%08x (QFI\\xfb)", ErrNotQcow2, be.Uint32(buf), uint32(magic))
	}
	h := &header{
		version:          be.Uint32(buf[offVersion:]),
		backingOffset:    be.Uint64(buf[offBackingOffset:]),
		backingSize:      be.Uint32(buf[offBackingSize:]),
		clusterBits:      be.Uint32(buf[offClusterBits:]),
		size:             be.Uint64(buf[offSize:]),
		cryptMethod:      be.Uint32(buf[offCryptMethod:]),
		l1Size:           be.Uint32(buf[offL1Size:]),
		l1Offset:         be.Uint64(buf[offL1Offset:]),
		refcountOffset:   be.Uint64(buf[offRefcountOffset:]),
		refcountClusters: be.Uint32(buf[offRefcountClusters:]),
		nbSnapshots:      be.Uint32(buf[offNbSnapshots:]),
		snapshotsOffset:  be.Uint64(buf[offSnapshotsOffset:]),
		refcountOrder:    4,
		headerLength:     v2HeaderLength,
	}
	switch h.version {
	case 2:
	case 3:
		if len(buf) < v3HeaderLength {
			return nil, corruptf(int64(len(buf)), "version 3 header truncated (%d bytes)", len(buf))
		}
		h.incompatible = be.Uint64(buf[offIncompatible:])
		h.compatible = be.Uint64(buf[offCompatible:])
		h.autoclear = be.Uint64(buf[offAutoclear:])
		h.refcountOrder = be.Uint32(buf[offRefcountOrder:])
		h.headerLength = be.Uint32(buf[offHeaderLength:])
		if h.headerLength < v3HeaderLength {
			return nil, corruptf(offHeaderLength, "header_length %d invalid (must be >= 104)", h.headerLength)
		}
	default:
		return nil, unsupportedf(offVersion, "version %d (only 2 and 3 exist)", h.version)
	}
	if h.clusterBits < MinClusterBits || h.clusterBits > MaxClusterBits {
		return nil, unsupportedf(offClusterBits, "cluster_bits %d outside %d..%d", h.clusterBits, MinClusterBits, MaxClusterBits)
	}
	cs := uint64(1) << h.clusterBits
	if uint64(h.headerLength) > cs || int(h.headerLength) > len(buf) {
		return nil, corruptf(offHeaderLength, "header_length %d exceeds the first cluster", h.headerLength)
	}
	if h.headerLength > v3HeaderLength {
		h.compressionType = buf[offCompressionType]
		h.tail = append([]byte(nil), buf[offCompressionType+1:h.headerLength]...)
	}
	if h.refcountOrder > 6 {
		return nil, corruptf(offRefcountOrder, "refcount_order %d > 6", h.refcountOrder)
	}
	if h.cryptMethod != 0 {
		return nil, unsupportedf(offCryptMethod, "encrypted image (crypt_method %d)", h.cryptMethod)
	}
	if h.size > 1<<62 {
		return nil, corruptf(offSize, "virtual size %d too large", h.size)
	}

	// Header extensions: between the header and the end of the first cluster.
	end := uint64(len(buf))
	if end > cs {
		end = cs
	}
	if err := h.decodeExtensions(buf[:end], uint64(h.headerLength)); err != nil {
		return nil, err
	}

	// Feature bits, checked after the extensions so the names are known.
	if unk := h.incompatible &^ incKnown; unk != 0 {
		return nil, unsupportedf(offIncompatible, "unknown incompatible feature(s): %s", h.featureList(0, unk))
	}
	if h.incompatible&incDataFile != 0 {
		return nil, unsupportedf(offIncompatible, "external data file (incompatible bit 2): images whose data lives in another file are not supported")
	}
	if h.incompatible&incExtL2 != 0 {
		return nil, unsupportedf(offIncompatible, "extended L2 entries (incompatible bit 4)")
	}
	if h.incompatible&incCompression != 0 {
		if h.headerLength <= v3HeaderLength {
			return nil, corruptf(offIncompatible, "compression type bit set but header has no compression_type field")
		}
		if h.compressionType != 1 {
			return nil, unsupportedf(offCompressionType, "compression type %d", h.compressionType)
		}
	} else if h.headerLength > v3HeaderLength && h.compressionType != 0 {
		return nil, corruptf(offCompressionType, "compression_type %d without the compression type incompatible bit", h.compressionType)
	}
	if (h.incompatible&incZoned != 0) != (h.zoned != nil) {
		if h.zoned == nil {
			return nil, corruptf(offIncompatible, "zoned format bit 5 set but the image has no zoned extension")
		}
		return nil, corruptf(offIncompatible, "zoned extension present but incompatible bit 5 (zoned format) is clear")
	}

	// Backing file name.
	if h.backingOffset != 0 {
		if h.backingSize > maxBackingFileLength || h.backingSize == 0 {
			return nil, corruptf(offBackingSize, "backing file name length %d (must be 1..1023)", h.backingSize)
		}
		if h.backingOffset+uint64(h.backingSize) > uint64(len(buf)) || h.backingOffset+uint64(h.backingSize) > cs {
			return nil, corruptf(offBackingOffset, "backing file name at %d+%d lies outside the first cluster", h.backingOffset, h.backingSize)
		}
		h.backingFile = string(buf[h.backingOffset : h.backingOffset+uint64(h.backingSize)])
	}
	return h, nil
}

func (h *header) decodeExtensions(buf []byte, off uint64) error {
	be := binary.BigEndian
	seen := map[uint32]bool{}
	for {
		if off+8 > uint64(len(buf)) {
			// qemu tolerates a missing end marker at the end of the cluster.
			return nil
		}
		m := be.Uint32(buf[off:])
		l := uint64(be.Uint32(buf[off+4:]))
		if m == extEnd {
			return nil
		}
		dataOff := off + 8
		if dataOff+l > uint64(len(buf)) {
			return corruptf(int64(off), "header extension 0x%08x length %d runs past the first cluster", m, l)
		}
		data := buf[dataOff : dataOff+l]
		if seen[m] && m != extEnd {
			return corruptf(int64(off), "header extension 0x%08x appears twice", m)
		}
		seen[m] = true
		switch m {
		case extBackingFmt:
			h.backingFormat = string(data)
		case extFeatureNames:
			for i := 0; i+48 <= len(data); i += 48 {
				name := string(data[i+2 : i+48])
				if j := strings.IndexByte(name, 0); j >= 0 {
					name = name[:j]
				}
				h.featureNames = append(h.featureNames, featureName{typ: data[i], bit: data[i+1], name: name})
			}
		case extBitmaps:
			h.bitmaps = append([]byte(nil), data...)
		case extCrypto:
			return unsupportedf(int64(off), "full disk encryption header")
		case extDataFile:
			return unsupportedf(int64(off), "external data file %q: images whose data lives in another file are not supported", string(data))
		case extZoned:
			z, err := decodeZonedExt(data, int64(dataOff))
			if err != nil {
				return err
			}
			h.zoned = z
			h.zonedRaw = append([]byte(nil), data...)
		default:
			h.others = append(h.others, rawExt{magic: m, data: append([]byte(nil), data...)})
		}
		off = dataOff + (l+7)&^7
	}
}

// featureList names the bits in mask using the image's feature-name table.
func (h *header) featureList(typ uint8, mask uint64) string {
	var names []string
	for bit := 0; bit < 64; bit++ {
		if mask&(1<<bit) == 0 {
			continue
		}
		name := fmt.Sprintf("bit %d", bit)
		for _, f := range h.featureNames {
			if f.typ == typ && int(f.bit) == bit {
				name = f.name
			}
		}
		names = append(names, name)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// encode renders the header, its extensions and the backing file name into
// one cluster. It fails when they do not fit.
func (h *header) encode(clusterSize int) ([]byte, error) {
	be := binary.BigEndian
	buf := make([]byte, clusterSize)
	be.PutUint32(buf[offMagic:], magic)
	be.PutUint32(buf[offVersion:], h.version)
	be.PutUint32(buf[offClusterBits:], h.clusterBits)
	be.PutUint64(buf[offSize:], h.size)
	be.PutUint32(buf[offCryptMethod:], h.cryptMethod)
	be.PutUint32(buf[offL1Size:], h.l1Size)
	be.PutUint64(buf[offL1Offset:], h.l1Offset)
	be.PutUint64(buf[offRefcountOffset:], h.refcountOffset)
	be.PutUint32(buf[offRefcountClusters:], h.refcountClusters)
	be.PutUint32(buf[offNbSnapshots:], h.nbSnapshots)
	be.PutUint64(buf[offSnapshotsOffset:], h.snapshotsOffset)
	off := v2HeaderLength
	if h.version >= 3 {
		if h.headerLength < v3HeaderLength {
			h.headerLength = ourV3HeaderLength
		}
		be.PutUint64(buf[offIncompatible:], h.incompatible)
		be.PutUint64(buf[offCompatible:], h.compatible)
		be.PutUint64(buf[offAutoclear:], h.autoclear)
		be.PutUint32(buf[offRefcountOrder:], h.refcountOrder)
		be.PutUint32(buf[offHeaderLength:], h.headerLength)
		if h.headerLength > v3HeaderLength {
			buf[offCompressionType] = h.compressionType
			copy(buf[offCompressionType+1:h.headerLength], h.tail)
		}
		off = int(h.headerLength)
	}
	add := func(m uint32, data []byte) error {
		n := 8 + (len(data)+7)&^7
		if off+n+8 > clusterSize {
			return fmt.Errorf("%w: header extensions do not fit in one %d-byte cluster", ErrUnsupported, clusterSize)
		}
		be.PutUint32(buf[off:], m)
		be.PutUint32(buf[off+4:], uint32(len(data)))
		copy(buf[off+8:], data)
		off += n
		return nil
	}
	if h.backingFormat != "" {
		if err := add(extBackingFmt, []byte(h.backingFormat)); err != nil {
			return nil, err
		}
	}
	if h.zoned != nil {
		if err := add(extZoned, h.zoned.encode(h.zonedRaw)); err != nil {
			return nil, err
		}
	}
	if h.bitmaps != nil {
		if err := add(extBitmaps, h.bitmaps); err != nil {
			return nil, err
		}
	}
	if h.version >= 3 {
		// The feature-name table is optional: qemu leaves it out when it
		// does not fit (512-byte clusters). A zoned image keeps at least
		// its own entry so other tools name the feature they refuse.
		names := h.featureNames
		if len(names) == 0 || h.zoned != nil && !hasFeatureName(names, 0, 5) {
			names = ourFeatureNames
		}
		candidates := [][]featureName{names}
		if h.zoned != nil {
			candidates = append(candidates, []featureName{{0, 5, "zoned format"}})
		}
		for _, names := range candidates {
			tbl := make([]byte, 48*len(names))
			for i, f := range names {
				tbl[i*48] = f.typ
				tbl[i*48+1] = f.bit
				copy(tbl[i*48+2:i*48+48], f.name)
			}
			if off+8+len(tbl)+8+len(h.backingFile) > clusterSize {
				continue
			}
			h.featureNames = names
			if err := add(extFeatureNames, tbl); err != nil {
				return nil, err
			}
			break
		}
	}
	for _, e := range h.others {
		if err := add(e.magic, e.data); err != nil {
			return nil, err
		}
	}
	off += 8 // end-of-extensions marker (zeros)
	if h.backingFile != "" {
		if len(h.backingFile) > maxBackingFileLength || off+len(h.backingFile) > clusterSize {
			return nil, fmt.Errorf("%w: backing file name of %d bytes does not fit in the header cluster", ErrUnsupported, len(h.backingFile))
		}
		h.backingOffset = uint64(off)
		h.backingSize = uint32(len(h.backingFile))
		copy(buf[off:], h.backingFile)
	} else {
		h.backingOffset, h.backingSize = 0, 0
	}
	be.PutUint64(buf[offBackingOffset:], h.backingOffset)
	be.PutUint32(buf[offBackingSize:], h.backingSize)
	return buf, nil
}

func hasFeatureName(names []featureName, typ, bit uint8) bool {
	for _, f := range names {
		if f.typ == typ && f.bit == bit {
			return true
		}
	}
	return false
}
