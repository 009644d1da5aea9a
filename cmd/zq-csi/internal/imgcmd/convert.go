package imgcmd

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

const convertUsage = `Usage: zq-csi img convert [-q] [-p] [-U] [-f FMT] [-O OUTPUT_FMT] [-o OPTIONS] SRC DST

Copy the virtual disk of SRC into a new image DST, like qemu-img convert.
Unallocated and zero ranges stay sparse in DST.

  -f FMT         source format: qcow2 or raw (detected when omitted)
  -O OUTPUT_FMT  raw (the default, as in qemu-img) or qcow2
  -o OPTIONS     qcow2 creation options for DST (see 'zq-csi img create -o help');
                 the size is the source's
`

// copyChunk is the unit of copying; zeroBlock is the granularity at which
// all-zero data is left sparse (qemu-img convert's default -S 4k).
const (
	copyChunk = 1 << 20
	zeroBlock = 4096
)

func runConvert(e Env, args []string) int {
	opts, pos, code, done := parseArgs(e, "convert", args, optSpec{short: "f:O:o:qpUc"})
	if done {
		return code
	}
	srcFmt, dstFmt := "", fmtRaw
	var oargs []string
	for _, o := range opts {
		switch o.name {
		case "f":
			srcFmt = o.val
		case "O":
			dstFmt = o.val
		case "o":
			if o.val == "help" || o.val == "?" {
				fmt.Fprint(e.Stdout, createOptionsHelp)
				return 0
			}
			oargs = append(oargs, o.val)
		case "c":
			return fail(e, "", errors.New("compressed output (-c) is not supported"))
		}
	}
	if len(pos) != 2 {
		return usageFail(e, "convert", "Expecting a source and a destination file name")
	}
	srcPath, dstPath := pos[0], pos[1]
	if dstFmt != fmtRaw && dstFmt != fmtQcow2 {
		return fail(e, "", fmt.Errorf("Unknown file format '%s'", dstFmt))
	}
	if dstFmt == fmtRaw && len(oargs) > 0 {
		return fail(e, "", errors.New("the raw output format takes no options"))
	}

	src, _, err := openDevice(srcPath, srcFmt, true)
	if err != nil {
		return fail(e, srcPath, fmt.Errorf("Could not open '%s': %w", srcPath, err))
	}
	defer src.Close()
	size := src.Size()

	var co qcow2.CreateOptions
	if dstFmt == fmtQcow2 {
		if co, err = qcow2.ParseCreateOptions(oargs, strconv.FormatUint(size, 10)); err != nil {
			return fail(e, dstPath, err)
		}
	}
	_, statErr := os.Lstat(dstPath)
	existed := statErr == nil
	if err := convert(src, dstPath, dstFmt, co); err != nil {
		if !existed {
			_ = os.Remove(dstPath)
		}
		return fail(e, dstPath, err)
	}
	return 0
}

// extentsOf lists the ranges of src that must be copied (everything else
// reads as zeros).
func extentsOf(src device) ([][2]uint64, error) {
	size := src.Size()
	if size == 0 {
		return nil, nil
	}
	if im, ok := src.(*qcow2.Image); ok {
		exts, err := im.Map(0, size)
		if err != nil {
			return nil, err
		}
		var out [][2]uint64
		for _, x := range exts {
			if !x.Zero {
				out = append(out, [2]uint64{x.Start, x.Start + x.Length})
			}
		}
		return out, nil
	}
	rd := src.(*rawDevice)
	rs, err := dataRanges(rd.f, int64(size))
	if err != nil {
		return nil, err
	}
	out := make([][2]uint64, len(rs))
	for i, r := range rs {
		out[i] = [2]uint64{uint64(r[0]), uint64(r[1])}
	}
	return out, nil
}

func convert(src device, dstPath, dstFmt string, co qcow2.CreateOptions) (err error) {
	size := src.Size()
	exts, err := extentsOf(src)
	if err != nil {
		return err
	}
	var dst device
	// A destination with a backing file must get explicit zeros; a new
	// image without one already reads as zeros everywhere.
	writeZeros := false
	if dstFmt == fmtQcow2 {
		warnings, err := qcow2.Create(dstPath, co)
		if err != nil {
			return err
		}
		_ = warnings // clamped zone limits were reported when the options were chosen
		im, err := qcow2.Open(dstPath, qcow2.OpenOptions{})
		if err != nil {
			return err
		}
		dst = im
		writeZeros = co.BackingFile != ""
	} else {
		f, err := os.OpenFile(dstPath, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
		if err != nil {
			return err
		}
		if err := f.Truncate(int64(size)); err != nil {
			f.Close()
			return err
		}
		dst = &rawDevice{f: f}
	}
	defer func() {
		if cerr := dst.Close(); err == nil {
			err = cerr
		}
	}()

	if writeZeros {
		if err := dst.WriteZeroes(0, int64(size), false); err != nil {
			return err
		}
	}
	buf := make([]byte, copyChunk)
	zero := make([]byte, zeroBlock)
	for _, x := range exts {
		for off := x[0]; off < x[1]; {
			n := min(x[1]-off, copyChunk)
			p := buf[:n]
			if _, err := src.ReadAt(p, int64(off)); err != nil {
				return fmt.Errorf("error while reading at offset %d: %w", off, err)
			}
			// Write the runs of non-zero blocks only.
			for i := uint64(0); i < n; {
				j := i
				for j < n && !bytes.Equal(p[j:min(j+zeroBlock, n)], zero[:min(zeroBlock, n-j)]) {
					j = min(j+zeroBlock, n)
				}
				if j > i {
					if _, err := dst.WriteAt(p[i:j], int64(off+i)); err != nil {
						return fmt.Errorf("error while writing at offset %d: %w", off+i, err)
					}
				}
				for j < n && bytes.Equal(p[j:min(j+zeroBlock, n)], zero[:min(zeroBlock, n-j)]) {
					j = min(j+zeroBlock, n)
				}
				i = j
			}
			off += n
		}
	}
	return dst.Flush()
}
