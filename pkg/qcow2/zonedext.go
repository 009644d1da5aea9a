package qcow2

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"strconv"
)

// The zoned header extension (magic 0x007a6264). Layouts and rules: see
// docs/zoned-format.md in this repository (copied from the project's spec
// note): layout A is the seed's and the one we write; B and C are read and
// rewritten in the layout they came in.

const (
	zonedLenA = 56
	zonedLenB = 48
	zonedLenC = 44

	// MaxZones is the largest nr_zones accepted (spec §2).
	MaxZones = 1 << 20

	// Write-pointer table entry flags.
	wpConvFlagA = 1 << 59 // layout A: little-endian entries, bit 59
	wpConvFlagB = 1 << 63 // layouts B and C: big-endian entries, bit 63
	wpMaskA     = wpConvFlagA - 1
	wpMaskB     = wpConvFlagB - 1

	ZoneModelHostManaged = 1
)

func decodeZonedExt(d []byte, off int64) (*ZonedExt, error) {
	be := binary.BigEndian
	z := &ZonedExt{}
	switch len(d) {
	case zonedLenA:
		z.Layout = LayoutA
		z.ZoneSize = be.Uint64(d[4:])
		z.ZoneCapacity = be.Uint64(d[12:])
		z.ConventionalZones = be.Uint32(d[20:])
		z.NrZones = be.Uint32(d[24:])
		z.MaxActiveZones = be.Uint32(d[28:])
		z.MaxOpenZones = be.Uint32(d[32:])
		z.MaxAppendBytes = be.Uint32(d[36:])
		z.MetaSize = be.Uint64(d[40:])
		z.MetaOffset = be.Uint64(d[48:])
	case zonedLenB:
		z.Layout = LayoutB
		z.NrZones = be.Uint32(d[4:])
		z.ZoneSize = be.Uint64(d[8:])
		z.ZoneCapacity = be.Uint64(d[16:])
		z.ConventionalZones = be.Uint32(d[24:])
		z.MaxActiveZones = be.Uint32(d[28:])
		z.MaxOpenZones = be.Uint32(d[32:])
		z.MaxAppendBytes = be.Uint32(d[36:])
		z.MetaOffset = be.Uint64(d[40:])
		z.MetaSize = 8 * uint64(z.NrZones)
	case zonedLenC:
		z.Layout = LayoutC
		z.NrZones = be.Uint32(d[4:])
		z.ZoneSize = be.Uint64(d[8:])
		z.ZoneCapacity = be.Uint64(d[16:])
		z.MetaOffset = be.Uint64(d[24:])
		z.ConventionalZones = be.Uint32(d[32:])
		z.MaxActiveZones = be.Uint32(d[36:])
		z.MaxOpenZones = be.Uint32(d[40:])
		z.MetaSize = 8 * uint64(z.NrZones)
	default:
		return nil, unsupportedf(off, "zoned extension of %d bytes is not a known layout (56, 48 or 44 bytes)", len(d))
	}
	z.Model = d[0]
	if z.Model != ZoneModelHostManaged {
		if z.Model == 0 {
			return nil, unsupportedf(off, "zoned extension with zoned=0 (not zoned) but incompatible bit 5 set")
		}
		return nil, unsupportedf(off, "zone model %d (only 1, host-managed, exists)", z.Model)
	}
	if d[1] != 0 || d[2] != 0 || d[3] != 0 {
		return nil, corruptf(off+1, "zoned extension reserved bytes 1-3 are not zero")
	}
	return z, nil
}

