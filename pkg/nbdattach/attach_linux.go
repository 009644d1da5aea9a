package nbdattach

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// NetlinkOptions configure a NetlinkAttacher. Zero values take the defaults.
type NetlinkOptions struct {
	// StateDir holds the attachment records (required).
	StateDir string
	// Server serves the kernel's sockets; nil means NewServer(nil).
	Server *Server
	// DeadConnTimeout is how long the kernel parks I/O waiting for a new
	// connection after the serving process dies (default 120 s).
	DeadConnTimeout time.Duration
	// RequeueInterval is the block layer's request timer of each device
	// (/sys/block/nbdN/queue/io_timeout; default 2 s; negative: leave the
	// kernel's 30 s). With NBD_ATTR_TIMEOUT 0 it fails nothing: it bounds how
	// long a request sent on a connection that died waits before the kernel
	// resends it on the replacement.
	RequeueInterval time.Duration
	// DeviceTimeout bounds the wait for /dev/nbdN after CONNECT (default 10 s).
	DeviceTimeout time.Duration
	// ReconfigureWait bounds how long Recover retries a RECONFIGURE that
	// finds no dead connection to replace, because the kernel has not yet
	// noticed that the previous process's socket is closed (default 10 s).
	ReconfigureWait time.Duration
	// OnServeError receives errors of the serving goroutines (the package
	// never logs); may be nil.
	OnServeError func(volumeID string, err error)

	// sysRoot and devRoot replace /sys and /dev in unit tests.
	sysRoot, devRoot string
}

// NetlinkAttacher attaches volumes as /dev/nbdN through the kernel's
// netlink NBD interface, serving each over a socketpair from this process.
// See the package documentation for the restart model.
type NetlinkAttacher struct {
	nl    *NetlinkClient
	store *StateStore
	srv   *Server
	sys   sysfs
	opts  NetlinkOptions

	locks keyedMutex

	mu       sync.Mutex
	live     map[string]*served // by volume id
	stopping bool
}

// served is one volume this process serves.
type served struct {
	mu  sync.Mutex
	att Attachment // guarded by mu (Generation changes on reconnect)

	exp     *Export
	flags   TransmissionFlags
	backend Backend

	ctx       context.Context
	cancel    context.CancelFunc
	detaching chan struct{} // closed by Detach before DISCONNECT
	done      chan struct{} // closed when the serving loop has returned
}

var _ Attacher = (*NetlinkAttacher)(nil)

// NewNetlinkAttacher returns an attacher using nl for kernel requests.
func NewNetlinkAttacher(nl *NetlinkClient, opts NetlinkOptions) (*NetlinkAttacher, error) {
	store, err := NewStateStore(opts.StateDir)
	if err != nil {
		return nil, err
	}
	if opts.Server == nil {
		opts.Server = NewServer(nil)
	}
	if opts.DeadConnTimeout == 0 {
		opts.DeadConnTimeout = 120 * time.Second
	}
	if opts.RequeueInterval == 0 {
		opts.RequeueInterval = 2 * time.Second
	}
	if opts.DeviceTimeout == 0 {
		opts.DeviceTimeout = 10 * time.Second
	}
	if opts.ReconfigureWait == 0 {
		opts.ReconfigureWait = 10 * time.Second
	}
	if opts.sysRoot == "" {
		opts.sysRoot = "/sys"
	}
	if opts.devRoot == "" {
		opts.devRoot = "/dev"
	}
	return &NetlinkAttacher{
		nl:    nl,
		store: store,
		srv:   opts.Server,
		sys:   sysfs{sysRoot: opts.sysRoot, devRoot: opts.devRoot},
		opts:  opts,
		live:  make(map[string]*served),
	}, nil
}

// Kind implements Attacher.
func (a *NetlinkAttacher) Kind() string { return "nbd" }

// Errors of the attacher.
var (
	// ErrConflict: the volume is attached with another image.
	ErrConflict = errors.New("nbd: volume already attached with a different image")
	// ErrNotServed: a record exists but this process does not serve it;
	// Recover must run first.
	ErrNotServed = errors.New("nbd: volume is recorded as attached but not served by this process (run Recover first)")
	// ErrBackendMismatch: the device at a recorded index carries another
	// backend identifier; it belongs to someone else and is left alone.
	ErrBackendMismatch = errors.New("nbd: device backend identifier does not match the record")
	// ErrDeviceBusy: RECONFIGURE found no dead connection to replace: the
	// device is still served, normally by another process.
	ErrDeviceBusy = errors.New("nbd: the device's connection is still alive (is another process serving it?)")
	// ErrStopped: Shutdown has begun.
	ErrStopped = errors.New("nbd: attacher is shutting down")
)

