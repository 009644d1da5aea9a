package zoned

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func newMachine(t testing.TB, g Geometry) *Machine {
	t.Helper()
	m, err := NewMachine(g, nil)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// must fails the test on an error from a setup step.
func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func zoneState(m *Machine, i int) (Cond, uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.zones[i].cond, m.zones[i].wp
}

// snap is everything an operation could change.
type snap struct {
	zones      []zone
	n          Counts
	head, tail int32
}

func takeSnap(m *Machine) snap {
	m.mu.Lock()
	defer m.mu.Unlock()
	return snap{slices.Clone(m.zones), m.n, m.lruHead, m.lruTail}
}

func (s snap) equal(o snap) bool {
	return slices.Equal(s.zones, o.zones) && s.n == o.n && s.head == o.head && s.tail == o.tail
}

// checkInvariants verifies the state is one the device model allows.
//
// The exceptions to "EMPTY iff WP == start": an explicitly opened zone may
// have no data yet, and a zone whose first write is pending is IMP_OPEN (or
// CLOSED, if closed to make room) with its WP still at the start, because
// the WP moves at Commit.
func checkInvariants(m *Machine) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	g := m.g
	if m.logging || len(m.undo) != 0 {
		return fmt.Errorf("undo log left active")
	}
	var n Counts
	for i, z := range m.zones {
		start, wend := g.ZoneStart(i), g.WritableEnd(i)
		if g.IsConventional(i) {
			if z.cond != CondNotWP || z.claim != claimNone || z.wp != start {
				return fmt.Errorf("conventional zone %d: %+v", i, z)
			}
			continue
		}
		if z.wp < start || z.wp > wend || z.wp%SectorSize != 0 {
			return fmt.Errorf("zone %d: WP %d outside [%d, %d] or unaligned", i, z.wp, start, wend)
		}
		if (z.cond == CondFull) != (z.wp == wend) {
			return fmt.Errorf("zone %d: %v with WP %d, writable end %d", i, z.cond, z.wp, wend)
		}
		writing := z.claim == claimWrite
		hasData := z.wp > start || writing
		switch z.cond {
		case CondEmpty:
			if z.wp != start {
				return fmt.Errorf("zone %d: EMPTY with WP %d", i, z.wp)
			}
		case CondImpOpen:
			n.ImplicitOpen++
			if !hasData {
				return fmt.Errorf("zone %d: IMP_OPEN without data", i)
			}
		case CondExpOpen:
			n.ExplicitOpen++
		case CondClosed:
			n.Closed++
			if !hasData {
				return fmt.Errorf("zone %d: CLOSED without data", i)
			}
		case CondFull:
		default:
			return fmt.Errorf("zone %d: condition %v", i, z.cond)
		}
		if z.cond != CondImpOpen && (z.prev != -1 || z.next != -1) {
			return fmt.Errorf("zone %d: %v but linked in the LRU", i, z.cond)
		}
	}
	if n != m.n {
		return fmt.Errorf("counts %+v, conditions say %+v", m.n, n)
	}
	if g.MaxOpen != 0 && n.Open() > g.MaxOpen {
		return fmt.Errorf("%d open zones, max %d", n.Open(), g.MaxOpen)
	}
	if g.MaxActive != 0 && n.Active() > g.MaxActive {
		return fmt.Errorf("%d active zones, max %d", n.Active(), g.MaxActive)
	}
	var k uint32
	prev := int32(-1)
	for i := m.lruHead; i >= 0; i = m.zones[i].next {
		if k++; k > n.ImplicitOpen {
			return fmt.Errorf("LRU longer than %d implicitly open zones", n.ImplicitOpen)
		}
		if m.zones[i].cond != CondImpOpen || m.zones[i].prev != prev {
			return fmt.Errorf("LRU entry %d: %+v, prev should be %d", i, m.zones[i], prev)
		}
		prev = i
	}
	if k != n.ImplicitOpen || m.lruTail != prev {
		return fmt.Errorf("LRU has %d entries ending at %d, want %d ending at %d", k, m.lruTail, n.ImplicitOpen, prev)
	}
	return nil
}

func checkOK(t testing.TB, m *Machine) {
	t.Helper()
	if err := checkInvariants(m); err != nil {
		t.Fatal(err)
	}
}

// lru lists the implicitly open zones, least recently written first.
func lru(m *Machine) []int {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []int
	for i := m.lruHead; i >= 0; i = m.zones[i].next {
		out = append(out, int(i))
	}
	return out
}

