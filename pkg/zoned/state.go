package zoned

import (
	"errors"
	"fmt"
	"sync"
)

// Cond is a zone condition, numbered as in Linux include/uapi/linux/blkzoned.h
// (enum blk_zone_cond) so that a report can be passed through unchanged.
type Cond uint8

const (
	CondNotWP    Cond = 0x0 // conventional zone
	CondEmpty    Cond = 0x1
	CondImpOpen  Cond = 0x2
	CondExpOpen  Cond = 0x3
	CondClosed   Cond = 0x4
	CondReadOnly Cond = 0xD // not emulated
	CondFull     Cond = 0xE
	CondOffline  Cond = 0xF // not emulated
)

func (c Cond) String() string {
	switch c {
	case CondNotWP:
		return "NOT_WP"
	case CondEmpty:
		return "EMPTY"
	case CondImpOpen:
		return "IMP_OPEN"
	case CondExpOpen:
		return "EXP_OPEN"
	case CondClosed:
		return "CLOSED"
	case CondReadOnly:
		return "READONLY"
	case CondFull:
		return "FULL"
	case CondOffline:
		return "OFFLINE"
	}
	return fmt.Sprintf("Cond(%#x)", uint8(c))
}

// ZoneType is enum blk_zone_type. Sequential-write-preferred (host-aware)
// zones are not emulated.
type ZoneType uint8

const (
	TypeConventional     ZoneType = 0x1
	TypeSeqWriteRequired ZoneType = 0x2
)

func (t ZoneType) String() string {
	switch t {
	case TypeConventional:
		return "CONVENTIONAL"
	case TypeSeqWriteRequired:
		return "SEQWRITE_REQ"
	}
	return fmt.Sprintf("ZoneType(%#x)", uint8(t))
}

// Op names a command, for errors and for BeginMgmt.
type Op uint8

const (
	OpWrite Op = iota + 1
	OpAppend
	OpOpen
	OpClose
	OpFinish
	OpReset
	OpResetAll
	OpRestore // NewMachine's checks of a persisted write-pointer table
	OpRead    // ReadExtents
)

func (o Op) String() string {
	switch o {
	case OpWrite:
		return "write"
	case OpAppend:
		return "append"
	case OpOpen:
		return "open"
	case OpClose:
		return "close"
	case OpFinish:
		return "finish"
	case OpReset:
		return "reset"
	case OpResetAll:
		return "reset-all"
	case OpRestore:
		return "restore"
	case OpRead:
		return "read"
	}
	return fmt.Sprintf("Op(%d)", uint8(o))
}

// ZoneReport is one zone as BLKREPORTZONE (struct blk_zone) describes it.
type ZoneReport struct {
	Start, Len, Cap, WP uint64
	Type                ZoneType
	Cond                Cond
}

// Change is the effect of a management command on one zone, for the
// caller's I/O while the command is pending: after OpReset the bytes in
// [Start, OldWP) may be discarded; after OpFinish the bytes in
// [OldWP, NewWP) must be made to read as zeros (they may hold the remains
// of a failed write or of a write whose WP never became durable).
type Change struct {
	Zone             int
	Start            uint64
	OldWP, NewWP     uint64
	OldCond, NewCond Cond
}

// Extent is a piece of a read: Zero pieces lie at or beyond a write pointer
// (or between capacity and zone end) and must read as zeros (spec §4).
type Extent struct {
	Offset, Length uint64
	Zero           bool
}

// Counts are the zone resources in use (spec §4).
type Counts struct {
	ImplicitOpen, ExplicitOpen, Closed uint32
}

// Open is the number of zones counted against max_open_zones.
func (c Counts) Open() uint32 { return c.ImplicitOpen + c.ExplicitOpen }

// Active is the number of zones counted against max_active_zones.
func (c Counts) Active() uint32 { return c.ImplicitOpen + c.ExplicitOpen + c.Closed }

type claim uint8

const (
	claimNone  claim = iota
	claimWrite       // a write or append is pending
	claimMgmt        // a management command is pending (or being applied)
)

// zone is the state of one zone. prev/next link the implicitly open zones
// in least-recently-written order; -1 ends the list.
type zone struct {
	wp         uint64
	prev, next int32
	cond       Cond
	claim      claim
}

type undoRec struct {
	i int32
	z zone
}

