package qcow2

// Parsing of qemu-img style creation options ("-o key=value,...") into
// CreateOptions. The option names, the size syntax and the compat levels
// follow qemu-img 7.2; the zone.* options follow the seed patch
// (specs/zoned-format.md §2), with the QAPI dashed spellings accepted as
// synonyms.

import (
	"errors"
	"fmt"
	"math"
	"math/big"
	"math/bits"
	"strconv"
	"strings"
)

// ErrInvalidOption is the sentinel every *OptionError matches with errors.Is.
var ErrInvalidOption = errors.New("qcow2: invalid option")

// OptionError reports a creation option (or size) that was refused.
type OptionError struct {
	Name  string // canonical option name, e.g. "zone.size"
	Value string // the value as the user wrote it
	Rule  string // what the value violates
}

func (e *OptionError) Error() string {
	return fmt.Sprintf("invalid option %s=%s: %s", e.Name, e.Value, e.Rule)
}

// Unwrap makes errors.Is(err, ErrInvalidOption) true.
func (e *OptionError) Unwrap() error { return ErrInvalidOption }

// Rules shared with callers that want to tell "too large" from "malformed"
// (qemu-io prints different messages for the two).
const (
	ruleSizeSyntax = "not a size (bytes, or a number with suffix B, K, M, G, T, P or E; decimal fractions need a suffix)"
	ruleSizeRange  = "too large (must not exceed 9223372036854775807 bytes)"
)

// IsSizeTooLarge reports whether err is a ParseSize overflow.
func IsSizeTooLarge(err error) bool {
	var oe *OptionError
	return errors.As(err, &oe) && oe.Rule == ruleSizeRange
}

// maxSizeLen bounds the text ParseSize accepts, so a hostile string cannot
// make the exact big-number arithmetic expensive.
const maxSizeLen = 100

// ParseSize parses a size the way qemu-img does (qemu_strtosz): a decimal
// number of bytes, optionally with a decimal fraction and a suffix
// b/B (bytes), k/K, m/M, g/G, t/T, p/P, e/E (powers of 1024), or a
// hexadecimal number "0x..." without fraction or suffix. A fraction needs a
// suffix other than B; the result is rounded to the nearest byte, halves up.
// Negative values and values above math.MaxInt64 (qemu-img's own limit for
// sizes and offsets) are refused. Errors are *OptionError named "size".
func ParseSize(s string) (uint64, error) {
	return parseSize("size", s)
}

func parseSize(name, s string) (uint64, error) {
	bad := func(rule string) (uint64, error) {
		return 0, &OptionError{Name: name, Value: s, Rule: rule}
	}
	if s == "" || len(s) > maxSizeLen {
		return bad(ruleSizeSyntax)
	}
	if strings.HasPrefix(s, "-") {
		return bad("must not be negative")
	}
	if len(s) > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X') {
		// qemu reparses "0x..." as hex and refuses a fraction or suffix.
		v, err := strconv.ParseUint(s[2:], 16, 64)
		if err != nil {
			if errors.Is(err, strconv.ErrRange) {
				return bad(ruleSizeRange)
			}
			return bad(ruleSizeSyntax)
		}
		if v > math.MaxInt64 {
			return bad(ruleSizeRange)
		}
		return v, nil
	}
	i := 0
	for i < len(s) && isDigit(s[i]) {
		i++
	}
	if i == 0 {
		return bad(ruleSizeSyntax)
	}
	intPart := s[:i]
	fracPart := ""
	if i < len(s) && s[i] == '.' {
		j := i + 1
		for j < len(s) && isDigit(s[j]) {
			j++
		}
		fracPart = s[i+1 : j]
		i = j
	}
	mul := uint64(1)
	if i < len(s) {
		m, ok := suffixMul(s[i])
		if !ok || i+1 != len(s) {
			return bad(ruleSizeSyntax)
		}
		mul = m
		i++
	}
	hasFrac := strings.TrimRight(fracPart, "0") != ""
	if mul == 1 && hasFrac {
		return bad(ruleSizeSyntax)
	}
	// Exact arithmetic: (int + frac/10^n) * mul, rounded half up.
	v, _ := new(big.Int).SetString(intPart, 10)
	v.Mul(v, new(big.Int).SetUint64(mul))
	if fracPart != "" {
		num, _ := new(big.Int).SetString(fracPart, 10)
		den := new(big.Int).Exp(big.NewInt(10), big.NewInt(int64(len(fracPart))), nil)
		num.Mul(num, new(big.Int).SetUint64(mul))
		num.Mul(num, big.NewInt(2))
		num.Add(num, den)
		den.Mul(den, big.NewInt(2))
		num.Quo(num, den) // floor(frac*mul + 1/2)
		v.Add(v, num)
	}
	if !v.IsUint64() || v.Uint64() > math.MaxInt64 {
		return bad(ruleSizeRange)
	}
	return v.Uint64(), nil
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func suffixMul(c byte) (uint64, bool) {
	switch c {
	case 'b', 'B':
		return 1, true
	case 'k', 'K':
		return 1 << 10, true
	case 'm', 'M':
		return 1 << 20, true
	case 'g', 'G':
		return 1 << 30, true
	case 't', 'T':
		return 1 << 40, true
	case 'p', 'P':
		return 1 << 50, true
	case 'e', 'E':
		return 1 << 60, true
	}
	return 0, false
}