// TestTransitions is the (state, op) → (state, WP, error) table for one
// sequential zone of a device without resource limits.
func TestTransitions(t *testing.T) {
	const z = 2
	g := base()
	start, wend := g.ZoneStart(z), g.WritableEnd(z)
	setups := map[string]func(*Machine) error{
		"EMPTY":         func(*Machine) error { return nil },
		"IMP_OPEN":      func(m *Machine) error { return m.Write(start, 1024) },
		"EXP_OPEN@0":    func(m *Machine) error { return m.Open(z) },
		"EXP_OPEN":      func(m *Machine) error { return errors.Join(m.Open(z), m.Write(start, 1024)) },
		"CLOSED":        func(m *Machine) error { return errors.Join(m.Write(start, 1024), m.Close(z)) },
		"FULL":          func(m *Machine) error { return m.Finish(z) },
		"FULL(written)": func(m *Machine) error { return m.Write(start, 4096) },
	}
	type op struct {
		name string
		do   func(m *Machine, wp uint64) (Op, error)
	}
	write := func(name string, off func(wp uint64) uint64, length func(wp uint64) uint64) op {
		return op{name, func(m *Machine, wp uint64) (Op, error) { return OpWrite, m.Write(off(wp), length(wp)) }}
	}
	at := func(wp uint64) uint64 { return wp }
	n := func(k uint64) func(uint64) uint64 { return func(uint64) uint64 { return k } }
	ops := map[string]op{
		"write@wp":       write("write@wp", at, n(512)),
		"write@start":    write("write@start", func(uint64) uint64 { return start }, n(512)),
		"write@wp+512":   write("write@wp+512", func(wp uint64) uint64 { return min(wp, wend-1024) + 512 }, n(512)),
		"write-to-end":   write("write-to-end", at, func(wp uint64) uint64 { return max(wend-wp, 512) }),
		"write-past-end": write("write-past-end", func(wp uint64) uint64 { return min(wp, wend-512) }, func(wp uint64) uint64 { return wend - min(wp, wend-512) + 512 }),
		"append":         {"append", func(m *Machine, _ uint64) (Op, error) { _, err := m.Append(z, 512); return OpAppend, err }},
		"append-big":     {"append-big", func(m *Machine, _ uint64) (Op, error) { _, err := m.Append(z, 1536); return OpAppend, err }},
		"open":           {"open", func(m *Machine, _ uint64) (Op, error) { return OpOpen, m.Open(z) }},
		"close":          {"close", func(m *Machine, _ uint64) (Op, error) { return OpClose, m.Close(z) }},
		"finish":         {"finish", func(m *Machine, _ uint64) (Op, error) { return OpFinish, m.Finish(z) }},
		"reset":          {"reset", func(m *Machine, _ uint64) (Op, error) { return OpReset, m.Reset(z) }},
	}
	const same = ^uint64(0) // WP unchanged
	tests := []struct {
		state, op string
		cond      Cond
		wp        uint64 // relative to the zone start, or same
		err       error
		errno     syscall.Errno
	}{
		{"EMPTY", "write@wp", CondImpOpen, 512, nil, 0},
		{"EMPTY", "write@start", CondImpOpen, 512, nil, 0},
		{"EMPTY", "write@wp+512", CondEmpty, same, ErrNotAtWritePointer, syscall.EIO},
		{"EMPTY", "write-to-end", CondFull, 4096, nil, 0},
		{"EMPTY", "write-past-end", CondEmpty, same, ErrBoundary, syscall.EIO},
		{"EMPTY", "append", CondImpOpen, 512, nil, 0},
		{"EMPTY", "append-big", CondEmpty, same, ErrAppendTooLarge, syscall.EIO},
		{"EMPTY", "open", CondExpOpen, 0, nil, 0},
		{"EMPTY", "close", CondEmpty, same, ErrInvalidZoneOp, syscall.EINVAL},
		{"EMPTY", "finish", CondFull, 4096, nil, 0},
		{"EMPTY", "reset", CondEmpty, 0, nil, 0},

		{"IMP_OPEN", "write@wp", CondImpOpen, 1536, nil, 0},
		{"IMP_OPEN", "write@start", CondImpOpen, same, ErrNotAtWritePointer, syscall.EIO},
		{"IMP_OPEN", "write@wp+512", CondImpOpen, same, ErrNotAtWritePointer, syscall.EIO},
		{"IMP_OPEN", "write-to-end", CondFull, 4096, nil, 0},
		{"IMP_OPEN", "write-past-end", CondImpOpen, same, ErrBoundary, syscall.EIO},
		{"IMP_OPEN", "append", CondImpOpen, 1536, nil, 0},
		{"IMP_OPEN", "append-big", CondImpOpen, same, ErrAppendTooLarge, syscall.EIO},
		{"IMP_OPEN", "open", CondExpOpen, same, nil, 0},
		{"IMP_OPEN", "close", CondClosed, same, nil, 0},
		{"IMP_OPEN", "finish", CondFull, 4096, nil, 0},
		{"IMP_OPEN", "reset", CondEmpty, 0, nil, 0},

		{"EXP_OPEN@0", "write@wp", CondExpOpen, 512, nil, 0},
		{"EXP_OPEN@0", "write@wp+512", CondExpOpen, same, ErrNotAtWritePointer, syscall.EIO},
		{"EXP_OPEN@0", "write-to-end", CondFull, 4096, nil, 0},
		{"EXP_OPEN@0", "append", CondExpOpen, 512, nil, 0},
		{"EXP_OPEN@0", "open", CondExpOpen, 0, nil, 0},
		{"EXP_OPEN@0", "close", CondEmpty, 0, nil, 0}, // no data: back to EMPTY
		{"EXP_OPEN@0", "finish", CondFull, 4096, nil, 0},
		{"EXP_OPEN@0", "reset", CondEmpty, 0, nil, 0},

		{"EXP_OPEN", "write@wp", CondExpOpen, 1536, nil, 0},
		{"EXP_OPEN", "write@start", CondExpOpen, same, ErrNotAtWritePointer, syscall.EIO},
		{"EXP_OPEN", "write-to-end", CondFull, 4096, nil, 0},
		{"EXP_OPEN", "write-past-end", CondExpOpen, same, ErrBoundary, syscall.EIO},
		{"EXP_OPEN", "append", CondExpOpen, 1536, nil, 0},
		{"EXP_OPEN", "append-big", CondExpOpen, same, ErrAppendTooLarge, syscall.EIO},
		{"EXP_OPEN", "open", CondExpOpen, same, nil, 0},
		{"EXP_OPEN", "close", CondClosed, same, nil, 0},
		{"EXP_OPEN", "finish", CondFull, 4096, nil, 0},
		{"EXP_OPEN", "reset", CondEmpty, 0, nil, 0},

		{"CLOSED", "write@wp", CondImpOpen, 1536, nil, 0},
		{"CLOSED", "write@start", CondClosed, same, ErrNotAtWritePointer, syscall.EIO},
		{"CLOSED", "write@wp+512", CondClosed, same, ErrNotAtWritePointer, syscall.EIO},
		{"CLOSED", "write-to-end", CondFull, 4096, nil, 0},
		{"CLOSED", "write-past-end", CondClosed, same, ErrBoundary, syscall.EIO},
		{"CLOSED", "append", CondImpOpen, 1536, nil, 0},
		{"CLOSED", "append-big", CondClosed, same, ErrAppendTooLarge, syscall.EIO},
		{"CLOSED", "open", CondExpOpen, same, nil, 0},
		{"CLOSED", "close", CondClosed, same, nil, 0},
		{"CLOSED", "finish", CondFull, 4096, nil, 0},
		{"CLOSED", "reset", CondEmpty, 0, nil, 0},

		{"FULL", "write@wp+512", CondFull, same, ErrZoneFull, syscall.EIO},
		{"FULL", "write@start", CondFull, same, ErrZoneFull, syscall.EIO},
		{"FULL", "write-past-end", CondFull, same, ErrZoneFull, syscall.EIO},
		{"FULL", "append", CondFull, same, ErrZoneFull, syscall.ENOSPC},
		{"FULL", "append-big", CondFull, same, ErrAppendTooLarge, syscall.EIO},
		{"FULL", "open", CondFull, same, ErrInvalidZoneOp, syscall.EINVAL},
		{"FULL", "close", CondFull, same, ErrInvalidZoneOp, syscall.EINVAL},
		{"FULL", "finish", CondFull, same, nil, 0},
		{"FULL", "reset", CondEmpty, 0, nil, 0},

		{"FULL(written)", "write@start", CondFull, same, ErrZoneFull, syscall.EIO},
		{"FULL(written)", "append", CondFull, same, ErrZoneFull, syscall.ENOSPC},
		{"FULL(written)", "finish", CondFull, same, nil, 0},
		{"FULL(written)", "reset", CondEmpty, 0, nil, 0},
	}
	for _, tt := range tests {
		t.Run(tt.state+"/"+tt.op, func(t *testing.T) {
			m := newMachine(t, g)
			must(t, setups[tt.state](m))
			_, wp0 := zoneState(m, z)
			before := takeSnap(m)
			op, err := ops[tt.op].do(m, wp0)
			if !errors.Is(err, tt.err) || (err == nil) != (tt.err == nil) {
				t.Fatalf("%s: error %v, want %v", tt.op, err, tt.err)
			}
			if got := Errno(err); got != tt.errno {
				t.Errorf("Errno(%v) = %v, want %v", err, got, tt.errno)
			}
			if err != nil {
				var ze *ZoneError
				if !errors.As(err, &ze) || ze.Op != op || ze.Zone != z {
					t.Errorf("error %#v does not name %v and zone %d", err, op, z)
				}
				if !takeSnap(m).equal(before) {
					t.Errorf("failed %s changed the state", tt.op)
				}
			}
			cond, wp := zoneState(m, z)
			want := tt.wp
			if want == same {
				want = wp0
			} else {
				want += start
			}
			if cond != tt.cond || wp != want {
				t.Errorf("after %s: %v WP %d, want %v WP %d", tt.op, cond, wp-start, tt.cond, want-start)
			}
			checkOK(t, m)
		})
	}
}

