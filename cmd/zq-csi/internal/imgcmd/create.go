package imgcmd

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

const createUsage = `Usage: zq-csi img create [-q] [-f FMT] [-b BACKING [-F BACKING_FMT]] [-u]
                         [-o OPTION=VALUE[,OPTION=VALUE...]]... FILE [SIZE]

Create a new image. Options may come before or after FILE, as with qemu-img.
FMT is qcow2 (the default) or raw. SIZE takes the suffixes K, M, G, T, P, E
(powers of 1024) and decimal fractions ("1.5G"). Without SIZE the image takes
the size of its backing file.

  -f FMT          image format: qcow2 (default) or raw
  -b BACKING      backing file (relative names are relative to FILE's directory)
  -F BACKING_FMT  backing file format (qcow2 or raw; detected when omitted)
  -u              do not open the backing file (SIZE is then required)
  -o OPTIONS      creation options; '-o help' lists them
  -q              quiet: do not print the "Formatting" line

Example (the zoned image of the qcow2 zoned-format series):
  zq-csi img create -f qcow2 zbc.qcow2 -o size=768M -o zone.size=64M \
    -o zone.capacity=64M -o zone.conventional_zones=0 \
    -o zone.max_append_bytes=4096 -o zone.max_open_zones=6 \
    -o zone.max_active_zones=8 -o zone.mode=host-managed
`

const createOptionsHelp = `Supported options:
  size=<size>                      Virtual disk size
  compat=<str>                     Compatibility level (v2 [0.10] or v3 [1.1])
  backing_file=<str>               File name of a base image
  backing_fmt=<str>                Image format of the base image (qcow2, raw)
  cluster_size=<size>              qcow2 cluster size (512 .. 2M, default 64k)
  refcount_bits=<num>              Width of a reference count entry in bits (1 .. 64, default 16)
  lazy_refcounts=<bool (on/off)>   Postpone refcount updates
  extended_l2=off                  accepted for qemu-img compatibility
  preallocation=off                accepted for qemu-img compatibility
  compression_type=zlib            accepted for qemu-img compatibility
  zone.mode=host-managed           make a zoned image (the qcow2 zoned format)
  zone.size=<size>                 zone size, a power of two (default 256M)
  zone.capacity=<size>             writable bytes per zone (default: zone.size)
  zone.conventional_zones=<num>    number of leading conventional zones (default 0)
  zone.max_open_zones=<num>        open zone limit (default: zone.max_active_zones)
  zone.max_active_zones=<num>      active zone limit (0 = none, default 0)
  zone.max_append_bytes=<size>     zone append limit (default 64k)
The zone options also have QAPI spellings with dashes (zone.max-open-zones, ...).
`

// rawOptionsHelp is what -o help lists for the raw format: its one option
// (qemu-img create -f raw -o help lists size alone too).
const rawOptionsHelp = `Supported raw options:
  size=<size>                      Virtual disk size
`

// optionsHelp returns the -o help text of an output format.
func optionsHelp(format string) string {
	if format == fmtRaw {
		return rawOptionsHelp
	}
	return createOptionsHelp
}

func runCreate(e Env, args []string) int {
	opts, pos, code, done := parseArgs(e, "create", args, optSpec{short: "f:o:b:F:uq"})
	if done {
		return code
	}
	var (
		format        = fmtQcow2
		oargs         []string
		backing       string
		backingFmt    string
		unsafe, quiet bool
		help          bool
	)
	for _, o := range opts {
		switch o.name {
		case "f":
			format = o.val
		case "o":
			if o.val == "help" || o.val == "?" {
				help = true // answered once -f is known, wherever it stands
				continue
			}
			oargs = append(oargs, o.val)
		case "b":
			backing = o.val
		case "F":
			backingFmt = o.val
		case "u":
			unsafe = true
		case "q":
			quiet = true
		}
	}
	if help {
		if format != fmtRaw && format != fmtQcow2 {
			return fail(e, "", fmt.Errorf("Unknown file format '%s'", format))
		}
		fmt.Fprint(e.Stdout, optionsHelp(format))
		return 0
	}
	if len(pos) < 1 {
		return usageFail(e, "create", "Expecting image file name")
	}
	if len(pos) > 2 {
		return usageFail(e, "create", "Unexpected argument: "+pos[2])
	}
	file, sizeArg := pos[0], ""
	if len(pos) == 2 {
		sizeArg = pos[1]
	}
	// -b and -F are spelled as options so that ParseCreateOptions sees one
	// list; ",," keeps commas in file names.
	if backing != "" {
		oargs = append(oargs, "backing_file="+strings.ReplaceAll(backing, ",", ",,"))
	}
	if backingFmt != "" {
		oargs = append(oargs, "backing_fmt="+strings.ReplaceAll(backingFmt, ",", ",,"))
	}
	switch format {
	case fmtRaw:
		return createRaw(e, file, oargs, sizeArg, quiet)
	case fmtQcow2:
	default:
		return fail(e, "", fmt.Errorf("Unknown file format '%s'", format))
	}

	co, err := qcow2.ParseCreateOptions(oargs, sizeArg)
	if err != nil {
		return fail(e, file, err)
	}
	if co.BackingFile != "" && !unsafe {
		bpath := pathCombine(file, co.BackingFile)
		bfmt, bsize, err := probeBacking(bpath, co.BackingFormat)
		if err != nil {
			return fail(e, file, fmt.Errorf("Could not open backing file '%s': %w", bpath, err))
		}
		if co.BackingFormat == "" {
			co.BackingFormat = bfmt
			oargs = append(oargs, "backing_fmt="+bfmt)
		}
		if co.Size == 0 && sizeArg == "" && !hasSizeOption(oargs) {
			// Reparse with the size, so the zone checks see it.
			co, err = qcow2.ParseCreateOptions(oargs, strconv.FormatUint(bsize, 10))
			if err != nil {
				return fail(e, file, err)
			}
		}
	} else if co.BackingFile != "" && sizeArg == "" && !hasSizeOption(oargs) {
		return fail(e, file, errors.New("Image creation needs a size parameter (-u does not open the backing file)"))
	}

	if !quiet {
		fmt.Fprintln(e.Stdout, formattingLine(file, co))
	}
	_, statErr := os.Lstat(file)
	existed := statErr == nil
	warnings, err := qcow2.Create(file, co)
	if err != nil {
		if !existed {
			// qcow2.Create should clean up; make sure a refused image
			// leaves nothing behind.
			_ = os.Remove(file)
		}
		return fail(e, file, err)
	}
	for _, w := range warnings {
		fmt.Fprintf(e.Stderr, "warning: %s\n", w)
	}
	return 0
}

