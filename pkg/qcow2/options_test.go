package qcow2

import (
	"errors"
	"fmt"
	"math"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

func u64(v uint64) *uint64 { return &v }
func u32(v uint32) *uint32 { return &v }

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want uint64
	}{
		{"0", 0},
		{"512", 512},
		{"512b", 512},
		{"512B", 512},
		{"1k", 1024},
		{"1K", 1024},
		{"64M", 64 << 20},
		{"768m", 768 << 20},
		{"1G", 1 << 30},
		{"2g", 2 << 30},
		{"1T", 1 << 40},
		{"1t", 1 << 40},
		{"1P", 1 << 50},
		{"1p", 1 << 50},
		{"7E", 7 << 60},
		{"7e", 7 << 60},
		{"1.5G", 1610612736},
		{"1.5k", 1536},
		{"1.K", 1024},
		{"0.5K", 512},
		{"1.0009765625K", 1025}, // exactly 1025
		{"0.0001K", 0},          // 0.1024 rounds down
		{"0.0005K", 1},          // 0.512 rounds up
		{"0.00048828125K", 1},   // exactly 0.5: halves round up, as in qemu
		{"1.0b", 1},             // a zero fraction needs no scale
		{"0x10", 16},
		{"0X1f", 31},
		{"0x7fffffffffffffff", math.MaxInt64},
		{"9223372036854775807", math.MaxInt64},
		{"007", 7},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseSize(tc.in)
			if err != nil {
				t.Fatalf("ParseSize(%q): %v", tc.in, err)
			}
			if got != tc.want {
				t.Fatalf("ParseSize(%q) = %d, want %d", tc.in, got, tc.want)
			}
		})
	}
}

func TestParseSizeErrors(t *testing.T) {
	tests := []struct {
		in       string
		tooLarge bool
	}{
		{"", false},
		{"-1", false},
		{"-0", false},
		{"+1", false},
		{"abc", false},
		{"1x", false},
		{"1KB", false},
		{"1 K", false},
		{" 1", false},
		{"1.5", false},  // fraction without a scale
		{"1.5b", false}, // B is no scale
		{".5K", false},
		{"1e3", false}, // exponents are not sizes ("e" is exa only as a suffix)
		{"0x10k", false},
		{"0x1.8", false},
		{"0x", false},
		{"1.2.3K", false},
		{"8E", true},
		{"16E", true},
		{"9223372036854775808", true},
		{"18446744073709551616", true},
		{"0x8000000000000000", true},
		{"0x10000000000000000", true},
		{"99999999999999999999999T", true},
		{strings.Repeat("1", 200), false},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			v, err := ParseSize(tc.in)
			if err == nil {
				t.Fatalf("ParseSize(%q) = %d, want an error", tc.in, v)
			}
			var oe *OptionError
			if !errors.As(err, &oe) || !errors.Is(err, ErrInvalidOption) {
				t.Fatalf("ParseSize(%q) error %T %v is not an *OptionError matching ErrInvalidOption", tc.in, err, err)
			}
			if oe.Value != tc.in {
				t.Errorf("OptionError.Value = %q, want %q", oe.Value, tc.in)
			}
			if got := IsSizeTooLarge(err); got != tc.tooLarge {
				t.Errorf("IsSizeTooLarge = %v, want %v (%v)", got, tc.tooLarge, err)
			}
		})
	}
}

// seedOpts are the -o arguments of the command line in the seed patch.
var seedOpts = []string{
	"size=768M", "zone.size=64M", "zone.capacity=64M", "zone.conventional_zones=0",
	"zone.max_append_bytes=4096", "zone.max_open_zones=6", "zone.max_active_zones=8",
	"zone.mode=host-managed",
}

