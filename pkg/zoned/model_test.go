package zoned

import (
	"errors"
	"math/rand/v2"
	"testing"
)

// modelGeoms are the devices the model check and the fuzz target drive:
// every mix of limits, capacity below zone size, runts, conventional zones.
var modelGeoms = []Geometry{
	{Size: 8 * 4096, ZoneSize: 4096, ZoneCapacity: 4096, NrZones: 8, Conventional: 1, MaxAppendBytes: 1024, MaxOpen: 2, MaxActive: 3},
	{Size: 6*4096 + 1024, ZoneSize: 4096, ZoneCapacity: 3072, NrZones: 7, Conventional: 2, MaxAppendBytes: 2048, MaxOpen: 3, MaxActive: 3},
	{Size: 4 * 4096, ZoneSize: 4096, ZoneCapacity: 2048, NrZones: 4, MaxAppendBytes: 1024, MaxOpen: 1},
	{Size: 8 * 4096, ZoneSize: 4096, ZoneCapacity: 4096, NrZones: 8, Conventional: 3, MaxAppendBytes: 3072},
	{Size: 5*4096 + 512, ZoneSize: 4096, ZoneCapacity: 4096, NrZones: 6, MaxAppendBytes: 512, MaxActive: 2},
	{Size: 16 * 2048, ZoneSize: 2048, ZoneCapacity: 1536, NrZones: 16, Conventional: 1, MaxAppendBytes: 512, MaxOpen: 4, MaxActive: 6},
}

var sentinels = []error{
	ErrNotAtWritePointer, ErrZoneFull, ErrBoundary, ErrUnaligned, ErrTooManyOpenZones,
	ErrTooManyActiveZones, ErrConventionalZone, ErrInvalidZoneOp, ErrOutOfRange, ErrAppendTooLarge,
}

// harness drives a Machine from a byte stream, holding pending writes
// across steps, and checks after every step that the state is valid and
// that a refused command changed nothing.
type harness struct {
	t       testing.TB
	g       Geometry
	m       *Machine
	pending map[int]*Pending // pending writes and appends by zone
	order   []int            // zones with a pending write, oldest first
}

func newHarness(t testing.TB, g Geometry) *harness {
	m := newMachine(t, g)
	m.noWait = true // one goroutine holds the Pendings: a wait would wait for itself
	return &harness{t: t, g: g, m: m, pending: map[int]*Pending{}}
}

func (h *harness) busy(first, last int) bool {
	for i := first; i <= last; i++ {
		if h.pending[i] != nil {
			return true
		}
	}
	return false
}

// busyAt reports whether a write at off would wait for a held Pending.
func (h *harness) busyAt(off uint64) bool {
	i := h.g.ZoneIndex(off)
	return i >= 0 && h.busy(i, i)
}

func (h *harness) hold(p *Pending) {
	i := h.g.ZoneIndex(p.Offset())
	if h.m.g.IsConventional(i) {
		p.Commit()
		return
	}
	h.pending[i] = p
	h.order = append(h.order, i)
}

func (h *harness) end(k int, commit bool) {
	if len(h.order) == 0 {
		return
	}
	k %= len(h.order)
	i := h.order[k]
	h.order = append(h.order[:k], h.order[k+1:]...)
	p := h.pending[i]
	delete(h.pending, i)
	_, wp := zoneState(h.m, i)
	if commit {
		p.Commit()
		if _, got := zoneState(h.m, i); got != wp+p.Length() {
			h.t.Fatalf("commit of %d bytes at %d left WP %d", p.Length(), wp, got)
		}
	} else {
		p.Abort()
		if _, got := zoneState(h.m, i); got != wp {
			h.t.Fatalf("abort moved WP %d to %d", wp, got)
		}
	}
}

