package zoned

import "fmt"

// SectorSize is the granularity of every offset and length the engine
// accepts: the 512-byte logical block of the emulated device.
const SectorSize = 512

// MaxZones bounds nr_zones (spec §2), so the per-zone state of a hostile
// image stays a few tens of MiB.
const MaxZones = 1 << 20

// Geometry describes a zoned device. Field names follow the qcow2 zoned
// header extension (spec §1); all sizes are in bytes.
type Geometry struct {
	Size           uint64 // device (virtual disk) size
	ZoneSize       uint64 // distance between zone starts, a power of two
	ZoneCapacity   uint64 // writable bytes of a full-size sequential zone
	NrZones        uint32 // ceil(Size / ZoneSize)
	Conventional   uint32 // the first Conventional zones have no write pointer
	MaxOpen        uint32 // max implicitly+explicitly open zones, 0 = no limit
	MaxActive      uint32 // max open+closed zones, 0 = no limit
	MaxAppendBytes uint32 // largest zone append; 0 disables zone append
}

// GeometryError reports a geometry that breaks one rule of spec §2. Field
// is the header field's on-disk name so that a user can find it in
// qemu-img's options; it unwraps to ErrInvalidGeometry.
type GeometryError struct {
	Field string
	Value uint64
	Rule  string
}

func (e *GeometryError) Error() string {
	return fmt.Sprintf("zoned: invalid geometry: %s = %d: %s", e.Field, e.Value, e.Rule)
}

func (e *GeometryError) Unwrap() error { return ErrInvalidGeometry }

// ZoneCount returns ceil(size / zoneSize) without overflowing.
func ZoneCount(size, zoneSize uint64) uint64 {
	if zoneSize == 0 {
		return 0
	}
	n := size / zoneSize
	if size%zoneSize != 0 {
		n++
	}
	return n
}

// Clamp lowers zone limits that are too large, as spec §2 (and the seed)
// require of an image's header: max_active_zones above nr_zones becomes
// nr_zones, max_open_zones above the sequential zones becomes their
// number, and max_open_zones above a non-zero max_active_zones becomes
// max_active_zones. It returns the geometry to run with and one warning
// per change, naming the option, its value and the value used, for the
// caller to print; g is returned unchanged with no warnings when its limits
// fit.
func (g Geometry) Clamp() (Geometry, []string) {
	var warnings []string
	if g.MaxActive > g.NrZones {
		warnings = append(warnings, fmt.Sprintf("zone.max_active_zones=%d exceeds the number of zones %d; using %d", g.MaxActive, g.NrZones, g.NrZones))
		g.MaxActive = g.NrZones
	}
	if seq := g.SequentialZones(); g.Conventional < g.NrZones && g.MaxOpen > seq {
		warnings = append(warnings, fmt.Sprintf("zone.max_open_zones=%d exceeds the number of sequential zones %d; using %d", g.MaxOpen, seq, seq))
		g.MaxOpen = seq
	}
	if g.MaxActive != 0 && g.MaxOpen > g.MaxActive {
		warnings = append(warnings, fmt.Sprintf("zone.max_open_zones=%d exceeds zone.max_active_zones=%d; using %d", g.MaxOpen, g.MaxActive, g.MaxActive))
		g.MaxOpen = g.MaxActive
	}
	return g, warnings
}