func hasSizeOption(oargs []string) bool {
	for _, a := range oargs {
		for _, kv := range strings.Split(a, ",") {
			if strings.HasPrefix(kv, "size=") {
				return true
			}
		}
	}
	return false
}

// probeBacking returns the format and virtual size of a backing file.
func probeBacking(path, want string) (string, uint64, error) {
	f, _, err := resolveFormat(path, want)
	if err != nil {
		return "", 0, err
	}
	if f == fmtRaw {
		fi, err := os.Stat(path)
		if err != nil {
			return "", 0, err
		}
		return f, uint64(fi.Size()), nil
	}
	im, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		return "", 0, err
	}
	defer im.Close()
	return f, im.Size(), nil
}

// formattingLine approximates qemu-img 7.2's "Formatting" line, which prints
// the creation options in the order of qcow2's option list, zone options
// (as the seed adds them) after compression_type.
func formattingLine(file string, co qcow2.CreateOptions) string {
	cs := co.ClusterSize
	if cs == 0 {
		cs = qcow2.DefaultClusterSize
	}
	rb := co.RefcountBits
	if rb == 0 {
		rb = qcow2.DefaultRefcountBits
	}
	parts := []string{
		"fmt=qcow2",
		fmt.Sprintf("cluster_size=%d", cs),
		"extended_l2=off",
		"compression_type=zlib",
	}
	if z := co.Zoned; z != nil {
		parts = append(parts, "zone.mode=host-managed")
		add64 := func(n string, p *uint64) {
			if p != nil {
				parts = append(parts, fmt.Sprintf("%s=%d", n, *p))
			}
		}
		add32 := func(n string, p *uint32) {
			if p != nil {
				parts = append(parts, fmt.Sprintf("%s=%d", n, *p))
			}
		}
		add64("zone.size", z.ZoneSize)
		add64("zone.capacity", z.ZoneCapacity)
		add32("zone.conventional_zones", z.ConventionalZones)
		add64("zone.max_append_bytes", z.MaxAppendBytes)
		add32("zone.max_active_zones", z.MaxActiveZones)
		add32("zone.max_open_zones", z.MaxOpenZones)
	}
	parts = append(parts, fmt.Sprintf("size=%d", co.Size))
	switch co.Version {
	case 2:
		parts = append(parts, "compat=0.10")
	case 3:
		parts = append(parts, "compat=1.1")
	}
	if co.BackingFile != "" {
		parts = append(parts, "backing_file="+co.BackingFile)
	}
	if co.BackingFormat != "" {
		parts = append(parts, "backing_fmt="+co.BackingFormat)
	}
	lazy := "off"
	if co.LazyRefcounts {
		lazy = "on"
	}
	parts = append(parts, "lazy_refcounts="+lazy, fmt.Sprintf("refcount_bits=%d", rb))
	return fmt.Sprintf("Formatting '%s', %s", file, strings.Join(parts, " "))
}

func createRaw(e Env, file string, oargs []string, sizeArg string, quiet bool) int {
	co, err := qcow2.ParseCreateOptions(oargs, sizeArg)
	if err != nil {
		return fail(e, file, err)
	}
	if co != (qcow2.CreateOptions{Size: co.Size}) || co.BackingFile != "" {
		return fail(e, file, errors.New("the raw format takes only the size option"))
	}
	if !quiet {
		fmt.Fprintf(e.Stdout, "Formatting '%s', fmt=raw size=%d\n", file, co.Size)
	}
	// As qcow2.Create: an existing file is truncated only under the
	// writer's lock (qemu's raw_co_create), so an image someone has open
	// is refused, not destroyed.
	f, err := os.OpenFile(file, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return fail(e, file, err)
	}
	if err := qcow2.LockFileFor(f, qcow2.OpenOptions{}); err != nil {
		f.Close()
		return fail(e, file, err)
	}
	if err := f.Truncate(0); err != nil {
		f.Close()
		return fail(e, file, err)
	}
	if err := f.Truncate(int64(co.Size)); err != nil {
		f.Close()
		return fail(e, file, err)
	}
	if err := f.Close(); err != nil {
		return fail(e, file, err)
	}
	return 0
}
