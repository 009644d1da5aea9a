package ublk

import (
	"bytes"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// memReq stands in for /dev/ublkcN: in is the request's data (a WRITE's
// payload), out receives what the server copies to the request.
type memReq struct {
	in, out []byte
}

func (m *memReq) readIn(p []byte, off int64) (int, error) { return copy(p, m.in[off:]), nil }
func (m *memReq) writeOut(p []byte, off int64) (int, error) {
	m.out = append(m.out[:0], p...)
	return len(p), nil
}

const (
	tZone = 1 << 20 // 1 MiB zones
	tSecs = tZone / 512
)

func testDevice(t *testing.T, conv, maxOpen uint32) *zoned.Device {
	t.Helper()
	path := filepath.Join(t.TempDir(), "z.qcow2")
	zs := uint64(tZone)
	if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: 8 * tZone, Zoned: &qcow2.ZonedOptions{
		ZoneSize: &zs, ConventionalZones: &conv, MaxOpenZones: &maxOpen,
	}}); err != nil {
		t.Fatal(err)
	}
	d, err := zoned.Open(path, zoned.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func desc(op uint8, flags uint32, sector uint64, n uint32) ioDesc {
	return ioDesc{OpFlags: uint32(op) | flags, StartSector: sector, NrSectors: n}
}

func TestHandlerZoneSemantics(t *testing.T) {
	d := testDevice(t, 1, 2)
	h, err := newHandler(d, 512<<10)
	if err != nil {
		t.Fatal(err)
	}
	rb := h.newBuf()
	data := bytes.Repeat([]byte{0xab}, 4096)
	req := &memReq{in: data}
	steps := []struct {
		name string
		d    ioDesc
		res  int32
		lba  uint64
	}{
		{"write conventional anywhere", desc(opWrite, 0, 100, 8), 4096, 0},
		{"write at WP of zone 1", desc(opWrite, 0, tSecs, 8), 4096, 0},
		{"write off the WP", desc(opWrite, 0, tSecs+64, 8), -int32(syscall.EIO), 0},
		{"write FUA at the new WP", desc(opWrite, ioFlagFUA, tSecs+8, 8), 4096, 0},
		{"append to zone 2 returns its start", desc(opZoneAppend, 0, 2*tSecs, 8), 4096, 2 * tSecs},
		{"second append lands after the first", desc(opZoneAppend, 0, 2*tSecs, 8), 4096, 2*tSecs + 8},
		{"append to a conventional zone", desc(opZoneAppend, 0, 0, 8), -int32(syscall.EIO), 0},
		// max_open_zones 2: explicit opens close implicitly open zones
		// (zones 1 and 2) to make room, then run out.
		{"open zone 3", desc(opZoneOpen, 0, 3*tSecs, 0), 0, 0},
		{"open zone 4", desc(opZoneOpen, 0, 4*tSecs, 0), 0, 0},
		{"open zone 5: two explicitly open", desc(opZoneOpen, 0, 5*tSecs, 0), -int32(syscall.ETOOMANYREFS), 0},
		{"close empty zone 4", desc(opZoneClose, 0, 4*tSecs, 0), 0, 0},
		{"finish zone 3", desc(opZoneFinish, 0, 3*tSecs, 0), 0, 0},
		{"write to a full zone", desc(opWrite, 0, 3*tSecs, 8), -int32(syscall.EIO), 0},
		{"reset zone 3", desc(opZoneReset, 0, 3*tSecs, 0), 0, 0},
		{"write after reset", desc(opWrite, 0, 3*tSecs, 8), 4096, 0},
		{"flush", desc(opFlush, 0, 0, 0), 0, 0},
		{"read beyond the device", desc(opRead, 0, 8*tSecs, 8), -int32(syscall.EINVAL), 0},
		{"unknown op", desc(opWriteSame, 0, 0, 8), -int32(syscall.EOPNOTSUPP), 0},
	}
	for _, s := range steps {
		res, lba := h.handle(s.d, req, rb)
		if res != s.res || lba != s.lba {
			t.Fatalf("%s: res %d lba %d, want %d %d", s.name, res, lba, s.res, s.lba)
		}
	}
	// Data written reads back, and the rest of the zone reads as zeros.
	if res, _ := h.handle(desc(opRead, 0, tSecs, 24), req, rb); res != 24*512 {
		t.Fatalf("read: %d", res)
	}
	if !bytes.Equal(req.out[:8192], bytes.Repeat([]byte{0xab}, 8192)) || !bytes.Equal(req.out[8192:], make([]byte, 4096)) {
		t.Fatal("read back differs")
	}
	// Report from zone 0: types, conditions and write pointers in sectors.
	if res, _ := h.handle(desc(opReportZones, 0, 0, 8), req, rb); res != 8*blkZoneSize {
		t.Fatalf("report: %d", res)
	}
	want := []blkZone{
		{Start: 0, Len: tSecs, WP: 0, Type: 1, Cond: 0, Capacity: tSecs},
		{Start: tSecs, Len: tSecs, WP: tSecs + 16, Type: 2, Cond: uint8(zoned.CondClosed), Capacity: tSecs},
		{Start: 2 * tSecs, Len: tSecs, WP: 2*tSecs + 16, Type: 2, Cond: uint8(zoned.CondClosed), Capacity: tSecs},
		{Start: 3 * tSecs, Len: tSecs, WP: 3*tSecs + 8, Type: 2, Cond: uint8(zoned.CondImpOpen), Capacity: tSecs},
		{Start: 4 * tSecs, Len: tSecs, WP: 4 * tSecs, Type: 2, Cond: uint8(zoned.CondEmpty), Capacity: tSecs},
	}
	for i, w := range want {
		if got := decodeBlkZone(req.out[i*blkZoneSize:]); got != w {
			t.Errorf("zone %d: %+v, want %+v", i, got, w)
		}
	}
	if c := h.snapshot(); c.Appends != 3 || c.Failed != 6 || c.ZoneMgmt != 6 || c.Reports != 1 {
		t.Errorf("counts %+v", c)
	}
	// Reset all, then every sequential zone is empty.
	if res, _ := h.handle(desc(opZoneResetAll, 0, 0, 0), req, rb); res != 0 {
		t.Fatalf("reset all: %d", res)
	}
	h.handle(desc(opReportZones, 0, tSecs, 7), req, rb)
	for i := range 7 {
		if z := decodeBlkZone(req.out[i*blkZoneSize:]); z.Cond != uint8(zoned.CondEmpty) || z.WP != z.Start {
			t.Errorf("after reset all, zone %d: %+v", i+1, z)
		}
	}
}

// A report asked past the last zone ends with a zeroed entry.
func TestHandlerReportShort(t *testing.T) {
	h, err := newHandler(testDevice(t, 0, 0), 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	rb := h.newBuf()
	req := &memReq{}
	if res, _ := h.handle(desc(opReportZones, 0, 6*tSecs, 4), req, rb); res != 4*blkZoneSize {
		t.Fatalf("report: %d", res)
	}
	if z := decodeBlkZone(req.out[2*blkZoneSize:]); z.Len != 0 {
		t.Fatalf("entry after the last zone: %+v", z)
	}
	if z := decodeBlkZone(req.out[blkZoneSize:]); z.Start != 7*tSecs {
		t.Fatalf("last zone: %+v", z)
	}
}

// After recovery with reissue, a write the dead server applied comes
// again: accepted if it ends at the write pointer with the same data.
func TestHandlerReplayedWrite(t *testing.T) {
	d := testDevice(t, 0, 0)
	h, err := newHandler(d, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	rb := h.newBuf()
	a := &memReq{in: bytes.Repeat([]byte{1}, 4096)}
	b := &memReq{in: bytes.Repeat([]byte{2}, 4096)}
	if res, _ := h.handle(desc(opWrite, 0, 0, 8), a, rb); res != 4096 {
		t.Fatal(res)
	}
	if res, _ := h.handle(desc(opWrite, 0, 0, 8), a, rb); res != -int32(syscall.EIO) {
		t.Fatalf("replay without reissue: %d", res)
	}
	h.replayOK = true
	for _, c := range []struct {
		name string
		req  *memReq
		sec  uint64
		res  int32
	}{
		{"same write again", a, 0, 4096},
		{"other data", b, 0, -int32(syscall.EIO)},
		{"not ending at the WP", a, 8 + 8, -int32(syscall.EIO)},
	} {
		if res, _ := h.handle(desc(opWrite, 0, c.sec, 8), c.req, rb); res != c.res {
			t.Errorf("%s: %d, want %d", c.name, res, c.res)
		}
	}
	if r := d.Report(0, 1)[0]; r.WP != 4096 {
		t.Fatalf("WP moved: %+v", r)
	}
}

// Queues share the handler, each with its own buffer: writers on
// different zones and readers run at once (the race detector watches).
func TestHandlerConcurrentQueues(t *testing.T) {
	h, err := newHandler(testDevice(t, 0, 0), 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	const queues, writes = 4, 32
	var wg sync.WaitGroup
	for q := range queues {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rb := h.newBuf()
			z := uint64(q + 1)
			req := &memReq{in: bytes.Repeat([]byte{byte(q + 1)}, 4096)}
			for i := range uint64(writes) {
				if res, _ := h.handle(desc(opWrite, 0, z*tSecs+i*8, 8), req, rb); res != 4096 {
					t.Errorf("queue %d write %d: %d", q, i, res)
					return
				}
				if res, _ := h.handle(desc(opRead, 0, z*tSecs, 8), req, rb); res != 4096 || !bytes.Equal(req.out, req.in) {
					t.Errorf("queue %d read %d: %d", q, i, res)
					return
				}
			}
		}()
	}
	wg.Wait()
	if c := h.snapshot(); c.Writes != queues*writes || c.Reads != queues*writes || c.Failed != 0 {
		t.Errorf("counts %+v", c)
	}
}
