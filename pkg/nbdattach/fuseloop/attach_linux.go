package fuseloop

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
)

// Kind is what Attacher.Kind returns.
const Kind = "fuse-loop"

// maxWrite keeps a WRITE request with its header inside one pipe (1 MiB)
// so go-fuse can splice it.
const maxWrite = 512 << 10

// maxBackground is the FUSE max_background: the kernel has at most this
// many asynchronous requests outstanding, so such requests cannot overtake
// each other in the server's reader goroutines. Measured on kernel 6.18
// (fio --rw=write --iodepth=8 --bs=4k over a 64 MiB sequential zone,
// TestFioOrderingExperiment): no reordering with 1, 12 or 64, loop direct
// I/O on or off, because go-fuse does not negotiate FUSE_ASYNC_DIO, so
// the loop worker's writes reach the server one at a time in queue order.
// 1 guards against that changing; its cost was within the noise
// (80-145 MiB/s either way). A variable for the experiment.
var maxBackground = 1

// Options configure an Attacher.
type Options struct {
	// StateDir holds the attachment records (records/) and the FUSE mount
	// points (fuse/<volume>/).
	StateDir string
	// NoDirectIO attaches loop devices without LO_FLAGS_DIRECT_IO.
	NoDirectIO bool
	// OnEvent receives what the attacher did that an operator may want to
	// know (attach, detach, fallbacks), as a message and key/value pairs
	// in the style of klog.InfoS; nil drops them. This package does not
	// log.
	OnEvent func(msg string, keysAndValues ...any)
}

// Attacher exposes each backend as the file <StateDir>/fuse/<volume>/disk
// of a FUSE filesystem served by this process, with a loop device on top.
// The FUSE server lives in this process: after a restart the mount is dead,
// so Recover replaces the attachment (the old loop device fails I/O with
// EIO/ENOTCONN until then); nbd and ublk attachments survive a restart, this
// one does not.
type Attacher struct {
	dir   string
	store *nbdattach.StateStore
	noDIO bool
	event func(msg string, keysAndValues ...any)

	mu   sync.Mutex
	vols map[string]*volume
}

type volume struct {
	att     nbdattach.Attachment
	backend nbdattach.Backend
	node    *diskNode
	server  *fuse.Server
	mnt     string
	file    *os.File // the FUSE file while binding the loop device
	loop    *os.File // /dev/loopN, held open
	dio     bool
}

var _ nbdattach.Attacher = (*Attacher)(nil)

// New checks that /dev/fuse and /dev/loop-control are usable and returns an
// Attacher keeping its state under o.StateDir.
func New(o Options) (*Attacher, error) {
	if err := Available(); err != nil {
		return nil, err
	}
	if o.StateDir == "" {
		return nil, errors.New("fuse-loop: no state directory")
	}
	st, err := nbdattach.NewStateStore(filepath.Join(o.StateDir, "records"))
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(o.StateDir, "fuse"), 0o700); err != nil {
		return nil, err
	}
	event := o.OnEvent
	if event == nil {
		event = func(string, ...any) {}
	}
	return &Attacher{dir: o.StateDir, store: st, noDIO: o.NoDirectIO, event: event, vols: map[string]*volume{}}, nil
}

// Available reports why this host cannot run the attacher, or nil.
func Available() error {
	for _, p := range []string{"/dev/fuse", "/dev/loop-control"} {
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("fuse-loop needs %s: %w", p, err)
		}
		f.Close()
	}
	return nil
}

func (a *Attacher) Kind() string { return Kind }

func (a *Attacher) mountPoint(volumeID string) string {
	// Volume ids may contain '/'; keep one directory per volume.
	return filepath.Join(a.dir, "fuse", strings.NewReplacer("/", "_", "\x00", "_").Replace(volumeID))
}

// Attach mounts the volume's FUSE filesystem and binds a loop device to its
// file; DevicePath is /dev/loopN.
func (a *Attacher) Attach(ctx context.Context, req nbdattach.AttachRequest) (*nbdattach.Attachment, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if v, ok := a.vols[req.VolumeID]; ok {
		if v.att.ImagePath != req.ImagePath {
			return nil, fmt.Errorf("fuse-loop: volume %s is attached with image %s, not %s", req.VolumeID, v.att.ImagePath, req.ImagePath)
		}
		att := v.att
		return &att, nil
	}
	prev, err := a.store.Get(req.VolumeID)
	gen, idx := uint64(1), -1
	if err == nil {
		gen, idx = prev.Generation+1, prev.Index
		a.cleanStale(prev)
	}
	v, err := a.attach(req, idx)
	if err != nil {
		return nil, err
	}
	v.att.Generation = gen
	if err := a.store.Save(v.att); err != nil {
		a.teardown(v)
		return nil, err
	}
	a.vols[req.VolumeID] = v
	a.event("Attached volume through FUSE and loop", "volumeID", req.VolumeID, "device", v.att.DevicePath, "mount", v.mnt, "directIO", v.dio)
	att := v.att
	return &att, nil
}