// Canonical option names.
const (
	optSize           = "size"
	optClusterSize    = "cluster_size"
	optRefcountBits   = "refcount_bits"
	optLazyRefcounts  = "lazy_refcounts"
	optBackingFile    = "backing_file"
	optBackingFmt     = "backing_fmt"
	optCompat         = "compat"
	optExtendedL2     = "extended_l2"
	optPrealloc       = "preallocation"
	optCompression    = "compression_type"
	optZoneMode       = "zone.mode"
	optZoneSize       = "zone.size"
	optZoneCapacity   = "zone.capacity"
	optZoneConv       = "zone.conventional_zones"
	optZoneMaxOpen    = "zone.max_open_zones"
	optZoneMaxActive  = "zone.max_active_zones"
	optZoneMaxAppend  = "zone.max_append_bytes"
	maxZones          = 1 << 20
	sectorSize        = 512
	minClusterSize    = 1 << MinClusterBits
	maxClusterSize    = 1 << MaxClusterBits
	maxRefcountBits   = 64
	hostManagedZoning = "host-managed"
)

// optionSynonyms maps the QAPI (dashed) spellings to the qemu-img ones.
var optionSynonyms = map[string]string{
	"cluster-size":            optClusterSize,
	"refcount-bits":           optRefcountBits,
	"lazy-refcounts":          optLazyRefcounts,
	"backing-file":            optBackingFile,
	"backing-fmt":             optBackingFmt,
	"extended-l2":             optExtendedL2,
	"compression-type":        optCompression,
	"zone.conventional-zones": optZoneConv,
	"zone.max-open-zones":     optZoneMaxOpen,
	"zone.max-active-zones":   optZoneMaxActive,
	"zone.max-append-bytes":   optZoneMaxAppend,
}

var knownOptions = map[string]bool{
	optSize: true, optClusterSize: true, optRefcountBits: true,
	optLazyRefcounts: true, optBackingFile: true, optBackingFmt: true,
	optCompat: true, optExtendedL2: true, optPrealloc: true,
	optCompression: true, optZoneMode: true, optZoneSize: true,
	optZoneCapacity: true, optZoneConv: true, optZoneMaxOpen: true,
	optZoneMaxActive: true, optZoneMaxAppend: true,
}

type kv struct{ key, val string }