// Attach implements Attacher: socketpair, CONNECT with the kernel's end,
// serve ours, wait for the device, record.
func (a *NetlinkAttacher) Attach(ctx context.Context, req AttachRequest) (*Attachment, error) {
	if req.VolumeID == "" || req.Backend == nil {
		return nil, errors.New("nbd: attach needs a volume id and a backend")
	}
	unlock := a.locks.lock(req.VolumeID)
	defer unlock()

	if s := a.lookup(req.VolumeID); s != nil {
		att := s.attachment()
		if att.ImagePath != req.ImagePath || att.ReadOnly != req.ReadOnly {
			return nil, fmt.Errorf("%w: %q is %s (image %s)", ErrConflict, req.VolumeID, att.DevicePath, att.ImagePath)
		}
		return &att, nil
	}
	if rec, err := a.store.Get(req.VolumeID); err == nil {
		return nil, fmt.Errorf("%w: %q at %s", ErrNotServed, req.VolumeID, rec.DevicePath)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}

	bs := req.BlockSize
	if bs == 0 {
		bs = DefaultMinBlockSize
	}
	exp := &Export{Name: req.VolumeID, Backend: req.Backend, ReadOnly: req.ReadOnly, MinBlockSize: bs}
	flags, err := exp.Flags()
	if err != nil {
		return nil, err
	}
	size := uint64(req.Backend.Size())
	if size == 0 || size%uint64(bs) != 0 {
		return nil, fmt.Errorf("nbd: volume %q: size %d is not a positive multiple of the block size %d", req.VolumeID, size, bs)
	}

	conn, kfd, err := socketPair()
	if err != nil {
		return nil, err
	}
	idx, err := a.nl.Connect(ConnectConfig{
		Index:           -1,
		Size:            size,
		BlockSize:       uint64(bs),
		ServerFlags:     flags,
		Timeout:         0,
		DeadConnTimeout: a.opts.DeadConnTimeout,
		ClientFlags:     ClientDestroyOnDisconnect,
		BackendID:       req.VolumeID,
		Sockets:         []int{kfd},
	})
	unix.Close(kfd) // the kernel holds its own reference
	if err != nil {
		conn.Close()
		return nil, err
	}
	att := Attachment{
		VolumeID:   req.VolumeID,
		DevicePath: a.sys.devicePath(idx),
		Index:      idx,
		ImagePath:  req.ImagePath,
		BackendID:  req.VolumeID,
		Generation: 1,
		ReadOnly:   req.ReadOnly,
		Kind:       a.Kind(),
	}
	s, err := a.start(att, exp, flags, req.Backend, conn)
	if err != nil {
		conn.Close()
		a.nl.Disconnect(idx)
		return nil, err
	}
	if err := a.afterConnect(ctx, s, size); err != nil {
		a.abandon(s)
		return nil, err
	}
	if err := a.store.Save(att); err != nil {
		a.abandon(s)
		return nil, err
	}
	return &att, nil
}

// afterConnect waits for the device and sets its request timer.
func (a *NetlinkAttacher) afterConnect(ctx context.Context, s *served, size uint64) error {
	idx := s.attachment().Index
	if err := a.sys.waitDevice(ctx, idx, size, a.opts.DeviceTimeout); err != nil {
		return err
	}
	if a.opts.RequeueInterval > 0 {
		if err := a.sys.setIOTimeout(idx, a.opts.RequeueInterval); err != nil {
			return fmt.Errorf("nbd: setting the request timer of nbd%d: %w", idx, err)
		}
	}
	return nil
}

// abandon undoes a half-done Attach.
func (a *NetlinkAttacher) abandon(s *served) {
	close(s.detaching)
	a.nl.Disconnect(s.attachment().Index)
	select {
	case <-s.done:
	case <-time.After(5 * time.Second):
		s.cancel()
		<-s.done
	}
}

