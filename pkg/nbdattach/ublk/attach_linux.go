//go:build linux

package ublk

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
)

// Attacher exposes zoned volumes as /dev/ublkbN: the nbdattach.Attacher
// of nodes whose kernel has zoned ublk. Devices are created with
// UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE, so when the
// serving process dies the kernel keeps the device and queues its I/O
// (requests the dead process held are reissued), and Recover in the next
// process takes every recorded device over.
type Attacher struct {
	store *nbdattach.StateStore
	opts  AttacherOptions

	mu   sync.Mutex
	live map[string]*attached
}

type attached struct {
	dev *Device
	att nbdattach.Attachment
}

// AttacherOptions configure an Attacher.
type AttacherOptions struct {
	StateDir string  // attachment records (required)
	Device   Options // per-device options; recovery flags are added
	// OnServeError receives errors of the serving loops; may be nil.
	OnServeError func(volumeID string, err error)
}

var _ nbdattach.Attacher = (*Attacher)(nil)

// ErrNotZoned: ublk serves zoned backends only (the NBD attacher serves
// the rest).
var ErrNotZoned = errors.New("ublk: the backend is not a zoned device")

// ErrConflict: the volume is attached with another image.
var ErrConflict = errors.New("ublk: volume already attached with a different image")

// ErrForeignDevice: the recorded device carries another volume's tag.
var ErrForeignDevice = errors.New("ublk: the recorded device belongs to another volume")

// NewAttacher returns an attacher recording into o.StateDir.
func NewAttacher(o AttacherOptions) (*Attacher, error) {
	store, err := nbdattach.NewStateStore(o.StateDir)
	if err != nil {
		return nil, err
	}
	return &Attacher{store: store, opts: o, live: map[string]*attached{}}, nil
}

// Kind implements nbdattach.Attacher.
func (a *Attacher) Kind() string { return "ublk" }

// volumeTag is what the kernel keeps for us in ublksrv_flags.
func volumeTag(volumeID string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(volumeID))
	return h.Sum64() | 1 // never 0: 0 is "no tag"
}

// backendOf finds the zoned device behind an attach request's backend.
func backendOf(b nbdattach.Backend) (Backend, error) {
	switch v := b.(type) {
	case Backend:
		return v, nil
	case nbdattach.ZonedBackend:
		return v.D, nil
	case *nbdattach.ZonedBackend:
		return v.D, nil
	}
	return nil, fmt.Errorf("%w (%T)", ErrNotZoned, b)
}

func (a *Attacher) devOptions(volumeID string) Options {
	o := a.opts.Device
	o.FixedID = false
	o.Flags |= FlagUserRecovery | FlagUserRecoveryReissue
	o.Tag = volumeTag(volumeID)
	if a.opts.OnServeError != nil {
		o.OnError = func(err error) { a.opts.OnServeError(volumeID, err) }
	}
	return o
}

// Attach implements nbdattach.Attacher.
func (a *Attacher) Attach(ctx context.Context, req nbdattach.AttachRequest) (*nbdattach.Attachment, error) {
	if req.VolumeID == "" || req.Backend == nil {
		return nil, errors.New("ublk: attach needs a volume id and a backend")
	}
	b, err := backendOf(req.Backend)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if s := a.live[req.VolumeID]; s != nil {
		if s.att.ImagePath != req.ImagePath {
			return nil, fmt.Errorf("%w: %q is served from %s", ErrConflict, req.VolumeID, s.att.ImagePath)
		}
		att := s.att
		return &att, nil
	}
	if rec, err := a.store.Get(req.VolumeID); err == nil {
		return nil, fmt.Errorf("ublk: %q is recorded on %s but not served by this process (run Recover first)", req.VolumeID, rec.DevicePath)
	}
	o := a.devOptions(req.VolumeID)
	o.ReadOnly = req.ReadOnly
	if r, ok := req.Backend.(nbdattach.ReadOnlyer); ok && r.ReadOnly() {
		o.ReadOnly = true
	}
	dev, err := Start(b, o)
	if err != nil {
		return nil, err
	}
	att := nbdattach.Attachment{
		VolumeID: req.VolumeID, DevicePath: dev.BlockPath(), Index: int(dev.ID), ImagePath: req.ImagePath,
		BackendID: fmt.Sprintf("ublk-tag-%016x", volumeTag(req.VolumeID)), Generation: 1, ReadOnly: req.ReadOnly, Kind: a.Kind(),
	}
	if err := a.store.Save(att); err != nil {
		dev.Stop()
		return nil, err
	}
	a.live[req.VolumeID] = &attached{dev: dev, att: att}
	return &att, nil
}

// Detach implements nbdattach.Attacher: STOP_DEV (the kernel writes back
// and drains /dev/ublkbN through us), DEL_DEV, record removed. The backend
// stays open: its owner closes it. A recorded device served by another
// process (or by none, after a crash) is stopped through the control
// device, if it still carries the volume's tag.
func (a *Attacher) Detach(ctx context.Context, volumeID string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := a.live[volumeID]
	if s == nil {
		rec, err := a.store.Get(volumeID)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := stopRecorded(rec); err != nil {
			return fmt.Errorf("ublk: detach %q: %w", volumeID, err)
		}
		return a.store.Remove(volumeID)
	}
	if err := s.dev.Stop(); err != nil {
		return fmt.Errorf("ublk: detach %q: %w", volumeID, err)
	}
	delete(a.live, volumeID)
	return a.store.Remove(volumeID)
}