// splitOptions splits one "-o" argument into key=value pairs. As in qemu's
// QemuOpts, ",," stands for a literal comma inside a value.
func splitOptions(arg string) ([]kv, error) {
	var out []kv
	var cur strings.Builder
	var parts []string
	for i := 0; i < len(arg); i++ {
		if arg[i] == ',' {
			if i+1 < len(arg) && arg[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			parts = append(parts, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(arg[i])
	}
	parts = append(parts, cur.String())
	for _, p := range parts {
		if p == "" {
			continue // qemu tolerates empty elements, e.g. a trailing comma
		}
		k, v, ok := strings.Cut(p, "=")
		if !ok {
			// qemu treats a bare boolean key as "key=on".
			if canonicalName(k) == optLazyRefcounts {
				out = append(out, kv{k, "on"})
				continue
			}
			return nil, &OptionError{Name: k, Value: "", Rule: "missing value (expected NAME=VALUE)"}
		}
		out = append(out, kv{k, v})
	}
	return out, nil
}

func canonicalName(k string) string {
	if c, ok := optionSynonyms[k]; ok {
		return c
	}
	return k
}

// ParseCreateOptions turns qemu-img style "-o" arguments (each
// "key=value[,key=value...]", possibly repeated; the last value of a key
// wins) and the optional positional SIZE (sizeArg, "" when absent) into
// CreateOptions, and validates everything that can be decided before the
// file exists (specs/zoned-format.md §2), so that a refused command leaves no
// file behind. Zone limits that the engine clamps (max_open/max_active) are
// not errors here. A size is required unless a backing file is given; then
// Size stays 0 and means "the backing file's size". Every error is an
// *OptionError.
func ParseCreateOptions(opts []string, sizeArg string) (CreateOptions, error) {
	var co CreateOptions
	vals := map[string]string{}
	spelled := map[string]string{} // canonical name -> the spelling that set it
	for _, arg := range opts {
		pairs, err := splitOptions(arg)
		if err != nil {
			return co, err
		}
		for _, p := range pairs {
			name := canonicalName(p.key)
			if !knownOptions[name] {
				return co, &OptionError{Name: p.key, Value: p.val, Rule: "unknown option"}
			}
			// One spelling given twice is qemu-img's "the last one
			// wins"; two spellings of one option with different values
			// are a contradiction the user did not see, refused as the
			// CSI server refuses it in StorageClass parameters.
			if prev, ok := spelled[name]; ok && prev != p.key && vals[name] != p.val {
				return co, &OptionError{Name: p.key, Value: p.val,
					Rule: fmt.Sprintf("conflicts with %s=%s, the same option under another spelling", prev, vals[name])}
			}
			vals[name] = p.val
			spelled[name] = p.key
		}
	}
	bad := func(name, rule string) (CreateOptions, error) {
		return CreateOptions{}, &OptionError{Name: name, Value: vals[name], Rule: rule}
	}

	// Size: positional or option, not both (qemu-img: "The image size must
	// be specified only once").
	sizeStr, haveSize := vals[optSize]
	if sizeArg != "" {
		if haveSize {
			return CreateOptions{}, &OptionError{Name: optSize, Value: sizeStr,
				Rule: fmt.Sprintf("the image size must be specified only once (positional SIZE %s and -o size=%s)", sizeArg, sizeStr)}
		}
		sizeStr, haveSize = sizeArg, true
		vals[optSize] = sizeArg
	}
	if haveSize {
		v, err := parseSize(optSize, sizeStr)
		if err != nil {
			return CreateOptions{}, err
		}
		co.Size = v
	}

	if v, ok := vals[optCompat]; ok {
		switch v {
		case "0.10", "v2":
			co.Version = 2
		case "1.1", "v3":
			co.Version = 3
		default:
			return bad(optCompat, "must be 0.10 (v2) or 1.1 (v3)")
		}
	}
	if v, ok := vals[optClusterSize]; ok {
		n, err := parseSize(optClusterSize, v)
		if err != nil {
			return CreateOptions{}, err
		}
		if n < minClusterSize || n > maxClusterSize || bits.OnesCount64(n) != 1 {
			return bad(optClusterSize, "must be a power of two between 512 and 2048k")
		}
		co.ClusterSize = uint32(n)
	}
	if v, ok := vals[optRefcountBits]; ok {
		n, err := strconv.ParseUint(v, 0, 64)
		if err != nil || n == 0 || n > maxRefcountBits || bits.OnesCount64(n) != 1 {
			return bad(optRefcountBits, "must be a power of two between 1 and 64")
		}
		co.RefcountBits = uint32(n)
	}
	if v, ok := vals[optLazyRefcounts]; ok {
		b, ok := parseBool(v)
		if !ok {
			return bad(optLazyRefcounts, "must be on or off")
		}
		co.LazyRefcounts = b
	}
	if v, ok := vals[optBackingFile]; ok {
		if v == "" {
			return bad(optBackingFile, "must not be empty")
		}
		co.BackingFile = v
	}
	if v, ok := vals[optBackingFmt]; ok {
		if v != "qcow2" && v != "raw" {
			return bad(optBackingFmt, "must be qcow2 or raw")
		}
		if co.BackingFile == "" {
			return bad(optBackingFmt, "needs a backing file")
		}
		co.BackingFormat = v
	}
	// Options qemu-img prints by default; accepted with the only value we
	// implement so that command lines copied from qemu-img keep working.
	for name, only := range map[string]string{optExtendedL2: "off", optPrealloc: "off", optCompression: "zlib"} {
		if v, ok := vals[name]; ok {
			if name == optExtendedL2 {
				if b, ok := parseBool(v); ok && !b {
					continue
				}
			} else if v == only {
				continue
			}
			return bad(name, "not supported by zq-csi (only "+only+")")
		}
	}
	if co.Version == 2 {
		if co.LazyRefcounts {
			return bad(optLazyRefcounts, "lazy refcounts need compat=1.1 or above")
		}
		if co.RefcountBits != 0 && co.RefcountBits != DefaultRefcountBits {
			return bad(optRefcountBits, "refcount widths other than 16 bits need compat=1.1 or above")
		}
	}
	if !haveSize && co.BackingFile == "" {
		return bad(optSize, "image creation needs a size (or a backing file)")
	}

	z, err := parseZoned(vals, co, haveSize)
	if err != nil {
		return CreateOptions{}, err
	}
	co.Zoned = z
	return co, nil
}

// parseZoned handles the zone.* options and the checks of
// specs/zoned-format.md §2 that do not depend on the file.
func parseZoned(vals map[string]string, co CreateOptions, haveSize bool) (*ZonedOptions, error) {
	bad := func(name, value, rule string) (*ZonedOptions, error) {
		return nil, &OptionError{Name: name, Value: value, Rule: rule}
	}
	mode, hasMode := vals[optZoneMode]
	if !hasMode {
		for _, n := range []string{optZoneSize, optZoneCapacity, optZoneConv, optZoneMaxOpen, optZoneMaxActive, optZoneMaxAppend} {
			if v, ok := vals[n]; ok {
				return bad(n, v, "zone options need zone.mode=host-managed")
			}
		}
		return nil, nil
	}
	if mode != hostManagedZoning {
		return bad(optZoneMode, mode, "only host-managed is supported")
	}
	if co.Version == 2 {
		return bad(optCompat, vals[optCompat], "the zoned format needs compat=1.1")
	}
	z := &ZonedOptions{}
	sizeOpt := func(name string) (*uint64, error) {
		v, ok := vals[name]
		if !ok {
			return nil, nil
		}
		n, err := parseSize(name, v)
		if err != nil {
			return nil, err
		}
		return &n, nil
	}
	numOpt := func(name string) (*uint32, error) {
		v, ok := vals[name]
		if !ok {
			return nil, nil
		}
		n, err := strconv.ParseUint(v, 0, 32)
		if err != nil {
			return nil, &OptionError{Name: name, Value: v, Rule: "must be a number between 0 and 4294967295"}
		}
		u := uint32(n)
		return &u, nil
	}
	var err error
	if z.ZoneSize, err = sizeOpt(optZoneSize); err != nil {
		return nil, err
	}
	if z.ZoneCapacity, err = sizeOpt(optZoneCapacity); err != nil {
		return nil, err
	}
	if z.MaxAppendBytes, err = sizeOpt(optZoneMaxAppend); err != nil {
		return nil, err
	}
	if z.ConventionalZones, err = numOpt(optZoneConv); err != nil {
		return nil, err
	}
	if z.MaxOpenZones, err = numOpt(optZoneMaxOpen); err != nil {
		return nil, err
	}
	if z.MaxActiveZones, err = numOpt(optZoneMaxActive); err != nil {
		return nil, err
	}

	// Effective values, with the defaults of §2, for the cross checks.
	zs, zsName, zsVal := uint64(DefaultZoneSize), optZoneSize, vals[optZoneSize]
	if z.ZoneSize != nil {
		zs = *z.ZoneSize
	} else {
		zsVal = fmt.Sprintf("%d (default)", zs)
	}
	if zs < sectorSize || bits.OnesCount64(zs) != 1 {
		return bad(zsName, zsVal, "zone size must be a power of two and a multiple of 512")
	}
	zc, zcVal := zs, vals[optZoneCapacity]
	if z.ZoneCapacity != nil {
		zc = *z.ZoneCapacity
		switch {
		case zc == 0:
			return bad(optZoneCapacity, zcVal, "zone capacity must not be 0")
		case zc%sectorSize != 0:
			return bad(optZoneCapacity, zcVal, "zone capacity must be a multiple of 512")
		case zc > zs:
			return bad(optZoneCapacity, zcVal, fmt.Sprintf("zone capacity exceeds zone size %d", zs))
		}
	}
	ma, maVal := uint64(DefaultMaxAppendBytes), vals[optZoneMaxAppend]
	if z.MaxAppendBytes != nil {
		ma = *z.MaxAppendBytes
	} else {
		maVal = fmt.Sprintf("%d (default)", ma)
	}
	if ma%sectorSize != 0 {
		return bad(optZoneMaxAppend, maVal, "max append bytes must be a multiple of 512")
	}
	if ma > math.MaxUint32 || ma+sectorSize >= zc {
		return bad(optZoneMaxAppend, maVal, fmt.Sprintf("max append bytes + 512 must be less than the zone capacity %d", zc))
	}
	if !haveSize {
		return z, nil // size comes from the backing file; the engine checks the rest
	}
	size := (co.Size + sectorSize - 1) / sectorSize * sectorSize
	nr := (size + zs - 1) / zs
	if nr > maxZones {
		return bad(zsName, zsVal, fmt.Sprintf("%d zones for size %d; at most %d zones are allowed", nr, co.Size, maxZones))
	}
	conv := uint64(0)
	if z.ConventionalZones != nil {
		conv = uint64(*z.ConventionalZones)
	}
	if conv >= nr {
		name, val := optZoneConv, vals[optZoneConv]
		if z.ConventionalZones == nil {
			name, val = optSize, vals[optSize]
		}
		return bad(name, val, fmt.Sprintf("conventional zones must be fewer than the %d zones of the image", nr))
	}
	return z, nil
}

func parseBool(v string) (bool, bool) {
	switch strings.ToLower(v) {
	case "on", "yes", "true", "y":
		return true, true
	case "off", "no", "false", "n":
		return false, true
	}
	return false, false
}
