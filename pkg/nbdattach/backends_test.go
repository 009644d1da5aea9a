package nbdattach

import (
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
)

// memBackend is an in-memory backend with an allocation map of 4 KiB blocks,
// an extra metadata context "zq:test" (64 KiB "zones" whose flags are the
// zone index modulo 4), and hooks for failure and delay injection.
type memBackend struct {
	mu       sync.RWMutex
	data     []byte
	alloc    []bool // per memBlock: written since creation or last trim
	fastZero bool   // CanFastZero answer
	readOnly bool

	// hook, when set, runs before every operation with its name and offset;
	// a non-nil error is returned instead of doing the operation.
	hook    func(op string, off int64) error
	flushes atomic.Int64

	// durable, when not nil (newDurableMemBackend), models stable storage:
	// Flush copies data into it, and so does a WriteAt with fua for its
	// range. A test reads it to see what would survive a power loss.
	durable   []byte
	fuaWrites atomic.Int64
}

const (
	memBlock    = 4096
	memZoneSize = 64 << 10
	testContext = "zq:test"
)

func newMemBackend(size int64) *memBackend {
	return &memBackend{data: make([]byte, size), alloc: make([]bool, (size+memBlock-1)/memBlock)}
}

// newDurableMemBackend is a memBackend that tracks what is durable.
func newDurableMemBackend(size int64) *memBackend {
	m := newMemBackend(size)
	m.durable = make([]byte, size)
	return m
}

// durableBytes returns a copy of what is on stable storage.
func (m *memBackend) durableBytes() []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return slices.Clone(m.durable)
}

func (m *memBackend) run(op string, off int64) error {
	if m.hook != nil {
		return m.hook(op, off)
	}
	return nil
}

// bytes returns a copy of the contents, taken under the lock: the race
// detector cannot see that a peer process got its reply after the write.
func (m *memBackend) bytes() []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return slices.Clone(m.data)
}

func (m *memBackend) Size() int64 { return int64(len(m.data)) }

func (m *memBackend) ReadAt(p []byte, off int64) (int, error) {
	if err := m.run("read", off); err != nil {
		return 0, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	n := copy(p, m.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memBackend) WriteAt(p []byte, off int64, fua bool) (int, error) {
	if err := m.run("write", off); err != nil {
		return 0, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	n := copy(m.data[off:], p)
	m.mark(off, int64(n), true)
	if fua {
		m.fuaWrites.Add(1)
		if m.durable != nil {
			copy(m.durable[off:], p)
		}
	}
	return n, nil
}

func (m *memBackend) mark(off, length int64, allocated bool) {
	for b := off / memBlock; b*memBlock < off+length; b++ {
		// Only whole blocks become holes; partially covered ones stay.
		if allocated || (b*memBlock >= off && (b+1)*memBlock <= off+length) {
			m.alloc[b] = allocated
		}
	}
}

func (m *memBackend) Flush() error {
	m.flushes.Add(1)
	if err := m.run("flush", 0); err != nil {
		return err
	}
	if m.durable != nil {
		m.mu.Lock()
		copy(m.durable, m.data)
		m.mu.Unlock()
	}
	return nil
}

func (m *memBackend) Trim(off, length int64) error {
	if err := m.run("trim", off); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+length])
	m.mark(off, length, false)
	return nil
}

func (m *memBackend) WriteZeroes(off, length int64, noHole bool) error {
	if err := m.run("zero", off); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+length])
	m.mark(off, length, noHole)
	return nil
}

func (m *memBackend) CanFastZero(off, length int64, noHole bool) bool { return m.fastZero && !noHole }

func (m *memBackend) ReadOnly() bool { return m.readOnly }

func (m *memBackend) MetaContexts() []string { return []string{testContext} }

