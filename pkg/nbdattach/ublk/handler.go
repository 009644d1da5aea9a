package ublk

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// Backend is what a ublk device serves: a host-managed zoned device.
// *zoned.Device implements it.
type Backend interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64, fua bool) (int, error)
	WriteZeroes(off, length int64, noHole bool) error
	Append(zone int, p []byte, fua bool) (uint64, error)
	Mgmt(op zoned.Op, off, length uint64) error
	Report(start, n int) []zoned.ZoneReport
	Flush() error
	Trim(off, length int64) error
	Geometry() zoned.Geometry
}

var _ Backend = (*zoned.Device)(nil)

// reqData moves a request's payload. With UBLK_F_USER_COPY that is pread
// (request → server: WRITE, ZONE_APPEND) and pwrite (server → request:
// READ, REPORT_ZONES) on /dev/ublkcN at the request's offset.
type reqData interface {
	readIn(p []byte, off int64) (int, error)
	writeOut(p []byte, off int64) (int, error)
}

// handler turns one io descriptor into backend calls and a result for
// COMMIT_AND_FETCH_REQ: the byte count (READ, WRITE, REPORT_ZONES: the
// kernel requeues the remainder of a short result), 0, or -errno. It is
// shared by every queue of a device and safe for concurrent use: what one
// request needs for itself lives in the reqBuf its caller passes.
type handler struct {
	b           Backend
	g           zoned.Geometry
	zoneSectors uint64
	sectors     uint64 // exposed size in sectors (whole zones)
	maxIO       int    // largest payload (max_io_buf_bytes)
	// replayOK accepts a WRITE that ends exactly at its zone's write
	// pointer and matches the data there: a request the previous server
	// applied but did not commit, reissued after recovery
	// (UBLK_F_USER_RECOVERY_REISSUE).
	replayOK bool

	counts [256]atomic.Uint64 // requests by UBLK_IO_OP_*
	failed atomic.Uint64      // requests answered with an error

	fmu      sync.Mutex
	failures []string // the first maxFailures backend errors, for Failures
}

// Counts are the requests a device served, by kind.
type Counts struct {
	Reads, Writes, Appends, Flushes, Discards, WriteZeroes uint64
	ZoneMgmt, Reports, Failed                              uint64
}

// reqBuf is the memory of one request being served: its payload, and the
// data a reissued write is compared with. A queue serving its requests one
// at a time needs one.
type reqBuf struct {
	buf     []byte // maxIO bytes
	scratch []byte // allocated on the first replay check
	// mayPark lets a WRITE or ZONE_APPEND that the zone engine refuses for
	// lack of open or active slots be answered resParked instead of an
	// errno: the queue keeps it and tries again (see parking).
	mayPark bool
}

// resParked is the result of a request the queue must keep and retry.
const resParked = math.MinInt32

func (h *handler) newBuf() *reqBuf { return &reqBuf{buf: make([]byte, h.maxIO)} }

func (h *handler) snapshot() Counts {
	c := func(op int) uint64 { return h.counts[op].Load() }
	return Counts{
		Reads: c(opRead), Writes: c(opWrite), Appends: c(opZoneAppend), Flushes: c(opFlush), Discards: c(opDiscard),
		WriteZeroes: c(opWriteZeroes), Reports: c(opReportZones), Failed: h.failed.Load(),
		ZoneMgmt: c(opZoneOpen) + c(opZoneClose) + c(opZoneFinish) + c(opZoneReset) + c(opZoneResetAll),
	}
}

func newHandler(b Backend, maxIO int) (*handler, error) {
	g := b.Geometry()
	if g.ZoneSize == 0 || g.ZoneSize%zoned.SectorSize != 0 || g.ZoneSize&(g.ZoneSize-1) != 0 {
		return nil, fmt.Errorf("ublk: zone size %d is not a power-of-two number of sectors", g.ZoneSize)
	}
	zs := g.ZoneSize / zoned.SectorSize
	// The kernel counts zones as dev_sectors >> ilog2(chunk_sectors): a
	// smaller last zone would be left out of its zone count and fail zone
	// revalidation, so only whole zones are exposed.
	whole := g.Size / g.ZoneSize
	if whole == 0 {
		return nil, fmt.Errorf("ublk: device of %d bytes holds no whole zone of %d bytes", g.Size, g.ZoneSize)
	}
	return &handler{b: b, g: g, zoneSectors: zs, sectors: whole * zs, maxIO: maxIO}, nil
}

