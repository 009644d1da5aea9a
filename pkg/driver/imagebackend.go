package driver

import (
	"syscall"
	"time"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
	"github.com/zq-csi/zq-csi/pkg/qcow2"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// slotBackend serves a staged volume's zoned device (nbdattach.ZonedBackend:
// zone rules enforced, zones visible through zq:zones) to an attacher.
// Every request holds the slot's gate shared, so Images can freeze the
// volume (snapshot, expansion, limit change) and reopen the device under
// it; a request that finds no device fails rather than blocks.
type slotBackend struct {
	s  *imageSlot
	ro bool
	// obs counts what the backend serves (metrics.go); nil: nothing.
	obs *volumeObserver
}

var (
	_ nbdattach.Backend       = (*slotBackend)(nil)
	_ nbdattach.BlockStatuser = (*slotBackend)(nil)
	_ nbdattach.MetaContexter = (*slotBackend)(nil)
	_ nbdattach.Orderer       = (*slotBackend)(nil)
)

// OrderKey keeps the zone write order of the zoned device: writes to one
// sequential zone that the kernel has in flight together are applied in
// the order they were sent.
func (b *slotBackend) OrderKey(off, length int64) (int64, bool) {
	z, done, err := b.zb()
	if err != nil {
		return 0, false
	}
	defer done()
	return z.OrderKey(off, length)
}

func (b *slotBackend) zb() (nbdattach.ZonedBackend, func(), error) {
	b.s.gate.RLock()
	if b.s.dev == nil {
		b.s.gate.RUnlock()
		return nbdattach.ZonedBackend{}, nil, qcow2.ErrClosed
	}
	return nbdattach.ZonedBackend{D: b.s.dev}, b.s.gate.RUnlock, nil
}

func (b *slotBackend) ReadAt(p []byte, off int64) (n int, err error) {
	defer b.obs.done(opRead, time.Now(), &err, func() { b.obs.st.read.Add(uint64(n)) })
	z, done, err := b.zb()
	if err != nil {
		return 0, err
	}
	defer done()
	return z.ReadAt(p, off)
}

func (b *slotBackend) WriteAt(p []byte, off int64, fua bool) (n int, err error) {
	defer b.obs.done(opWrite, time.Now(), &err, func() { b.obs.st.written.Add(uint64(n)) })
	if b.ro {
		return 0, syscall.EPERM
	}
	z, done, err := b.zb()
	if err != nil {
		return 0, err
	}
	defer done()
	return z.WriteAt(p, off, fua)
}

func (b *slotBackend) Flush() (err error) {
	defer b.obs.done(opFlush, time.Now(), &err, nil)
	z, done, err := b.zb()
	if err != nil {
		return err
	}
	defer done()
	return z.Flush()
}

func (b *slotBackend) Trim(off, length int64) (err error) {
	// On NBD a whole-zone TRIM is the zone reset (spec §6).
	resets := uint64(0)
	defer b.obs.done(opTrim, time.Now(), &err, func() { b.obs.st.resets.Add(resets) })
	if b.ro {
		return syscall.EPERM
	}
	z, done, err := b.zb()
	if err != nil {
		return err
	}
	defer done()
	if b.obs != nil {
		resets = wholeSequentialZones(b.s.dev.Geometry(), off, length)
	}
	return z.Trim(off, length)
}

func (b *slotBackend) WriteZeroes(off, length int64, noHole bool) (err error) {
	defer b.obs.done(opWriteZeroes, time.Now(), &err, func() { b.obs.st.written.Add(uint64(length)) })
	if b.ro {
		return syscall.EPERM
	}
	z, done, err := b.zb()
	if err != nil {
		return err
	}
	defer done()
	return z.WriteZeroes(off, length, noHole)
}

func (b *slotBackend) Size() int64 {
	z, done, err := b.zb()
	if err != nil {
		return 0
	}
	defer done()
	return z.Size()
}

func (b *slotBackend) ReadOnly() bool { return b.ro }

func (b *slotBackend) MetaContexts() []string { return nbdattach.ZonedBackend{}.MetaContexts() }

func (b *slotBackend) BlockStatus(ctx string, off, length int64) ([]nbdattach.Extent, error) {
	z, done, err := b.zb()
	if err != nil {
		return nil, err
	}
	defer done()
	return z.BlockStatus(ctx, off, length)
}

// The ublk exporter (ublk.Backend) serves the zone interface itself —
// zone append, zone management, zone reports — so those go straight to
// the zoned device, under the same gate.

func (b *slotBackend) Append(zone int, p []byte, fua bool) (off uint64, err error) {
	defer b.obs.done(opAppend, time.Now(), &err, func() {
		b.obs.st.written.Add(uint64(len(p)))
		b.obs.st.appends.Add(1)
	})
	if b.ro {
		return 0, syscall.EPERM
	}
	b.s.gate.RLock()
	defer b.s.gate.RUnlock()
	if b.s.dev == nil {
		return 0, qcow2.ErrClosed
	}
	return b.s.dev.Append(zone, p, fua)
}

func (b *slotBackend) Mgmt(op zoned.Op, off, length uint64) (err error) {
	defer b.obs.done(opZoneMgmt, time.Now(), &err, func() { b.obs.mgmt(op) })
	if b.ro {
		return syscall.EPERM
	}
	b.s.gate.RLock()
	defer b.s.gate.RUnlock()
	if b.s.dev == nil {
		return qcow2.ErrClosed
	}
	return b.s.dev.Mgmt(op, off, length)
}

// Report returns no zones while the device is closed (ublk answers a
// report of fewer zones than asked with zeroed entries).
func (b *slotBackend) Report(start, n int) []zoned.ZoneReport {
	b.s.gate.RLock()
	defer b.s.gate.RUnlock()
	if b.s.dev == nil {
		return nil
	}
	return b.s.dev.Report(start, n)
}

// Geometry is read once when a ublk device is created or recovered: the
// kernel fixes the zone size, count and limits then. A limit lowered
// later (ControllerModifyVolume) is enforced by the engine all the same.
func (b *slotBackend) Geometry() zoned.Geometry {
	b.s.gate.RLock()
	defer b.s.gate.RUnlock()
	if b.s.dev == nil {
		return zoned.Geometry{}
	}
	return b.s.dev.Geometry()
}