func (m *memBackend) BlockStatus(ctx string, off, length int64) ([]Extent, error) {
	if err := m.run("status:"+ctx, off); err != nil {
		return nil, err
	}
	end := off + length
	var out []Extent
	add := func(l int64, f uint32) {
		if n := len(out); n > 0 && out[n-1].Flags == f {
			out[n-1].Length += l
			return
		}
		out = append(out, Extent{Length: l, Flags: f})
	}
	switch ctx {
	case BaseAllocation:
		m.mu.RLock()
		defer m.mu.RUnlock()
		for pos := off; pos < end; {
			b := pos / memBlock
			next := min((b+1)*memBlock, end)
			var f uint32
			if !m.alloc[b] {
				f = StateHole | StateZero
			}
			add(next-pos, f)
			pos = next
		}
	case testContext:
		for pos := off; pos < end; {
			z := pos / memZoneSize
			next := min((z+1)*memZoneSize, end)
			add(next-pos, uint32(z%4))
			pos = next
		}
	default:
		return nil, fmt.Errorf("unknown context %q", ctx)
	}
	return out, nil
}

// plainBackend hides the optional interfaces of a memBackend.
type plainBackend struct{ m *memBackend }

func (p plainBackend) ReadAt(b []byte, off int64) (int, error) { return p.m.ReadAt(b, off) }
func (p plainBackend) WriteAt(b []byte, off int64, fua bool) (int, error) {
	return p.m.WriteAt(b, off, fua)
}
func (p plainBackend) Flush() error                 { return p.m.Flush() }
func (p plainBackend) Trim(off, length int64) error { return p.m.Trim(off, length) }
func (p plainBackend) WriteZeroes(off, length int64, noHole bool) error {
	return p.m.WriteZeroes(off, length, noHole)
}
func (p plainBackend) Size() int64 { return p.m.Size() }

// fileBackend serves a regular file: FUA and FLUSH are fdatasync, TRIM punches
// holes, WRITE_ZEROES uses FALLOC_FL_ZERO_RANGE (or punches with holes
// allowed), and base:allocation comes from SEEK_DATA/SEEK_HOLE.
type fileBackend struct {
	f    *os.File
	size int64
}

const (
	fallocKeepSize  = 0x01
	fallocPunchHole = 0x02
	fallocZeroRange = 0x10
	seekData        = 3
	seekHole        = 4
)

func openFileBackend(path string) (*fileBackend, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &fileBackend{f: f, size: st.Size()}, nil
}

func (b *fileBackend) Close() error { return b.f.Close() }
func (b *fileBackend) Size() int64  { return b.size }

func (b *fileBackend) ReadAt(p []byte, off int64) (int, error) { return b.f.ReadAt(p, off) }

func (b *fileBackend) WriteAt(p []byte, off int64, fua bool) (int, error) {
	n, err := b.f.WriteAt(p, off)
	if err == nil && fua {
		err = b.Flush()
	}
	return n, err
}

func (b *fileBackend) Flush() error { return syscall.Fdatasync(int(b.f.Fd())) }

func (b *fileBackend) Trim(off, length int64) error {
	return syscall.Fallocate(int(b.f.Fd()), fallocPunchHole|fallocKeepSize, off, length)
}

func (b *fileBackend) WriteZeroes(off, length int64, noHole bool) error {
	mode := uint32(fallocZeroRange | fallocKeepSize)
	if !noHole {
		mode = fallocPunchHole | fallocKeepSize
	}
	err := syscall.Fallocate(int(b.f.Fd()), mode, off, length)
	if errors.Is(err, syscall.EOPNOTSUPP) {
		_, err = b.f.WriteAt(make([]byte, length), off)
	}
	return err
}

func (b *fileBackend) CanFastZero(off, length int64, noHole bool) bool { return true }

func (b *fileBackend) BlockStatus(ctx string, off, length int64) ([]Extent, error) {
	if ctx != BaseAllocation {
		return nil, fmt.Errorf("unknown context %q", ctx)
	}
	fd := int(b.f.Fd())
	end := off + length
	var out []Extent
	for pos := off; pos < end; {
		data, err := syscall.Seek(fd, pos, seekData)
		if errors.Is(err, syscall.ENXIO) {
			data = b.size // no data after pos
		} else if err != nil {
			return nil, err
		}
		if data > pos {
			l := min(data, end) - pos
			out = append(out, Extent{Length: l, Flags: StateHole | StateZero})
			pos += l
			continue
		}
		hole, err := syscall.Seek(fd, pos, seekHole)
		if err != nil {
			return nil, err
		}
		l := min(hole, end) - pos
		out = append(out, Extent{Length: l})
		pos += l
	}
	return out, nil
}
