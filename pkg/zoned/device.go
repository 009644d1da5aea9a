package zoned

import (
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

// Device is a host-managed zoned block device over a qcow2 image with the
// zoned extension: the Machine decides, the image stores.
//
// Durability (spec §5, DESIGN point 3). Two copies of the write pointers:
//
//   - the image's write-pointer table is the durable copy. It only moves
//     forward after an fsync has made the data it covers durable (Flush, FUA
//     writes, Close), and resets and finishes are written there, with an
//     fsync, before they are acknowledged. After a power loss it never
//     points past durable data.
//   - a live table in a sidecar file (<image>.wplive) receives every write
//     pointer change, write-through to the page cache, before the write is
//     acknowledged. It records the boot it was written in: after a crash of
//     the process on the same boot the page cache still holds everything
//     acknowledged, so Open takes the live pointers; after a reboot it
//     ignores them and uses the durable table.
type Device struct {
	img  *qcow2.Image
	m    *Machine
	g    Geometry
	ro   bool
	live *liveTable // nil when read-only

	// flushMu orders Flush against management commands, so a flush never
	// writes a pointer older than a reset that raced with it.
	flushMu sync.Mutex
	durable []uint64 // the write pointers in the image's table

	warnings []string // zone limits Open clamped (see Warnings)
}

// OpenOptions control Open.
type OpenOptions struct {
	ReadOnly bool
	// ForceShare (read-only only) opens the image while someone else
	// writes it, as qemu-img -U does (qcow2.OpenOptions.ForceShare): a
	// snapshot of the zones as of the open, which the writer then moves on.
	ForceShare bool
}

// Open opens the zoned image at path.
func Open(path string, o OpenOptions) (*Device, error) {
	img, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: o.ReadOnly, ForceShare: o.ForceShare})
	if err != nil {
		return nil, err
	}
	d, err := newDevice(img, path, o.ReadOnly)
	if err != nil {
		img.Close()
		return nil, err
	}
	return d, nil
}

// GeometryOf returns the zone geometry an image's zoned extension
// describes, with zone limits that are too large clamped (spec §2: clamped
// and reported, not refused; see Geometry.Clamp): warnings says what was
// changed, for the caller to print. The image is not modified.
func GeometryOf(inf qcow2.Info) (g Geometry, warnings []string, err error) {
	z := inf.Zoned
	if z == nil {
		return Geometry{}, nil, fmt.Errorf("%w: the image has no zoned extension (create it with -o zone.mode=host-managed)", ErrInvalidGeometry)
	}
	g = Geometry{
		Size: inf.VirtualSize, ZoneSize: z.ZoneSize, ZoneCapacity: z.ZoneCapacity, NrZones: z.NrZones,
		Conventional: z.ConventionalZones, MaxOpen: z.MaxOpenZones, MaxActive: z.MaxActiveZones,
		MaxAppendBytes: z.MaxAppendBytes,
	}
	g, warnings = g.Clamp()
	if err := g.Validate(); err != nil {
		return Geometry{}, nil, err
	}
	return g, warnings, nil
}

func newDevice(img *qcow2.Image, path string, ro bool) (*Device, error) {
	g, warnings, err := GeometryOf(img.Info())
	if err != nil {
		return nil, err
	}
	durable, _, err := img.WritePointers()
	if err != nil {
		return nil, err
	}
	wps := durable
	lt, livePtrs, err := openLiveTable(path+liveSuffix, g.NrZones, ro)
	if err != nil {
		return nil, err
	}
	if livePtrs != nil && !slices.Equal(livePtrs, durable) {
		// Same boot, the previous process died: the page cache holds all it
		// acknowledged. Refuse a live table that breaks the geometry rather
		// than guess.
		if _, err := NewMachine(g, livePtrs); err == nil {
			wps = livePtrs
		}
	}
	m, err := NewMachine(g, wps)
	if err != nil {
		lt.close()
		return nil, err
	}
	d := &Device{img: img, m: m, g: g, ro: ro, live: lt, durable: slices.Clone(durable), warnings: warnings}
	if !ro {
		// Make what we recovered durable now, so the durable table is
		// current before anything new is written.
		if err := d.Flush(); err != nil {
			lt.close()
			return nil, err
		}
		if err := lt.reset(m.WritePointers()); err != nil {
			lt.close()
			return nil, err
		}
	}
	return d, nil
}