// encode renders the extension in its layout. raw is the extension as read,
// so bytes we do not interpret (padding) survive.
func (z *ZonedExt) encode(raw []byte) []byte {
	be := binary.BigEndian
	var d []byte
	switch z.Layout {
	case LayoutB:
		d = make([]byte, zonedLenB)
		be.PutUint32(d[4:], z.NrZones)
		be.PutUint64(d[8:], z.ZoneSize)
		be.PutUint64(d[16:], z.ZoneCapacity)
		be.PutUint32(d[24:], z.ConventionalZones)
		be.PutUint32(d[28:], z.MaxActiveZones)
		be.PutUint32(d[32:], z.MaxOpenZones)
		be.PutUint32(d[36:], z.MaxAppendBytes)
		be.PutUint64(d[40:], z.MetaOffset)
	case LayoutC:
		d = make([]byte, zonedLenC)
		be.PutUint32(d[4:], z.NrZones)
		be.PutUint64(d[8:], z.ZoneSize)
		be.PutUint64(d[16:], z.ZoneCapacity)
		be.PutUint64(d[24:], z.MetaOffset)
		be.PutUint32(d[32:], z.ConventionalZones)
		be.PutUint32(d[36:], z.MaxActiveZones)
		be.PutUint32(d[40:], z.MaxOpenZones)
	default:
		d = make([]byte, zonedLenA)
		be.PutUint64(d[4:], z.ZoneSize)
		be.PutUint64(d[12:], z.ZoneCapacity)
		be.PutUint32(d[20:], z.ConventionalZones)
		be.PutUint32(d[24:], z.NrZones)
		be.PutUint32(d[28:], z.MaxActiveZones)
		be.PutUint32(d[32:], z.MaxOpenZones)
		be.PutUint32(d[36:], z.MaxAppendBytes)
		be.PutUint64(d[40:], z.MetaSize)
		be.PutUint64(d[48:], z.MetaOffset)
	}
	d[0] = z.Model
	return d
}

// zoneRule is a violated validation rule: the field, its value and the rule.
type zoneRule struct {
	field string
	value uint64
	rule  string
}

// check applies the rules of spec §2 that concern the geometry. Limits that
// are merely too large are not errors here; clamp handles them.
func (z *ZonedExt) check(virtualSize uint64) *zoneRule {
	switch {
	case z.ZoneSize == 0:
		return &zoneRule{"zone.size", z.ZoneSize, "must not be 0"}
	case z.ZoneSize&(z.ZoneSize-1) != 0:
		return &zoneRule{"zone.size", z.ZoneSize, "must be a power of two"}
	case z.ZoneSize%512 != 0:
		return &zoneRule{"zone.size", z.ZoneSize, "must be a multiple of 512"}
	case z.ZoneCapacity == 0:
		return &zoneRule{"zone.capacity", z.ZoneCapacity, "must not be 0"}
	case z.ZoneCapacity > z.ZoneSize:
		return &zoneRule{"zone.capacity", z.ZoneCapacity, fmt.Sprintf("must not exceed zone.size (%d)", z.ZoneSize)}
	case z.ZoneCapacity%512 != 0:
		return &zoneRule{"zone.capacity", z.ZoneCapacity, "must be a multiple of 512"}
	}
	want := (virtualSize + z.ZoneSize - 1) / z.ZoneSize
	switch {
	case uint64(z.NrZones) != want:
		return &zoneRule{"nr_zones", uint64(z.NrZones), fmt.Sprintf("nr_zones field is wrong: must be ceil(size %d / zone.size %d) = %d", virtualSize, z.ZoneSize, want)}
	case z.NrZones == 0:
		return &zoneRule{"size", virtualSize, "a zoned image needs at least one zone"}
	case z.NrZones > MaxZones:
		return &zoneRule{"nr_zones", uint64(z.NrZones), fmt.Sprintf("must not exceed %d (size / zone.size)", MaxZones)}
	case z.ConventionalZones >= z.NrZones:
		return &zoneRule{"zone.conventional_zones", uint64(z.ConventionalZones), fmt.Sprintf("must be less than the number of zones (%d)", z.NrZones)}
	}
	if z.Layout != LayoutC {
		switch {
		case z.MaxAppendBytes%512 != 0:
			return &zoneRule{"zone.max_append_bytes", uint64(z.MaxAppendBytes), "must be a multiple of 512"}
		case uint64(z.MaxAppendBytes)+512 >= z.ZoneCapacity:
			return &zoneRule{"zone.max_append_bytes", uint64(z.MaxAppendBytes), fmt.Sprintf("must be less than zone.capacity (%d) minus 512", z.ZoneCapacity)}
		}
	}
	if z.MetaSize != 8*uint64(z.NrZones) {
		return &zoneRule{"zonedmeta_size", z.MetaSize, fmt.Sprintf("must be 8 × nr_zones = %d", 8*uint64(z.NrZones))}
	}
	return nil
}