// Machine is the zone state machine of one device. All methods are safe
// for concurrent use; every command is atomic with respect to the others.
type Machine struct {
	g Geometry

	mu       sync.Mutex
	released sync.Cond // broadcast whenever a zone claim is dropped
	zones    []zone
	n        Counts
	lruHead  int32 // least recently written implicitly open zone
	lruTail  int32

	// fillers counts the pending writes and appends that end at their
	// zone's writable end: each one's Commit makes its zone FULL and frees
	// an open and an active slot (see waitForFill).
	fillers int
	// noWait makes a command refused for lack of resources fail at once
	// even while fillers are pending; for single-goroutine tests that hold
	// Pendings across commands, where waiting would wait for themselves.
	noWait bool

	// Undo log of the multi-zone management command being applied, so that
	// a failure on its k-th zone leaves the machine exactly as it was.
	logging              bool
	undo                 []undoRec
	savedN               Counts
	savedHead, savedTail int32
}

// NewMachine returns the state of a device with geometry g whose persisted
// write pointers are wps (one per zone, as absolute byte offsets; entries
// of conventional zones are ignored). A nil wps means a fresh device with
// every zone EMPTY.
//
// Open zones are not persisted: after a restart a zone whose WP is at its
// start is EMPTY, at its writable end FULL, and anywhere between CLOSED
// (spec §4). A table that could not have been written under the geometry's
// limits is refused.
func NewMachine(g Geometry, wps []uint64) (*Machine, error) {
	if err := g.Validate(); err != nil {
		return nil, err
	}
	if wps != nil && len(wps) != int(g.NrZones) {
		return nil, &ZoneError{Op: OpRestore, Zone: -1, Err: fmt.Errorf("%w: %d entries for %d zones", ErrBadWritePointer, len(wps), g.NrZones)}
	}
	m := &Machine{g: g, zones: make([]zone, g.NrZones), lruHead: -1, lruTail: -1}
	m.released.L = &m.mu
	for i := range m.zones {
		z := &m.zones[i]
		z.prev, z.next = -1, -1
		start := g.ZoneStart(i)
		if g.IsConventional(i) {
			z.cond, z.wp = CondNotWP, start
			continue
		}
		wp, end := start, g.WritableEnd(i)
		if wps != nil {
			wp = wps[i]
		}
		switch {
		case wp < start || wp > end:
			return nil, &ZoneError{Op: OpRestore, Zone: i, Offset: wp, Err: fmt.Errorf("%w: not in [%d, %d]", ErrBadWritePointer, start, end)}
		case wp%SectorSize != 0:
			return nil, &ZoneError{Op: OpRestore, Zone: i, Offset: wp, Err: fmt.Errorf("%w: not a multiple of 512", ErrBadWritePointer)}
		}
		z.wp = wp
		switch wp {
		case start:
			z.cond = CondEmpty
		case end:
			z.cond = CondFull
		default:
			z.cond = CondClosed
			m.n.Closed++
		}
	}
	if g.MaxActive != 0 && m.n.Closed > g.MaxActive {
		// A crash cannot produce this if the limits were enforced when the
		// zones were written.
		return nil, &ZoneError{Op: OpRestore, Zone: -1, Err: fmt.Errorf("%w: %d partially written zones exceed max_active_zones %d", ErrBadWritePointer, m.n.Closed, g.MaxActive)}
	}
	return m, nil
}

// Geometry returns the device geometry.
func (m *Machine) Geometry() Geometry { return m.g }

// Counts returns the zone resources in use.
func (m *Machine) Counts() Counts {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.n
}

// Pending is a command the machine has accepted and whose I/O the caller
// now performs: the data of a write or append, the discard of a reset, the
// zeroing of a finish, and persisting the write pointers. Until Commit or
// Abort, the zones it covers are claimed: other commands on them wait.
//
// A Pending must be ended exactly once (further calls do nothing) and must
// not be used from several goroutines at once. A goroutine must not start a
// command on a zone while it holds a Pending on that zone: it would wait
// for itself.
type Pending struct {
	m           *Machine
	op          Op
	first, last int // zones covered; claimed unless conventional
	off, length uint64
	prev        Cond // write/append: the zone's condition before
	fills       bool // write/append: ends at the writable end (counted in fillers)
	changes     []Change
	unclaimed   bool // write to conventional zones: nothing to release
	done        bool
}

