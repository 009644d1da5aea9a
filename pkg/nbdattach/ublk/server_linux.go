//go:build linux

package ublk

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// Options configure a device.
type Options struct {
	// Queues is the number of hardware queues, each served by a thread
	// of its own; default min(NumCPU, 4). The kernel caps it at its
	// number of CPUs. Recover serves as many queues as the device has.
	Queues     int
	QueueDepth int    // tags per queue; default 64
	MaxIOBytes int    // largest request (max_io_buf_bytes); default 512 KiB
	DevID      uint32 // with FixedID: the device number to create
	FixedID    bool   // false: the kernel chooses the number
	Flags      uint64 // extra UBLK_F_* (e.g. FlagUserRecovery)
	// Tag is stored by the kernel with the device (ublksrv_flags, which
	// it never interprets) and returned by GET_DEV_INFO: the attacher keeps
	// a hash of the volume id there, so a device is never recovered onto
	// another volume's image.
	Tag uint64
	// OnError receives errors of the serving loop (nil: dropped).
	OnError func(error)
	// ReadOnly marks the block device read-only (UBLK_ATTR_READ_ONLY):
	// the kernel refuses writes before they reach the server.
	ReadOnly bool
}

func (o *Options) defaults() {
	if o.Queues <= 0 {
		o.Queues = defaultQueues(runtime.NumCPU())
	}
	o.Queues = min(o.Queues, maxQueues)
	if o.QueueDepth <= 0 {
		o.QueueDepth = 64
	}
	if o.MaxIOBytes <= 0 {
		o.MaxIOBytes = 512 << 10
	}
}

// defaultQueues: a queue per CPU up to four. blk-mq sends a request to the
// queue of the CPU that submitted it, so more queues than CPUs stay idle,
// and every queue costs a thread, a ring and a payload buffer.
func defaultQueues(cpus int) int { return max(1, min(cpus, 4)) }

// Device is a served ublk device: /dev/ublkcN (ours) and /dev/ublkbN (the
// kernel's host-managed zoned block device).
type Device struct {
	ID     uint32
	Info   DevInfo // as negotiated by ADD_DEV
	Params Params

	ctrl     *Control
	char     *os.File
	fd       int // char's
	h        *handler
	depth    int
	queues   []*queue
	launched bool // the queue goroutines run (each sends once on its done)
	onError  func(error)

	stopping  atomic.Bool
	progress  atomic.Uint64 // requests answered, all queues: parked requests retry when it moves
	abandoned atomic.Bool
	running   atomic.Int32  // queue loops not yet returned
	ended     chan struct{} // closed when every queue loop has returned
	stopOnce  sync.Once
	stopErr   error
}

// queue is one hardware queue of a device, served by one locked thread
// with its own ring, its own mapping of the queue's descriptors and its
// own payload buffer.
type queue struct {
	id     uint16
	rb     *reqBuf
	served atomic.Uint64
	done   chan error // the loop's result, sent once
	// Written by the queue's thread, read after done.
	tid int
	// An abandoned queue's ring and descriptor mapping, closed by Abandon
	// once every abandoned queue thread has exited.
	leftRing  *Ring
	leftDescs []byte
}

func newDevice(info DevInfo, ctrl *Control, h *handler, onError func(error)) *Device {
	d := &Device{ID: info.DevID, Info: info, ctrl: ctrl, h: h, depth: int(info.QueueDepth), fd: -1, onError: onError, ended: make(chan struct{})}
	for q := range max(int(info.NrHWQueues), 1) {
		d.queues = append(d.queues, &queue{id: uint16(q), rb: h.newBuf(), done: make(chan error, 1)})
	}
	d.running.Store(int32(len(d.queues)))
	return d
}

// ParamsFor returns the ublk parameters presenting g as a host-managed
// zoned device: 512-byte logical blocks, 4 KiB physical, zone size as
// chunk_sectors, the zone limits of the image, a volatile write cache
// with FUA (so the kernel sends FLUSH and FUA, which the durability
// contract needs). Only whole zones are exposed.
func ParamsFor(g zoned.Geometry, maxIO int) Params {
	zs := uint32(g.ZoneSize / zoned.SectorSize)
	nz := uint32(g.Size / g.ZoneSize)
	maxSectors := uint32(maxIO / zoned.SectorSize)
	app := g.MaxAppendBytes / zoned.SectorSize
	if app == 0 || app > maxSectors {
		// The kernel refuses max_zone_append_sectors = 0; an image with
		// zone append disabled gets EIO for every append from the engine.
		app = min(maxSectors, zs)
	}
	app = min(app, zs)
	return Params{
		Types:          paramTypeBasic | paramTypeZoned,
		Attrs:          attrVolatileCache | attrFUA,
		LogicalBSShift: 9, PhysicalBSShift: 12, IOOptShift: 12, IOMinShift: 9,
		MaxSectors: maxSectors, ChunkSectors: zs, DevSectors: uint64(nz) * uint64(zs),
		MaxOpenZones: min(g.MaxOpen, nz), MaxActiveZones: min(g.MaxActive, nz), MaxZoneAppendSectors: app,
	}
}

