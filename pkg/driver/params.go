package driver

import (
	"errors"
	"fmt"
	"maps"
	"math"
	"math/big"
	"math/bits"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/api/resource"

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
	// clamped says which zone limits were lowered to what the zones
	// allow (clampLimits), for the log and the event.
	clamped []string
}

// sizeParams are the parameters that hold a byte count (parseBytes).
var sizeParams = []string{ParamZoneSize, ParamZoneCapacity, ParamMaxAppend, ParamClusterSize}

// ruleBytes is the size rule, as the messages and the README state it.
const ruleBytes = "must be a whole number of bytes: plain (67108864), with a qemu-img suffix K, M, G, T, P or E (powers of 1024: 64M = 64 MiB), " +
	"or a Kubernetes quantity (64Mi, 1Gi: powers of 1024; 500k, 1e6: powers of 10)"

// qemuSize is a number with one of the single-letter suffixes qemu-img
// and `zq-csi img` read as powers of 1024 (upper case; g, t and p, which
// Kubernetes does not have, also in lower case).
var qemuSize = regexp.MustCompile(`^([0-9]+)(\.[0-9]+)?([KMGTPEgtp])$`)

// parseBytes reads the byte count of size parameter name. The rule, one
// for every size parameter: a plain whole number is bytes; a single
// upper-case K, M, G, T, P or E suffix follows qemu-img (powers of 1024),
// as the image tool and the image option names this driver shares with it
// do — so "64M" is 67108864 here, not Kubernetes' 64e6; anything else is a
// Kubernetes quantity (Ki, Mi, Gi, Ti, Pi, Ei powers of 1024, k powers of
// 10, decimal exponents). "m" alone is refused: Kubernetes reads it as
// milli, qemu as MiB. The result must be a whole number of bytes.
func parseBytes(name, v string) (uint64, error) {
	bad := func(rule string) (uint64, error) {
		return 0, errorf(ErrInvalidArgument, "parameter %s=%s: %s", name, v, rule)
	}
	if n, err := strconv.ParseUint(v, 10, 64); err == nil {
		if n > math.MaxInt64 {
			return bad("too large")
		}
		return n, nil
	}
	if m := qemuSize.FindStringSubmatch(v); m != nil {
		r, ok := new(big.Rat).SetString(m[1] + m[2])
		if !ok {
			return bad(ruleBytes)
		}
		shift := map[byte]uint{'K': 10, 'M': 20, 'G': 30, 'T': 40, 'P': 50, 'E': 60, 'g': 30, 't': 40, 'p': 50}[m[3][0]]
		r.Mul(r, new(big.Rat).SetInt(new(big.Int).Lsh(big.NewInt(1), shift)))
		if !r.IsInt() {
			return bad("is not a whole number of bytes")
		}
		if !r.Num().IsInt64() {
			return bad("too large")
		}
		return uint64(r.Num().Int64()), nil
	}
	if strings.HasSuffix(v, "m") {
		return bad("ambiguous suffix m (milli in Kubernetes, MiB in qemu-img): write M or Mi")
	}
	q, err := resource.ParseQuantity(v)
	if err != nil {
		return bad(ruleBytes)
	}
	if q.Sign() < 0 {
		return bad("must not be negative")
	}
	r, ok := new(big.Rat).SetString(q.AsDec().String())
	if !ok {
		return bad(ruleBytes)
	}
	if !r.IsInt() {
		return bad("is not a whole number of bytes")
	}
	// ParseQuantity saturates at 2^63-1 rather than fail: take that value
	// for the overflow it stands for.
	if !r.Num().IsInt64() || r.Num().Int64() == math.MaxInt64 {
		return bad("too large")
	}
	return uint64(r.Num().Int64()), nil
}

// zoneSizeOf returns the effective zone size of canonical parameters.
func zoneSizeOf(p map[string]string) (uint64, error) {
	v, ok := p[ParamZoneSize]
	if !ok {
		return qcow2.DefaultZoneSize, nil
	}
	zs, err := parseBytes(ParamZoneSize, v)
	if err != nil {
		return 0, err
	}
	if zs < 512 || bits.OnesCount64(zs) != 1 {
		return 0, errorf(ErrInvalidArgument, "parameter %s=%s: must be a power of two of at least 512 bytes (%s is %d bytes)", ParamZoneSize, v, v, zs)
	}
	return zs, nil
}