// Validate applies the rules of spec §2 to g. Limits that are too large are
// errors here: the engine runs with consistent limits, and lowering them
// (Clamp, with a warning) is the caller's decision, made before the
// geometry reaches the engine.
func (g Geometry) Validate() error {
	bad := func(field string, v uint64, rule string) error {
		return &GeometryError{Field: field, Value: v, Rule: rule}
	}
	switch {
	case g.Size == 0:
		return bad("size", g.Size, "must be positive")
	case g.Size%SectorSize != 0:
		return bad("size", g.Size, "must be a multiple of 512")
	}
	switch {
	case g.ZoneSize == 0 || g.ZoneSize&(g.ZoneSize-1) != 0:
		return bad("zone_size", g.ZoneSize, "must be a power of two")
	case g.ZoneSize%SectorSize != 0:
		return bad("zone_size", g.ZoneSize, "must be a multiple of 512")
	}
	switch {
	case g.ZoneCapacity == 0:
		return bad("zone_capacity", g.ZoneCapacity, "must be positive")
	case g.ZoneCapacity > g.ZoneSize:
		return bad("zone_capacity", g.ZoneCapacity, fmt.Sprintf("must not exceed zone_size %d", g.ZoneSize))
	case g.ZoneCapacity%SectorSize != 0:
		return bad("zone_capacity", g.ZoneCapacity, "must be a multiple of 512")
	}
	switch want := ZoneCount(g.Size, g.ZoneSize); {
	case uint64(g.NrZones) != want:
		return bad("nr_zones", uint64(g.NrZones), fmt.Sprintf("nr_zones field is wrong: size %d / zone_size %d needs %d", g.Size, g.ZoneSize, want))
	case g.NrZones > MaxZones:
		return bad("nr_zones", uint64(g.NrZones), fmt.Sprintf("must not exceed %d", MaxZones))
	}
	if g.Conventional >= g.NrZones {
		return bad("conventional_zones", uint64(g.Conventional), fmt.Sprintf("must be less than nr_zones %d", g.NrZones))
	}
	// The seed's check, kept as written: it also rejects max_append_bytes 0
	// when the capacity is a single sector.
	switch {
	case g.MaxAppendBytes%SectorSize != 0:
		return bad("max_append_bytes", uint64(g.MaxAppendBytes), "must be a multiple of 512")
	case uint64(g.MaxAppendBytes)+SectorSize >= g.ZoneCapacity:
		return bad("max_append_bytes", uint64(g.MaxAppendBytes), fmt.Sprintf("plus 512 must be less than zone_capacity %d", g.ZoneCapacity))
	}
	if g.MaxActive > g.NrZones {
		return bad("max_active_zones", uint64(g.MaxActive), fmt.Sprintf("must not exceed nr_zones %d", g.NrZones))
	}
	switch seq := g.SequentialZones(); {
	case g.MaxOpen > seq:
		return bad("max_open_zones", uint64(g.MaxOpen), fmt.Sprintf("must not exceed the %d sequential zones", seq))
	case g.MaxActive != 0 && g.MaxOpen > g.MaxActive:
		// The seed's documentation says the opposite; the rule is
		// max_open <= max_active (spec §2).
		return bad("max_open_zones", uint64(g.MaxOpen), fmt.Sprintf("must not exceed max_active_zones %d", g.MaxActive))
	}
	return nil
}

// SequentialZones is the number of sequential-write-required zones.
func (g Geometry) SequentialZones() uint32 { return g.NrZones - g.Conventional }

// IsConventional reports whether zone i is conventional (spec §1: they are
// the first Conventional zones).
func (g Geometry) IsConventional(i int) bool { return i >= 0 && i < int(g.Conventional) }

// ZoneIndex returns the zone holding byte off, or -1 if off is beyond the
// device.
func (g Geometry) ZoneIndex(off uint64) int {
	if off >= g.Size || g.ZoneSize == 0 {
		return -1
	}
	return int(off / g.ZoneSize)
}

// The helpers below take a zone index in [0, NrZones) of a valid geometry.

// ZoneStart returns the first byte of zone i.
func (g Geometry) ZoneStart(i int) uint64 { return uint64(i) * g.ZoneSize }

// ZoneLen returns the length of zone i: ZoneSize, except for a last zone cut
// short by the device size (a "runt").
func (g Geometry) ZoneLen(i int) uint64 {
	start := g.ZoneStart(i)
	return min(g.ZoneSize, g.Size-start)
}

// ZoneCap returns the writable bytes of zone i. Conventional zones are
// writable throughout, as null_blk reports them (capacity = length).
func (g Geometry) ZoneCap(i int) uint64 {
	if g.IsConventional(i) {
		return g.ZoneLen(i)
	}
	return min(g.ZoneCapacity, g.ZoneLen(i))
}

// WritableEnd returns the offset one past the last writable byte of zone i:
// min(start+capacity, size) for a sequential zone (spec §1).
func (g Geometry) WritableEnd(i int) uint64 { return g.ZoneStart(i) + g.ZoneCap(i) }

// ZoneEnd returns the offset one past the last byte of zone i.
func (g Geometry) ZoneEnd(i int) uint64 { return g.ZoneStart(i) + g.ZoneLen(i) }
