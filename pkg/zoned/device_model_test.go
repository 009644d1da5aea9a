package zoned

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand"
	"os"
	"sync"
	"syscall"
	"testing"
)

// refModel is an independent, deliberately plain model of a host-managed
// device (spec §4), written from the spec rather than from Machine: a
// slice of zones, a byte array, and an LRU list of implicitly open zones.
type refModel struct {
	g     Geometry
	cond  []Cond
	wp    []uint64
	lru   []int // implicitly open zones, least recently written first
	data  []byte
	nOpen func() int
}

func newRefModel(g Geometry) *refModel {
	m := &refModel{g: g, cond: make([]Cond, g.NrZones), wp: make([]uint64, g.NrZones), data: make([]byte, g.Size)}
	for i := range m.cond {
		m.wp[i] = g.ZoneStart(i)
		m.cond[i] = CondEmpty
		if g.IsConventional(i) {
			m.cond[i] = CondNotWP
		}
	}
	return m
}

func (m *refModel) count(cs ...Cond) uint32 {
	n := uint32(0)
	for _, c := range m.cond {
		for _, x := range cs {
			if c == x {
				n++
			}
		}
	}
	return n
}

func (m *refModel) lruDel(z int) {
	for k, v := range m.lru {
		if v == z {
			m.lru = append(m.lru[:k], m.lru[k+1:]...)
			return
		}
	}
}

// need claims the resources for zone z (EMPTY or CLOSED) to become open.
func (m *refModel) need(z int) syscall.Errno {
	if m.cond[z] == CondEmpty && m.g.MaxActive != 0 && m.count(CondImpOpen, CondExpOpen, CondClosed) >= m.g.MaxActive {
		return syscall.EOVERFLOW
	}
	if m.g.MaxOpen != 0 && m.count(CondImpOpen, CondExpOpen) >= m.g.MaxOpen {
		if len(m.lru) == 0 {
			return syscall.ETOOMANYREFS
		}
		victim := m.lru[0]
		m.lru = m.lru[1:]
		m.cond[victim] = CondClosed
	}
	return 0
}

func (m *refModel) end(z int) uint64 { return min(m.g.ZoneStart(z)+m.g.ZoneCapacity, m.g.Size) }

func (m *refModel) advance(z int, off uint64, p []byte) {
	copy(m.data[off:], p)
	m.wp[z] = off + uint64(len(p))
	if m.cond[z] != CondExpOpen {
		m.cond[z] = CondImpOpen
		m.lruDel(z)
		m.lru = append(m.lru, z)
	}
	if m.wp[z] == m.end(z) {
		m.cond[z] = CondFull
		m.lruDel(z)
	}
}

func (m *refModel) write(off uint64, p []byte) syscall.Errno {
	z := int(off / m.g.ZoneSize)
	n := uint64(len(p))
	if m.g.IsConventional(z) {
		if off+n > m.g.ZoneStart(int(m.g.Conventional)) {
			return syscall.EIO
		}
		copy(m.data[off:], p)
		return 0
	}
	switch {
	case m.cond[z] == CondFull, off != m.wp[z], off+n > m.end(z):
		return syscall.EIO
	}
	if m.cond[z] == CondEmpty || m.cond[z] == CondClosed {
		if e := m.need(z); e != 0 {
			return e
		}
	}
	m.advance(z, off, p)
	return 0
}

func (m *refModel) appendZ(z int, p []byte) (uint64, syscall.Errno) {
	n := uint64(len(p))
	switch {
	case m.g.IsConventional(z), n > uint64(m.g.MaxAppendBytes):
		return 0, syscall.EIO
	case m.cond[z] == CondFull:
		return 0, syscall.ENOSPC
	case m.wp[z]+n > m.end(z):
		return 0, syscall.EIO
	}
	if m.cond[z] == CondEmpty || m.cond[z] == CondClosed {
		if e := m.need(z); e != 0 {
			return 0, e
		}
	}
	off := m.wp[z]
	m.advance(z, off, p)
	return off, 0
}