// Geometry returns the zone geometry.
func (d *Device) Geometry() Geometry { return d.g }

// Warnings says which of the image's zone limits were too large and were
// lowered for this device (spec §2), one line each, for the caller to
// show; nil when none were. The image itself is left as it is.
func (d *Device) Warnings() []string { return d.warnings }

// Machine returns the zone state machine (for reports and counters).
func (d *Device) Machine() *Machine { return d.m }

// Image returns the underlying image.
func (d *Device) Image() *qcow2.Image { return d.img }

// Size returns the device size in bytes.
func (d *Device) Size() int64 { return int64(d.g.Size) }

// ReadAt reads p at off. Data at or beyond a write pointer reads as zeros
// (spec §4); reads are never refused inside the device.
func (d *Device) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, &ZoneError{Op: OpRead, Zone: -1, Offset: uint64(off), Length: uint64(len(p)), Err: ErrOutOfRange}
	}
	exts, err := d.m.ReadExtents(uint64(off), uint64(len(p)))
	if err != nil {
		return 0, err
	}
	for _, e := range exts {
		b := p[e.Offset-uint64(off) : e.Offset-uint64(off)+e.Length]
		if e.Zero {
			clear(b)
			continue
		}
		if _, err := d.img.ReadAt(b, int64(e.Offset)); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// WriteAt writes p at off: anywhere in conventional zones, exactly at the
// write pointer in sequential ones. With fua the data and the write pointer
// covering it are durable before it returns.
func (d *Device) WriteAt(p []byte, off int64, fua bool) (int, error) {
	if err := d.writable(); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, &ZoneError{Op: OpWrite, Zone: -1, Offset: uint64(off), Length: uint64(len(p)), Err: ErrOutOfRange}
	}
	pend, err := d.m.BeginWrite(uint64(off), uint64(len(p)))
	if err != nil {
		return 0, err
	}
	if err := d.finishWrite(pend, func() error { _, err := d.img.WriteAt(p, off); return err }); err != nil {
		return 0, err
	}
	if fua {
		if err := d.Flush(); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// WriteZeroes writes zeros like a write (so in sequential zones it must be
// at the write pointer); without noHole whole clusters are deallocated.
func (d *Device) WriteZeroes(off, length int64, noHole bool) error {
	if err := d.writable(); err != nil {
		return err
	}
	if off < 0 || length < 0 {
		return &ZoneError{Op: OpWrite, Zone: -1, Offset: uint64(off), Length: uint64(length), Err: ErrOutOfRange}
	}
	pend, err := d.m.BeginWrite(uint64(off), uint64(length))
	if err != nil {
		return err
	}
	return d.finishWrite(pend, func() error { return d.img.WriteZeroes(off, length, !noHole) })
}

// Append writes p at zone's write pointer and returns the offset written.
func (d *Device) Append(zone int, p []byte, fua bool) (uint64, error) {
	if err := d.writable(); err != nil {
		return 0, err
	}
	pend, err := d.m.BeginAppend(zone, uint64(len(p)))
	if err != nil {
		return 0, err
	}
	off := pend.Offset()
	if err := d.finishWrite(pend, func() error { _, err := d.img.WriteAt(p, int64(off)); return err }); err != nil {
		return 0, err
	}
	if fua {
		if err := d.Flush(); err != nil {
			return 0, err
		}
	}
	return off, nil
}

// finishWrite does the I/O of an accepted write, records the new write
// pointer in the live table while the zone is still claimed (so records of
// one zone land in write-pointer order), then commits.
func (d *Device) finishWrite(pend *Pending, io func() error) error {
	if err := io(); err != nil {
		pend.Abort()
		return err
	}
	if z := d.g.ZoneIndex(pend.Offset()); !d.g.IsConventional(z) {
		if err := d.live.set(uint32(z), pend.Offset()+pend.Length()); err != nil {
			pend.Abort()
			return err
		}
	}
	pend.Commit()
	return nil
}

// Flush makes every acknowledged write durable, then advances the durable
// write pointers to cover it (data → qcow2 metadata → write pointers).
func (d *Device) Flush() error {
	if d.ro {
		return nil
	}
	d.flushMu.Lock()
	defer d.flushMu.Unlock()
	return d.flushLocked()
}

func (d *Device) flushLocked() error {
	// Pointers taken before the fsync only cover data written before it.
	wps := d.m.WritePointers()
	if err := d.img.Flush(); err != nil {
		return err
	}
	changed := false
	for i, wp := range wps {
		if d.g.IsConventional(i) || wp == d.durable[i] {
			continue
		}
		if err := d.img.SetWritePointer(uint32(i), wp); err != nil {
			return err
		}
		d.durable[i] = wp
		changed = true
	}
	if changed {
		return d.img.Flush()
	}
	return nil
}

// Trim maps NBD TRIM onto zones (spec §6): whole sequential zones are
// reset, partial ranges of sequential zones are ignored (TRIM is advisory),
// conventional zones are deallocated.
func (d *Device) Trim(off, length int64) error {
	if err := d.writable(); err != nil {
		return err
	}
	if off < 0 || length < 0 || uint64(off+length) > d.g.Size {
		return &ZoneError{Op: OpReset, Zone: -1, Offset: uint64(off), Length: uint64(length), Err: ErrOutOfRange}
	}
	start, end := uint64(off), uint64(off+length)
	for a := start; a < end; {
		i := d.g.ZoneIndex(a)
		zs, ze := d.g.ZoneStart(i), d.g.ZoneStart(i)+d.g.ZoneLen(i)
		b := min(end, ze)
		switch {
		case d.g.IsConventional(i):
			if err := d.img.Discard(int64(a), int64(b-a)); err != nil {
				return err
			}
		case a == zs && b == ze:
			if err := d.Mgmt(OpReset, zs, ze-zs); err != nil {
				return err
			}
		}
		a = b
	}
	return nil
}

// Mgmt runs a zone management command (open, close, finish, reset) over
// whole zones [off, off+length); a reset of the whole device resets every
// sequential zone. Resets and finishes are durable when it returns.
func (d *Device) Mgmt(op Op, off, length uint64) error {
	if err := d.writable(); err != nil {
		return err
	}
	d.flushMu.Lock()
	defer d.flushMu.Unlock()
	var pend *Pending
	var err error
	if op == OpReset && off == 0 && length == d.g.Size || op == OpResetAll {
		pend, err = d.m.BeginResetAll()
	} else {
		pend, err = d.m.BeginMgmt(op, off, length)
	}
	if err != nil {
		return err
	}
	// The command took effect in the machine at Begin (reads already see
	// it); the zones stay claimed until Commit, so no write can slip into a
	// zone while its old data is still being dropped.
	defer pend.Commit()
	changes := pend.Changes()
	moved := false
	for _, c := range changes {
		if c.NewWP > c.OldWP { // finish: the rest of the zone must read as zeros first
			if err := d.img.WriteZeroes(int64(c.OldWP), int64(c.NewWP-c.OldWP), true); err != nil {
				return d.failed(err)
			}
		}
	}
	for _, c := range changes {
		if c.OldWP != c.NewWP {
			moved = true
			if err := d.live.set(uint32(c.Zone), c.NewWP); err != nil {
				return d.failed(err)
			}
		}
	}
	if !moved {
		return nil
	}
	// Durable before acknowledged (spec §5): finished zones' zeros, then
	// the new write pointers. A reset's pointer goes back before its data
	// is dropped, so no pointer ever covers discarded data.
	if err := d.flushLocked(); err != nil {
		return d.failed(err)
	}
	for _, c := range changes {
		if c.NewWP < c.OldWP {
			if err := d.img.Discard(int64(c.Start), int64(c.OldWP-c.Start)); err != nil {
				return d.failed(err)
			}
		}
	}
	return nil
}

// failed turns an I/O error during a management command into a device
// error: the state machine has already applied the command.
func (d *Device) failed(err error) error {
	return fmt.Errorf("zone management I/O failed, device state may be inconsistent until reopened: %w", err)
}

// Report returns up to n zones from zone start.
func (d *Device) Report(start, n int) []ZoneReport { return d.m.Report(start, n) }

// Close flushes, records the write pointers durably and closes the image.
func (d *Device) Close() error {
	var errs []error
	if !d.ro {
		errs = append(errs, d.Flush())
	}
	errs = append(errs, d.img.Close())
	if d.live != nil {
		if errors.Join(errs...) == nil {
			errs = append(errs, d.live.remove())
		} else {
			d.live.close()
		}
	}
	return errors.Join(errs...)
}

func (d *Device) writable() error {
	if d.ro {
		return qcow2.ErrReadOnly
	}
	return nil
}

// liveSuffix names the sidecar file holding the live write pointers.
const liveSuffix = ".wplive"