func TestParseCreateOptions(t *testing.T) {
	tests := []struct {
		name    string
		opts    []string
		sizeArg string
		want    CreateOptions
	}{
		{
			name: "seed command line",
			opts: seedOpts,
			want: CreateOptions{Size: 768 << 20, Zoned: &ZonedOptions{
				ZoneSize: u64(64 << 20), ZoneCapacity: u64(64 << 20), ConventionalZones: u32(0),
				MaxAppendBytes: u64(4096), MaxOpenZones: u32(6), MaxActiveZones: u32(8),
			}},
		},
		{
			name: "seed options in one argument",
			opts: []string{strings.Join(seedOpts, ",")},
			want: CreateOptions{Size: 768 << 20, Zoned: &ZonedOptions{
				ZoneSize: u64(64 << 20), ZoneCapacity: u64(64 << 20), ConventionalZones: u32(0),
				MaxAppendBytes: u64(4096), MaxOpenZones: u32(6), MaxActiveZones: u32(8),
			}},
		},
		{
			name:    "positional size only",
			sizeArg: "1G",
			want:    CreateOptions{Size: 1 << 30},
		},
		{
			name: "zone mode only: pointers stay nil",
			opts: []string{"zone.mode=host-managed"}, sizeArg: "1G",
			want: CreateOptions{Size: 1 << 30, Zoned: &ZonedOptions{}},
		},
		{
			name:    "dashed QAPI synonyms",
			opts:    []string{"zone.mode=host-managed,zone.conventional-zones=2,zone.max-open-zones=3,zone.max-active-zones=4,zone.max-append-bytes=8k,zone.size=1M"},
			sizeArg: "16M",
			want: CreateOptions{Size: 16 << 20, Zoned: &ZonedOptions{
				ZoneSize: u64(1 << 20), ConventionalZones: u32(2), MaxOpenZones: u32(3),
				MaxActiveZones: u32(4), MaxAppendBytes: u64(8192),
			}},
		},
		{
			name:    "classic options",
			opts:    []string{"cluster_size=4k,refcount_bits=64", "lazy_refcounts=on", "compat=1.1"},
			sizeArg: "10M",
			want:    CreateOptions{Size: 10 << 20, ClusterSize: 4096, RefcountBits: 64, LazyRefcounts: true, Version: 3},
		},
		{
			name:    "dashed classic options",
			opts:    []string{"cluster-size=2M,refcount-bits=1,lazy-refcounts=true,backing-file=b.qcow2,backing-fmt=qcow2"},
			sizeArg: "",
			want:    CreateOptions{ClusterSize: 2 << 20, RefcountBits: 1, LazyRefcounts: true, BackingFile: "b.qcow2", BackingFormat: "qcow2"},
		},
		{
			name: "compat 0.10", opts: []string{"compat=0.10", "size=1M"},
			want: CreateOptions{Size: 1 << 20, Version: 2},
		},
		{
			name: "compat v3", opts: []string{"compat=v3", "lazy_refcounts=off"}, sizeArg: "1M",
			want: CreateOptions{Size: 1 << 20, Version: 3},
		},
		{
			name: "last value wins", opts: []string{"cluster_size=4k", "cluster_size=512"}, sizeArg: "1M",
			want: CreateOptions{Size: 1 << 20, ClusterSize: 512},
		},
		{
			name: "comma escape in a value", opts: []string{"backing_file=a,,b.img,backing_fmt=raw"}, sizeArg: "1M",
			want: CreateOptions{Size: 1 << 20, BackingFile: "a,b.img", BackingFormat: "raw"},
		},
		{
			name: "bare boolean", opts: []string{"lazy_refcounts"}, sizeArg: "1M",
			want: CreateOptions{Size: 1 << 20, LazyRefcounts: true},
		},
		{
			name: "qemu-img defaults accepted", opts: []string{"extended_l2=off,preallocation=off,compression_type=zlib"}, sizeArg: "1M",
			want: CreateOptions{Size: 1 << 20},
		},
		{
			name: "clamped limits are not errors", opts: []string{"zone.mode=host-managed,zone.size=1M,zone.max_open_zones=100,zone.max_active_zones=50"}, sizeArg: "4M",
			want: CreateOptions{Size: 4 << 20, Zoned: &ZonedOptions{ZoneSize: u64(1 << 20), MaxOpenZones: u32(100), MaxActiveZones: u32(50)}},
		},
		{
			name: "zoned size from backing file is checked later", opts: []string{"zone.mode=host-managed,zone.size=1M,backing_file=b"},
			want: CreateOptions{BackingFile: "b", Zoned: &ZonedOptions{ZoneSize: u64(1 << 20)}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseCreateOptions(tc.opts, tc.sizeArg)
			if err != nil {
				t.Fatalf("ParseCreateOptions(%q, %q): %v", tc.opts, tc.sizeArg, err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("ParseCreateOptions(%q, %q)\n got %s\nwant %s", tc.opts, tc.sizeArg, dumpCO(got), dumpCO(tc.want))
			}
		})
	}
}

func dumpCO(c CreateOptions) string {
	z := c.Zoned
	c.Zoned = nil
	s := fmt.Sprintf("%+v", c)
	if z == nil {
		return s + " Zoned:nil"
	}
	f := func(p any) string {
		switch v := p.(type) {
		case *uint64:
			if v != nil {
				return fmt.Sprint(*v)
			}
		case *uint32:
			if v != nil {
				return fmt.Sprint(*v)
			}
		}
		return "nil"
	}
	return s + fmt.Sprintf(" Zoned:{size:%s cap:%s conv:%s open:%s active:%s append:%s}",
		f(z.ZoneSize), f(z.ZoneCapacity), f(z.ConventionalZones), f(z.MaxOpenZones), f(z.MaxActiveZones), f(z.MaxAppendBytes))
}

func TestParseCreateOptionsErrors(t *testing.T) {
	tests := []struct {
		name      string
		opts      []string
		sizeArg   string
		wantName  string
		wantValue string
	}{
		{"unknown option", []string{"foo=1"}, "1M", "foo", "1"},
		{"missing value", []string{"cluster_size"}, "1M", "cluster_size", ""},
		{"no size", nil, "", "size", ""},
		{"size twice", []string{"size=1M"}, "2M", "size", "1M"},
		{"bad size", nil, "12Q", "size", "12Q"},
		{"negative size", []string{"size=-1"}, "", "size", "-1"},
		{"cluster size not power of two", []string{"cluster_size=3k"}, "1M", "cluster_size", "3k"},
		{"cluster size too small", []string{"cluster_size=256"}, "1M", "cluster_size", "256"},
		{"cluster size too big", []string{"cluster_size=4M"}, "1M", "cluster_size", "4M"},
		{"refcount bits 3", []string{"refcount_bits=3"}, "1M", "refcount_bits", "3"},
		{"refcount bits 128", []string{"refcount_bits=128"}, "1M", "refcount_bits", "128"},
		{"refcount bits 0", []string{"refcount_bits=0"}, "1M", "refcount_bits", "0"},
		{"lazy refcounts maybe", []string{"lazy_refcounts=maybe"}, "1M", "lazy_refcounts", "maybe"},
		{"compat 2.0", []string{"compat=2.0"}, "1M", "compat", "2.0"},
		{"lazy refcounts on v2", []string{"compat=0.10,lazy_refcounts=on"}, "1M", "lazy_refcounts", "on"},
		{"refcount bits on v2", []string{"compat=0.10,refcount_bits=64"}, "1M", "refcount_bits", "64"},
		{"backing fmt vmdk", []string{"backing_file=b,backing_fmt=vmdk"}, "1M", "backing_fmt", "vmdk"},
		{"backing fmt without file", []string{"backing_fmt=raw"}, "1M", "backing_fmt", "raw"},
		{"compression zstd", []string{"compression_type=zstd"}, "1M", "compression_type", "zstd"},
		{"extended l2", []string{"extended_l2=on"}, "1M", "extended_l2", "on"},
		{"zone option without mode", []string{"zone.size=64M"}, "1G", "zone.size", "64M"},
		{"dashed zone option without mode", []string{"zone.max-open-zones=2"}, "1G", "zone.max_open_zones", "2"},
		{"zone mode host-aware", []string{"zone.mode=host-aware"}, "1G", "zone.mode", "host-aware"},
		{"zoned on v2", []string{"zone.mode=host-managed,compat=0.10"}, "1G", "compat", "0.10"},
		{"zone size not power of two", []string{"zone.mode=host-managed,zone.size=3M"}, "1G", "zone.size", "3M"},
		{"zone size 0", []string{"zone.mode=host-managed,zone.size=0"}, "1G", "zone.size", "0"},
		{"zone size 256", []string{"zone.mode=host-managed,zone.size=256"}, "1G", "zone.size", "256"},
		{"zone size syntax", []string{"zone.mode=host-managed,zone.size=64Mi"}, "1G", "zone.size", "64Mi"},
		{"capacity above size", []string{"zone.mode=host-managed,zone.size=64M,zone.capacity=128M"}, "1G", "zone.capacity", "128M"},
		{"capacity above default size", []string{"zone.mode=host-managed,zone.capacity=512M"}, "1G", "zone.capacity", "512M"},
		{"capacity 0", []string{"zone.mode=host-managed,zone.capacity=0"}, "1G", "zone.capacity", "0"},
		{"capacity unaligned", []string{"zone.mode=host-managed,zone.capacity=1000"}, "1G", "zone.capacity", "1000"},
		{"max append unaligned", []string{"zone.mode=host-managed,zone.max_append_bytes=1000"}, "1G", "zone.max_append_bytes", "1000"},
		{"max append too big", []string{"zone.mode=host-managed,zone.size=1M,zone.max_append_bytes=1M"}, "1G", "zone.max_append_bytes", "1M"},
		{"max append equals capacity-512", []string{"zone.mode=host-managed,zone.size=1M,zone.capacity=8k,zone.max_append_bytes=7.5k"}, "1G", "zone.max_append_bytes", "7.5k"},
		{"default max append too big for capacity", []string{"zone.mode=host-managed,zone.size=64k"}, "1M", "zone.max_append_bytes", "65536 (default)"},
		{"conventional zones = nr zones", []string{"zone.mode=host-managed,zone.size=64M,zone.conventional_zones=12"}, "768M", "zone.conventional_zones", "12"},
		{"conventional zones not a number", []string{"zone.mode=host-managed,zone.conventional_zones=two"}, "1G", "zone.conventional_zones", "two"},
		{"max open zones overflow", []string{"zone.mode=host-managed,zone.max_open_zones=4294967296"}, "1G", "zone.max_open_zones", "4294967296"},
		{"too many zones", []string{"zone.mode=host-managed,zone.size=1k,zone.max_append_bytes=0"}, "2G", "zone.size", "1k"},
		{"zoned size 0", []string{"zone.mode=host-managed"}, "0", "size", "0"},
		// Two spellings of one option with different values (issue 13,
		// from 14): refused naming the second spelling; the rule names the first.
		{"two spellings, one -o", []string{"zone.mode=host-managed,zone.max_open_zones=4,zone.max-open-zones=6"}, "1G", "zone.max-open-zones", "6"},
		{"two spellings, two -o", []string{"zone.mode=host-managed,zone.conventional-zones=1", "zone.conventional_zones=2"}, "1G", "zone.conventional_zones", "2"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			co, err := ParseCreateOptions(tc.opts, tc.sizeArg)
			if err == nil {
				t.Fatalf("ParseCreateOptions(%q, %q) = %s, want an error", tc.opts, tc.sizeArg, dumpCO(co))
			}
			var oe *OptionError
			if !errors.As(err, &oe) {
				t.Fatalf("error %T %v is not an *OptionError", err, err)
			}
			if !errors.Is(err, ErrInvalidOption) {
				t.Errorf("errors.Is(%v, ErrInvalidOption) = false", err)
			}
			if oe.Name != tc.wantName || oe.Value != tc.wantValue {
				t.Errorf("error names %s=%q, want %s=%q (%v)", oe.Name, oe.Value, tc.wantName, tc.wantValue, err)
			}
			want := "invalid option " + oe.Name + "=" + oe.Value + ": "
			if !strings.HasPrefix(err.Error(), want) || oe.Rule == "" {
				t.Errorf("Error() = %q, want prefix %q and a rule", err.Error(), want)
			}
		})
	}
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"0", "512", "1.5G", "64M", "0x10", "7E", "8E", "1.K", "-1", "1e3", "0.00048828125K", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := ParseSize(s)
		if err != nil {
			var oe *OptionError
			if !errors.As(err, &oe) || !errors.Is(err, ErrInvalidOption) {
				t.Fatalf("ParseSize(%q): error %T is not an *OptionError", s, err)
			}
			return
		}
		if v > math.MaxInt64 {
			t.Fatalf("ParseSize(%q) = %d exceeds MaxInt64", s, v)
		}
		// A result always reparses to itself as plain bytes.
		w, err := ParseSize(strconv.FormatUint(v, 10))
		if err != nil || w != v {
			t.Fatalf("ParseSize(%q) = %d, but reparsing gives %d, %v", s, v, w, err)
		}
		if strings.HasPrefix(s, "-") {
			t.Fatalf("ParseSize(%q) accepted a negative value", s)
		}
	})
}

// TestParseCreateOptionsSpellings: the error for two spellings names both
// spellings and both values; agreeing spellings and one spelling repeated
// (qemu-img: the last wins) are accepted.
func TestParseCreateOptionsSpellings(t *testing.T) {
	_, err := ParseCreateOptions([]string{"zone.mode=host-managed,zone.max_open_zones=4,zone.max-open-zones=6"}, "1G")
	for _, want := range []string{"zone.max_open_zones=4", "zone.max-open-zones=6"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not name %s", err, want)
		}
	}
	co, err := ParseCreateOptions([]string{"zone.mode=host-managed,zone.max_open_zones=4,zone.max-open-zones=4,zone.max_active_zones=5", "zone.max_active_zones=6"}, "1G")
	if err != nil {
		t.Fatal(err)
	}
	if *co.Zoned.MaxOpenZones != 4 || *co.Zoned.MaxActiveZones != 6 {
		t.Errorf("max_open %d max_active %d, want 4 and 6", *co.Zoned.MaxOpenZones, *co.Zoned.MaxActiveZones)
	}
}