func TestAppendReturnsOffset(t *testing.T) {
	m := newMachine(t, base())
	start := m.g.ZoneStart(3)
	for k := range uint64(4) {
		off, err := m.Append(3, 512)
		must(t, err)
		if off != start+k*512 {
			t.Errorf("append %d at %d, want %d", k, off, start+k*512)
		}
	}
	for _, tt := range []struct {
		zone   int
		length uint64
		err    error
	}{{-1, 512, ErrOutOfRange}, {8, 512, ErrOutOfRange}, {0, 512, ErrConventionalZone}, {3, 0, ErrUnaligned}, {3, 100, ErrUnaligned}} {
		if _, err := m.Append(tt.zone, tt.length); !errors.Is(err, tt.err) {
			t.Errorf("Append(%d, %d) = %v, want %v", tt.zone, tt.length, err, tt.err)
		}
	}
	// Appends fill the zone up to its end and not past it.
	must(t, m.Write(start+2048, 1536))
	if _, err := m.Append(3, 1024); !errors.Is(err, ErrBoundary) {
		t.Errorf("append past the end: %v", err)
	}
	if _, err := m.Append(3, 512); err != nil {
		t.Fatal(err)
	}
	if c, _ := zoneState(m, 3); c != CondFull {
		t.Errorf("zone 3 is %v after appends to its end", c)
	}
	g := base()
	g.MaxAppendBytes = 0
	m = newMachine(t, g)
	if _, err := m.Append(3, 512); !errors.Is(err, ErrAppendTooLarge) {
		t.Errorf("append with max_append_bytes 0: %v", err)
	}
}

func TestWriteArguments(t *testing.T) {
	m := newMachine(t, base())
	for _, tt := range []struct {
		off, length uint64
		err         error
	}{
		{4096, 0, ErrUnaligned},
		{4096 + 1, 512, ErrUnaligned},
		{4096, 100, ErrUnaligned},
		{8 * 4096, 512, ErrOutOfRange},
		{7 * 4096, 8192, ErrOutOfRange},
		{4096, ^uint64(0) - 511, ErrOutOfRange}, // off+length overflows
		{4096, 8192, ErrBoundary},               // crosses into zone 2
	} {
		before := takeSnap(m)
		if err := m.Write(tt.off, tt.length); !errors.Is(err, tt.err) {
			t.Errorf("Write(%d, %d) = %v, want %v", tt.off, tt.length, err, tt.err)
		}
		if !takeSnap(m).equal(before) {
			t.Errorf("failed Write(%d, %d) changed the state", tt.off, tt.length)
		}
	}
}

func TestConventional(t *testing.T) {
	g := base()
	g.Conventional = 2
	m := newMachine(t, g)
	before := takeSnap(m)
	for _, w := range []struct{ off, length uint64 }{{0, 512}, {1024, 512}, {0, 512}, {3584, 1024}, {0, 8192}} {
		must(t, m.Write(w.off, w.length)) // anywhere, again, across conventional zones
	}
	if !takeSnap(m).equal(before) {
		t.Error("conventional writes changed the state")
	}
	if err := m.Write(4096, 8192); !errors.Is(err, ErrBoundary) {
		t.Errorf("write from conventional into sequential: %v", err)
	}
	for _, f := range []struct {
		op Op
		do func(int) error
	}{{OpOpen, m.Open}, {OpClose, m.Close}, {OpFinish, m.Finish}, {OpReset, m.Reset}} {
		err := f.do(1)
		if !errors.Is(err, ErrConventionalZone) || Errno(err) != syscall.EIO {
			t.Errorf("%v of a conventional zone: %v (%v)", f.op, err, Errno(err))
		}
	}
	if _, err := m.Append(0, 512); !errors.Is(err, ErrConventionalZone) || Errno(err) != syscall.EIO {
		t.Errorf("append to a conventional zone: %v", err)
	}
	if err := m.Mgmt(OpReset, 4096, 8192); !errors.Is(err, ErrConventionalZone) {
		t.Errorf("reset of a range starting conventional: %v", err)
	}
	if got := m.DataLimit(1); got != 8192 {
		t.Errorf("DataLimit(conventional 1) = %d, want 8192", got)
	}
	r := m.Report(0, 3)
	want := []ZoneReport{
		{Start: 0, Len: 4096, Cap: 4096, WP: 0, Type: TypeConventional, Cond: CondNotWP},
		{Start: 4096, Len: 4096, Cap: 4096, WP: 4096, Type: TypeConventional, Cond: CondNotWP},
		{Start: 8192, Len: 4096, Cap: 4096, WP: 8192, Type: TypeSeqWriteRequired, Cond: CondEmpty},
	}
	if !slices.Equal(r, want) {
		t.Errorf("Report = %+v, want %+v", r, want)
	}
	// Reset-all, and a reset of the whole device, skip conventional zones.
	for _, reset := range []func() error{m.ResetAll, func() error { return m.Mgmt(OpReset, 0, g.Size) }} {
		must(t, m.Write(8192, 512))
		must(t, m.Finish(3))
		must(t, reset())
		for i := 2; i < 8; i++ {
			if c, wp := zoneState(m, i); c != CondEmpty || wp != g.ZoneStart(i) {
				t.Errorf("zone %d after reset-all: %v %d", i, c, wp)
			}
		}
		checkOK(t, m)
	}
}

func TestCapacityBelowSize(t *testing.T) {
	g := base()
	g.ZoneCapacity = 3072
	m := newMachine(t, g)
	start := g.ZoneStart(2)
	if err := m.Write(start, 3584); !errors.Is(err, ErrBoundary) {
		t.Errorf("write past capacity: %v", err)
	}
	must(t, m.Write(start, 2048))
	ext, err := m.ReadExtents(start-512, 4096+1024)
	must(t, err)
	want := []Extent{{start - 512, 512, true}, {start, 2048, false}, {start + 2048, 2048 + 512, true}}
	if !slices.Equal(ext, want) {
		t.Errorf("ReadExtents = %+v, want %+v", ext, want)
	}
	must(t, m.Write(start+2048, 1024))
	if c, wp := zoneState(m, 2); c != CondFull || wp != start+3072 {
		t.Errorf("zone filled to capacity: %v %d", c, wp-start)
	}
	must(t, m.Finish(3))
	r := m.Report(2, 2)
	for k, rep := range r {
		if rep.Cap != 3072 || rep.Cond != CondFull || rep.WP != rep.Start+rep.Len {
			t.Errorf("report of zone %d: %+v", 2+k, rep)
		}
	}
	if wps := m.WritePointers(); wps[2] != start+3072 || wps[3] != g.ZoneStart(3)+3072 {
		t.Errorf("persisted WPs of FULL zones %d, %d; want the writable ends", wps[2], wps[3])
	}
	ext, err = m.ReadExtents(g.ZoneStart(3), 4096)
	must(t, err)
	if want := []Extent{{g.ZoneStart(3), 3072, false}, {g.ZoneStart(3) + 3072, 1024, true}}; !slices.Equal(ext, want) {
		t.Errorf("ReadExtents of finished zone = %+v, want %+v", ext, want)
	}
}