// stopRecorded stops a recorded device this process does not serve:
// another process serves it (its queue then ends, and it releases the
// device), or its server died and the kernel keeps it for recovery (the
// I/O it queued fails). A device that is gone already is fine; one that
// carries another volume's tag is left alone.
func stopRecorded(rec nbdattach.Attachment) error {
	ctrl, err := OpenControl()
	if err != nil {
		return err
	}
	defer ctrl.Close()
	info, err := ctrl.GetDevInfo(uint32(rec.Index))
	if errors.Is(err, unix.ENODEV) {
		return nil
	}
	if err != nil {
		return err
	}
	if info.ServerFlags != volumeTag(rec.VolumeID) {
		return fmt.Errorf("%w: %s", ErrForeignDevice, rec.DevicePath)
	}
	if err := ctrl.StopDev(info.DevID); err != nil && !errors.Is(err, unix.ENODEV) {
		return err
	}
	return DeleteDevice(ctrl, info.DevID)
}

// KernelState describes rec's device as the kernel sees it: "gone",
// "foreign" (it carries another volume's tag), or its state ("live",
// "quiesced": its server died and its I/O waits for Recover, "dead",
// "fail-io"), with the pid of the process serving it.
func KernelState(c *Control, rec nbdattach.Attachment) (string, int32, error) {
	info, err := c.GetDevInfo(uint32(rec.Index))
	if errors.Is(err, unix.ENODEV) {
		return "gone", 0, nil
	}
	if err != nil {
		return "", 0, err
	}
	if info.ServerFlags != volumeTag(rec.VolumeID) {
		return "foreign", info.ServerPID, nil
	}
	switch info.State {
	case StateLive:
		return "live", info.ServerPID, nil
	case StateQuiesced:
		return "quiesced", info.ServerPID, nil
	case StateDead:
		return "dead", info.ServerPID, nil
	case StateFailIO:
		return "fail-io", info.ServerPID, nil
	}
	return fmt.Sprintf("state-%d", info.State), info.ServerPID, nil
}

// Served returns a channel closed when this process stops serving
// volumeID's device (detached here or by another process, or abandoned),
// and false when this process does not serve it.
func (a *Attacher) Served(volumeID string) (<-chan struct{}, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := a.live[volumeID]
	if s == nil {
		return nil, false
	}
	return s.dev.Done(), true
}

// List implements nbdattach.Attacher.
func (a *Attacher) List(ctx context.Context) ([]nbdattach.Attachment, error) {
	recs, err := a.store.List()
	var out []nbdattach.Attachment
	for _, r := range recs {
		if r.Kind == a.Kind() {
			out = append(out, r)
		}
	}
	return out, err
}

// Recover implements nbdattach.Attacher: each recorded device still known
// to the kernel, carrying the record's volume tag, is taken over with the
// backend open returns; records whose device is gone are removed.
func (a *Attacher) Recover(ctx context.Context, open func(nbdattach.Attachment) (nbdattach.Backend, error)) ([]nbdattach.Attachment, error) {
	recs, err := a.List(ctx)
	errs := []error{err}
	var out []nbdattach.Attachment
	for _, rec := range recs {
		att, err := a.recoverOne(rec, open)
		if err != nil {
			errs = append(errs, fmt.Errorf("ublk: recovering %q (%s): %w", rec.VolumeID, rec.DevicePath, err))
			continue
		}
		if att != nil {
			out = append(out, *att)
		}
	}
	return out, errors.Join(errs...)
}

func (a *Attacher) recoverOne(rec nbdattach.Attachment, open func(nbdattach.Attachment) (nbdattach.Backend, error)) (*nbdattach.Attachment, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if s := a.live[rec.VolumeID]; s != nil {
		att := s.att
		return &att, nil
	}
	ctrl, err := OpenControl()
	if err != nil {
		return nil, err
	}
	info, err := ctrl.GetDevInfo(uint32(rec.Index))
	ctrl.Close()
	if errors.Is(err, unix.ENODEV) {
		return nil, a.store.Remove(rec.VolumeID) // the device is gone
	}
	if err != nil {
		return nil, err
	}
	if info.ServerFlags != volumeTag(rec.VolumeID) {
		return nil, ErrForeignDevice
	}
	nb, err := open(rec)
	if err != nil {
		return nil, err
	}
	b, err := backendOf(nb)
	if err != nil {
		return nil, err
	}
	dev, err := Recover(uint32(rec.Index), b, a.devOptions(rec.VolumeID))
	if err != nil {
		return nil, err
	}
	att := rec
	att.Generation++
	if err := a.store.Save(att); err != nil {
		return nil, err
	}
	a.live[rec.VolumeID] = &attached{dev: dev, att: att}
	return &att, nil
}

// Abandon stops serving every device without stopping them (a graceful
// restart of the serving process): Recover in the next process takes them
// over.
func (a *Attacher) Abandon() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	var errs []error
	for v, s := range a.live {
		errs = append(errs, s.dev.Abandon())
		delete(a.live, v)
	}
	return errors.Join(errs...)
}