// maxFailures bounds what Failures keeps.
const maxFailures = 16

// errRes is errnoRes for a backend error of a request, remembered (the
// first maxFailures) so a test or an operator can see why requests failed.
func (h *handler) errRes(err error) int32 {
	if err != nil {
		h.fmu.Lock()
		if len(h.failures) < maxFailures {
			h.failures = append(h.failures, err.Error())
		}
		h.fmu.Unlock()
	}
	return errnoRes(err)
}

// failuresSnapshot returns the remembered backend errors.
func (h *handler) failuresSnapshot() []string {
	h.fmu.Lock()
	defer h.fmu.Unlock()
	return append([]string(nil), h.failures...)
}

func errnoRes(err error) int32 {
	var en syscall.Errno
	if errors.As(err, &en) && en != 0 {
		return -int32(en)
	}
	return -int32(zoned.Errno(err))
}

func (h *handler) handle(d ioDesc, data reqData, rb *reqBuf) (res int32, appendLBA uint64) {
	res, appendLBA = h.serve(d, data, rb)
	if res == resParked {
		return res, 0 // counted when it is finally answered
	}
	h.counts[d.op()].Add(1)
	if res < 0 {
		h.failed.Add(1)
	}
	return res, appendLBA
}

func (h *handler) serve(d ioDesc, data reqData, rb *reqBuf) (res int32, appendLBA uint64) {
	sector, n := d.StartSector, uint64(d.NrSectors)
	off := int64(sector * zoned.SectorSize)
	length := int64(n * zoned.SectorSize)
	inRange := sector <= h.sectors && n <= h.sectors-sector
	fua := d.OpFlags&ioFlagFUA != 0
	switch d.op() {
	case opRead, opWrite, opZoneAppend:
		if !inRange || length > int64(len(rb.buf)) {
			return -int32(syscall.EINVAL), 0
		}
	}
	switch d.op() {
	case opRead:
		p := rb.buf[:length]
		if _, err := h.b.ReadAt(p, off); err != nil {
			return h.errRes(err), 0
		}
		return h.out(data, p)
	case opWrite:
		p, r := h.in(data, rb, length)
		if r < 0 {
			return r, 0
		}
		if _, err := h.b.WriteAt(p, off, fua); err != nil {
			if h.replayed(rb, p, off, err) {
				return int32(length), 0
			}
			if parkable(rb, err) {
				return resParked, 0
			}
			return h.errRes(err), 0
		}
		return int32(length), 0
	case opZoneAppend:
		p, r := h.in(data, rb, length)
		if r < 0 {
			return r, 0
		}
		at, err := h.b.Append(int(sector/h.zoneSectors), p, fua)
		if err != nil {
			if parkable(rb, err) {
				return resParked, 0
			}
			return h.errRes(err), 0
		}
		return int32(length), at / zoned.SectorSize
	case opFlush:
		return h.errRes(h.b.Flush()), 0
	case opDiscard:
		if !inRange {
			return -int32(syscall.EINVAL), 0
		}
		return h.errRes(h.b.Trim(off, length)), 0
	case opWriteZeroes:
		if !inRange {
			return -int32(syscall.EINVAL), 0
		}
		return h.errRes(h.b.WriteZeroes(off, length, d.OpFlags&ioFlagNoUnmap != 0)), 0
	case opZoneOpen, opZoneClose, opZoneFinish, opZoneReset:
		// Zone management requests carry no length: they name the zone
		// starting at start_sector.
		if sector >= h.sectors {
			return -int32(syscall.EINVAL), 0
		}
		z := int(sector / h.zoneSectors)
		op := map[uint8]zoned.Op{opZoneOpen: zoned.OpOpen, opZoneClose: zoned.OpClose, opZoneFinish: zoned.OpFinish, opZoneReset: zoned.OpReset}[d.op()]
		return h.errRes(h.b.Mgmt(op, h.g.ZoneStart(z), h.g.ZoneLen(z))), 0
	case opZoneResetAll:
		return h.errRes(h.b.Mgmt(zoned.OpResetAll, 0, h.g.Size)), 0
	case opReportZones:
		return h.report(d, data, rb), 0
	}
	return -int32(syscall.EOPNOTSUPP), 0
}