func TestRuntZone(t *testing.T) {
	g := base()
	g.Size = 7*4096 + 2048
	g.ZoneCapacity = 3072
	m := newMachine(t, g)
	start := g.ZoneStart(7)
	if err := m.Write(start, 2560); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("write past the device end: %v", err)
	}
	must(t, m.Write(start, 1536))
	must(t, m.Write(start+1536, 512))
	if c, wp := zoneState(m, 7); c != CondFull || wp != g.Size {
		t.Errorf("runt after 2 KiB: %v %d", c, wp)
	}
	if r := m.Report(7, 5); len(r) != 1 || r[0].Len != 2048 || r[0].Cap != 2048 || r[0].WP != g.Size {
		t.Errorf("Report(runt) = %+v", r)
	}
	// A management range may end at the device end instead of a zone
	// multiple.
	for _, tt := range []struct {
		off, length uint64
		err         error
	}{
		{start, 2048, nil},
		{g.ZoneStart(6), 4096 + 2048, nil},
		{start, 4096, ErrOutOfRange},
		{g.ZoneStart(6), 2048, ErrUnaligned},
		{g.ZoneStart(6) + 512, 4096, ErrUnaligned},
		{g.ZoneStart(6), 0, ErrUnaligned},
	} {
		if err := m.Mgmt(OpReset, tt.off, tt.length); !errors.Is(err, tt.err) || (err == nil) != (tt.err == nil) {
			t.Errorf("reset [%d, +%d): %v, want %v", tt.off, tt.length, err, tt.err)
		} else if Errno(err) != map[bool]syscall.Errno{true: 0, false: syscall.EINVAL}[err == nil] {
			t.Errorf("Errno(%v) = %v, want EINVAL", err, Errno(err))
		}
	}
	must(t, m.Finish(7))
	if _, wp := zoneState(m, 7); wp != g.Size {
		t.Errorf("finished runt WP %d, want device end %d", wp, g.Size)
	}
}

func TestMgmtArguments(t *testing.T) {
	m := newMachine(t, base())
	for _, op := range []Op{OpWrite, OpAppend, OpResetAll, 0} {
		if err := m.Mgmt(op, 4096, 4096); !errors.Is(err, ErrInvalidZoneOp) {
			t.Errorf("Mgmt(%v) = %v", op, err)
		}
	}
	for _, i := range []int{-1, 8} {
		if err := m.Open(i); !errors.Is(err, ErrOutOfRange) {
			t.Errorf("Open(%d) = %v", i, err)
		}
	}
	// A range command applies to every zone...
	must(t, m.Mgmt(OpOpen, 2*4096, 3*4096))
	for i := 2; i < 5; i++ {
		if c, _ := zoneState(m, i); c != CondExpOpen {
			t.Errorf("zone %d is %v after a range open", i, c)
		}
	}
	// ...or to none: zone 5 is FULL, so closing 3..5 changes nothing.
	must(t, m.Finish(5))
	before := takeSnap(m)
	err := m.Mgmt(OpClose, 3*4096, 3*4096)
	var ze *ZoneError
	if !errors.As(err, &ze) || ze.Zone != 5 || !errors.Is(err, ErrInvalidZoneOp) {
		t.Errorf("range close over a FULL zone: %v", err)
	}
	if !takeSnap(m).equal(before) {
		t.Error("failed range close changed the state")
	}
	checkOK(t, m)
}

// TestImplicitCloseLRU: with max_open 2, writing a third zone closes the
// least recently written implicitly open zone.
func TestImplicitCloseLRU(t *testing.T) {
	g := base()
	g.Conventional, g.MaxOpen = 0, 2
	m := newMachine(t, g)
	w := func(i int) {
		t.Helper()
		_, wp := zoneState(m, i)
		must(t, m.Write(wp, 512))
		checkOK(t, m)
	}
	w(0)
	w(1)
	w(0) // zone 1 is now the least recently written
	if got := lru(m); !slices.Equal(got, []int{1, 0}) {
		t.Fatalf("LRU %v, want [1 0]", got)
	}
	w(2)
	if c, _ := zoneState(m, 1); c != CondClosed {
		t.Errorf("zone 1 is %v, want CLOSED", c)
	}
	if got := lru(m); !slices.Equal(got, []int{0, 2}) {
		t.Errorf("LRU %v, want [0 2]", got)
	}
	w(1) // CLOSED needs an open slot: zone 0 goes
	if got := lru(m); !slices.Equal(got, []int{2, 1}) {
		t.Errorf("LRU %v, want [2 1]", got)
	}
	_, err := m.Append(3, 512) // appends count as writes
	must(t, err)
	if got := lru(m); !slices.Equal(got, []int{1, 3}) {
		t.Errorf("LRU %v, want [1 3]", got)
	}
	must(t, m.Open(1)) // IMP_OPEN → EXP_OPEN leaves the LRU
	if got := lru(m); !slices.Equal(got, []int{3}) {
		t.Errorf("LRU %v, want [3]", got)
	}
	must(t, m.Open(4)) // explicit open may close an implicitly open zone
	if c, _ := zoneState(m, 3); c != CondClosed {
		t.Errorf("zone 3 is %v, want CLOSED", c)
	}
	// Both open zones are explicit: nothing may be closed for a write.
	before := takeSnap(m)
	err = m.Write(g.ZoneStart(5), 512)
	if !errors.Is(err, ErrTooManyOpenZones) || Errno(err) != syscall.ETOOMANYREFS {
		t.Errorf("write with only explicit opens: %v (%v)", err, Errno(err))
	}
	if err := m.Open(5); !errors.Is(err, ErrTooManyOpenZones) {
		t.Errorf("open with only explicit opens: %v", err)
	}
	if !takeSnap(m).equal(before) {
		t.Error("refused write changed the state")
	}
	// Writes to explicitly open zones need nothing.
	_, wp := zoneState(m, 4)
	must(t, m.Write(wp, 512))
	checkOK(t, m)
}