// Start creates and starts a ublk device serving b. It returns when
// /dev/ublkbN exists.
func Start(b Backend, o Options) (_ *Device, err error) {
	o.defaults()
	h, err := newHandler(b, o.MaxIOBytes)
	if err != nil {
		return nil, err
	}
	ctrl, err := OpenControl()
	if err != nil {
		return nil, err
	}
	id := anyDev
	if o.FixedID {
		id = o.DevID
	}
	info, err := ctrl.AddDev(DevInfo{
		NrHWQueues: uint16(o.Queues), QueueDepth: uint16(o.QueueDepth), MaxIOBufBytes: uint32(o.MaxIOBytes), DevID: id,
		Flags: FlagUserCopy | FlagZoned | FlagCmdIoctlEncode | o.Flags, ServerFlags: o.Tag,
	})
	if err != nil {
		ctrl.Close()
		return nil, err
	}
	d := newDevice(info, ctrl, h, o.OnError)
	defer func() {
		if err != nil {
			d.teardown()
		}
	}()
	if info.Flags&FlagZoned == 0 || info.Flags&FlagUserCopy == 0 {
		return nil, fmt.Errorf("ublk: the kernel did not grant zoned user-copy devices (flags %#x): Linux >= 6.6 with CONFIG_BLK_DEV_ZONED", info.Flags)
	}
	h.replayOK = info.Flags&FlagUserRecoveryReissue != 0
	d.Params = ParamsFor(h.g, int(info.MaxIOBufBytes))
	if o.ReadOnly {
		d.Params.Attrs |= attrReadOnly
	}
	if err := ctrl.SetParams(d.ID, d.Params); err != nil {
		return nil, err
	}
	if d.char, err = openWait(d.CharPath(), 5*time.Second); err != nil {
		return nil, err
	}
	d.fd = int(d.char.Fd())
	if err := d.startQueues(); err != nil {
		return nil, err
	}
	if err := ctrl.StartDev(d.ID, os.Getpid()); err != nil {
		return nil, err
	}
	return d, nil
}

// Recover takes over device id, whose previous server died, with a new
// server for b (UBLK_F_USER_RECOVERY): START_USER_RECOVERY (retried while
// the kernel still releases the dead server's /dev/ublkcN), every queue
// fetches every tag, END_USER_RECOVERY. I/O queued in the meantime, and
// with FlagUserRecoveryReissue the requests the dead server held, are
// then served by b. The device's geometry must be b's; it keeps its
// number of queues and their depth (o.Queues and o.QueueDepth are unused).
func Recover(id uint32, b Backend, o Options) (_ *Device, err error) {
	o.defaults()
	h, err := newHandler(b, o.MaxIOBytes)
	if err != nil {
		return nil, err
	}
	ctrl, err := OpenControl()
	if err != nil {
		return nil, err
	}
	info, err := ctrl.GetDevInfo(id)
	if err != nil {
		ctrl.Close()
		return nil, err
	}
	params, err := ctrl.GetParams(id)
	if err != nil {
		ctrl.Close()
		return nil, err
	}
	want := ParamsFor(h.g, int(info.MaxIOBufBytes))
	if info.Flags&FlagUserRecovery == 0 || params.ChunkSectors != want.ChunkSectors || params.DevSectors != want.DevSectors {
		ctrl.Close()
		return nil, fmt.Errorf("ublk: device %d (flags %#x, %d sectors in zones of %d) cannot be recovered with this backend (%d sectors in zones of %d)",
			id, info.Flags, params.DevSectors, params.ChunkSectors, want.DevSectors, want.ChunkSectors)
	}
	if h, err = newHandler(b, int(info.MaxIOBufBytes)); err != nil {
		ctrl.Close()
		return nil, err
	}
	h.replayOK = info.Flags&FlagUserRecoveryReissue != 0
	d := newDevice(info, ctrl, h, o.OnError)
	d.ID, d.Params = id, params
	deadline := time.Now().Add(10 * time.Second)
	for {
		err = ctrl.StartUserRecovery(id)
		if err == nil || !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		ctrl.Close()
		return nil, err
	}
	defer func() {
		if err != nil {
			d.stopping.Store(true)
			if d.char != nil {
				d.waitQueues(30 * time.Second)
				d.char.Close()
			}
			ctrl.Close()
		}
	}()
	if d.char, err = openWait(d.CharPath(), 5*time.Second); err != nil {
		return nil, err
	}
	d.fd = int(d.char.Fd())
	// END_USER_RECOVERY only once every queue has fetched all its tags:
	// the kernel waits for that itself, but a queue that failed to start
	// would leave it waiting.
	if err := d.startQueues(); err != nil {
		return nil, err
	}
	if err := ctrl.EndUserRecovery(id, os.Getpid()); err != nil {
		return nil, err
	}
	return d, nil
}

