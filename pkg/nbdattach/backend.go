package nbdattach

import (
	"fmt"
	"strings"
)

// Backend is the storage behind an export. Every method may be called from
// several goroutines at once (requests run concurrently, possibly over several
// connections); the server checks offsets and lengths against Size before
// calling, so a backend sees only in-range, non-negative requests.
type Backend interface {
	// ReadAt fills p from off. A short read must come with an error.
	ReadAt(p []byte, off int64) (int, error)
	// WriteAt writes p at off. With fua the data must be durable before
	// WriteAt returns (NBD_CMD_FLAG_FUA).
	WriteAt(p []byte, off int64, fua bool) (int, error)
	// Flush makes every write that has returned durable (NBD_CMD_FLUSH).
	Flush() error
	// Trim is a hint that the range is no longer needed (NBD_CMD_TRIM).
	Trim(off, length int64) error
	// WriteZeroes makes the range read as zeros. With noHole the range must
	// stay allocated (NBD_CMD_FLAG_NO_HOLE).
	WriteZeroes(off, length int64, noHole bool) error
	// Size is the export size in bytes; it must not change while served.
	Size() int64
}

// Extent is one run of a block status reply: Length bytes sharing Flags,
// whose meaning is defined by the metadata context (for base:allocation,
// StateHole and StateZero).
type Extent struct {
	Length int64
	Flags  uint32
}

// BlockStatuser is implemented by backends that can describe their contents.
// BlockStatus is called with base:allocation (if the backend lists it or not)
// and with each context from MetaContexts that the client selected. It
// returns consecutive extents starting at off; they may cover less than
// length (the client asks again) or more (the server trims them).
type BlockStatuser interface {
	BlockStatus(context string, off, length int64) ([]Extent, error)
}

// MetaContexter lists the metadata contexts a backend offers beyond
// base:allocation, such as "zq:zones". Each name is "namespace:leaf".
type MetaContexter interface {
	MetaContexts() []string
}

// ReadOnlyer is implemented by backends that may refuse writes; a true result
// makes the export read-only whatever Export.ReadOnly says.
type ReadOnlyer interface {
	ReadOnly() bool
}

// FastZeroer is implemented by backends that can tell, cheaply and before
// any I/O, whether WriteZeroes of a range will be faster than writing zero
// bytes. Without it every NBD_CMD_FLAG_FAST_ZERO request fails at once with
// ENOTSUP, as proto.md requires of a server that cannot decide quickly.
type FastZeroer interface {
	CanFastZero(off, length int64, noHole bool) bool
}

// Orderer is implemented by backends whose writes to some ranges must be
// applied in the order they arrived on a connection (a zoned device's
// sequential zones). Write-type requests with the same key run one after
// another in arrival order; others still run concurrently.
type Orderer interface {
	OrderKey(off, length int64) (key int64, ok bool)
}

// Cacher is implemented by backends that can prefetch (NBD_CMD_CACHE).
// Without it NBD_CMD_CACHE succeeds without doing anything.
type Cacher interface {
	Cache(off, length int64) error
}

// Block size defaults. proto.md: a client wanting interoperability keeps to
// 512-byte alignment and 32 MiB requests; 4096 is the usual preferred size.
const (
	DefaultMinBlockSize       = 512
	DefaultPreferredBlockSize = 4096
	DefaultMaxPayload         = 32 << 20

	// maxMaxPayload keeps a whole read inside one structured chunk (whose
	// length field is 32 bits) and bounds per-connection memory.
	maxMaxPayload = 1 << 30
)

// Export is one named export.
type Export struct {
	Name        string // canonical name; "" is the default export
	Description string // shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION
	Backend     Backend

	ReadOnly bool // writes fail with EPERM; also set when the backend says so

	// MinBlockSize is the advertised minimum block size and the alignment
	// the server enforces on offsets and lengths (EINVAL otherwise): a power
	// of two from 1 to 64 KiB; 0 means DefaultMinBlockSize. Use 4096 for a
	// zoned export with 4 KiB logical blocks.
	MinBlockSize uint32
	// PreferredBlockSize is advertised only; 0 means
	// max(DefaultPreferredBlockSize, MinBlockSize).
	PreferredBlockSize uint32
	// MaxPayload caps READ and WRITE lengths (EINVAL above it); it is the
	// advertised maximum block size. 0 means DefaultMaxPayload.
	MaxPayload uint32

	// MultiConn advertises NBD_FLAG_CAN_MULTI_CONN. Set it only when the
	// backend's Flush (and FUA) cover writes made through every connection,
	// which is what the flag promises the client.
	MultiConn bool
}