// TestActiveLimit: max_open 2, max_active 3.
func TestActiveLimit(t *testing.T) {
	g := base()
	g.Conventional, g.MaxOpen, g.MaxActive = 0, 2, 3
	type step struct {
		name  string
		do    func(m *Machine) error
		err   error
		conds string // conditions of zones 0..5 after the step
	}
	wr := func(i int) func(*Machine) error {
		return func(m *Machine) error { _, wp := zoneState(m, i); return m.Write(wp, 512) }
	}
	steps := []step{
		{"write 0", wr(0), nil, "I-----"},
		{"write 1", wr(1), nil, "II----"},
		{"write 2 closes 0", wr(2), nil, "CII---"},
		{"write 3 (EMPTY) needs an active slot", wr(3), ErrTooManyActiveZones, "CII---"},
		{"open 3 (EMPTY) too", func(m *Machine) error { return m.Open(3) }, ErrTooManyActiveZones, "CII---"},
		{"finish 3 (EMPTY) too", func(m *Machine) error { return m.Finish(3) }, ErrTooManyActiveZones, "CII---"},
		// A CLOSED zone needs only an open slot; closing zone 1 keeps it
		// active, so the active limit holds (null_blk would refuse here).
		{"write 0 (CLOSED) closes 1", wr(0), nil, "ICI---"},
		{"finish 1 frees an active slot", func(m *Machine) error { return m.Finish(1) }, nil, "IFI---"},
		{"write 3 closes 2", wr(3), nil, "IFCI--"},
		{"reset 2", func(m *Machine) error { return m.Reset(2) }, nil, "IF-I--"},
		{"open 4", func(m *Machine) error { return m.Open(4) }, nil, "CF-IE-"},
		{"open 5: active full", func(m *Machine) error { return m.Open(5) }, ErrTooManyActiveZones, "CF-IE-"},
		{"close 4 at start → EMPTY", func(m *Machine) error { return m.Close(4) }, nil, "CF-I--"},
		{"finish 5 (EMPTY) with a free active slot", func(m *Machine) error { return m.Finish(5) }, nil, "CF-I-F"},
		{"open 4", func(m *Machine) error { return m.Open(4) }, nil, "CF-IEF"},
		{"open 0 closes 3", func(m *Machine) error { return m.Open(0) }, nil, "EF-CEF"},
		{"write 3: no implicit zone to close", wr(3), ErrTooManyOpenZones, "EF-CEF"},
		{"reset all", func(m *Machine) error { return m.ResetAll() }, nil, "------"},
	}
	letter := map[Cond]byte{CondEmpty: '-', CondImpOpen: 'I', CondExpOpen: 'E', CondClosed: 'C', CondFull: 'F'}
	m := newMachine(t, g)
	for _, s := range steps {
		before := takeSnap(m)
		err := s.do(m)
		if !errors.Is(err, s.err) || (err == nil) != (s.err == nil) {
			t.Fatalf("%s: %v, want %v", s.name, err, s.err)
		}
		if err != nil && !takeSnap(m).equal(before) {
			t.Fatalf("%s: failed but changed the state", s.name)
		}
		var got []byte
		for i := range 6 {
			c, _ := zoneState(m, i)
			got = append(got, letter[c])
		}
		if string(got) != s.conds {
			t.Fatalf("%s: zones %s, want %s", s.name, got, s.conds)
		}
		checkOK(t, m)
	}
}

// With both limits reached, an EMPTY zone reports the active limit, which
// null_check_zone_resources checks first.
func TestActiveCheckedFirst(t *testing.T) {
	g := base()
	g.Conventional, g.MaxOpen, g.MaxActive = 0, 2, 2
	m := newMachine(t, g)
	must(t, m.Open(0))
	must(t, m.Open(1))
	err := m.Write(g.ZoneStart(2), 512)
	if !errors.Is(err, ErrTooManyActiveZones) || Errno(err) != syscall.EOVERFLOW {
		t.Errorf("write: %v (%v), want EOVERFLOW", err, Errno(err))
	}
}

func TestRangeOpenAllOrNothing(t *testing.T) {
	g := base()
	g.Conventional, g.MaxOpen = 0, 2
	m := newMachine(t, g)
	must(t, m.Write(0, 512)) // zone 0 implicitly open, may be closed for the range
	must(t, m.Write(4096, 512))
	must(t, m.Close(1))
	before := takeSnap(m)
	err := m.Mgmt(OpOpen, 4096, 3*4096) // zones 1, 2 open; 3 cannot
	var ze *ZoneError
	if !errors.As(err, &ze) || ze.Zone != 3 || !errors.Is(err, ErrTooManyOpenZones) {
		t.Fatalf("range open: %v", err)
	}
	if !takeSnap(m).equal(before) {
		t.Error("failed range open changed the state (rollback incomplete)")
	}
	checkOK(t, m)
	must(t, m.Mgmt(OpOpen, 4096, 2*4096))
	if got := lru(m); len(got) != 0 {
		t.Errorf("LRU %v after opening 1 and 2", got)
	}
	checkOK(t, m)
}

func TestPendingWrite(t *testing.T) {
	g := base()
	start := g.ZoneStart(2)
	t.Run("commit publishes the WP", func(t *testing.T) {
		m := newMachine(t, g)
		p, err := m.BeginWrite(start, 1024)
		must(t, err)
		if c, wp := zoneState(m, 2); c != CondImpOpen || wp != start {
			t.Errorf("pending: %v WP %d", c, wp-start)
		}
		if m.DataLimit(2) != start || m.WritePointers()[2] != start {
			t.Error("pending write visible before Commit")
		}
		checkOK(t, m)
		p.Commit()
		p.Commit() // no-op
		p.Abort()  // no-op
		if m.DataLimit(2) != start+1024 || m.WritePointers()[2] != start+1024 {
			t.Error("write not visible after Commit")
		}
		checkOK(t, m)
	})
	t.Run("abort from EMPTY", func(t *testing.T) {
		m := newMachine(t, g)
		before := takeSnap(m)
		p, err := m.BeginWrite(start, 1024)
		must(t, err)
		p.Abort()
		if !takeSnap(m).equal(before) {
			t.Error("aborted first write left a trace")
		}
	})
	t.Run("abort from CLOSED", func(t *testing.T) {
		m := newMachine(t, g)
		must(t, m.Write(start, 512))
		must(t, m.Close(2))
		before := takeSnap(m)
		p, err := m.BeginAppend(2, 512)
		must(t, err)
		p.Abort()
		if !takeSnap(m).equal(before) {
			t.Error("aborted append to a CLOSED zone left a trace")
		}
	})
	t.Run("abort of a zone-filling write", func(t *testing.T) {
		m := newMachine(t, g)
		must(t, m.Write(start, 512))
		p, err := m.BeginWrite(start+512, 4096-512)
		must(t, err)
		p.Abort()
		if c, wp := zoneState(m, 2); c != CondImpOpen || wp != start+512 {
			t.Errorf("after abort: %v WP %d", c, wp-start)
		}
		checkOK(t, m)
	})
	t.Run("conventional", func(t *testing.T) {
		m := newMachine(t, g)
		p, err := m.BeginWrite(0, 4096)
		must(t, err)
		if p.Op() != OpWrite || p.Offset() != 0 || p.Length() != 4096 || p.Changes() != nil {
			t.Errorf("pending %+v", p)
		}
		p.Abort()
		p.Commit()
		checkOK(t, m)
	})
}