func (m *refModel) mgmt(op Op, z int) syscall.Errno {
	if m.g.IsConventional(z) {
		return syscall.EIO
	}
	switch op {
	case OpOpen:
		switch m.cond[z] {
		case CondFull:
			return syscall.EINVAL
		case CondEmpty, CondClosed:
			if e := m.need(z); e != 0 {
				return e
			}
		}
		m.lruDel(z)
		m.cond[z] = CondExpOpen
	case OpClose:
		switch m.cond[z] {
		case CondEmpty, CondFull:
			return syscall.EINVAL
		case CondImpOpen, CondExpOpen:
			m.lruDel(z)
			m.cond[z] = CondClosed
			if m.wp[z] == m.g.ZoneStart(z) {
				m.cond[z] = CondEmpty
			}
		}
	case OpFinish:
		if m.cond[z] == CondEmpty && m.g.MaxActive != 0 && m.count(CondImpOpen, CondExpOpen, CondClosed) >= m.g.MaxActive {
			return syscall.EOVERFLOW
		}
		if m.cond[z] != CondFull {
			clear(m.data[m.wp[z]:m.end(z)])
			m.wp[z] = m.end(z)
		}
		m.lruDel(z)
		m.cond[z] = CondFull
	case OpReset:
		m.lruDel(z)
		clear(m.data[m.g.ZoneStart(z):m.end(z)])
		m.wp[z] = m.g.ZoneStart(z)
		m.cond[z] = CondEmpty
	}
	return 0
}

// reopen: open zones are not persisted (spec §4).
func (m *refModel) reopen() {
	m.lru = nil
	for z, c := range m.cond {
		if c == CondImpOpen || c == CondExpOpen {
			m.cond[z] = CondClosed
			if m.wp[z] == m.g.ZoneStart(z) {
				m.cond[z] = CondEmpty
			}
		}
	}
}

// randFill fills p (a multiple of 8 bytes long) with random bytes, eight at
// a time: far cheaper than rand.Read under the race detector.
func randFill(rng *rand.Rand, p []byte) {
	for i := 0; i+8 <= len(p); i += 8 {
		binary.LittleEndian.PutUint64(p[i:], rng.Uint64())
	}
}

