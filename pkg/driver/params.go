package driver

import (
	"errors"
	"fmt"
	"maps"
	"math/bits"
	"slices"
	"strconv"
	"strings"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

// StorageClass parameters (DESIGN.md point 9). The zone options keep the
// image option names of specs/zoned-format.md §2 (dashed QAPI spellings are
// synonyms); clusterSize is a driver option passed to the image as
// cluster_size. Keys under csi.storage.k8s.io/ are added by the external
// provisioner (PVC/PV names) and ignored.
const (
	ParamZoneMode        = "zone.mode"
	ParamZoneSize        = "zone.size"
	ParamZoneCapacity    = "zone.capacity"
	ParamConventional    = "zone.conventional_zones"
	ParamMaxOpen         = "zone.max_open_zones"
	ParamMaxActive       = "zone.max_active_zones"
	ParamMaxAppend       = "zone.max_append_bytes"
	ParamClusterSize     = "clusterSize"
	ParamExporter        = "exporter"
	provisionerPrefix    = "csi.storage.k8s.io/"
	hostManaged          = "host-managed"
	defaultVolumeSize    = 1 << 30
	maxCapacityBytes     = 1 << 61 // qcow2's own limit on the virtual size
	volumeContextNodeKey = "node"
	// volumeContextExporterKey carries the exporter parameter to
	// NodeStageVolume.
	volumeContextExporterKey = "exporter"
)

// paramSynonyms maps accepted spellings to the canonical parameter name.
var paramSynonyms = map[string]string{
	"zone.conventional-zones": ParamConventional,
	"zone.max-open-zones":     ParamMaxOpen,
	"zone.max-active-zones":   ParamMaxActive,
	"zone.max-append-bytes":   ParamMaxAppend,
	"cluster_size":            ParamClusterSize,
	"cluster-size":            ParamClusterSize,
}

var knownParams = []string{ParamZoneMode, ParamZoneSize, ParamZoneCapacity, ParamConventional,
	ParamMaxOpen, ParamMaxActive, ParamMaxAppend, ParamClusterSize, ParamExporter}

// Exporters a volume may ask for (the exporter parameter; it travels to
// NodeStageVolume in the volume context under the same key). They name
// how the node presents the volume, not anything in the image.
const (
	// ExporterAuto: ublk where the node has zoned ublk, else the node's
	// ordinary attacher. The default.
	ExporterAuto = "auto"
	// ExporterUblk: a true host-managed zoned block device (/dev/ublkbN);
	// staging fails on nodes without zoned ublk.
	ExporterUblk = "ublk"
	// ExporterNBD: the node's ordinary attacher (nbd, or fuse-loop or file
	// where the node runs those): zones enforced, device not zoned.
	ExporterNBD = "nbd"
)

// exporterOf returns the validated exporter of canonical parameters
// (ExporterAuto when unset).
func exporterOf(p map[string]string) (string, error) {
	v, ok := p[ParamExporter]
	if !ok {
		return ExporterAuto, nil
	}
	if err := checkExporter(v); err != nil {
		return "", errorf(ErrInvalidArgument, "parameter %s=%s: %w", ParamExporter, v, err)
	}
	return v, nil
}

var errExporterRule = errors.New("must be auto, ublk or nbd (auto: ublk where the node's kernel has zoned ublk, else nbd)")

func checkExporter(v string) error {
	switch v {
	case ExporterAuto, ExporterUblk, ExporterNBD:
		return nil
	}
	return errExporterRule
}

// mutableParams are the parameters ControllerModifyVolume (and a
// VolumeAttributesClass at creation) may set: the open/active limits only
// change what the zone engine admits, never where data lives.
var mutableParams = []string{ParamMaxOpen, ParamMaxActive}

// canonicalParams returns params keyed by canonical names, refusing unknown
// keys and two spellings of one key with different values. allowed limits
// the accepted names (nil: every known parameter).
func canonicalParams(params map[string]string, allowed []string, what string) (map[string]string, error) {
	if allowed == nil {
		allowed = knownParams
	}
	out := make(map[string]string, len(params))
	for _, k := range slices.Sorted(maps.Keys(params)) {
		v := params[k]
		if strings.HasPrefix(k, provisionerPrefix) {
			continue
		}
		name := k
		if c, ok := paramSynonyms[k]; ok {
			name = c
		}
		if !slices.Contains(allowed, name) {
			if what == "mutable parameter" && slices.Contains(knownParams, name) {
				return nil, errorf(ErrInvalidArgument, "%s %s=%s: not mutable; only %s can be changed after creation", what, k, v, strings.Join(mutableParams, ", "))
			}
			return nil, errorf(ErrInvalidArgument, "%s %s=%s: unknown (known: %s)", what, k, v, strings.Join(allowed, ", "))
		}
		if prev, ok := out[name]; ok && prev != v {
			return nil, errorf(ErrInvalidArgument, "%s %s=%s: conflicts with %s=%s given under another spelling", what, k, v, name, prev)
		}
		if v == "" {
			return nil, errorf(ErrInvalidArgument, "%s %s: empty value", what, k)
		}
		out[name] = v
	}
	return out, nil
}

// Geometry is a volume's zone layout and limits, as the volume context and
// the records show it.
type Geometry struct {
	Size         uint64 `json:"size"`
	ZoneSize     uint64 `json:"zoneSize"`
	ZoneCapacity uint64 `json:"zoneCapacity"`
	NrZones      uint32 `json:"nrZones"`
	Conventional uint32 `json:"conventionalZones"`
	MaxOpen      uint32 `json:"maxOpenZones"`
	MaxActive    uint32 `json:"maxActiveZones"`
	MaxAppend    uint64 `json:"maxAppendBytes"`
	ClusterSize  uint32 `json:"clusterSize"`
}

// volumeContext renders the geometry for CreateVolumeResponse, so that
// `kubectl describe pv` shows it.
func (g Geometry) volumeContext() map[string]string {
	u := func(v uint64) string { return strconv.FormatUint(v, 10) }
	return map[string]string{
		"zone.size":               u(g.ZoneSize),
		"zone.capacity":           u(g.ZoneCapacity),
		"zone.nr_zones":           u(uint64(g.NrZones)),
		"zone.conventional_zones": u(uint64(g.Conventional)),
		"zone.max_open_zones":     u(uint64(g.MaxOpen)),
		"zone.max_active_zones":   u(uint64(g.MaxActive)),
		"zone.max_append_bytes":   u(g.MaxAppend),
	}
}

func geometryFromExt(size uint64, clusterSize uint32, z *qcow2.ZonedExt) Geometry {
	return Geometry{Size: size, ZoneSize: z.ZoneSize, ZoneCapacity: z.ZoneCapacity, NrZones: z.NrZones,
		Conventional: z.ConventionalZones, MaxOpen: z.MaxOpenZones, MaxActive: z.MaxActiveZones,
		MaxAppend: uint64(z.MaxAppendBytes), ClusterSize: clusterSize}
}

// volumeSpec is a validated creation request: what qcow2.Create gets, and
// the geometry that results.
type volumeSpec struct {
	create qcow2.CreateOptions
	geo    Geometry
}

// zoneSizeOf returns the effective zone size of canonical parameters.
func zoneSizeOf(p map[string]string) (uint64, error) {
	v, ok := p[ParamZoneSize]
	if !ok {
		return qcow2.DefaultZoneSize, nil
	}
	zs, err := qcow2.ParseSize(v)
	if err != nil || zs < 512 || bits.OnesCount64(zs) != 1 {
		return 0, errorf(ErrInvalidArgument, "parameter %s=%s: must be a power of two of at least 512 bytes (suffixes K, M, G allowed)", ParamZoneSize, v)
	}
	return zs, nil
}

func uintParam(p map[string]string, name string) (uint32, bool, error) {
	v, ok := p[name]
	if !ok {
		return 0, false, nil
	}
	n, err := strconv.ParseUint(v, 10, 32)
	if err != nil {
		return 0, true, errorf(ErrInvalidArgument, "parameter %s=%s: must be a whole number between 0 and 4294967295", name, v)
	}
	return uint32(n), true, nil
}

// capacityFor picks the volume size for a capacity range: required_bytes
// rounded up to whole zones (the default size when unset), checked against
// limit_bytes (CSI: OUT_OF_RANGE when the range cannot be honoured).
func capacityFor(required, limit int64, zoneSize uint64, minZones uint32) (uint64, error) {
	if required < 0 || limit < 0 {
		return 0, errorf(ErrInvalidArgument, "capacity_range: required_bytes=%d and limit_bytes=%d must not be negative", required, limit)
	}
	if limit > 0 && required > limit {
		return 0, errorf(ErrInvalidArgument, "capacity_range: required_bytes=%d exceeds limit_bytes=%d", required, limit)
	}
	want := uint64(required)
	if want == 0 {
		want = max(defaultVolumeSize, uint64(minZones)*zoneSize)
		if limit > 0 && want > uint64(limit) {
			want = uint64(limit)
		}
	}
	if want > maxCapacityBytes {
		return 0, errorf(ErrOutOfRange, "capacity_range: required_bytes=%d is above the largest volume (%d bytes)", want, uint64(maxCapacityBytes))
	}
	size := (want + zoneSize - 1) / zoneSize * zoneSize
	if limit > 0 && size > uint64(limit) {
		return 0, errorf(ErrOutOfRange, "capacity_range: %d bytes rounded up to whole zones of zone.size=%s is %d bytes, above limit_bytes=%d", want, fmtSize(zoneSize), size, limit)
	}
	return size, nil
}

// buildSpec validates canonical parameters for a volume of size bytes (a
// whole number of zones) by handing them to qcow2.ParseCreateOptions as
// image options, then checks the limits the image format would clamp and
// refuses them, as the issue asks, instead of silently changing them.
func buildSpec(p map[string]string, size uint64) (*volumeSpec, error) {
	if m, ok := p[ParamZoneMode]; ok && m != hostManaged {
		return nil, errorf(ErrInvalidArgument, "parameter %s=%s: only %s is supported", ParamZoneMode, m, hostManaged)
	}
	if _, err := exporterOf(p); err != nil {
		return nil, err
	}
	opts := []string{ParamZoneMode + "=" + hostManaged}
	for _, k := range slices.Sorted(maps.Keys(p)) {
		name := k
		switch k {
		case ParamZoneMode, ParamExporter: // not image options
			continue
		case ParamClusterSize:
			name = "cluster_size"
		}
		// ",," is a literal comma in qemu option syntax; doubling keeps a
		// value from smuggling in another option (e.g. backing_file).
		opts = append(opts, name+"="+strings.ReplaceAll(p[k], ",", ",,"))
	}
	co, err := qcow2.ParseCreateOptions(opts, strconv.FormatUint(size, 10))
	if err != nil {
		return nil, paramError(err, size)
	}
	z := co.Zoned
	g := Geometry{Size: size, ZoneSize: qcow2.DefaultZoneSize, MaxAppend: qcow2.DefaultMaxAppendBytes, ClusterSize: qcow2.DefaultClusterSize}
	if co.ClusterSize != 0 {
		g.ClusterSize = co.ClusterSize
	}
	if z.ZoneSize != nil {
		g.ZoneSize = *z.ZoneSize
	}
	g.ZoneCapacity = g.ZoneSize
	if z.ZoneCapacity != nil {
		g.ZoneCapacity = *z.ZoneCapacity
	}
	if z.ConventionalZones != nil {
		g.Conventional = *z.ConventionalZones
	}
	if z.MaxAppendBytes != nil {
		g.MaxAppend = *z.MaxAppendBytes
	}
	if z.MaxActiveZones != nil {
		g.MaxActive = *z.MaxActiveZones
		g.MaxOpen = g.MaxActive
	}
	if z.MaxOpenZones != nil {
		g.MaxOpen = *z.MaxOpenZones
	}
	g.NrZones = uint32(size / g.ZoneSize)
	if err := g.checkLimits(p); err != nil {
		return nil, err
	}
	return &volumeSpec{create: co, geo: g}, nil
}

// checkLimits refuses the limits qcow2 would clamp (spec §2: max_active ≤
// nr_zones, max_open ≤ sequential zones, max_open ≤ max_active when set).
// p holds the values as the user wrote them, for the messages.
func (g Geometry) checkLimits(p map[string]string) error {
	seq := g.NrZones - g.Conventional
	shown := func(name string, v uint32) string {
		if s, ok := p[name]; ok {
			return s
		}
		return strconv.FormatUint(uint64(v), 10) + " (default)"
	}
	vol := fmt.Sprintf("a %s volume with %s=%s", fmtSize(g.Size), ParamZoneSize, fmtSize(g.ZoneSize))
	switch {
	case g.MaxActive > g.NrZones:
		return errorf(ErrInvalidArgument, "parameter %s=%s: larger than the %d zones of %s; it would be clamped — set it to %d or less",
			ParamMaxActive, shown(ParamMaxActive, g.MaxActive), g.NrZones, vol, g.NrZones)
	case g.MaxOpen > seq:
		return errorf(ErrInvalidArgument, "parameter %s=%s: larger than the %d sequential zones of %s; it would be clamped — set it to %d or less",
			ParamMaxOpen, shown(ParamMaxOpen, g.MaxOpen), seq, vol, seq)
	case g.MaxActive != 0 && g.MaxOpen > g.MaxActive:
		return errorf(ErrInvalidArgument, "parameter %s=%s: larger than %s=%d; it would be clamped — set it to %d or less (open zones are also active)",
			ParamMaxOpen, shown(ParamMaxOpen, g.MaxOpen), ParamMaxActive, g.MaxActive, g.MaxActive)
	}
	return nil
}

// paramError turns a qcow2 option error into one that names the StorageClass
// parameter (or the capacity, for the image size).
func paramError(err error, size uint64) error {
	var oe *qcow2.OptionError
	if !errors.As(err, &oe) {
		return errorf(ErrInvalidArgument, "parameters: %w", err)
	}
	name := oe.Name
	switch name {
	case "size":
		return errorf(ErrInvalidArgument, "capacity %d bytes (%s): %s", size, fmtSize(size), oe.Rule)
	case "cluster_size":
		name = ParamClusterSize
	}
	return errorf(ErrInvalidArgument, "parameter %s=%s: %s", name, oe.Value, oe.Rule)
}

// fmtSize writes a byte count the way qemu-img sizes are written when it is
// a whole number of K/M/G/T, and in bytes otherwise.
func fmtSize(v uint64) string {
	for _, u := range []struct {
		s     string
		shift uint
	}{{"T", 40}, {"G", 30}, {"M", 20}, {"K", 10}} {
		if v >= 1<<u.shift && v%(1<<u.shift) == 0 {
			return strconv.FormatUint(v>>u.shift, 10) + u.s
		}
	}
	return strconv.FormatUint(v, 10)
}