// TestPendingVictim: a zone whose first write is pending can be closed to
// make room; it comes back CLOSED (with data) on Commit, EMPTY on Abort.
func TestPendingVictim(t *testing.T) {
	g := base()
	g.Conventional, g.MaxOpen = 0, 1
	for _, commit := range []bool{true, false} {
		t.Run(fmt.Sprint("commit=", commit), func(t *testing.T) {
			m := newMachine(t, g)
			p, err := m.BeginWrite(0, 512)
			must(t, err)
			must(t, m.Write(4096, 512)) // closes zone 0 while its write is pending
			if c, wp := zoneState(m, 0); c != CondClosed || wp != 0 {
				t.Errorf("victim: %v WP %d", c, wp)
			}
			checkOK(t, m)
			want := CondClosed
			if commit {
				p.Commit()
			} else {
				p.Abort()
				want = CondEmpty
			}
			if c, _ := zoneState(m, 0); c != want {
				t.Errorf("zone 0 is %v, want %v", c, want)
			}
			checkOK(t, m)
		})
	}
}

func TestPendingMgmt(t *testing.T) {
	g := base()
	m := newMachine(t, g)
	must(t, m.Write(g.ZoneStart(2), 1024))
	must(t, m.Write(g.ZoneStart(3), 512))
	p, err := m.BeginMgmt(OpFinish, g.ZoneStart(2), 3*4096)
	must(t, err)
	want := []Change{
		{Zone: 2, Start: 2 * 4096, OldWP: 2*4096 + 1024, NewWP: 3 * 4096, OldCond: CondImpOpen, NewCond: CondFull},
		{Zone: 3, Start: 3 * 4096, OldWP: 3*4096 + 512, NewWP: 4 * 4096, OldCond: CondImpOpen, NewCond: CondFull},
		{Zone: 4, Start: 4 * 4096, OldWP: 4 * 4096, NewWP: 5 * 4096, OldCond: CondEmpty, NewCond: CondFull},
	}
	if !slices.Equal(p.Changes(), want) {
		t.Errorf("Changes = %+v, want %+v", p.Changes(), want)
	}
	// A write to a claimed zone waits for the claim.
	done := make(chan error)
	go func() { _, err := m.Append(3, 512); done <- err }()
	select {
	case err := <-done:
		t.Fatalf("append ran while the zone was claimed: %v", err)
	case <-time.After(20 * time.Millisecond):
	}
	p.Abort() // releases; the finish stands
	if err := <-done; !errors.Is(err, ErrZoneFull) {
		t.Errorf("append after finish: %v", err)
	}
	p, err = m.BeginResetAll()
	must(t, err)
	if len(p.Changes()) != 3 || p.Changes()[0].NewWP != p.Changes()[0].Start {
		t.Errorf("reset-all Changes = %+v", p.Changes())
	}
	p.Commit()
	checkOK(t, m)
}

// TestMgmtWaitsForWrite: a reset cannot overtake a pending write.
func TestMgmtWaitsForWrite(t *testing.T) {
	m := newMachine(t, base())
	start := m.g.ZoneStart(4)
	p, err := m.BeginWrite(start, 512)
	must(t, err)
	done := make(chan error)
	go func() { done <- m.Reset(4) }()
	select {
	case <-done:
		t.Fatal("reset ran during a pending write")
	case <-time.After(20 * time.Millisecond):
	}
	p.Commit()
	must(t, <-done)
	if c, wp := zoneState(m, 4); c != CondEmpty || wp != start {
		t.Errorf("after reset: %v %d", c, wp)
	}
	checkOK(t, m)
}

// TestConcurrentAppend: appends from many goroutines get distinct,
// contiguous offsets and fill the zone exactly.
func TestConcurrentAppend(t *testing.T) {
	g := Geometry{Size: 4 << 20, ZoneSize: 1 << 20, ZoneCapacity: 1 << 20, NrZones: 4, MaxAppendBytes: 4096, MaxOpen: 2, MaxActive: 2}
	m := newMachine(t, g)
	const workers, each = 16, 16 // 16*16*4 KiB = 1 MiB
	var (
		mu   sync.Mutex
		offs []uint64
		wg   sync.WaitGroup
	)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range each {
				p, err := m.BeginAppend(1, 4096)
				if err != nil {
					t.Error(err)
					return
				}
				if (w+k)%3 == 0 {
					time.Sleep(10 * time.Microsecond) // the "I/O"
				}
				mu.Lock()
				offs = append(offs, p.Offset())
				mu.Unlock()
				p.Commit()
			}
		}()
	}
	wg.Wait()
	slices.Sort(offs)
	for k, off := range offs {
		if want := g.ZoneStart(1) + uint64(k)*4096; off != want {
			t.Fatalf("offset %d is %d, want %d", k, off, want)
		}
	}
	if c, _ := zoneState(m, 1); c != CondFull {
		t.Errorf("zone 1 is %v", c)
	}
	_, err := m.Append(1, 4096)
	if Errno(err) != syscall.ENOSPC {
		t.Errorf("append to the full zone: %v", err)
	}
	checkOK(t, m)
}

