package qcow2

// This file holds the exported types of the engine. The implementation lives
// in the files named after each concept (header.go, zonedext.go, image.go,
// refcount.go, check.go, ...).

// Default values used by Create, matching qemu-img.
const (
	DefaultClusterSize  = 65536
	DefaultRefcountBits = 16
	MinClusterBits      = 9  // 512 B
	MaxClusterBits      = 21 // 2 MiB

	DefaultZoneSize       = 256 << 20
	DefaultMaxAppendBytes = 64 << 10
)

// CreateOptions describe a new image. Zero values take qemu-img's defaults.
type CreateOptions struct {
	Size          uint64 // virtual size in bytes; rounded up to 512
	ClusterSize   uint32 // power of two, 512 B .. 2 MiB; 0 = 64 KiB
	RefcountBits  uint32 // power of two, 1 .. 64; 0 = 16
	Version       int    // 2 or 3; 0 = 3
	LazyRefcounts bool
	BackingFile   string
	BackingFormat string        // "", "qcow2" or "raw"
	Zoned         *ZonedOptions // nil: not a zoned image
}

// ZonedOptions are the zone.* creation options. A nil pointer field means
// "not given" and takes the default of ../shared/specs/zoned-format.md §2.
type ZonedOptions struct {
	ZoneSize          *uint64
	ZoneCapacity      *uint64
	ConventionalZones *uint32
	MaxOpenZones      *uint32
	MaxActiveZones    *uint32
	MaxAppendBytes    *uint64
}

// ZoneLayout identifies which revision of the zoned extension an image uses.
type ZoneLayout int

const (
	// LayoutA is the seed's 56-byte layout; the one zq-csi writes.
	LayoutA ZoneLayout = iota
	// LayoutB is the later 48-byte layout (big-endian WP entries, bit 63).
	LayoutB
	// LayoutC is the newest layout (44 bytes, padded; no max_append_bytes).
	LayoutC
)

func (l ZoneLayout) String() string {
	switch l {
	case LayoutA:
		return "A (seed, 56 bytes)"
	case LayoutB:
		return "B (48 bytes)"
	case LayoutC:
		return "C (44 bytes)"
	}
	return "unknown"
}

// ZonedExt is the decoded zoned header extension.
type ZonedExt struct {
	Layout            ZoneLayout
	Model             uint8 // 1 = host-managed
	ZoneSize          uint64
	ZoneCapacity      uint64
	ConventionalZones uint32
	NrZones           uint32
	MaxActiveZones    uint32
	MaxOpenZones      uint32
	MaxAppendBytes    uint32
	MetaSize          uint64 // bytes of the write-pointer table (8 × NrZones)
	MetaOffset        uint64 // file offset of the write-pointer table
}

// SnapshotInfo describes one internal snapshot.
type SnapshotInfo struct {
	ID          string
	Name        string
	VMStateSize uint64
	DateSec     uint32
	DateNsec    uint32
	VMClockNsec uint64
	DiskSize    uint64
	ICount      int64 // -1 when absent
}

// Info is what `img info` shows.
type Info struct {
	Version          int
	VirtualSize      uint64
	ClusterSize      uint32
	RefcountBits     uint32
	LazyRefcounts    bool
	Corrupt          bool
	Dirty            bool
	ExtendedL2       bool
	Compression      string // "zlib" or "zstd"
	BackingFile      string
	BackingFormat    string
	Snapshots        []SnapshotInfo
	Zoned            *ZonedExt
	UnknownExtension []uint32 // magics preserved byte-for-byte
	Bitmaps          bool     // a bitmaps extension is present (preserved)
}

// Extent is one run of the guest address space with uniform status, as
// `qemu-img map` reports it.
type Extent struct {
	Start      uint64
	Length     uint64
	Depth      int    // 0 this image, 1 its backing file, ...
	Present    bool   // allocated somewhere in the chain
	Zero       bool   // reads as zeros
	Data       bool   // has data (not a hole)
	Offset     uint64 // host offset, valid when HasOffset
	HasOffset  bool
	Compressed bool
	File       string // file holding the data (for human map output)
}

// CheckOptions select what Check repairs.
type CheckOptions struct {
	RepairLeaks bool // -r leaks: free clusters that nothing references
	RepairAll   bool // -r all: also raise refcounts that are too low
	ForceShare  bool // -U: check an image someone else has open (no repair)
}

// CheckResult mirrors qemu-img check's report. After a repair the image is
// checked again (as qemu-img does): Corruptions and Leaks then count what
// remains, CorruptionsFixed and LeaksFixed what was repaired, and Messages
// hold the lines of both passes.
type CheckResult struct {
	Corruptions        int
	Leaks              int
	CheckErrors        int
	CorruptionsFixed   int
	LeaksFixed         int
	ImageEndOffset     uint64
	TotalClusters      uint64
	AllocatedClusters  uint64
	FragmentedClusters uint64
	CompressedClusters uint64
	Messages           []string // one line per problem, qemu-img wording
}

// ExitCode returns qemu-img check's exit code for the result: 0 clean (or
// everything repaired), 1 check errors, 2 corruptions, 3 leaks only.
func (r *CheckResult) ExitCode() int {
	switch {
	case r.CheckErrors > 0:
		return 1
	case r.Corruptions > 0:
		return 2
	case r.Leaks > 0:
		return 3
	}
	return 0
}