func (a *Attacher) attach(req nbdattach.AttachRequest, wantIdx int) (_ *volume, err error) {
	if req.Backend == nil {
		return nil, errors.New("fuse-loop: no backend")
	}
	bs := req.BlockSize
	if bs == 0 {
		bs = 512
	}
	if bs != 512 && bs != 1024 && bs != 2048 && bs != 4096 {
		return nil, fmt.Errorf("fuse-loop: block size %d is not 512..4096", bs)
	}
	ro := req.ReadOnly
	if r, ok := req.Backend.(nbdattach.ReadOnlyer); ok && r.ReadOnly() {
		ro = true
	}
	v := &volume{backend: req.Backend, mnt: a.mountPoint(req.VolumeID)}
	defer func() {
		if err != nil {
			a.teardown(v)
		}
	}()
	unmountStale(v.mnt)
	if err := os.MkdirAll(v.mnt, 0o700); err != nil {
		return nil, err
	}
	v.node = &diskNode{b: req.Backend, readOnly: ro}
	long := time.Hour // the file never changes behind the kernel's back
	v.server, err = fs.Mount(v.mnt, &rootNode{disk: v.node}, &fs.Options{
		EntryTimeout: &long,
		AttrTimeout:  &long,
		MountOptions: fuse.MountOptions{
			FsName:            "zq-csi:" + req.VolumeID,
			Name:              "zq-csi",
			DirectMountStrict: true, // no fusermount in the node image
			DisableXAttrs:     true,
			MaxWrite:          maxWrite,
			MaxBackground:     maxBackground,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("fuse-loop: mounting %s: %w", v.mnt, err)
	}
	flags := os.O_RDWR
	if ro {
		flags = os.O_RDONLY
	}
	v.file, err = os.OpenFile(filepath.Join(v.mnt, diskName), flags, 0)
	if err != nil {
		return nil, fmt.Errorf("fuse-loop: opening the FUSE file: %w", err)
	}
	v.loop, err = bindLoop(v.file, wantIdx, bs, ro, !a.noDIO)
	if err != nil {
		return nil, err
	}
	// The loop device holds its own reference to the file. Ours must go:
	// a FUSE server holding its own file open hangs in exit (close sends
	// FUSE_FLUSH, which the dying server never answers).
	v.file.Close()
	v.file = nil
	info, err := unix.IoctlLoopGetStatus64(int(v.loop.Fd()))
	if err != nil {
		return nil, fmt.Errorf("fuse-loop: LOOP_GET_STATUS64: %w", err)
	}
	v.dio = info.Flags&unix.LO_FLAGS_DIRECT_IO != 0
	if !a.noDIO && !v.dio {
		a.event("The loop driver refused direct I/O on the FUSE file; using buffered loop I/O (the FUSE file is still direct_io)", "volumeID", req.VolumeID)
	}
	v.att = nbdattach.Attachment{
		VolumeID: req.VolumeID, DevicePath: v.loop.Name(), Index: int(info.Number),
		ImagePath: req.ImagePath, BackendID: req.VolumeID, ReadOnly: ro, Kind: Kind,
	}
	return v, nil
}

// bindLoop binds f to a free loop device (wantIdx first when >= 0) and
// returns the open device.
func bindLoop(f *os.File, wantIdx int, bs uint32, ro, dio bool) (*os.File, error) {
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer ctl.Close()
	cfg := unix.LoopConfig{Fd: uint32(f.Fd()), Size: bs}
	cfg.Info.Flags = unix.LO_FLAGS_AUTOCLEAR
	if ro {
		cfg.Info.Flags |= unix.LO_FLAGS_READ_ONLY
	}
	if dio {
		cfg.Info.Flags |= unix.LO_FLAGS_DIRECT_IO
	}
	copy(cfg.Info.File_name[:len(cfg.Info.File_name)-1], f.Name())
	for attempt := 0; attempt < 16; attempt++ {
		idx := wantIdx
		if attempt > 0 || idx < 0 {
			idx, err = unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
			if err != nil {
				return nil, fmt.Errorf("fuse-loop: LOOP_CTL_GET_FREE: %w", err)
			}
		} else {
			// Create the device if it is gone (EEXIST when it is not).
			unix.Syscall(unix.SYS_IOCTL, ctl.Fd(), unix.LOOP_CTL_ADD, uintptr(idx))
		}
		name := fmt.Sprintf("/dev/loop%d", idx)
		dev, err := os.OpenFile(name, flagsFor(ro), 0)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) && attempt == 0 && wantIdx >= 0 {
				continue
			}
			return nil, fmt.Errorf("fuse-loop: %w", err)
		}
		c := cfg
		err = unix.IoctlLoopConfigure(int(dev.Fd()), &c)
		if err == nil {
			return dev, nil
		}
		dev.Close()
		if errors.Is(err, syscall.EINVAL) && dio {
			// Kernels that refuse direct I/O here: bind without it.
			c.Info.Flags &^= unix.LO_FLAGS_DIRECT_IO
			if dev, err = os.OpenFile(name, flagsFor(ro), 0); err == nil {
				if err = unix.IoctlLoopConfigure(int(dev.Fd()), &c); err == nil {
					return dev, nil
				}
				dev.Close()
			}
		}
		if !errors.Is(err, syscall.EBUSY) {
			return nil, fmt.Errorf("fuse-loop: LOOP_CONFIGURE %s: %w", name, err)
		}
		// Taken between GET_FREE and CONFIGURE: try another.
	}
	return nil, errors.New("fuse-loop: no free loop device")
}