// step runs one command chosen by kind with arguments a and b.
func (h *harness) step(kind, a, b byte) {
	t, g, m := h.t, h.g, h.m
	nr := int(g.NrZones)
	i := int(a) % nr
	start := g.ZoneStart(i)
	_, wp := zoneState(m, i)
	before := takeSnap(m)
	var err error
	switch kind % 16 {
	case 0: // write at the WP (of the next zone, if this one is FULL)
		if h.busyAt(wp) {
			return
		}
		err = m.Write(wp, uint64(b%8+1)*512)
		if err == nil && !g.IsConventional(i) && g.ZoneIndex(wp) == i {
			if _, got := zoneState(m, i); got != wp+uint64(b%8+1)*512 {
				t.Fatalf("write at %d of %d bytes left WP %d", wp, uint64(b%8+1)*512, got)
			}
		}
	case 1: // write somewhere in the zone, maybe unaligned or past its end
		off := start + uint64(b%16)*256
		if h.busyAt(off) {
			return
		}
		err = m.Write(off, uint64(b%5)*512)
	case 2:
		if h.busy(i, i) {
			return
		}
		var off uint64
		off, err = m.Append(i, uint64(b%4+1)*512)
		if err == nil && off != wp {
			t.Fatalf("append to zone %d at %d, WP was %d", i, off, wp)
		}
	case 3, 4, 5, 6:
		if h.busy(i, i) {
			return
		}
		err = []func(int) error{m.Open, m.Close, m.Finish, m.Reset}[kind%16-3](i)
		if err == nil {
			c, _ := zoneState(m, i)
			if want := []Cond{CondExpOpen, 0, CondFull, CondEmpty}[kind%16-3]; want != 0 && c != want {
				t.Fatalf("zone %d is %v after %v", i, c, []Op{OpOpen, OpClose, OpFinish, OpReset}[kind%16-3])
			}
		}
	case 7:
		if len(h.order) > 0 {
			return
		}
		err = m.ResetAll()
	case 8: // range command, sometimes misaligned
		last := min(i+int(b/4%3), nr-1)
		if h.busy(i, last) {
			return
		}
		off, length := start, g.ZoneEnd(last)-start
		if b >= 0xF0 {
			off += 512
		}
		err = m.Mgmt([]Op{OpOpen, OpClose, OpFinish, OpReset}[b%4], off, length)
	case 9, 10: // begin a write or an append and hold it
		if h.busy(i, i) || h.busyAt(wp) {
			return
		}
		var p *Pending
		if kind%16 == 9 {
			p, err = m.BeginWrite(wp, uint64(b%8+1)*512)
		} else {
			p, err = m.BeginAppend(i, uint64(b%4+1)*512)
		}
		if err == nil {
			h.hold(p)
		}
	case 11, 12:
		h.end(int(a), kind%16 == 11)
	case 13: // restart from the persisted WPs
		if len(h.order) > 0 {
			return
		}
		wps := m.WritePointers()
		m2, err := NewMachine(g, wps)
		if err != nil {
			t.Fatalf("restore of our own WPs: %v", err)
		}
		for k := range nr {
			c, wp := zoneState(m2, k)
			if wp != wps[k] || c == CondImpOpen || c == CondExpOpen {
				t.Fatalf("zone %d restored as %v %d from WP %d", k, c, wp, wps[k])
			}
		}
		m2.noWait = true
		h.m = m2
		m = m2
		before = takeSnap(m)
	case 14: // read extents agree with the data limits
		off := uint64(a) * 97 % g.Size
		length := min(uint64(b)*61, g.Size-off)
		ext, err := m.ReadExtents(off, length)
		if err != nil {
			t.Fatal(err)
		}
		pos := off
		for _, e := range ext {
			if e.Offset != pos || e.Length == 0 {
				t.Fatalf("extents %+v of [%d, +%d) not contiguous", ext, off, length)
			}
			for _, x := range []uint64{e.Offset, e.Offset + e.Length - 1} {
				z := g.ZoneIndex(x)
				if zero := x >= m.DataLimit(z); zero != e.Zero {
					t.Fatalf("byte %d in extent %+v, data limit %d", x, e, m.DataLimit(z))
				}
			}
			pos += e.Length
		}
		if pos != off+length {
			t.Fatalf("extents %+v do not cover [%d, +%d)", ext, off, length)
		}
	case 15: // writes across zones and past the device
		off := wp + uint64(b%4)*512
		if h.busyAt(off) {
			return
		}
		err = m.Write(off, uint64(b)*512)
	}
	if err != nil {
		var ze *ZoneError
		if !errors.As(err, &ze) {
			t.Fatalf("step %d: error %v is not a *ZoneError", kind%16, err)
		}
		known := false
		for _, s := range sentinels {
			known = known || errors.Is(err, s)
		}
		if !known {
			t.Fatalf("step %d: error %v wraps no sentinel", kind%16, err)
		}
		if !takeSnap(m).equal(before) {
			t.Fatalf("step %d: %v, but the state changed", kind%16, err)
		}
	}
	if err := checkInvariants(m); err != nil {
		t.Fatalf("step %d (%d, %d): %v", kind%16, a, b, err)
	}
}

func (h *harness) finish() {
	for len(h.order) > 0 {
		h.end(0, len(h.order)%2 == 0)
		checkOK(h.t, h.m)
	}
	h.step(13, 0, 0)
}

// TestModelRandom runs random command sequences, checking the invariants
// after every command.
func TestModelRandom(t *testing.T) {
	rounds := 400
	if testing.Short() {
		rounds = 40
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for r := range rounds {
		g := modelGeoms[r%len(modelGeoms)]
		h := newHarness(t, g)
		for range 300 {
			h.step(byte(rng.UintN(16)), byte(rng.UintN(256)), byte(rng.UintN(256)))
		}
		h.finish()
	}
}

// FuzzOps reads a geometry choice and then (command, a, b) triples.
func FuzzOps(f *testing.F) {
	f.Add([]byte{0, 0, 1, 8, 0, 2, 8, 0, 3, 8, 9, 4, 0, 11, 0, 0})
	f.Add([]byte{1, 9, 2, 8, 9, 3, 8, 9, 4, 8, 2, 5, 1, 12, 0, 0, 13, 0, 0})
	f.Add([]byte{2, 3, 0, 0, 3, 1, 0, 0, 2, 0, 4, 0, 0, 5, 1, 0, 8, 0, 0x33})
	f.Add([]byte{3, 15, 3, 200, 1, 4, 77, 14, 5, 9, 7, 0, 0, 8, 1, 0xF1})
	f.Add([]byte{4, 10, 1, 3, 10, 2, 3, 10, 3, 3, 11, 1, 0, 12, 0, 0, 6, 2, 0})
	f.Add([]byte{5, 0, 1, 3, 0, 2, 3, 0, 3, 3, 0, 4, 3, 0, 5, 3, 0, 6, 3, 9, 7, 1})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		h := newHarness(t, modelGeoms[int(data[0])%len(modelGeoms)])
		data = data[1:]
		for k := 0; k+2 < len(data) && k < 3000; k += 3 {
			h.step(data[k], data[k+1], data[k+2])
		}
		h.finish()
	})
}