// clamp lowers limits that are too large, as the seed does, and says what it
// changed. Rule: max_active ≤ nr_zones, max_open ≤ sequential zones,
// max_open ≤ max_active when max_active is set.
func (z *ZonedExt) clamp() (warnings []string) {
	seq := z.NrZones - z.ConventionalZones
	if z.MaxActiveZones > z.NrZones {
		warnings = append(warnings, fmt.Sprintf("zone.max_active_zones=%d exceeds the number of zones %d; set to %d", z.MaxActiveZones, z.NrZones, z.NrZones))
		z.MaxActiveZones = z.NrZones
	}
	if z.MaxOpenZones > seq {
		warnings = append(warnings, fmt.Sprintf("zone.max_open_zones=%d exceeds the number of sequential zones %d; set to %d", z.MaxOpenZones, seq, seq))
		z.MaxOpenZones = seq
	}
	if z.MaxActiveZones != 0 && z.MaxOpenZones > z.MaxActiveZones {
		warnings = append(warnings, fmt.Sprintf("zone.max_open_zones=%d exceeds zone.max_active_zones=%d; set to %d", z.MaxOpenZones, z.MaxActiveZones, z.MaxActiveZones))
		z.MaxOpenZones = z.MaxActiveZones
	}
	return warnings
}

// resolveZoned turns creation options into an extension (without the table
// offset), applying the defaults of spec §2, validating and clamping.
func resolveZoned(o *ZonedOptions, size uint64) (*ZonedExt, []string, error) {
	z := &ZonedExt{Layout: LayoutA, Model: ZoneModelHostManaged, ZoneSize: DefaultZoneSize, MaxAppendBytes: DefaultMaxAppendBytes}
	if o.ZoneSize != nil {
		z.ZoneSize = *o.ZoneSize
	}
	z.ZoneCapacity = z.ZoneSize
	if o.ZoneCapacity != nil {
		z.ZoneCapacity = *o.ZoneCapacity
	}
	if o.ConventionalZones != nil {
		z.ConventionalZones = *o.ConventionalZones
	}
	if o.MaxActiveZones != nil {
		z.MaxActiveZones = *o.MaxActiveZones
		z.MaxOpenZones = z.MaxActiveZones
	}
	if o.MaxOpenZones != nil {
		z.MaxOpenZones = *o.MaxOpenZones
	}
	if o.MaxAppendBytes != nil {
		if *o.MaxAppendBytes > 1<<32-1 {
			return nil, nil, &OptionError{Name: "zone.max_append_bytes", Value: strconv.FormatUint(*o.MaxAppendBytes, 10), Rule: "must fit in 32 bits"}
		}
		z.MaxAppendBytes = uint32(*o.MaxAppendBytes)
	}
	if z.ZoneSize != 0 && bits.OnesCount64(z.ZoneSize) == 1 {
		n := (size + z.ZoneSize - 1) / z.ZoneSize
		if n > MaxZones {
			return nil, nil, &OptionError{Name: "zone.size", Value: strconv.FormatUint(z.ZoneSize, 10), Rule: fmt.Sprintf("size %d / zone.size gives %d zones, more than the limit %d", size, n, MaxZones)}
		}
		z.NrZones = uint32(n)
	}
	z.MetaSize = 8 * uint64(z.NrZones)
	if r := z.check(size); r != nil {
		return nil, nil, &OptionError{Name: r.field, Value: strconv.FormatUint(r.value, 10), Rule: r.rule}
	}
	return z, z.clamp(), nil
}

// zoneStart returns the first byte of zone i.
func (z *ZonedExt) zoneStart(i uint32) uint64 { return uint64(i) * z.ZoneSize }

// WritableEnd returns the end of the writable part of zone i (a runt last
// zone ends at the virtual size).
func (z *ZonedExt) WritableEnd(i uint32, virtualSize uint64) uint64 {
	end := z.zoneStart(i) + z.ZoneCapacity
	if end > virtualSize {
		end = virtualSize
	}
	return end
}

// encodeWP renders a write-pointer table entry in the extension's layout.
func (z *ZonedExt) encodeWP(b []byte, wp uint64, conventional bool) {
	if z.Layout == LayoutA {
		v := wp & wpMaskA
		if conventional {
			v |= wpConvFlagA
		}
		binary.LittleEndian.PutUint64(b, v)
		return
	}
	v := wp & wpMaskB
	if conventional {
		v |= wpConvFlagB
	}
	binary.BigEndian.PutUint64(b, v)
}

// decodeWP reads a write-pointer table entry.
func (z *ZonedExt) decodeWP(b []byte) (wp uint64, conventional bool) {
	if z.Layout == LayoutA {
		v := binary.LittleEndian.Uint64(b)
		return v & wpMaskA, v&wpConvFlagA != 0
	}
	v := binary.BigEndian.Uint64(b)
	return v & wpMaskB, v&wpConvFlagB != 0
}