// TestDeviceAgainstReferenceModel applies thousands of random operations
// (writes at and off the WP, appends, open/close/finish/reset, reopen) to
// the device and to refModel, and requires identical results: errno of
// every command, append offsets, zone reports and every byte read.
func TestDeviceAgainstReferenceModel(t *testing.T) {
	seqs, ops := 2000, 80 // 160,000 operations
	if testing.Short() {
		seqs = 50
	}
	geoms := []struct {
		nz, conv     uint32
		zs, zcap     uint64
		open, active uint32
	}{
		{8, 0, 64 << 10, 64 << 10, 0, 0},
		{8, 2, 64 << 10, 48 << 10, 2, 3},
		{10, 1, 32 << 10, 32 << 10, 3, 3},
		{6, 0, 64 << 10, 40 << 10, 1, 2},
	}
	dir := memDir(t)
	for s := 0; s < seqs; s++ {
		gc := geoms[s%len(geoms)]
		path := mkZonedIn(t, dir, gc.nz, gc.conv, gc.zs, gc.zcap, gc.open, gc.active)
		d, err := Open(path, OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		g := d.Geometry()
		ref := newRefModel(g)
		rng := rand.New(rand.NewSource(int64(s)))
		errno := func(err error) syscall.Errno { return Errno(err) }
		for i := 0; i < ops; i++ {
			z := rng.Intn(int(g.NrZones))
			what := ""
			var got, want syscall.Errno
			switch k := rng.Intn(20); {
			case k < 9: // write, usually at the WP
				off := ref.wp[z]
				if g.IsConventional(z) || rng.Intn(6) == 0 {
					off = g.ZoneStart(z) + uint64(rng.Intn(int(g.ZoneSize/512)))*512
				}
				if off >= g.Size {
					continue // the last zone is full up to the device end
				}
				n := uint64(1+rng.Intn(16)) * 512
				n = min(n, g.Size-off)
				p := make([]byte, n)
				randFill(rng, p)
				what = fmt.Sprintf("write %d+%d", off, n)
				_, err := d.WriteAt(p, int64(off), rng.Intn(10) == 0)
				got, want = errno(err), ref.write(off, p)
			case k < 12:
				n := uint64(1+rng.Intn(20)) * 512
				p := make([]byte, n)
				randFill(rng, p)
				what = fmt.Sprintf("append zone %d +%d", z, n)
				off, err := d.Append(z, p, false)
				roff, e := ref.appendZ(z, p)
				got, want = errno(err), e
				if got == 0 && want == 0 && off != roff {
					t.Fatalf("seq %d op %d %s: appended at %d, model %d", s, i, what, off, roff)
				}
			case k < 18:
				op := []Op{OpOpen, OpClose, OpFinish, OpReset}[rng.Intn(4)]
				what = fmt.Sprintf("%s zone %d", op, z)
				got = errno(d.Mgmt(op, g.ZoneStart(z), g.ZoneLen(z)))
				want = ref.mgmt(op, z)
			case k < 19:
				what = "reopen"
				if err := d.Close(); err != nil {
					t.Fatal(err)
				}
				if d, err = Open(path, OpenOptions{}); err != nil {
					t.Fatal(err)
				}
				ref.reopen()
			default:
				what = "reset all"
				got = errno(d.Mgmt(OpReset, 0, g.Size))
				for z := int(g.Conventional); z < int(g.NrZones); z++ {
					ref.mgmt(OpReset, z)
				}
			}
			if got != want {
				t.Fatalf("seq %d op %d %s: errno %v, model %v", s, i, what, got, want)
			}
			for zi, r := range d.Report(0, int(g.NrZones)) {
				wp := ref.wp[zi]
				if ref.cond[zi] == CondFull {
					wp = r.Start + r.Len
				}
				if g.IsConventional(zi) {
					wp = r.Start
				}
				if r.Cond != ref.cond[zi] || r.WP != wp {
					t.Fatalf("seq %d op %d %s: zone %d is %v wp %d, model %v wp %d", s, i, what, zi, r.Cond, r.WP, ref.cond[zi], wp)
				}
			}
		}
		buf := make([]byte, g.Size)
		if _, err := d.ReadAt(buf, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, ref.data) {
			t.Fatalf("seq %d: device contents differ from the model", s)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		os.Remove(path)
	}
}

// TestDeviceConcurrency: writers to different zones run in parallel,
// writers racing on one zone land in WP order, concurrent appends to one
// zone get distinct offsets; run with -race.
func TestDeviceConcurrency(t *testing.T) {
	const zs = 256 << 10
	path := mkZoned(t, 8, 0, zs, zs, 0, 0)
	d, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var wg sync.WaitGroup
	// 4 zones, one writer each, sequential 4 KiB writes.
	for z := 0; z < 4; z++ {
		wg.Add(1)
		go func(z int) {
			defer wg.Done()
			for k := 0; k < 64; k++ {
				p := fill(byte(z*64+k), 4096)
				if _, err := d.WriteAt(p, int64(z*zs+k*4096), false); err != nil {
					t.Errorf("zone %d write %d: %v", z, k, err)
					return
				}
			}
		}(z)
	}
	// Zone 4: 16 goroutines append 4 KiB each, 4 times.
	offs := make(chan uint64, 64)
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for k := 0; k < 4; k++ {
				off, err := d.Append(4, fill(byte(w), 4096), false)
				if err != nil {
					t.Errorf("append: %v", err)
					return
				}
				offs <- off
			}
		}(w)
	}
	wg.Wait()
	close(offs)
	seen := map[uint64]bool{}
	for o := range offs {
		if seen[o] || o%4096 != 0 || o < 4*zs || o >= 5*zs {
			t.Fatalf("append offset %d repeated or out of zone 4", o)
		}
		seen[o] = true
	}
	if len(seen) != 64 {
		t.Fatalf("%d distinct append offsets, want 64", len(seen))
	}
	buf := make([]byte, 4096)
	for z := 0; z < 4; z++ {
		for k := 0; k < 64; k++ {
			d.ReadAt(buf, int64(z*zs+k*4096))
			if !bytes.Equal(buf, fill(byte(z*64+k), 4096)) {
				t.Fatalf("zone %d block %d corrupt", z, k)
			}
		}
	}
	for off := range seen {
		d.ReadAt(buf, int64(off))
		if !bytes.Equal(buf, fill(buf[0], 4096)) {
			t.Fatalf("append at %d torn", off)
		}
	}
}