// parkable: the request was refused for lack of zone resources and its
// queue may keep it for a retry.
func parkable(rb *reqBuf, err error) bool {
	return rb.mayPark && (errors.Is(err, zoned.ErrTooManyActiveZones) || errors.Is(err, zoned.ErrTooManyOpenZones))
}

// replayed tells whether a refused write is the reissue of one already
// applied: it ends at its zone's write pointer and the data is there.
func (h *handler) replayed(rb *reqBuf, p []byte, off int64, err error) bool {
	if !h.replayOK || !errors.Is(err, zoned.ErrNotAtWritePointer) && !errors.Is(err, zoned.ErrZoneFull) {
		return false
	}
	zi := h.g.ZoneIndex(uint64(off))
	reps := h.b.Report(zi, 1)
	if len(reps) != 1 {
		return false
	}
	wp := reps[0].WP
	if reps[0].Cond == zoned.CondFull {
		wp = reps[0].Start + reps[0].Cap
	}
	if uint64(off)+uint64(len(p)) != wp {
		return false
	}
	if len(rb.scratch) < len(p) {
		rb.scratch = make([]byte, len(rb.buf))
	}
	q := rb.scratch[:len(p)]
	if _, err := h.b.ReadAt(q, off); err != nil {
		return false
	}
	return bytes.Equal(p, q)
}

// in copies the request's payload into the buffer.
func (h *handler) in(data reqData, rb *reqBuf, length int64) ([]byte, int32) {
	p := rb.buf[:length]
	got, err := data.readIn(p, 0)
	if err != nil {
		return nil, errnoRes(err)
	}
	if int64(got) != length {
		return nil, -int32(syscall.EIO)
	}
	return p, 0
}

func (h *handler) out(data reqData, p []byte) (int32, uint64) {
	got, err := data.writeOut(p, 0)
	if err != nil {
		return errnoRes(err), 0
	}
	if got != len(p) {
		return -int32(syscall.EIO), 0
	}
	return int32(got), 0
}

// report answers UBLK_IO_OP_REPORT_ZONES: nr_zones struct blk_zone from
// the zone at start_sector; a zeroed entry ends a shorter report
// (ublk_cmd.h). The kernel's buffer holds exactly nr_zones entries
// whenever the report fits in one request (max_sectors*512/64 = 8192
// zones with our parameters).
func (h *handler) report(d ioDesc, data reqData, rb *reqBuf) int32 {
	nz := int64(d.NrSectors)
	if d.StartSector%h.zoneSectors != 0 || d.StartSector >= h.sectors || nz == 0 || nz*blkZoneSize > int64(len(rb.buf)) {
		return -int32(syscall.EINVAL)
	}
	first := int(d.StartSector / h.zoneSectors)
	last := int(h.sectors / h.zoneSectors) // exposed zones
	reps := h.b.Report(first, min(int(nz), last-first))
	p := rb.buf[:nz*blkZoneSize]
	clear(p)
	for i, z := range reps {
		blkZoneFrom(z).encode(p[i*blkZoneSize:])
	}
	r, _ := h.out(data, p)
	return r
}

func blkZoneFrom(z zoned.ZoneReport) blkZone {
	return blkZone{
		Start: z.Start / zoned.SectorSize, Len: z.Len / zoned.SectorSize, WP: z.WP / zoned.SectorSize,
		Type: uint8(z.Type), Cond: uint8(z.Cond), Capacity: z.Cap / zoned.SectorSize,
	}
}