// openWait opens a device node devtmpfs creates asynchronously to us.
func openWait(path string, d time.Duration) (*os.File, error) {
	deadline := time.Now().Add(d)
	for {
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err == nil || !errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
			return f, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// CharPath is /dev/ublkcN.
func (d *Device) CharPath() string { return fmt.Sprintf("/dev/ublkc%d", d.ID) }

// BlockPath is /dev/ublkbN.
func (d *Device) BlockPath() string { return fmt.Sprintf("/dev/ublkb%d", d.ID) }

// Counts returns the requests served so far.
func (d *Device) Counts() Counts { return d.h.snapshot() }

// Failures returns the backend errors of the first failed requests (at
// most 16), oldest first: what a zone engine refusal said, which the
// kernel only sees as an errno.
func (d *Device) Failures() []string { return d.h.failuresSnapshot() }

// QueueRequests returns the requests each hardware queue has served so
// far: blk-mq sends a request to the queue of the CPU that submitted it.
func (d *Device) QueueRequests() []uint64 {
	out := make([]uint64, len(d.queues))
	for i, q := range d.queues {
		out[i] = q.served.Load()
	}
	return out
}

// State returns the kernel's view of the device.
func (d *Device) State() (DevInfo, error) { return d.ctrl.GetDevInfo(d.ID) }

// Done is closed when the device's queues have all ended: it was stopped (by
// Stop, or by STOP_DEV from another process, such as "zq-csi ublk
// detach") or abandoned. Stop still releases what this process holds.
func (d *Device) Done() <-chan struct{} { return d.ended }

// Stop removes the block device (serving its last I/O), ends the queues and
// deletes the device. A device another process stopped already only has
// this process's side released.
func (d *Device) Stop() error {
	d.stopOnce.Do(func() {
		var err error
		select {
		case <-d.ended:
		default:
			err = d.ctrl.StopDev(d.ID)
		}
		d.stopErr = errors.Join(err, d.teardown())
	})
	return d.stopErr
}

// Abandon stops serving without stopping the device, as if this process
// had died: with FlagUserRecovery the kernel keeps /dev/ublkbN and queues
// its I/O until Recover in this or another process takes it over.
//
// Every queue's thread exits (see serve), so the kernel cancels its
// fetches in the exiting task, exactly as when the process is killed; only
// once all of them have exited does Abandon close any ring, then
// /dev/ublkcN, and it returns once the kernel reports the device QUIESCED.
// Closing a ring while its thread lives instead cancels the fetches in io_uring's asynchronous teardown,
// where Linux 6.12 can hand a newly queued request to a fetch being
// cancelled: the request is lost, the quiesce waits for it forever and
// every later control command on the device hangs (seen in the VM lane:
// ublk_quiesce_work_fn in ublk_wait_tagset_rqs_idle, a pwrite and a
// control command in D state).
func (d *Device) Abandon() error {
	var err error
	d.stopOnce.Do(func() {
		d.stopErr = errors.New("ublk: device abandoned")
		d.abandoned.Store(true)
		d.stopping.Store(true)
		if err = d.waitQueues(30 * time.Second); errors.Is(err, errQueueStuck) {
			// A loop still runs (a backend call that does not return):
			// closing anything now could lose a request. Leave it all.
			return
		}
		for _, q := range d.queues {
			if q.leftRing != nil {
				if gerr := waitThreadGone(q.tid, 5*time.Second); gerr != nil {
					err = errors.Join(err, gerr)
					return // as above: no ring is closed while a queue thread lives
				}
			}
		}
		for _, q := range d.queues {
			if q.leftDescs != nil {
				unix.Munmap(q.leftDescs)
			}
			if q.leftRing != nil {
				err = errors.Join(err, q.leftRing.Close())
			}
		}
		err = errors.Join(err, d.char.Close(), d.waitQuiesced(10*time.Second), d.ctrl.Close())
	})
	return err
}

// errQueueStuck: a queue loop did not return in time.
var errQueueStuck = errors.New("ublk: queue loop did not end")

// startQueues starts every queue's thread and waits until each has
// fetched all its tags (or failed to).
func (d *Device) startQueues() error {
	ready := make(chan error, len(d.queues))
	d.launched = true
	for _, q := range d.queues {
		go d.serve(q, ready)
	}
	var errs []error
	for range d.queues {
		errs = append(errs, <-ready)
	}
	return errors.Join(errs...)
}

// waitQueues collects every queue loop's result, giving up (errQueueStuck)
// after limit.
func (d *Device) waitQueues(limit time.Duration) error {
	if !d.launched {
		return nil
	}
	timeout := time.After(limit)
	var errs []error
	for _, q := range d.queues {
		select {
		case err := <-q.done:
			errs = append(errs, err)
		case <-timeout:
			return errors.Join(append(errs, fmt.Errorf("%w: queue %d of device %d after %v", errQueueStuck, q.id, d.ID, limit))...)
		}
	}
	return errors.Join(errs...)
}

// waitThreadGone waits until thread tid of this process has exited.
func waitThreadGone(tid int, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		if _, err := os.Stat(fmt.Sprintf("/proc/self/task/%d", tid)); errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("ublk: queue thread %d has not exited after %v", tid, limit)
		}
		time.Sleep(time.Millisecond)
	}
}