// WritePointers returns the write-pointer table: each zone's write pointer
// (absolute byte offset) and whether it is a conventional zone.
func (im *Image) WritePointers() (wps []uint64, conventional []bool, err error) {
	im.meta.Lock()
	defer im.meta.Unlock()
	z := im.h.zoned
	if z == nil {
		return nil, nil, fmt.Errorf("%w: not a zoned image", ErrUnsupported)
	}
	wps = make([]uint64, z.NrZones)
	conventional = make([]bool, z.NrZones)
	for i := range wps {
		wps[i], conventional[i] = z.decodeWP(im.wpTableBuf[i*8:])
	}
	return wps, conventional, nil
}

// SetWritePointer records zone i's write pointer, written through to the
// page cache (durable after Flush). The zone engine decides when it may be
// called so that the durable pointer never exceeds durable data.
func (im *Image) SetWritePointer(i uint32, wp uint64) error {
	if im.ro {
		return ErrReadOnly
	}
	im.meta.Lock()
	defer im.meta.Unlock()
	z := im.h.zoned
	if z == nil {
		return fmt.Errorf("%w: not a zoned image", ErrUnsupported)
	}
	if i >= z.NrZones || i < z.ConventionalZones {
		return fmt.Errorf("%w: zone %d has no write pointer (nr_zones %d, conventional %d)", ErrOutOfRange, i, z.NrZones, z.ConventionalZones)
	}
	if start, end := z.zoneStart(i), z.WritableEnd(i, im.h.size); wp < start || wp > end || wp%512 != 0 {
		return fmt.Errorf("%w: write pointer %d outside zone %d [%d, %d] or unaligned", ErrOutOfRange, wp, i, start, end)
	}
	at := z.MetaOffset + uint64(i)*8
	if err := im.checkOverlap(at, 8, writeWP, 0); err != nil {
		return err
	}
	b := im.wpTableBuf[i*8 : i*8+8]
	z.encodeWP(b, wp, false)
	_, err := im.f.WriteAt(b, int64(at))
	return err
}

// SetZoneLimits changes max_open_zones and max_active_zones in place (the
// mutable zone parameters; 0 means no limit). Values that break spec §2
// are refused, not clamped: the caller asked for exactly these. A
// max_active_zones below the number of zones partially written now (write
// pointer past the zone start, short of its writable end) is refused too:
// the zone engine could not restore such an image, as every partially
// written zone is active.
func (im *Image) SetZoneLimits(maxOpen, maxActive uint32) error {
	if im.ro {
		return ErrReadOnly
	}
	im.meta.Lock()
	defer im.meta.Unlock()
	z := im.h.zoned
	if z == nil {
		return fmt.Errorf("%w: not a zoned image", ErrUnsupported)
	}
	bad := func(name string, v uint32, rule string, args ...any) error {
		return &OptionError{Name: name, Value: fmt.Sprint(v), Rule: fmt.Sprintf(rule, args...)}
	}
	seq := z.NrZones - z.ConventionalZones
	switch {
	case maxActive > z.NrZones:
		return bad("zone.max_active_zones", maxActive, "must not exceed the number of zones (%d)", z.NrZones)
	case maxOpen > seq:
		return bad("zone.max_open_zones", maxOpen, "must not exceed the number of sequential zones (%d)", seq)
	case maxActive != 0 && maxOpen > maxActive:
		return bad("zone.max_open_zones", maxOpen, "must not exceed zone.max_active_zones (%d)", maxActive)
	}
	if maxActive != 0 {
		active := uint32(0)
		for i := z.ConventionalZones; i < z.NrZones; i++ {
			wp, _ := z.decodeWP(im.wpTableBuf[i*8:])
			if wp != z.zoneStart(i) && wp < z.WritableEnd(i, im.h.size) {
				active++
			}
		}
		if active > maxActive {
			return bad("zone.max_active_zones", maxActive, "%d zones are partially written (active) now; finish or reset zones first, or choose at least %d", active, active)
		}
	}
	c := *z
	c.MaxOpenZones, c.MaxActiveZones = maxOpen, maxActive
	old := *z
	*z = c
	if err := im.writeHeader(); err != nil {
		*z = old
		return err
	}
	return syncFile(im.f)
}