func flagsFor(ro bool) int {
	if ro {
		return os.O_RDONLY
	}
	return os.O_RDWR
}

// teardown releases whatever part of v exists: loop device, FUSE file,
// mount. It does not close the backend.
func (a *Attacher) teardown(v *volume) error {
	var errs []error
	if v.loop != nil {
		if err := unix.IoctlSetInt(int(v.loop.Fd()), unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, syscall.ENXIO) {
			errs = append(errs, fmt.Errorf("LOOP_CLR_FD %s: %w", v.loop.Name(), err))
		}
		v.loop.Close()
		v.loop = nil
	}
	if v.file != nil {
		v.file.Close()
		v.file = nil
	}
	if v.server != nil {
		// Server.Unmount retries for about 300 ms: the loop device lets go
		// of the file asynchronously.
		if err := v.server.Unmount(); err != nil {
			// Still busy: someone holds the loop device open, so the
			// kernel clears it at their last close. Detach the mount
			// lazily; the server ends with the last reference (I/O
			// until then fails: the backend is closed).
			a.event("The loop device is still open; unmounting the FUSE file lazily", "device", v.att.DevicePath, "mount", v.mnt)
			if lerr := unix.Unmount(v.mnt, unix.MNT_DETACH); lerr != nil {
				errs = append(errs, fmt.Errorf("unmounting %s: %w", v.mnt, err))
			}
		}
		v.server = nil
	}
	if err := os.Remove(v.mnt); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// unmountStale lazily unmounts a mount left at mnt by an earlier process.
func unmountStale(mnt string) {
	for i := 0; i < 4; i++ {
		if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
			return
		}
	}
}

// cleanStale removes what an earlier process left for rec: the loop device
// if it is still bound to rec's FUSE file, and the dead mount.
func (a *Attacher) cleanStale(rec nbdattach.Attachment) {
	mnt := a.mountPoint(rec.VolumeID)
	if rec.Index >= 0 {
		if dev, err := os.OpenFile(fmt.Sprintf("/dev/loop%d", rec.Index), os.O_RDONLY, 0); err == nil {
			if info, err := unix.IoctlLoopGetStatus64(int(dev.Fd())); err == nil &&
				strings.HasPrefix(unix.ByteSliceToString(info.File_name[:]), mnt) {
				if err := unix.IoctlSetInt(int(dev.Fd()), unix.LOOP_CLR_FD, 0); err != nil {
					a.event("Could not unbind a stale loop device", "device", dev.Name(), "err", err)
				}
			}
			dev.Close()
		}
	}
	unmountStale(mnt)
	os.Remove(mnt)
}

// Detach flushes the backend, unbinds the loop device, unmounts and closes
// the backend. Detaching a volume that is not attached succeeds.
func (a *Attacher) Detach(ctx context.Context, volumeID string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	v, ok := a.vols[volumeID]
	if !ok {
		if rec, err := a.store.Get(volumeID); err == nil {
			a.cleanStale(rec)
		}
		return ignoreMissing(a.store.Remove(volumeID))
	}
	var errs []error
	if err := v.backend.Flush(); err != nil {
		errs = append(errs, fmt.Errorf("flush: %w", err))
	}
	errs = append(errs, a.teardown(v))
	if c, ok := v.backend.(io.Closer); ok {
		errs = append(errs, c.Close())
	}
	delete(a.vols, volumeID)
	errs = append(errs, ignoreMissing(a.store.Remove(volumeID)))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("fuse-loop: detaching %s: %w", volumeID, err)
	}
	a.event("Detached volume", "volumeID", volumeID, "device", v.att.DevicePath)
	return nil
}