// waitQuiesced polls the device state until the kernel has quiesced it
// (UBLK_S_DEV_QUIESCED) after its server went away.
func (d *Device) waitQuiesced(limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		info, err := d.ctrl.GetDevInfo(d.ID)
		if err != nil {
			return fmt.Errorf("ublk: device %d after abandon: %w", d.ID, err)
		}
		if info.State == StateQuiesced {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("ublk: device %d still in state %d %v after its server went away, not QUIESCED", d.ID, info.State, limit)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// teardown ends the queue loops (giving the kernel's aborts a moment to
// arrive), releases the char device and deletes the device.
func (d *Device) teardown() error {
	var errs []error
	d.stopping.Store(true)
	if d.char != nil {
		errs = append(errs, d.waitQueues(30*time.Second), d.char.Close())
	}
	// DEL_DEV waits until every opener of /dev/ublkbN has closed it; a
	// process still holding it must not hang the detach.
	err := DeleteDevice(d.ctrl, d.ID)
	errs = append(errs, err, d.ctrl.Close())
	return errors.Join(errs...)
}

func (d *Device) report(err error) {
	if d.onError != nil && err != nil {
		d.onError(err)
	}
}

// userCopy moves request payloads through /dev/ublkcN.
type userCopy struct {
	fd     int
	q, tag uint16
}

func (u userCopy) readIn(p []byte, off int64) (int, error) {
	return unix.Pread(u.fd, p, userCopyPos(u.q, u.tag, off))
}

func (u userCopy) writeOut(p []byte, off int64) (int, error) {
	return unix.Pwrite(u.fd, p, userCopyPos(u.q, u.tag, off))
}

// serve runs queue q: one locked OS thread, since the driver binds every
// tag to the task that fetched it, with its own ring. Requests are served
// one at a time in arrival order; the block layer already keeps at most
// one write per sequential zone in flight (zone write plugging), and
// requests of different queues run in parallel.
//
// An abandoned queue (Abandon) returns with its thread still locked, so
// the thread exits with the goroutine and the kernel cancels the thread's
// fetches in task exit, as for a killed server.
func (d *Device) serve(q *queue, ready chan<- error) {
	runtime.LockOSThread()
	if unix.Gettid() == unix.Getpid() {
		// The main thread never exits (Go wedges it instead): serve from
		// another one. Holding the main thread until the new goroutine
		// has locked its own keeps it off this one.
		locked := make(chan struct{})
		go func() {
			runtime.LockOSThread()
			close(locked)
			d.serveLocked(q, ready)
		}()
		<-locked
		runtime.UnlockOSThread()
		return
	}
	d.serveLocked(q, ready)
}

// serveLocked runs queue q on the calling goroutine's locked thread.
func (d *Device) serveLocked(q *queue, ready chan<- error) {
	err := d.loop(q, ready)
	exits := q.leftRing != nil // abandoned: the thread must exit
	q.done <- err
	if d.running.Add(-1) == 0 {
		close(d.ended)
	}
	if !exits {
		runtime.UnlockOSThread()
	}
}

func (d *Device) loop(q *queue, ready chan<- error) (err error) {
	q.tid = unix.Gettid()
	fd := d.fd
	ring, err := NewRing(uint32(d.depth), SetupSQE128)
	if err != nil {
		ready <- err
		return err
	}
	defer func() {
		if d.abandoned.Load() {
			q.leftRing = ring // closed by Abandon after this thread has exited
			return
		}
		ring.Close()
	}()
	pg := os.Getpagesize()
	descs, err := unix.Mmap(fd, descOffset(q.id, pg), cmdBufSize(d.depth, pg), unix.PROT_READ, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		err = fmt.Errorf("ublk: mmap %s queue %d: %w", d.CharPath(), q.id, err)
		ready <- err
		return err
	}
	defer func() {
		if d.abandoned.Load() {
			q.leftDescs = descs
			return
		}
		unix.Munmap(descs)
	}()
	push := func(op uint32, c ioCmd) {
		c.QID = q.id
		sqe := SQE{Opcode: OpURingCmd, Fd: int32(fd), Off: uint64(op), UserData: uint64(c.Tag)}
		c.encode(sqe.Cmd[:])
		if err := ring.Push(&sqe); err != nil {
			// Cannot happen: one SQE per completion, ring sized to the depth.
			d.report(fmt.Errorf("ublk: queue %d tag %d: %w", q.id, c.Tag, err))
		}
	}
	for tag := range d.depth {
		push(ioFetchReq, ioCmd{Tag: uint16(tag)})
	}
	if _, err := ring.Submit(0); err != nil {
		ready <- err
		return err
	}
	ready <- nil
	live := d.depth
	var stopAt time.Time
	var park parking
	wait := 200 * time.Millisecond
	for live > 0 {
		if _, err := ring.SubmitAndWait(1, wait); err != nil && !errors.Is(err, ErrTimeout) {
			return err
		}
		ring.Reap(func(c CQE) {
			tag := uint16(c.UserData)
			switch {
			case c.Res == ioResAbort:
				live-- // the device is going away: no more requests on this tag
				return
			case c.Res < 0:
				live--
				d.report(fmt.Errorf("ublk: queue %d tag %d: fetch/commit refused: %w", q.id, tag, c.Err()))
				return
			}
			desc := decodeIODesc(descs[int(tag)*ioDescSize:])
			q.rb.mayPark = true
			res, lba := d.h.handle(desc, userCopy{fd: fd, q: q.id, tag: tag}, q.rb)
			if res == resParked {
				park.add(tag, desc, d.progress.Load())
				return
			}
			q.served.Add(1)
			d.progress.Add(1)
			push(ioCommitAndFetchReq, ioCmd{Tag: tag, Result: res, Addr: lba})
		})
		// Parked requests: retried after other requests were served; the
		// last try, with parking off, answers the engine's errno.
		park.retry(d.progress.Load(), d.stopping.Load(), func(tag uint16, desc ioDesc, final bool) bool {
			q.rb.mayPark = !final
			res, lba := d.h.handle(desc, userCopy{fd: fd, q: q.id, tag: tag}, q.rb)
			if res == resParked {
				return false
			}
			q.served.Add(1)
			d.progress.Add(1)
			push(ioCommitAndFetchReq, ioCmd{Tag: tag, Result: res, Addr: lba})
			return true
		})
		if park.len() > 0 {
			wait = parkPoll
		} else {
			wait = 200 * time.Millisecond
		}
		if d.abandoned.Load() {
			return nil // the thread exits; the kernel cancels the fetches
		}
		if d.stopping.Load() {
			// After STOP_DEV every pending fetch completes with ABORT; if
			// START_DEV never ran, nothing will: closing the ring cancels
			// them.
			if stopAt.IsZero() {
				stopAt = time.Now()
			} else if time.Since(stopAt) > 2*time.Second {
				return nil
			}
		}
	}
	return nil
}