// TestConcurrentWriters: more writers than open slots, each on its own
// zone; zones are closed under pending writes and the state stays valid.
func TestConcurrentWriters(t *testing.T) {
	g := Geometry{Size: 8 * 65536, ZoneSize: 65536, ZoneCapacity: 65536, NrZones: 8, Conventional: 1, MaxAppendBytes: 4096, MaxOpen: 2, MaxActive: 7}
	m := newMachine(t, g)
	var wg sync.WaitGroup
	for i := 1; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range 64 {
				off := g.ZoneStart(i) + uint64(k)*1024
				p, err := m.BeginWrite(off, 1024)
				if err != nil {
					t.Errorf("zone %d write %d: %v", i, k, err)
					return
				}
				if k%5 == 4 {
					p.Abort()
					p, err = m.BeginWrite(off, 1024)
					if err != nil {
						t.Errorf("zone %d rewrite %d: %v", i, k, err)
						return
					}
				}
				p.Commit()
				if err := checkInvariants(m); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	for i := 1; i < 8; i++ {
		if c, wp := zoneState(m, i); c != CondFull || wp != g.ZoneEnd(i) {
			t.Errorf("zone %d: %v %d", i, c, wp)
		}
	}
	checkOK(t, m)
}

func TestRestore(t *testing.T) {
	g := base()
	g.ZoneCapacity = 3072
	g.MaxActive = 3
	s := g.ZoneStart
	t.Run("conditions", func(t *testing.T) {
		wps := []uint64{12345, s(1), s(2) + 512, s(3) + 3072, s(4) + 2560, s(5), s(6), s(7)}
		m, err := NewMachine(g, wps)
		must(t, err)
		wantC := []Cond{CondNotWP, CondEmpty, CondClosed, CondFull, CondClosed, CondEmpty, CondEmpty, CondEmpty}
		for i, w := range wantC {
			if c, _ := zoneState(m, i); c != w {
				t.Errorf("zone %d restored %v, want %v", i, c, w)
			}
		}
		wps[0] = 0 // conventional entries are ignored and reported as the start
		if got := m.WritePointers(); !slices.Equal(got, wps) {
			t.Errorf("WritePointers = %v, want %v", got, wps)
		}
		if n := m.Counts(); n != (Counts{Closed: 2}) {
			t.Errorf("Counts = %+v", n)
		}
		checkOK(t, m)
	})
	t.Run("roundtrip", func(t *testing.T) {
		m := newMachine(t, g)
		must(t, m.Finish(4)) // needs an active slot while EMPTY
		must(t, m.Write(s(1), 1024))
		must(t, m.Open(2))
		must(t, m.Write(s(3), 512))
		must(t, m.Close(3))
		m2, err := NewMachine(g, m.WritePointers())
		must(t, err)
		want := []Cond{CondNotWP, CondClosed, CondEmpty, CondClosed, CondFull, CondEmpty, CondEmpty, CondEmpty}
		for i, w := range want {
			if c, _ := zoneState(m2, i); c != w {
				t.Errorf("zone %d restored %v, want %v", i, c, w)
			}
		}
		if !slices.Equal(m.WritePointers(), m2.WritePointers()) {
			t.Error("WPs changed across restore")
		}
	})
	bad := []struct {
		name string
		wps  []uint64
		zone int
	}{
		{"short table", make([]uint64, 7), -1},
		{"below start", []uint64{0, s(1), s(2) - 512, s(3), s(4), s(5), s(6), s(7)}, 2},
		{"past capacity", []uint64{0, s(1), s(2), s(3) + 3584, s(4), s(5), s(6), s(7)}, 3},
		{"unaligned", []uint64{0, s(1) + 100, s(2), s(3), s(4), s(5), s(6), s(7)}, 1},
		{"too many closed", []uint64{0, s(1) + 512, s(2) + 512, s(3) + 512, s(4) + 512, s(5), s(6), s(7)}, -1},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewMachine(g, tt.wps)
			var ze *ZoneError
			if !errors.As(err, &ze) || ze.Op != OpRestore || ze.Zone != tt.zone || !errors.Is(err, ErrBadWritePointer) {
				t.Fatalf("NewMachine = %v, want a restore error for zone %d", err, tt.zone)
			}
			if Errno(err) != syscall.EINVAL {
				t.Errorf("Errno = %v", Errno(err))
			}
			t.Log(err)
		})
	}
}

func TestReport(t *testing.T) {
	m := newMachine(t, base())
	must(t, m.Write(2*4096, 1024))
	must(t, m.Open(3))
	for _, tt := range []struct{ start, n, want int }{{0, 8, 8}, {6, 10, 2}, {8, 1, 0}, {-1, 1, 0}, {0, 0, 0}, {7, int(^uint(0) >> 1), 1}} {
		if got := len(m.Report(tt.start, tt.n)); got != tt.want {
			t.Errorf("len(Report(%d, %d)) = %d, want %d", tt.start, tt.n, got, tt.want)
		}
	}
	r := m.Report(2, 2)
	want := []ZoneReport{
		{Start: 8192, Len: 4096, Cap: 4096, WP: 8192 + 1024, Type: TypeSeqWriteRequired, Cond: CondImpOpen},
		{Start: 12288, Len: 4096, Cap: 4096, WP: 12288, Type: TypeSeqWriteRequired, Cond: CondExpOpen},
	}
	if !slices.Equal(r, want) {
		t.Errorf("Report = %+v, want %+v", r, want)
	}
}

func TestReadExtents(t *testing.T) {
	m := newMachine(t, base())
	must(t, m.Write(2*4096, 1024))
	must(t, m.Write(3*4096, 4096))
	for _, tt := range []struct {
		off, length uint64
		want        []Extent
	}{
		{0, 4096, []Extent{{0, 4096, false}}},
		{4000, 200, []Extent{{4000, 96, false}, {4096, 104, true}}},
		{2 * 4096, 2 * 4096, []Extent{{8192, 1024, false}, {8192 + 1024, 3072, true}, {12288, 4096, false}}},
		{8192 + 1000, 10, []Extent{{8192 + 1000, 10, false}}},
		{8192 + 1024, 10, []Extent{{8192 + 1024, 10, true}}},
		{8 * 4096, 0, nil},
	} {
		got, err := m.ReadExtents(tt.off, tt.length)
		must(t, err)
		if !slices.Equal(got, tt.want) {
			t.Errorf("ReadExtents(%d, %d) = %+v, want %+v", tt.off, tt.length, got, tt.want)
		}
	}
	if _, err := m.ReadExtents(7*4096, 8192); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("read past the end: %v", err)
	}
}