// clusterSizeOf returns the effective cluster size of canonical
// parameters (its validity is qcow2's to judge; an unparsable one is
// refused here).
func clusterSizeOf(p map[string]string) (uint64, error) {
	v, ok := p[ParamClusterSize]
	if !ok {
		return qcow2.DefaultClusterSize, nil
	}
	return parseBytes(ParamClusterSize, v)
}

// maxVolumeSize is the largest volume of zone size zs and cluster size
// cs, and what sets it: qcow2's own limit on the virtual size (2^61
// bytes), the zone count (at most qcow2.MaxZones, spec §2), or the L1
// table (at most 32 MiB of 8-byte entries, each covering cs*cs/8 bytes).
func maxVolumeSize(zs, cs uint64) (uint64, string) {
	limit, why := uint64(maxCapacityBytes), "the largest qcow2 image (2^61 bytes)"
	if byZones := uint64(qcow2.MaxZones) * zs; byZones < limit {
		limit, why = byZones, fmt.Sprintf("%d zones (the most an image may have) of %s=%s", qcow2.MaxZones, ParamZoneSize, fmtSize(zs))
	}
	if cs >= 512 && bits.OnesCount64(cs) == 1 && cs <= 1<<21 {
		if byL1 := uint64(32<<20/8) * (cs * cs / 8); byL1 < limit {
			limit, why = byL1, fmt.Sprintf("the 32 MiB L1 table of %s=%s", ParamClusterSize, fmtSize(cs))
		}
	}
	return limit / zs * zs, why
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
// limit_bytes and against the largest volume the geometry allows
// (maxVolumeSize). Sizes the plugin cannot make are OUT_OF_RANGE, one
// rule for every size (CSI spec, CreateVolume errors: "Unsupported
// capacity_range ... OUT_OF_RANGE"); a size that does not fit the node's
// free space is RESOURCE_EXHAUSTED, decided by the caller.
func capacityFor(required, limit int64, zoneSize, clusterSize uint64, minZones uint32) (uint64, error) {
	if required < 0 || limit < 0 {
		return 0, errorf(ErrInvalidArgument, "capacity_range: required_bytes=%d and limit_bytes=%d must not be negative", required, limit)
	}
	if limit > 0 && required > limit {
		return 0, errorf(ErrInvalidArgument, "capacity_range: required_bytes=%d exceeds limit_bytes=%d", required, limit)
	}
	largest, why := maxVolumeSize(zoneSize, clusterSize)
	want := uint64(required)
	if want == 0 {
		want = max(defaultVolumeSize, uint64(minZones)*zoneSize)
		if limit > 0 && want > uint64(limit) {
			want = uint64(limit)
		}
		want = min(want, largest)
	}
	if want > largest {
		return 0, errorf(ErrOutOfRange, "capacity_range: required_bytes=%s is above the largest volume of this StorageClass, %s: %s",
			bytesAndSize(want), bytesAndSize(largest), why)
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
		v := p[k]
		if slices.Contains(sizeParams, k) {
			// The image tool's parser knows qemu's suffixes only: it gets
			// the byte count of the driver's rule (parseBytes).
			n, err := parseBytes(k, v)
			if err != nil {
				return nil, err
			}
			v = strconv.FormatUint(n, 10)
		}
		// ",," is a literal comma in qemu option syntax; doubling keeps a
		// value from smuggling in another option (e.g. backing_file).
		opts = append(opts, name+"="+strings.ReplaceAll(v, ",", ",,"))
	}
	co, err := qcow2.ParseCreateOptions(opts, strconv.FormatUint(size, 10))
	if err != nil {
		return nil, paramError(err, size, p)
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
	clamped := g.clampLimits()
	// The image gets the clamped limits: it is made exactly as the volume
	// context says (qcow2.Create would clamp the same way, with warnings).
	mo, ma := g.MaxOpen, g.MaxActive
	zo := *co.Zoned
	zo.MaxOpenZones, zo.MaxActiveZones = &mo, &ma
	co.Zoned = &zo
	return &volumeSpec{create: co, geo: g, clamped: clamped}, nil
}

// clampLimits lowers the open/active limits that are larger than the
// volume's zones allow, as the seed, qemu-img and `zq-csi img create` do
// (spec §2: max_active ≤ nr_zones, max_open ≤ sequential zones, max_open ≤
// max_active when set), and says what it changed. A StorageClass is
// written once for volumes of every size: a limit of 8 active zones must
// not make a 2-zone volume impossible. Only limits are clamped; a
// geometry that cannot be (conventional zones ≥ zones, a capacity above
// the zone size, ...) is still refused.
func (g *Geometry) clampLimits() (clamped []string) {
	seq := g.NrZones - g.Conventional
	if g.MaxActive > g.NrZones {
		clamped = append(clamped, fmt.Sprintf("%s=%d->%d (the volume has %d zones)", ParamMaxActive, g.MaxActive, g.NrZones, g.NrZones))
		g.MaxActive = g.NrZones
	}
	if g.MaxOpen > seq {
		clamped = append(clamped, fmt.Sprintf("%s=%d->%d (the volume has %d sequential zones)", ParamMaxOpen, g.MaxOpen, seq, seq))
		g.MaxOpen = seq
	}
	if g.MaxActive != 0 && g.MaxOpen > g.MaxActive {
		clamped = append(clamped, fmt.Sprintf("%s=%d->%d (open zones are also active: at most %s)", ParamMaxOpen, g.MaxOpen, g.MaxActive, ParamMaxActive))
		g.MaxOpen = g.MaxActive
	}
	return clamped
}

// volumeContextClampedKey names, in the volume context, the limits the
// volume has below what its parameters asked (see clampedLimits).
const volumeContextClampedKey = "zone.limits_clamped"

// clampedLimits compares the limits asked for (creation parameters, then
// the mutable ones in force) with g's and describes each that is lower,
// e.g. "zone.max_active_zones=8->2"; "" when none is.
func clampedLimits(params, mutable map[string]string, g Geometry) string {
	asked := maps.Clone(params)
	maps.Copy(asked, mutable)
	var out []string
	for _, l := range []struct {
		name string
		have uint32
	}{{ParamMaxActive, g.MaxActive}, {ParamMaxOpen, g.MaxOpen}} {
		v, ok := asked[l.name]
		if !ok {
			continue
		}
		if n, err := strconv.ParseUint(v, 10, 32); err == nil && uint32(n) != l.have {
			out = append(out, fmt.Sprintf("%s=%d->%d", l.name, n, l.have))
		}
	}
	return strings.Join(out, ",")
}

// paramError turns a qcow2 option error into one that names the StorageClass
// parameter (or the capacity, for the image size).
func paramError(err error, size uint64, p map[string]string) error {
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
	val := oe.Value
	if v, ok := p[name]; ok && v != val {
		val = v + " (" + oe.Value + " bytes)" // as the user wrote it
	}
	return errorf(ErrInvalidArgument, "parameter %s=%s: %s", name, val, oe.Rule)
}

// bytesAndSize writes "N (fmtSize)" or, when fmtSize is the bare
// number, "N bytes".
func bytesAndSize(v uint64) string {
	n := strconv.FormatUint(v, 10)
	if f := fmtSize(v); f != n {
		return n + " (" + f + ")"
	}
	return n + " bytes"
}

// fmtSize writes a byte count the way qemu-img sizes are written when it is
// a whole number of K/M/G/T, and in bytes otherwise.
func fmtSize(v uint64) string {
	for _, u := range []struct {
		s     string
		shift uint
	}{{"E", 60}, {"P", 50}, {"T", 40}, {"G", 30}, {"M", 20}, {"K", 10}} {
		if v >= 1<<u.shift && v%(1<<u.shift) == 0 {
			return strconv.FormatUint(v>>u.shift, 10) + u.s
		}
	}
	return strconv.FormatUint(v, 10)
}
