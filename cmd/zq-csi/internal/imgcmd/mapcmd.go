package imgcmd

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

const mapUsage = `Usage: zq-csi img map [-f FMT] [--output=human|json] [--start-offset=OFFSET]
                      [--max-length=LEN] [-U] FILE

Dump the allocation status of the virtual disk, like qemu-img map.

  --output=FORMAT        human (default) or json
  --start-offset=OFFSET  first byte to map (default 0)
  --max-length=LEN       bytes to map (default: to the end)
`

func runMap(e Env, args []string) int {
	opts, pos, code, done := parseArgs(e, "map", args, optSpec{short: "f:U",
		long: map[string]bool{"output": true, "start-offset": true, "max-length": true, "force-share": false}})
	if done {
		return code
	}
	want, output := "", "human"
	var start, maxLen uint64
	haveMax := false
	share := false
	for _, o := range opts {
		var err error
		switch o.name {
		case "U", "force-share":
			share = true
		case "f":
			want = o.val
		case "output":
			output, err = outputFormat(o.val)
		case "start-offset":
			start, err = qcow2.ParseSize(o.val)
		case "max-length":
			maxLen, err = qcow2.ParseSize(o.val)
			haveMax = true
		}
		if err != nil {
			return fail(e, "", err)
		}
	}
	if len(pos) != 1 {
		return usageFail(e, "map", "Expecting one image file name")
	}
	file := pos[0]
	format, _, err := resolveFormat(file, want)
	mode := openMode{format: format, readOnly: true, forceShare: share}
	if err != nil {
		return fail(e, file, err)
	}
	var exts []qcow2.Extent
	var size uint64
	if format == fmtQcow2 {
		im, err := qcow2.Open(file, mode.qcow2())
		if err != nil {
			return fail(e, file, fmt.Errorf("Could not open '%s': %w", file, err))
		}
		defer im.Close()
		size = im.Size()
		start, n := clampRange(start, maxLen, haveMax, size)
		if n > 0 {
			if exts, err = im.Map(start, n); err != nil {
				return fail(e, file, err)
			}
		}
		backing := pathCombine(file, im.Info().BackingFile)
		for i := range exts {
			if exts[i].File == "" && exts[i].HasOffset {
				switch exts[i].Depth {
				case 0:
					exts[i].File = file
				case 1:
					exts[i].File = backing
				}
			}
		}
	} else {
		f, err := os.Open(file)
		if err != nil {
			return fail(e, file, err)
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return fail(e, file, err)
		}
		size = uint64(fi.Size())
		start, n := clampRange(start, maxLen, haveMax, size)
		if exts, err = rawExtents(f, file, start, n); err != nil {
			return fail(e, file, err)
		}
	}
	if err := writeMap(e.Stdout, output, exts); err != nil {
		return fail(e, file, err)
	}
	return 0
}

func clampRange(start, maxLen uint64, haveMax bool, size uint64) (uint64, uint64) {
	if start >= size {
		return start, 0
	}
	n := size - start
	if haveMax && maxLen < n {
		n = maxLen
	}
	return start, n
}

// rawExtents maps a raw file the way qemu's file driver reports it: data
// ranges are data, holes read as zeros; both have a host offset.
func rawExtents(f *os.File, name string, start, n uint64) ([]qcow2.Extent, error) {
	if n == 0 {
		return nil, nil
	}
	end := start + n
	ranges, err := dataRanges(f, int64(end))
	if err != nil {
		return nil, err
	}
	var out []qcow2.Extent
	add := func(s, e uint64, data bool) {
		s, e = max(s, start), min(e, end)
		if s >= e {
			return
		}
		out = append(out, qcow2.Extent{Start: s, Length: e - s, Present: true, Zero: !data, Data: data,
			Offset: s, HasOffset: true, File: name})
	}
	pos := uint64(0)
	for _, r := range ranges {
		add(pos, uint64(r[0]), false)
		add(uint64(r[0]), uint64(r[1]), true)
		pos = uint64(r[1])
	}
	add(pos, end, false)
	return out, nil
}

// mergeable is qemu-img's entry_mergeable.
func mergeable(cur, next *qcow2.Extent) bool {
	if cur.Length == 0 {
		return true
	}
	if cur.Zero != next.Zero || cur.Data != next.Data || cur.Depth != next.Depth ||
		cur.Present != next.Present || cur.HasOffset != next.HasOffset {
		return false
	}
	if cur.HasOffset && (cur.File != next.File || cur.Offset+cur.Length != next.Offset) {
		return false
	}
	return true
}

var errCompressedHuman = errors.New("File contains external, encrypted or compressed clusters.")

// writeMap prints extents like qemu-img 7.2's img_map/dump_map_entry,
// merging adjacent entries the way it does (its human format also folds
// "zero" and "no data" together to coalesce more).
func writeMap(w io.Writer, output string, exts []qcow2.Extent) error {
	var sb strings.Builder
	if output == "json" {
		sb.WriteString("[")
	} else {
		fmt.Fprintf(&sb, "%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File")
	}
	var cur qcow2.Extent
	dump := func(e *qcow2.Extent, next *qcow2.Extent) error {
		if output == "json" {
			fmt.Fprintf(&sb, `{ "start": %d, "length": %d, "depth": %d, "present": %t, "zero": %t, "data": %t`,
				e.Start, e.Length, e.Depth, e.Present, e.Zero, e.Data)
			if e.HasOffset {
				fmt.Fprintf(&sb, `, "offset": %d`, e.Offset)
			}
			sb.WriteString("}")
			if next != nil {
				sb.WriteString(",\n")
			}
			return nil
		}
		if e.Data && !e.HasOffset {
			return errCompressedHuman
		}
		if e.Data && !e.Zero {
			off := uint64(0)
			if e.HasOffset {
				off = e.Offset
			}
			fmt.Fprintf(&sb, "%-16s%-16s%-16s%s\n", altHex(e.Start), altHex(e.Length), altHex(off), e.File)
		}
		if next != nil && (!next.Data || next.Zero) {
			next.Data, next.Zero = false, true
		}
		return nil
	}
	for i := range exts {
		next := exts[i]
		if mergeable(&cur, &next) {
			if cur.Length == 0 {
				cur = next
			} else {
				cur.Length += next.Length
			}
			continue
		}
		if err := dump(&cur, &next); err != nil {
			return flushErr(w, &sb, err)
		}
		cur = next
	}
	if cur.Length > 0 || output == "json" {
		if err := dump(&cur, nil); err != nil {
			return flushErr(w, &sb, err)
		}
	}
	if output == "json" {
		sb.WriteString("]\n")
	}
	_, err := io.WriteString(w, sb.String())
	return err
}

// flushErr writes what was printed before an error, as qemu-img has by
// then, and returns the error.
func flushErr(w io.Writer, sb *strings.Builder, err error) error {
	_, _ = io.WriteString(w, sb.String())
	return err
}

// altHex is C's "%#x": 0 stays "0", everything else gets "0x".
func altHex(v uint64) string {
	if v == 0 {
		return "0"
	}
	return fmt.Sprintf("%#x", v)
}
