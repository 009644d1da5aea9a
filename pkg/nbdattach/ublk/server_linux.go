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
	QueueDepth int    // tags of the single queue; default 64
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
	if o.QueueDepth <= 0 {
		o.QueueDepth = 64
	}
	if o.MaxIOBytes <= 0 {
		o.MaxIOBytes = 512 << 10
	}
}

// Device is a served ublk device: /dev/ublkcN (ours) and /dev/ublkbN (the
// kernel's host-managed zoned block device).
type Device struct {
	ID     uint32
	Info   DevInfo // as negotiated by ADD_DEV
	Params Params

	ctrl    *Control
	char    *os.File
	h       *handler
	depth   int
	onError func(error)

	stopping  atomic.Bool
	abandoned atomic.Bool
	// After Abandon's queue loop: the ring and the descriptor mapping,
	// closed by Abandon once the queue's thread has exited.
	leftRing  *Ring
	leftDescs []byte
	tid       int // the queue thread's
	done      chan error
	ended     chan struct{} // closed when the queue loop has returned
	stopOnce  sync.Once
	stopErr   error
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
		NrHWQueues: 1, QueueDepth: uint16(o.QueueDepth), MaxIOBufBytes: uint32(o.MaxIOBytes), DevID: id,
		Flags: FlagUserCopy | FlagZoned | FlagCmdIoctlEncode | o.Flags, ServerFlags: o.Tag,
	})
	if err != nil {
		ctrl.Close()
		return nil, err
	}
	d := &Device{ID: info.DevID, Info: info, ctrl: ctrl, h: h, depth: int(info.QueueDepth), onError: o.OnError, done: make(chan error, 1), ended: make(chan struct{})}
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
	ready := make(chan error, 1)
	go d.serve(ready)
	if err := <-ready; err != nil {
		return nil, err
	}
	if err := ctrl.StartDev(d.ID, os.Getpid()); err != nil {
		return nil, err
	}
	return d, nil
}