// exportConfig is an Export with defaults applied and its contexts listed.
type exportConfig struct {
	exp       *Export
	backend   Backend
	readOnly  bool
	minBlock  uint32
	prefBlock uint32
	maxBlock  uint32
	contexts  []string // base:allocation first
}

func powerOfTwo(v uint32) bool { return v != 0 && v&(v-1) == 0 }

func (e *Export) config() (*exportConfig, error) {
	if e == nil || e.Backend == nil {
		return nil, fmt.Errorf("nbd: export has no backend")
	}
	c := &exportConfig{
		exp:       e,
		backend:   e.Backend,
		readOnly:  e.ReadOnly,
		minBlock:  e.MinBlockSize,
		prefBlock: e.PreferredBlockSize,
		maxBlock:  e.MaxPayload,
	}
	if ro, ok := e.Backend.(ReadOnlyer); ok && ro.ReadOnly() {
		c.readOnly = true
	}
	if c.minBlock == 0 {
		c.minBlock = DefaultMinBlockSize
	}
	if !powerOfTwo(c.minBlock) || c.minBlock > 64<<10 {
		return nil, fmt.Errorf("nbd: export %q: minimum block size %d is not a power of two up to 64 KiB", e.Name, c.minBlock)
	}
	if c.prefBlock == 0 {
		c.prefBlock = max(DefaultPreferredBlockSize, c.minBlock)
	}
	if !powerOfTwo(c.prefBlock) || c.prefBlock < max(c.minBlock, 512) {
		return nil, fmt.Errorf("nbd: export %q: preferred block size %d must be a power of two >= max(512, minimum)", e.Name, c.prefBlock)
	}
	if c.maxBlock == 0 {
		c.maxBlock = DefaultMaxPayload
	}
	if c.maxBlock > maxMaxPayload {
		return nil, fmt.Errorf("nbd: export %q: maximum payload %d is above %d", e.Name, c.maxBlock, maxMaxPayload)
	}
	if c.maxBlock%c.minBlock != 0 || c.maxBlock < c.prefBlock {
		return nil, fmt.Errorf("nbd: export %q: maximum payload %d must be a multiple of %d and >= %d", e.Name, c.maxBlock, c.minBlock, c.prefBlock)
	}
	if e.Backend.Size() < 0 {
		return nil, fmt.Errorf("nbd: export %q: negative size", e.Name)
	}
	c.contexts = []string{BaseAllocation}
	if mc, ok := e.Backend.(MetaContexter); ok {
		for _, name := range mc.MetaContexts() {
			if name == BaseAllocation {
				continue
			}
			if i := strings.IndexByte(name, ':'); i <= 0 || len(name) > maxStringLen {
				return nil, fmt.Errorf("nbd: export %q: metadata context %q is not namespace:leaf", e.Name, name)
			}
			c.contexts = append(c.contexts, name)
		}
	}
	return c, nil
}

// flags are the transmission flags offered for this export. NBD_FLAG_SEND_DF
// needs structured replies, so it is offered only when they were negotiated.
func (c *exportConfig) flags(structured bool) TransmissionFlags {
	f := FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendCache
	if c.readOnly {
		f |= FlagReadOnly
	} else {
		f |= FlagSendTrim | FlagSendWriteZeroes | FlagSendFastZero
	}
	if c.exp.MultiConn {
		f |= FlagCanMultiConn
	}
	if structured {
		f |= FlagSendDF
	}
	return f
}

// Flags returns the transmission flags to give the kernel (NBD_ATTR_SERVER_FLAGS)
// for an export served with ServeTransmission: the kernel speaks simple
// replies only, so NBD_FLAG_SEND_DF is never among them.
func (e *Export) Flags() (TransmissionFlags, error) {
	c, err := e.config()
	if err != nil {
		return 0, err
	}
	return c.flags(false), nil
}