func TestErrno(t *testing.T) {
	wrap := func(op Op, err error) error { return &ZoneError{Op: op, Zone: 1, Err: err} }
	for _, tt := range []struct {
		err  error
		want syscall.Errno
	}{
		{nil, 0},
		{wrap(OpWrite, ErrNotAtWritePointer), syscall.EIO},
		{wrap(OpWrite, ErrZoneFull), syscall.EIO},
		{wrap(OpAppend, ErrZoneFull), syscall.ENOSPC},
		{wrap(OpWrite, ErrBoundary), syscall.EIO},
		{wrap(OpWrite, ErrUnaligned), syscall.EINVAL},
		{wrap(OpOpen, ErrTooManyOpenZones), syscall.ETOOMANYREFS},
		{wrap(OpOpen, ErrTooManyActiveZones), syscall.EOVERFLOW},
		{wrap(OpReset, ErrConventionalZone), syscall.EIO},
		{wrap(OpOpen, ErrInvalidZoneOp), syscall.EINVAL},
		{wrap(OpWrite, ErrOutOfRange), syscall.EINVAL},
		{wrap(OpAppend, ErrAppendTooLarge), syscall.EIO},
		{&GeometryError{Field: "zone_size"}, syscall.EINVAL},
		{wrap(OpRestore, fmt.Errorf("%w: x", ErrBadWritePointer)), syscall.EINVAL},
		{errors.New("other"), syscall.EIO},
	} {
		if got := Errno(tt.err); got != tt.want {
			t.Errorf("Errno(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}

func TestStrings(t *testing.T) {
	for c, s := range map[fmt.Stringer]string{
		CondNotWP: "NOT_WP", CondEmpty: "EMPTY", CondImpOpen: "IMP_OPEN", CondExpOpen: "EXP_OPEN",
		CondClosed: "CLOSED", CondReadOnly: "READONLY", CondFull: "FULL", CondOffline: "OFFLINE", Cond(7): "Cond(0x7)",
		TypeConventional: "CONVENTIONAL", TypeSeqWriteRequired: "SEQWRITE_REQ", ZoneType(3): "ZoneType(0x3)",
		OpResetAll: "reset-all", Op(99): "Op(99)",
	} {
		if c.String() != s {
			t.Errorf("String() = %q, want %q", c.String(), s)
		}
	}
	// Linux blkzoned.h values, relied on when passing reports through.
	if CondNotWP != 0x0 || CondEmpty != 0x1 || CondImpOpen != 0x2 || CondExpOpen != 0x3 || CondClosed != 0x4 ||
		CondReadOnly != 0xD || CondFull != 0xE || CondOffline != 0xF || TypeConventional != 1 || TypeSeqWriteRequired != 2 {
		t.Error("condition or type codes differ from blkzoned.h")
	}
	err := &ZoneError{Op: OpWrite, Zone: 3, Offset: 4096, Length: 512, Err: ErrNotAtWritePointer}
	if got, want := err.Error(), "zoned: write zone 3 offset 4096 length 512: write does not start at the write pointer"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

// Issue 12, first accounting bug: a write that fills its zone is accepted
// (the zone stays IMP_OPEN and active) and its data is still being stored
// when the next command, a write to an EMPTY zone, arrives. A device that
// processes commands in order has already made the first zone FULL; the
// engine refused the second write with EOVERFLOW ("active zones exceeded",
// which the kernel then turns into EIO for every plugged BIO of the zone).
// Now the refused command waits for the pending filler and is accepted
// when the filler commits, or refused if it aborts.
func TestFillerFreesSlotBeforeRefusal(t *testing.T) {
	g := Geometry{Size: 8 * 4096, ZoneSize: 4096, ZoneCapacity: 3072, NrZones: 8, Conventional: 1, MaxAppendBytes: 1024, MaxOpen: 2, MaxActive: 2}
	for _, tc := range []struct {
		name   string
		second func(m *Machine) error
		commit bool
		want   error
	}{
		{"write to EMPTY, filler commits", func(m *Machine) error { return m.Write(g.ZoneStart(3), 512) }, true, nil},
		{"append to EMPTY, filler commits", func(m *Machine) error { _, err := m.Append(3, 512); return err }, true, nil},
		{"explicit open, filler commits", func(m *Machine) error { return m.Open(3) }, true, nil},
		{"finish of EMPTY, filler commits", func(m *Machine) error { return m.Finish(3) }, true, nil},
		{"write to EMPTY, filler aborts", func(m *Machine) error { return m.Write(g.ZoneStart(3), 512) }, false, ErrTooManyActiveZones},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newMachine(t, g)
			must(t, m.Write(g.ZoneStart(1), 512)) // zone 1 active
			must(t, m.Write(g.ZoneStart(2), 2048))
			// The last 1 KiB of zone 2's capacity: this write fills it.
			p, err := m.BeginWrite(g.ZoneStart(2)+2048, 1024)
			must(t, err)
			done := make(chan error, 1)
			go func() { done <- tc.second(m) }()
			select {
			case err := <-done:
				t.Fatalf("second command did not wait for the zone-filling write: %v", err)
			case <-time.After(100 * time.Millisecond):
			}
			if tc.commit {
				p.Commit()
			} else {
				p.Abort()
			}
			err = <-done
			if !errors.Is(err, tc.want) || (err == nil) != (tc.want == nil) {
				t.Fatalf("second command: %v, want %v", err, tc.want)
			}
			if c, _ := zoneState(m, 2); tc.commit && c != CondFull {
				t.Errorf("zone 2 is %v after its filling write committed", c)
			}
			checkOK(t, m)
		})
	}
	// Without a pending filler the refusal is immediate, as before.
	m := newMachine(t, g)
	must(t, m.Write(g.ZoneStart(1), 512))
	must(t, m.Write(g.ZoneStart(2), 512))
	p, err := m.BeginWrite(g.ZoneStart(2)+512, 512) // pending, does not fill
	must(t, err)
	if err := m.Write(g.ZoneStart(3), 512); !errors.Is(err, ErrTooManyActiveZones) {
		t.Errorf("write with no filler pending: %v, want ErrTooManyActiveZones", err)
	}
	p.Commit()
}

// Four writers, each filling its own zones in turn, with max_active 4:
// what fio --zonemode=zbd with one zone per job does through an exporter
// serving several queues. The write that fills a zone is stored on another
// thread (another queue) while the writer already sends the first write of
// its next zone. A device processing commands in order never has more than
// four zones active here, so every write must be accepted.
func TestFillersUnderConcurrency(t *testing.T) {
	g := Geometry{Size: 64 * 8192, ZoneSize: 8192, ZoneCapacity: 6144, NrZones: 64, Conventional: 4, MaxAppendBytes: 2048, MaxOpen: 3, MaxActive: 4}
	m := newMachine(t, g)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for z := 4 + w; z < 64; z += 4 {
				for off := g.ZoneStart(z); off < g.WritableEnd(z); off += 1024 {
					p, err := m.BeginWrite(off, 1024)
					if err != nil {
						t.Errorf("writer %d zone %d offset %d: %v", w, z, off-g.ZoneStart(z), err)
						return
					}
					if off+1024 == g.WritableEnd(z) {
						wg.Add(1)
						go func() { // the filling write, stored by another queue
							defer wg.Done()
							time.Sleep(2 * time.Millisecond)
							p.Commit()
						}()
						continue
					}
					time.Sleep(time.Duration(off%3) * 50 * time.Microsecond) // the I/O
					p.Commit()
				}
			}
		}()
	}
	wg.Wait()
	checkOK(t, m)
	for z := 4; z < 64; z++ {
		if c, _ := zoneState(m, z); c != CondFull {
			t.Errorf("zone %d %v", z, c)
		}
	}
}

// A refusal for lack of resources names the limit and the zones holding
// it (issue 14: "Too many references: cannot splice" told a user nothing).
func TestLimitErrorsNameTheLimit(t *testing.T) {
	g := base()
	g.Conventional, g.MaxOpen, g.MaxActive = 0, 2, 3
	m := newMachine(t, g)
	must(t, m.Open(0))
	must(t, m.Open(1))
	err := m.Write(g.ZoneStart(2), 512)
	var ze *ZoneError
	if !errors.As(err, &ze) || ze.Limit != "max_open_zones=2 reached: all 2 open zones are explicitly open, none can be closed implicitly" {
		t.Errorf("open limit: %v", err)
	}
	must(t, m.Close(1)) // EMPTY again: nothing written
	must(t, m.Write(g.ZoneStart(1), 512))
	must(t, m.Close(1))
	must(t, m.Write(g.ZoneStart(2), 512))
	err = m.Write(g.ZoneStart(3), 512)
	if !errors.As(err, &ze) || ze.Limit != "max_active_zones=3 reached: 2 open, 1 closed: zones 0 EXP_OPEN, 1 CLOSED, 2 IMP_OPEN" ||
		!strings.HasSuffix(err.Error(), "too many active zones (max_active_zones=3 reached: 2 open, 1 closed: zones 0 EXP_OPEN, 1 CLOSED, 2 IMP_OPEN)") {
		t.Errorf("active limit: %v", err)
	}
}