// Recover takes over device id, whose previous server died, with a new
// server for b (UBLK_F_USER_RECOVERY): START_USER_RECOVERY (retried while
// the kernel still releases the dead server's /dev/ublkcN), fetch every
// tag, END_USER_RECOVERY. I/O queued in the meantime, and with
// FlagUserRecoveryReissue the requests the dead server held, are then
// served by b. The device's geometry must be b's.
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
	d := &Device{ID: id, Info: info, Params: params, ctrl: ctrl, h: h, depth: int(info.QueueDepth), onError: o.OnError, done: make(chan error, 1), ended: make(chan struct{})}
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
				<-d.done
				d.char.Close()
			}
			ctrl.Close()
		}
	}()
	if d.char, err = openWait(d.CharPath(), 5*time.Second); err != nil {
		return nil, err
	}
	ready := make(chan error, 1)
	go d.serve(ready)
	if err := <-ready; err != nil {
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

// State returns the kernel's view of the device.
func (d *Device) State() (DevInfo, error) { return d.ctrl.GetDevInfo(d.ID) }

// Done is closed when the device's queue has ended: it was stopped (by
// Stop, or by STOP_DEV from another process, such as "zq-csi ublk
// detach") or abandoned. Stop still releases what this process holds.
func (d *Device) Done() <-chan struct{} { return d.ended }

// Stop removes the block device (serving its last I/O), ends the queue and
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
// The queue's thread exits (see serve), so the kernel cancels its fetches
// in the exiting task, exactly as when the process is killed; only then
// does Abandon close the ring and /dev/ublkcN, and it returns once the
// kernel reports the device QUIESCED. Closing the ring while the thread
// lives instead cancels the fetches in io_uring's asynchronous teardown,
// where Linux 6.12 can hand a newly queued request to a fetch being
// cancelled: the request is lost, the quiesce waits for it forever and
// every later control command on the device hangs (seen in the VM lane:
// ublk_quiesce_work_fn in ublk_wait_tagset_rqs_idle, a pwrite and a
// control command in D state).
func (d *Device) Abandon() error {
	var err error
	d.stopOnce.Do(func() {
		d.abandoned.Store(true)
		d.stopping.Store(true)
		err = <-d.done
		err = errors.Join(err, waitThreadGone(d.tid, 5*time.Second))
		if d.leftDescs != nil {
			unix.Munmap(d.leftDescs)
		}
		if d.leftRing != nil {
			err = errors.Join(err, d.leftRing.Close())
		}
		err = errors.Join(err, d.char.Close(), d.waitQuiesced(10*time.Second), d.ctrl.Close())
		d.stopErr = errors.New("ublk: device abandoned")
	})
	return err
}

// waitThreadGone waits until thread tid of this process has exited.
func waitThreadGone(tid int, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		if _, err := os.Stat(fmt.Sprintf("/proc/self/task/%d", tid)); errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("ublk: the queue thread %d has not exited after %v", tid, limit)
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

// teardown ends the queue loop (giving the kernel's aborts a moment to
// arrive), releases the char device and deletes the device.
func (d *Device) teardown() error {
	var errs []error
	d.stopping.Store(true)
	if d.char != nil {
		select {
		case err := <-d.done:
			errs = append(errs, err)
		case <-time.After(30 * time.Second):
			errs = append(errs, errors.New("ublk: queue loop did not end"))
		}
		errs = append(errs, d.char.Close())
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
	fd  int
	tag uint16
}

func (u userCopy) readIn(p []byte, off int64) (int, error) {
	return unix.Pread(u.fd, p, userCopyPos(0, u.tag, off))
}

func (u userCopy) writeOut(p []byte, off int64) (int, error) {
	return unix.Pwrite(u.fd, p, userCopyPos(0, u.tag, off))
}

// serve is the queue: one locked OS thread, since the driver binds every
// tag to the task that fetched it, with its own ring. Requests are served
// one at a time in arrival order; the block layer already keeps at most
// one write per sequential zone in flight (zone write plugging).
//
// An abandoned queue (Abandon) returns with its thread still locked, so
// the thread exits with the goroutine and the kernel cancels the thread's
// fetches in task exit, as for a killed server.
func (d *Device) serve(ready chan<- error) {
	runtime.LockOSThread()
	if unix.Gettid() == unix.Getpid() {
		// The main thread never exits (Go wedges it instead): serve from
		// another one. Holding the main thread until the new goroutine
		// has locked its own keeps it off this one.
		locked := make(chan struct{})
		go func() {
			runtime.LockOSThread()
			close(locked)
			d.serveLocked(ready)
		}()
		<-locked
		runtime.UnlockOSThread()
		return
	}
	d.serveLocked(ready)
}

// serveLocked runs the queue on the calling goroutine's locked thread.
func (d *Device) serveLocked(ready chan<- error) {
	err := d.loop(ready)
	abandoned := d.abandoned.Load()
	d.done <- err
	close(d.ended)
	if !abandoned {
		runtime.UnlockOSThread()
	}
}

func (d *Device) loop(ready chan<- error) (err error) {
	d.tid = unix.Gettid()
	fd := int(d.char.Fd())
	ring, err := NewRing(uint32(d.depth), SetupSQE128)
	if err != nil {
		ready <- err
		return err
	}
	defer func() {
		if d.abandoned.Load() {
			d.leftRing = ring // closed by Abandon after this thread has exited
			return
		}
		ring.Close()
	}()
	// Queue q's descriptors live at q * (the size for UBLK_MAX_QUEUE_DEPTH).
	descs, err := unix.Mmap(fd, 0, cmdBufSize(d.depth, os.Getpagesize()), unix.PROT_READ, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		err = fmt.Errorf("ublk: mmap %s: %w", d.CharPath(), err)
		ready <- err
		return err
	}
	defer func() {
		if d.abandoned.Load() {
			d.leftDescs = descs
			return
		}
		unix.Munmap(descs)
	}()
	push := func(op uint32, c ioCmd) {
		sqe := SQE{Opcode: OpURingCmd, Fd: int32(fd), Off: uint64(op), UserData: uint64(c.Tag)}
		c.encode(sqe.Cmd[:])
		if err := ring.Push(&sqe); err != nil {
			// Cannot happen: one SQE per completion, ring sized to the depth.
			d.report(fmt.Errorf("ublk: tag %d: %w", c.Tag, err))
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
	for live > 0 {
		if _, err := ring.SubmitAndWait(1, 200*time.Millisecond); err != nil && !errors.Is(err, ErrTimeout) {
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
				d.report(fmt.Errorf("ublk: tag %d: fetch/commit refused: %w", tag, c.Err()))
				return
			}
			desc := decodeIODesc(descs[int(tag)*ioDescSize:])
			res, lba := d.h.handle(desc, userCopy{fd: fd, tag: tag})
			push(ioCommitAndFetchReq, ioCmd{Tag: tag, Result: res, Addr: lba})
		})
		if d.abandoned.Load() {
			return nil // closing the ring cancels the fetches
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