// Op returns the command.
func (p *Pending) Op() Op { return p.op }

// Offset returns where the data of a write or append goes (for an append,
// the zone's write pointer when it was accepted), or the start of a
// management command's range.
func (p *Pending) Offset() uint64 { return p.off }

// Length returns the length of the data or of the management range.
func (p *Pending) Length() uint64 { return p.length }

// Changes lists the zones a management command changed (condition or WP),
// in zone order. It is nil for writes and appends.
func (p *Pending) Changes() []Change { return p.changes }

// Commit ends the command successfully. For a write or append it advances
// the write pointer past the data (which must now be written) and makes
// the zone FULL if it reached its writable end; only then do WritePointers,
// DataLimit and Report show the data, so a persisted WP never points past
// data that was not written (spec §5).
func (p *Pending) Commit() { p.end(true) }

// Abort ends a command whose I/O failed. A write or append leaves the write
// pointer where it was and returns a zone it opened to its earlier
// condition (EMPTY or CLOSED), releasing the resources it took; an
// implicitly open zone closed to make room stays closed, which is a state
// the device could have reached anyway. A management command has already
// taken effect (resets and finishes only release resources, so they cannot
// always be undone): Abort just releases its zones, and the caller must
// report its I/O failure as a device error.
func (p *Pending) Abort() { p.end(false) }

func (p *Pending) end(ok bool) {
	if p.unclaimed {
		p.done = true
		return
	}
	m := p.m
	m.mu.Lock()
	defer m.mu.Unlock()
	if p.done {
		return
	}
	p.done = true
	switch p.op {
	case OpWrite, OpAppend:
		if p.fills {
			m.fillers--
		}
		i := p.first
		z := &m.zones[i]
		if z.claim != claimWrite || z.wp != p.off {
			panic(fmt.Sprintf("zoned: zone %d changed under a pending %s", i, p.op))
		}
		switch {
		case ok:
			z.wp += p.length
			if z.wp == m.g.WritableEnd(i) {
				m.setCond(i, CondFull)
			}
		case p.prev == CondEmpty:
			// Now IMP_OPEN, or CLOSED if it was picked to make room.
			m.setCond(i, CondEmpty)
		case p.prev == CondClosed && z.cond == CondImpOpen:
			m.setCond(i, CondClosed)
		}
		z.claim = claimNone
	default:
		for i := p.first; i <= p.last; i++ {
			m.zones[i].claim = claimNone
		}
	}
	m.released.Broadcast()
}