func ignoreMissing(err error) error {
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

// List returns the live attachments.
func (a *Attacher) List(context.Context) ([]nbdattach.Attachment, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]nbdattach.Attachment, 0, len(a.vols))
	for _, v := range a.vols {
		out = append(out, v.att)
	}
	return out, nil
}

// Recover replaces each recorded attachment: the FUSE server of the old
// process is gone, so the old loop device is unbound, the dead mount
// removed, and the volume attached again (on the same /dev/loopN when that
// device is free). I/O on the old device between the restart and Recover
// failed; a pod holding the old device open keeps a dead device until it
// reopens it.
func (a *Attacher) Recover(ctx context.Context, open func(nbdattach.Attachment) (nbdattach.Backend, error)) ([]nbdattach.Attachment, error) {
	recs, lerr := a.store.List()
	errs := []error{lerr}
	var out []nbdattach.Attachment
	for _, rec := range recs {
		a.mu.Lock()
		_, live := a.vols[rec.VolumeID]
		a.mu.Unlock()
		if live {
			continue
		}
		a.cleanStale(rec)
		b, err := open(rec)
		if err != nil {
			errs = append(errs, fmt.Errorf("reopening %s: %w", rec.ImagePath, err))
			a.store.Remove(rec.VolumeID)
			continue
		}
		att, err := a.Attach(ctx, nbdattach.AttachRequest{VolumeID: rec.VolumeID, ImagePath: rec.ImagePath, Backend: b, ReadOnly: rec.ReadOnly})
		if err != nil {
			if c, ok := b.(io.Closer); ok {
				c.Close()
			}
			errs = append(errs, err)
			a.store.Remove(rec.VolumeID)
			continue
		}
		if att.DevicePath != rec.DevicePath {
			a.event("Recovered volume on a different loop device", "volumeID", rec.VolumeID, "old", rec.DevicePath, "new", att.DevicePath)
		}
		out = append(out, *att)
	}
	return out, errors.Join(errs...)
}

// Shutdown flushes and releases every attachment but keeps the records,
// so that the next process's Recover attaches the volumes again.
func (a *Attacher) Shutdown(ctx context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	var errs []error
	for id, v := range a.vols {
		if err := v.backend.Flush(); err != nil {
			errs = append(errs, fmt.Errorf("%s: flush: %w", id, err))
		}
		errs = append(errs, a.teardown(v))
		if c, ok := v.backend.(io.Closer); ok {
			errs = append(errs, c.Close())
		}
		delete(a.vols, id)
	}
	return errors.Join(errs...)
}

// Resize makes the attached device follow its backend, which has grown to
// size: the kernel's cached attributes of the FUSE file are invalidated and
// reread, then LOOP_SET_CAPACITY resizes /dev/loopN.
func (a *Attacher) Resize(ctx context.Context, volumeID string, size int64) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	v, ok := a.vols[volumeID]
	if !ok {
		return fmt.Errorf("fuse-loop: volume %s is not attached", volumeID)
	}
	if got := v.backend.Size(); got != size {
		return fmt.Errorf("fuse-loop: the backend of %s is %d bytes, not %d", volumeID, got, size)
	}
	if errno := v.node.NotifyContent(-1, 0); errno != 0 {
		return fmt.Errorf("fuse-loop: invalidating the attributes of %s: %w", volumeID, errno)
	}
	fi, err := os.Stat(filepath.Join(v.mnt, diskName))
	if err != nil {
		return err
	}
	if fi.Size() != size {
		return fmt.Errorf("fuse-loop: the FUSE file of %s is still %d bytes, not %d", volumeID, fi.Size(), size)
	}
	if err := unix.IoctlSetInt(int(v.loop.Fd()), unix.LOOP_SET_CAPACITY, 0); err != nil {
		return fmt.Errorf("fuse-loop: LOOP_SET_CAPACITY %s: %w", v.loop.Name(), err)
	}
	a.event("Resized the loop device", "volumeID", volumeID, "device", v.att.DevicePath, "size", size)
	return nil
}

// MaxDevices is the loop driver's max_loop when set, else 256 (each
// attachment also costs a FUSE mount and server in this process).
func (a *Attacher) MaxDevices() int {
	if b, err := os.ReadFile("/sys/module/loop/parameters/max_loop"); err == nil {
		var n int
		if _, err := fmt.Sscan(strings.TrimSpace(string(b)), &n); err == nil && n > 0 {
			return n
		}
	}
	return 256
}