// start registers s and runs its serving loop.
func (a *NetlinkAttacher) start(att Attachment, exp *Export, flags TransmissionFlags, b Backend, conn net.Conn) (*served, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.stopping {
		return nil, ErrStopped
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &served{
		att: att, exp: exp, flags: flags, backend: b,
		ctx: ctx, cancel: cancel,
		detaching: make(chan struct{}),
		done:      make(chan struct{}),
	}
	a.live[att.VolumeID] = s
	go a.serve(s, conn)
	return s, nil
}

// serve runs the transmission phase until the volume is detached, the
// device disconnected, or the attacher shut down. A connection that breaks
// on our side (a protocol or write error) is replaced with RECONFIGURE, as
// after a restart; a clean end (NBD_CMD_DISC, or the kernel shutting the
// socket down, which it does only when disconnecting) ends the attachment.
func (a *NetlinkAttacher) serve(s *served, conn net.Conn) {
	defer close(s.done)
	defer func() {
		a.mu.Lock()
		if a.live[s.att.VolumeID] == s {
			delete(a.live, s.att.VolumeID)
		}
		a.mu.Unlock()
		if c, ok := s.backend.(io.Closer); ok {
			if err := c.Close(); err != nil {
				a.report(s, fmt.Errorf("closing backend: %w", err))
			}
		}
	}()
	for {
		err := a.srv.ServeTransmission(s.ctx, conn, s.exp, s.flags)
		if s.ctx.Err() != nil {
			return // Shutdown: the device stays, parked, for the next process
		}
		select {
		case <-s.detaching:
			return
		default:
		}
		if err == nil {
			// Disconnected by someone else (another process's Detach,
			// nbd-client -d): the record goes with the device.
			if rerr := a.store.Remove(s.att.VolumeID); rerr != nil {
				a.report(s, rerr)
			}
			return
		}
		a.report(s, fmt.Errorf("connection broke, reconnecting: %w", err))
		if conn, err = a.reconnect(s.ctx, s); err != nil {
			a.report(s, err)
			return
		}
	}
}

// reconnect gives the device a new socket, retrying while the kernel has
// not yet noticed that the old one is dead.
//
// Kernel quirk (drivers/block/nbd.c, nbd_genl_reconfigure): when no
// connection of the device is dead, RECONFIGURE drops the new socket and
// still answers success (it turns -ENOSPC into 0). Whether the kernel took
// the socket shows on our end: once we close our copy of the kernel's end,
// our end reads EOF unless the kernel holds it.
func (a *NetlinkAttacher) reconnect(ctx context.Context, s *served) (net.Conn, error) {
	att := s.attachment()
	deadline := time.Now().Add(a.opts.ReconfigureWait)
	for {
		conn, kfd, err := socketPair()
		if err != nil {
			return nil, err
		}
		err = a.nl.Reconfigure(ReconfigureConfig{Index: att.Index, BackendID: att.BackendID, Sockets: []int{kfd}})
		unix.Close(kfd)
		if err == nil {
			var dropped bool
			if dropped, err = peerClosed(conn); err == nil && dropped {
				err = ErrDeviceBusy
			}
		}
		if err == nil {
			att.Generation++
			s.mu.Lock()
			s.att = att
			s.mu.Unlock()
			if serr := a.store.Save(att); serr != nil {
				a.report(s, serr)
			}
			return conn, nil
		}
		conn.Close()
		busy := errors.Is(err, ErrDeviceBusy) || errors.Is(err, syscall.ENOSPC)
		if !busy || time.Now().After(deadline) {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (a *NetlinkAttacher) report(s *served, err error) {
	if a.opts.OnServeError != nil {
		a.opts.OnServeError(s.att.VolumeID, err)
	}
}

func (s *served) attachment() Attachment {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.att
}

func (a *NetlinkAttacher) lookup(volumeID string) *served {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.live[volumeID]
}

// Resize tells the kernel that volumeID's backend has grown (or shrunk)
// to size bytes: NBD_CMD_RECONFIGURE with NBD_ATTR_SIZE_BYTES, then wait
// until /dev/nbdN shows the new size. The backend must already have the
// size: the kernel asks for the new blocks at once (partition scan, and
// whatever the pod does next).
func (a *NetlinkAttacher) Resize(ctx context.Context, volumeID string, size int64) error {
	unlock := a.locks.lock(volumeID)
	defer unlock()
	s := a.lookup(volumeID)
	if s == nil {
		if rec, err := a.store.Get(volumeID); err == nil {
			return fmt.Errorf("%w: %q at %s", ErrNotServed, volumeID, rec.DevicePath)
		}
		return fmt.Errorf("nbd: resize: volume %q is not attached", volumeID)
	}
	if got := s.backend.Size(); got != size {
		return fmt.Errorf("nbd: resize %q: the backend is %d bytes, not %d", volumeID, got, size)
	}
	if bs := int64(s.exp.MinBlockSize); size <= 0 || size%bs != 0 {
		return fmt.Errorf("nbd: resize %q: size %d is not a positive multiple of the block size %d", volumeID, size, bs)
	}
	att := s.attachment()
	sz := uint64(size)
	if err := a.nl.Reconfigure(ReconfigureConfig{Index: att.Index, BackendID: att.BackendID, Size: &sz}); err != nil {
		return err
	}
	return a.sys.waitDevice(ctx, att.Index, sz, a.opts.DeviceTimeout)
}

// Detach implements Attacher: flush through the device, DISCONNECT (the
// kernel sends NBD_CMD_DISC), wait until our server has seen it and
// flushed the backend, drop the record. Detaching a volume served by
// another process disconnects its device; that process sees the DISC and
// lets go of the volume.
func (a *NetlinkAttacher) Detach(ctx context.Context, volumeID string) error {
	unlock := a.locks.lock(volumeID)
	defer unlock()

	s := a.lookup(volumeID)
	var att Attachment
	if s != nil {
		att = s.attachment()
	} else {
		rec, err := a.store.Get(volumeID)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		att = rec
	}
	id, exists, err := a.sys.backend(att.Index)
	if err != nil {
		return err
	}
	if exists && id == att.BackendID {
		// The device's page cache may hold writes the server has not seen.
		if s != nil {
			if err := a.sys.flushDevice(att.Index); err != nil {
				return fmt.Errorf("nbd: detach %q: flushing %s: %w", volumeID, att.DevicePath, err)
			}
			close(s.detaching)
		}
		if err := a.nl.Disconnect(att.Index); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
			return err
		}
		if s != nil {
			select {
			case <-s.done:
			case <-ctx.Done():
				return fmt.Errorf("nbd: detach %q: waiting for the kernel's disconnect: %w", volumeID, ctx.Err())
			}
		}
	} else if s != nil {
		// The device is gone (or is no longer ours): stop serving.
		close(s.detaching)
		s.cancel()
		<-s.done
	}
	return a.store.Remove(volumeID)
}

// List implements Attacher: the records, with what this process serves.
func (a *NetlinkAttacher) List(ctx context.Context) ([]Attachment, error) {
	return a.store.List()
}

// Recover implements Attacher. For each record: a device that is gone
// drops the record; a device whose backend id differs is never touched
// (ErrBackendMismatch, record dropped: the index now belongs to someone
// else); otherwise the device gets a new socket with RECONFIGURE (refused
// while another process still serves it), the image is reopened with open,
// and the kernel resends what it had parked. Records already served by this process are returned as they are.
// The returned error joins the failures of individual records; the
// attachments returned are the ones served.
func (a *NetlinkAttacher) Recover(ctx context.Context, open func(Attachment) (Backend, error)) ([]Attachment, error) {
	recs, lerr := a.store.List()
	errs := []error{lerr}
	var status map[int]bool
	if devs, err := a.nl.Status(-1); err == nil {
		status = make(map[int]bool, len(devs))
		for _, d := range devs {
			status[d.Index] = d.Connected
		}
	} else {
		errs = append(errs, err)
	}
	var out []Attachment
	for _, rec := range recs {
		att, err := a.recoverOne(ctx, rec, status, open)
		if err != nil {
			errs = append(errs, fmt.Errorf("nbd: recovering %q (nbd%d): %w", rec.VolumeID, rec.Index, err))
			continue
		}
		if att != nil {
			out = append(out, *att)
		}
	}
	return out, errors.Join(errs...)
}

func (a *NetlinkAttacher) recoverOne(ctx context.Context, rec Attachment, status map[int]bool, open func(Attachment) (Backend, error)) (*Attachment, error) {
	unlock := a.locks.lock(rec.VolumeID)
	defer unlock()
	if s := a.lookup(rec.VolumeID); s != nil {
		att := s.attachment()
		return &att, nil
	}
	id, exists, err := a.sys.backend(rec.Index)
	if err != nil {
		return nil, err
	}
	connected, listed := status[rec.Index]
	if !exists || (status != nil && (!listed || !connected)) {
		return nil, a.store.Remove(rec.VolumeID)
	}
	if id != rec.BackendID {
		// Never touch a device that is not ours.
		if rerr := a.store.Remove(rec.VolumeID); rerr != nil {
			return nil, errors.Join(rerr, ErrBackendMismatch)
		}
		return nil, fmt.Errorf("%w: the device says %q, the record %q", ErrBackendMismatch, id, rec.BackendID)
	}
	// RECONFIGURE before opening the image: while another process still
	// serves the device the kernel does not take our socket
	// (ErrDeviceBusy), and the image must not be opened by two processes at
	// once.
	tmp := &served{att: rec}
	conn, err := a.reconnect(ctx, tmp)
	if err != nil {
		return nil, err
	}
	// From here the kernel sends the parked requests to conn; they wait in
	// the socket until the server starts. Closing conn on failure parks
	// them again.
	b, err := open(rec)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("reopening %s: %w", rec.ImagePath, err)
	}
	bs, err := a.sys.logicalBlockSize(rec.Index)
	if err != nil {
		bs = DefaultMinBlockSize
	}
	exp := &Export{Name: rec.VolumeID, Backend: b, ReadOnly: rec.ReadOnly, MinBlockSize: bs}
	flags, err := exp.Flags()
	if err == nil {
		if sectors, serr := a.sys.sectors(rec.Index); serr == nil && sectors*512 != uint64(b.Size()) {
			err = fmt.Errorf("image size %d differs from the device's %d", b.Size(), sectors*512)
		}
	}
	if err != nil {
		conn.Close()
		closeBackend(b)
		return nil, err
	}
	att := tmp.attachment()
	att.Kind = a.Kind()
	att.DevicePath = a.sys.devicePath(rec.Index)
	if _, err := a.start(att, exp, flags, b, conn); err != nil {
		conn.Close()
		closeBackend(b)
		return nil, err
	}
	if a.opts.RequeueInterval > 0 {
		a.sys.setIOTimeout(rec.Index, a.opts.RequeueInterval)
	}
	return &att, nil
}

func closeBackend(b Backend) {
	if c, ok := b.(io.Closer); ok {
		c.Close()
	}
}

// Shutdown is the graceful stop: every serving loop stops reading
// requests, finishes the ones in flight, flushes its backend and closes its
// socket, so the kernel parks further I/O (for DeadConnTimeout) until the
// next process recovers the devices. Devices and records stay. Attach and
// Recover fail afterwards.
func (a *NetlinkAttacher) Shutdown(ctx context.Context) error {
	a.mu.Lock()
	a.stopping = true
	all := make([]*served, 0, len(a.live))
	for _, s := range a.live {
		all = append(all, s)
	}
	a.mu.Unlock()
	for _, s := range all {
		s.cancel()
	}
	for _, s := range all {
		select {
		case <-s.done:
		case <-ctx.Done():
			return fmt.Errorf("nbd: shutdown: %w", ctx.Err())
		}
	}
	return nil
}

// Served reports whether this process serves volumeID, and the channel
// closed when it stops serving it (detach, disconnect or shutdown).
func (a *NetlinkAttacher) Served(volumeID string) (<-chan struct{}, bool) {
	s := a.lookup(volumeID)
	if s == nil {
		return nil, false
	}
	return s.done, true
}

// keyedMutex is a per-key lock: operations on one volume are serialised,
// different volumes proceed in parallel.
type keyedMutex struct {
	mu sync.Mutex
	m  map[string]*keyedEntry
}

type keyedEntry struct {
	mu   sync.Mutex
	refs int
}

func (k *keyedMutex) lock(key string) (unlock func()) {
	k.mu.Lock()
	if k.m == nil {
		k.m = make(map[string]*keyedEntry)
	}
	e := k.m[key]
	if e == nil {
		e = &keyedEntry{}
		k.m[key] = e
	}
	e.refs++
	k.mu.Unlock()
	e.mu.Lock()
	return func() {
		e.mu.Unlock()
		k.mu.Lock()
		if e.refs--; e.refs == 0 {
			delete(k.m, key)
		}
		k.mu.Unlock()
	}
}