// BeginWrite accepts a write of length bytes at off, performing the
// implicit open (and, if needed, the closing of the least recently written
// implicitly open zone) that a device performs on accepting it.
//
// A write to conventional zones may span several of them. A write to a
// sequential zone must start at its write pointer (ErrNotAtWritePointer),
// stay within its writable end (ErrBoundary) and not target a FULL zone
// (ErrZoneFull), as null_blk's null_zone_write requires. On error nothing
// changed.
func (m *Machine) BeginWrite(off, length uint64) (*Pending, error) {
	fail := func(i int, err error) (*Pending, error) {
		return nil, &ZoneError{Op: OpWrite, Zone: i, Offset: off, Length: length, Err: err}
	}
	if err := m.checkIO(off, length); err != nil {
		return fail(-1, err)
	}
	i := int(off / m.g.ZoneSize)
	if m.g.IsConventional(i) {
		if off+length > m.g.ZoneStart(int(m.g.Conventional)) {
			return fail(i, ErrBoundary)
		}
		return &Pending{m: m, op: OpWrite, first: i, last: i, off: off, length: length, unclaimed: true}, nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for {
		m.waitClaim(i)
		z := &m.zones[i]
		switch {
		case z.cond == CondFull:
			return fail(i, ErrZoneFull)
		case off != z.wp:
			return fail(i, ErrNotAtWritePointer)
		case off+length > m.g.WritableEnd(i):
			return fail(i, ErrBoundary)
		}
		p, err := m.acceptWrite(OpWrite, i, length)
		if !m.waitForFill(err) {
			return p, err
		}
	}
}

// BeginAppend accepts a zone append of length bytes to zone i; the data
// goes at the returned Pending's Offset. Appends to one zone are serialized
// by the zone's claim, so each gets its own offset.
//
// Zone append to a conventional zone fails with ErrConventionalZone
// (null_blk returns BLK_STS_IOERR: EIO); length must be a positive
// multiple of 512 and at most max_append_bytes (the block layer's
// blk_check_zone_append fails larger ones with EIO); a FULL zone gives
// ErrZoneFull (ENOSPC, spec §4); data past the writable end, ErrBoundary.
func (m *Machine) BeginAppend(i int, length uint64) (*Pending, error) {
	fail := func(err error) (*Pending, error) {
		off := uint64(0)
		if i >= 0 && i < int(m.g.NrZones) {
			off = m.g.ZoneStart(i)
		}
		return nil, &ZoneError{Op: OpAppend, Zone: i, Offset: off, Length: length, Err: err}
	}
	switch {
	case i < 0 || i >= int(m.g.NrZones):
		return fail(ErrOutOfRange)
	case m.g.IsConventional(i):
		return fail(ErrConventionalZone)
	case length == 0 || length%SectorSize != 0:
		return fail(ErrUnaligned)
	case length > uint64(m.g.MaxAppendBytes):
		return fail(ErrAppendTooLarge)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for {
		m.waitClaim(i)
		z := &m.zones[i]
		switch {
		case z.cond == CondFull:
			return fail(ErrZoneFull)
		case z.wp+length > m.g.WritableEnd(i):
			return fail(ErrBoundary)
		}
		p, err := m.acceptWrite(OpAppend, i, length)
		if !m.waitForFill(err) {
			return p, err
		}
	}
}

// waitForFill decides what a command refused with err does while zone
// writes are pending: if err is a lack of open or active slots and a
// pending write will fill its zone (and so free one of each), it waits for
// some Pending to end and returns true, and the caller checks the command
// again from the start. Called with m.mu held.
//
// This is the resource rule of a device that processes each command before
// the next (null_blk, whose writes complete in submission order): by the
// time it sees the next command, a zone-filling write it accepted has made
// its zone FULL. Our exporters accept a command before its data is
// written; without the wait, a write to an EMPTY zone that arrives while
// another zone's last write is still being stored would be refused with
// EOVERFLOW although the device is about to have the slot (issue 12: f2fs
// and fio --zonemode=zbd saw "active zones exceeded" on our device and not
// on null_blk). Waiting cannot deadlock: a Pending's owner only does its
// I/O and then ends it.
func (m *Machine) waitForFill(err error) bool {
	if err == nil || m.noWait || m.fillers == 0 ||
		!errors.Is(err, ErrTooManyActiveZones) && !errors.Is(err, ErrTooManyOpenZones) {
		return false
	}
	m.released.Wait()
	return true
}

// acceptWrite implicitly opens sequential zone i, whose position checks
// passed, and claims it. Called with m.mu held and the zone unclaimed.
func (m *Machine) acceptWrite(op Op, i int, length uint64) (*Pending, error) {
	z := &m.zones[i]
	prev := z.cond
	switch prev {
	case CondEmpty, CondClosed:
		if err := m.acquire(i); err != nil {
			return nil, &ZoneError{Op: op, Zone: i, Offset: z.wp, Length: length, Err: err, Limit: m.limitText(err)}
		}
		m.setCond(i, CondImpOpen)
	case CondImpOpen:
		m.lruRemove(i)
		m.lruPush(i)
	}
	z.claim = claimWrite
	fills := z.wp+length == m.g.WritableEnd(i)
	if fills {
		m.fillers++
	}
	return &Pending{m: m, op: op, first: i, last: i, off: z.wp, length: length, prev: prev, fills: fills}, nil
}

// BeginMgmt accepts a zone management command (OpOpen, OpClose, OpFinish,
// OpReset) on the zones in [off, off+length). As blkdev_zone_mgmt requires,
// off must be a zone start and length a multiple of the zone size or reach
// the end of the device (ErrUnaligned, EINVAL). A reset of the whole device
// is a reset-all, which skips conventional zones as Linux does; any other
// range holding a conventional zone fails with ErrConventionalZone (EIO).
//
// The command is all or nothing: if one zone refuses, no zone changes
// (Linux, issuing one command per zone, stops at the failing one instead).
// It takes effect when accepted; the returned Pending keeps the zones
// claimed while the caller discards, zeroes or persists.
func (m *Machine) BeginMgmt(op Op, off, length uint64) (*Pending, error) {
	fail := func(i int, err error) (*Pending, error) {
		return nil, &ZoneError{Op: op, Zone: i, Offset: off, Length: length, Err: err}
	}
	switch op {
	case OpOpen, OpClose, OpFinish, OpReset:
	default:
		return fail(-1, ErrInvalidZoneOp)
	}
	switch {
	case off >= m.g.Size || length > m.g.Size-off:
		return fail(-1, ErrOutOfRange)
	case off%m.g.ZoneSize != 0, length == 0, length%m.g.ZoneSize != 0 && off+length != m.g.Size:
		return fail(-1, ErrUnaligned)
	}
	if op == OpReset && off == 0 && length == m.g.Size {
		return m.BeginResetAll()
	}
	first, last := int(off/m.g.ZoneSize), int((off+length-1)/m.g.ZoneSize)
	if m.g.IsConventional(first) {
		return fail(first, ErrConventionalZone)
	}
	return m.beginZones(op, first, last, off, length)
}

// BeginResetAll resets every sequential zone (REQ_OP_ZONE_RESET_ALL).
func (m *Machine) BeginResetAll() (*Pending, error) {
	return m.beginZones(OpResetAll, int(m.g.Conventional), int(m.g.NrZones)-1, 0, m.g.Size)
}

// beginZones claims sequential zones first..last in ascending order (so
// that two range commands cannot deadlock), then applies op to each.
func (m *Machine) beginZones(op Op, first, last int, off, length uint64) (*Pending, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := first; i <= last; i++ {
		m.waitClaim(i)
		m.zones[i].claim = claimMgmt
	}
	for {
		p, err, retry := m.applyZones(op, first, last, off, length)
		if !retry {
			return p, err
		}
	}
}

// applyZones applies op to the claimed zones first..last, all or nothing.
// retry says the command was rolled back and waited for a zone-filling
// write (waitForFill): the caller applies it again, still holding the
// claims.
func (m *Machine) applyZones(op Op, first, last int, off, length uint64) (p *Pending, err error, retry bool) {
	// Resets cannot fail, and a reset-all may cover 2^20 zones: no log.
	m.startLog(op != OpReset && op != OpResetAll)
	var changes []Change
	for i := first; i <= last; i++ {
		before := m.zones[i]
		var err error
		switch op {
		case OpOpen:
			err = m.open(i)
		case OpClose:
			err = m.close(i)
		case OpFinish:
			err = m.finish(i)
		case OpReset, OpResetAll:
			m.reset(i)
		}
		if err != nil {
			m.rollback()
			if m.waitForFill(err) {
				return nil, nil, true
			}
			for j := first; j <= last; j++ {
				m.zones[j].claim = claimNone
			}
			m.released.Broadcast()
			return nil, &ZoneError{Op: op, Zone: i, Offset: off, Length: length, Err: err, Limit: m.limitText(err)}, false
		}
		if z := m.zones[i]; z.cond != before.cond || z.wp != before.wp {
			changes = append(changes, Change{Zone: i, Start: m.g.ZoneStart(i), OldWP: before.wp, NewWP: z.wp, OldCond: before.cond, NewCond: z.cond})
		}
	}
	m.endLog()
	return &Pending{m: m, op: op, first: first, last: last, off: off, length: length, changes: changes}, nil, false
}

// open: EXPLICIT OPEN (null_open_zone). EXP_OPEN is a no-op; EMPTY and
// CLOSED need resources; FULL is ErrInvalidZoneOp (EINVAL, spec §4;
// null_blk answers BLK_STS_IOERR).
func (m *Machine) open(i int) error {
	switch m.zones[i].cond {
	case CondExpOpen:
		return nil
	case CondEmpty, CondClosed:
		if err := m.acquire(i); err != nil {
			return err
		}
	case CondImpOpen:
	default:
		return ErrInvalidZoneOp
	}
	m.setCond(i, CondExpOpen)
	return nil
}

// close: CLOSE (__null_close_zone). CLOSED is a no-op; an open zone with
// no data becomes EMPTY, otherwise CLOSED; EMPTY and FULL are
// ErrInvalidZoneOp (EINVAL, as for open of FULL; null_blk answers
// BLK_STS_IOERR).
func (m *Machine) close(i int) error {
	switch m.zones[i].cond {
	case CondClosed:
		return nil
	case CondImpOpen, CondExpOpen:
		m.closeZone(i)
		return nil
	}
	return ErrInvalidZoneOp
}

// finish: FINISH (null_finish_zone). FULL is a no-op; any other zone
// becomes FULL with its WP at the writable end. Finishing an EMPTY zone
// needs a free active slot although it ends up inactive: null_blk checks
// null_check_active there, following ZNS, where the zone passes through an
// active state.
func (m *Machine) finish(i int) error {
	switch m.zones[i].cond {
	case CondFull:
		return nil
	case CondEmpty:
		if !m.activeFree() {
			return ErrTooManyActiveZones
		}
	}
	m.setWP(i, m.g.WritableEnd(i))
	m.setCond(i, CondFull)
	return nil
}

// reset: RESET WRITE POINTER (null_reset_zone). EMPTY is a no-op.
func (m *Machine) reset(i int) {
	if m.zones[i].cond == CondEmpty {
		return
	}
	m.setWP(i, m.g.ZoneStart(i))
	m.setCond(i, CondEmpty)
}

// closeZone closes open zone i: back to EMPTY if it holds no data,
// otherwise CLOSED. A zone whose first write is still pending counts as
// holding data: the device accepted that write.
func (m *Machine) closeZone(i int) {
	z := &m.zones[i]
	if z.wp == m.g.ZoneStart(i) && z.claim != claimWrite {
		m.setCond(i, CondEmpty)
	} else {
		m.setCond(i, CondClosed)
	}
}

// limitText says which limit a resource error hit, with the counts at
// the time, for ZoneError.Limit. Called with m.mu held (or during
// rollback, when the counts are those the command saw).
func (m *Machine) limitText(err error) string {
	switch {
	case errors.Is(err, ErrTooManyActiveZones):
		return fmt.Sprintf("max_active_zones=%d reached: %d open, %d closed%s", m.g.MaxActive, m.n.Open(), m.n.Closed, m.activeList())
	case errors.Is(err, ErrTooManyOpenZones):
		return fmt.Sprintf("max_open_zones=%d reached: all %d open zones are explicitly open, none can be closed implicitly", m.g.MaxOpen, m.n.ExplicitOpen)
	}
	return ""
}

// activeList names the first active zones and their conditions, for
// limitText: which zones hold the slots.
func (m *Machine) activeList() string {
	var b []byte
	n := 0
	for i := range m.zones {
		switch c := m.zones[i].cond; c {
		case CondImpOpen, CondExpOpen, CondClosed:
			if n == 8 {
				return string(b) + " ..."
			}
			sep := ", "
			if n == 0 {
				sep = ": zones "
			}
			b = fmt.Appendf(b, "%s%d %v", sep, i, c)
			n++
		}
	}
	return string(b)
}

func (m *Machine) activeFree() bool {
	return m.g.MaxActive == 0 || m.n.Active() < m.g.MaxActive
}

// acquire makes room for EMPTY or CLOSED zone i to become open, the
// "manage open zone resources" step of ZBC extended with ZNS active
// limits (null_check_zone_resources). An EMPTY zone needs an active slot;
// either needs an open slot, made if necessary by closing the least
// recently written implicitly open zone. Closing keeps that zone active, so
// it never breaks max_active; null_blk nevertheless refuses to close one
// when the active limit is reached, which fails opening a CLOSED zone that
// needs no new active slot. We follow ZBC/ZNS and close it.
//
// acquire changes nothing unless it succeeds.
func (m *Machine) acquire(i int) error {
	if m.zones[i].cond == CondEmpty && !m.activeFree() {
		return ErrTooManyActiveZones
	}
	if m.g.MaxOpen != 0 && m.n.Open() >= m.g.MaxOpen {
		if m.lruHead < 0 {
			// Every open zone is explicitly open: never closed for us.
			return ErrTooManyOpenZones
		}
		m.closeZone(int(m.lruHead))
	}
	return nil
}

// waitClaim waits until zone i is not claimed. Called with m.mu held.
func (m *Machine) waitClaim(i int) {
	for m.zones[i].claim != claimNone {
		m.released.Wait()
	}
}

// checkIO checks the offset and length of a write.
func (m *Machine) checkIO(off, length uint64) error {
	switch {
	case length == 0 || off%SectorSize != 0 || length%SectorSize != 0:
		return ErrUnaligned
	case off >= m.g.Size || length > m.g.Size-off:
		return ErrOutOfRange
	}
	return nil
}

// setCond moves zone i to condition c, keeping the counts and the LRU
// list of implicitly open zones in step.
func (m *Machine) setCond(i int, c Cond) {
	z := &m.zones[i]
	old := z.cond
	if old == c {
		return
	}
	m.save(i)
	if old == CondImpOpen {
		m.lruRemove(i)
	}
	m.count(old, ^uint32(0))
	m.count(c, 1)
	z.cond = c
	if c == CondImpOpen {
		m.lruPush(i)
	}
}

func (m *Machine) setWP(i int, wp uint64) {
	m.save(i)
	m.zones[i].wp = wp
}

func (m *Machine) count(c Cond, delta uint32) {
	switch c {
	case CondImpOpen:
		m.n.ImplicitOpen += delta
	case CondExpOpen:
		m.n.ExplicitOpen += delta
	case CondClosed:
		m.n.Closed += delta
	}
}

// lruPush appends zone i as the most recently written.
func (m *Machine) lruPush(i int) {
	m.save(i)
	z := &m.zones[i]
	z.prev, z.next = m.lruTail, -1
	if m.lruTail >= 0 {
		m.save(int(m.lruTail))
		m.zones[m.lruTail].next = int32(i)
	} else {
		m.lruHead = int32(i)
	}
	m.lruTail = int32(i)
}

func (m *Machine) lruRemove(i int) {
	m.save(i)
	z := &m.zones[i]
	if z.prev >= 0 {
		m.save(int(z.prev))
		m.zones[z.prev].next = z.next
	} else {
		m.lruHead = z.next
	}
	if z.next >= 0 {
		m.save(int(z.next))
		m.zones[z.next].prev = z.prev
	} else {
		m.lruTail = z.prev
	}
	z.prev, z.next = -1, -1
}

func (m *Machine) startLog(on bool) {
	m.logging = on
	m.undo = m.undo[:0]
	m.savedN, m.savedHead, m.savedTail = m.n, m.lruHead, m.lruTail
}

// save records zone i before a change. Restoring the records newest first
// brings back each zone's oldest saved value, so duplicates are harmless.
func (m *Machine) save(i int) {
	if m.logging {
		m.undo = append(m.undo, undoRec{int32(i), m.zones[i]})
	}
}

func (m *Machine) rollback() {
	for k := len(m.undo) - 1; k >= 0; k-- {
		m.zones[m.undo[k].i] = m.undo[k].z
	}
	m.n, m.lruHead, m.lruTail = m.savedN, m.savedHead, m.savedTail
	m.endLog()
}

func (m *Machine) endLog() {
	m.logging = false
	if cap(m.undo) > 4096 {
		m.undo = nil // do not keep a huge range command's log alive
	}
	m.undo = m.undo[:0]
}

// Write performs BeginWrite and Commit: the state change of a write whose
// I/O is done elsewhere or not at all.
func (m *Machine) Write(off, length uint64) error {
	p, err := m.BeginWrite(off, length)
	if err != nil {
		return err
	}
	p.Commit()
	return nil
}

// Append performs BeginAppend and Commit and returns the offset written.
func (m *Machine) Append(zone int, length uint64) (uint64, error) {
	p, err := m.BeginAppend(zone, length)
	if err != nil {
		return 0, err
	}
	p.Commit()
	return p.Offset(), nil
}

// Mgmt performs BeginMgmt and Commit.
func (m *Machine) Mgmt(op Op, off, length uint64) error {
	p, err := m.BeginMgmt(op, off, length)
	if err != nil {
		return err
	}
	p.Commit()
	return nil
}

// Open explicitly opens zone i.
func (m *Machine) Open(i int) error { return m.zoneOp(OpOpen, i) }

// Close closes zone i.
func (m *Machine) Close(i int) error { return m.zoneOp(OpClose, i) }

// Finish makes zone i FULL.
func (m *Machine) Finish(i int) error { return m.zoneOp(OpFinish, i) }

// Reset makes zone i EMPTY.
func (m *Machine) Reset(i int) error { return m.zoneOp(OpReset, i) }

// ResetAll makes every sequential zone EMPTY.
func (m *Machine) ResetAll() error {
	p, err := m.BeginResetAll()
	if err != nil {
		return err
	}
	p.Commit()
	return nil
}

func (m *Machine) zoneOp(op Op, i int) error {
	if i < 0 || i >= int(m.g.NrZones) {
		return &ZoneError{Op: op, Zone: i, Err: ErrOutOfRange}
	}
	start, length := m.g.ZoneStart(i), m.g.ZoneLen(i)
	if m.g.IsConventional(i) {
		return &ZoneError{Op: op, Zone: i, Offset: start, Length: length, Err: ErrConventionalZone}
	}
	p, err := m.beginZones(op, i, i, start, length)
	if err != nil {
		return err
	}
	p.Commit()
	return nil
}

// Report returns up to n zones starting with zone start. A FULL zone's WP
// is reported as start+len, the value Linux's sd_zbc and NVMe ZNS drivers
// normalise it to (null_blk's finish sets the same) so that user space sees
// one convention; internally and in WritePointers it is the writable end.
// A conventional zone's WP is its start (spec §4).
func (m *Machine) Report(start, n int) []ZoneReport {
	nr := int(m.g.NrZones)
	if start < 0 || start >= nr || n <= 0 {
		return nil
	}
	n = min(n, nr-start)
	out := make([]ZoneReport, n)
	m.mu.Lock()
	defer m.mu.Unlock()
	for k := range out {
		i := start + k
		r := ZoneReport{Start: m.g.ZoneStart(i), Len: m.g.ZoneLen(i), Cap: m.g.ZoneCap(i)}
		switch z := m.zones[i]; {
		case m.g.IsConventional(i):
			r.Type, r.Cond, r.WP = TypeConventional, CondNotWP, r.Start
		case z.cond == CondFull:
			r.Type, r.Cond, r.WP = TypeSeqWriteRequired, z.cond, r.Start+r.Len
		default:
			r.Type, r.Cond, r.WP = TypeSeqWriteRequired, z.cond, z.wp
		}
		out[k] = r
	}
	return out
}

// DataLimit returns the offset up to which zone i (a valid index) holds
// data: its end for a conventional zone, its committed write pointer for a
// sequential one. Bytes from there to the zone end read as zeros.
func (m *Machine) DataLimit(i int) uint64 {
	if m.g.IsConventional(i) {
		return m.g.ZoneEnd(i)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.zones[i].wp
}

// ReadExtents splits the read [off, off+length) into data and zero pieces,
// merging neighbours of one kind. Reads are never refused (spec §4) other
// than beyond the device, and need not be aligned.
func (m *Machine) ReadExtents(off, length uint64) ([]Extent, error) {
	if off > m.g.Size || length > m.g.Size-off {
		return nil, &ZoneError{Op: OpRead, Zone: -1, Offset: off, Length: length, Err: ErrOutOfRange}
	}
	var out []Extent
	add := func(a, b uint64, zero bool) {
		if a >= b {
			return
		}
		if k := len(out) - 1; k >= 0 && out[k].Zero == zero && out[k].Offset+out[k].Length == a {
			out[k].Length += b - a
			return
		}
		out = append(out, Extent{Offset: a, Length: b - a, Zero: zero})
	}
	end := off + length
	m.mu.Lock()
	defer m.mu.Unlock()
	for a := off; a < end; {
		i := int(a / m.g.ZoneSize)
		b := min(end, m.g.ZoneEnd(i))
		limit := m.g.ZoneEnd(i)
		if !m.g.IsConventional(i) {
			limit = m.zones[i].wp
		}
		add(a, min(b, limit), false)
		add(max(a, limit), b, true)
		a = b
	}
	return out, nil
}

// WritePointers returns the committed write pointer of every zone, to be
// persisted after the data it covers (spec §5): a conventional zone's
// start, a FULL zone's writable end.
func (m *Machine) WritePointers() []uint64 {
	out := make([]uint64, len(m.zones))
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := range m.zones {
		out[i] = m.zones[i].wp
	}
	return out
}
