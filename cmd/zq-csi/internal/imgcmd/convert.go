package imgcmd

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
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
	srcFmt, dstFmt, share, help := "", fmtRaw, false, false
	var oargs []string
	for _, o := range opts {
		switch o.name {
		case "f":
			srcFmt = o.val
		case "O":
			dstFmt = o.val
		case "U":
			share = true
		case "o":
			if o.val == "help" || o.val == "?" {
				help = true
				continue
			}
			oargs = append(oargs, o.val)
		case "c":
			return fail(e, "", errors.New("compressed output (-c) is not supported"))
		}
	}
	if help {
		if dstFmt != fmtRaw && dstFmt != fmtQcow2 {
			return fail(e, "", fmt.Errorf("Unknown file format '%s'", dstFmt))
		}
		fmt.Fprint(e.Stdout, optionsHelp(dstFmt))
		return 0
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
	// Nothing is written before every check has passed, and then only to
	// a temporary file beside DST that replaces it at the end: a refused
	// or failed convert leaves DST (and SRC) as they were.
	if err := notInSourceChain(srcPath, dstPath); err != nil {
		return fail(e, dstPath, err)
	}

	src, zsrc, err := openIODevice(srcPath, openMode{format: srcFmt, readOnly: true, forceShare: share})
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
	var srcWPs []uint64 // a zoned source's write pointers (zone engine view)
	if zsrc != nil {
		for _, r := range zsrc.Report(0, int(zsrc.Geometry().NrZones)) {
			srcWPs = append(srcWPs, r.WP)
		}
	}
	if err := convert(src, srcWPs, dstPath, dstFmt, co); err != nil {
		return fail(e, dstPath, err)
	}
	return 0
}

// notInSourceChain refuses a destination that is the source itself (any
// name for the same inode: the path, a hard link, a symbolic link) or a
// file of its backing chain: replacing it would change what the source
// reads while it is being copied, and after the copy.
func notInSourceChain(srcPath, dstPath string) error {
	dfi, err := os.Stat(dstPath)
	if err != nil {
		return nil // DST does not exist yet (or cannot be stat'ed: creating it will say why)
	}
	name := srcPath
	for depth := 0; name != "" && depth < 16; depth++ {
		sfi, err := os.Stat(name)
		if err != nil {
			return nil // opening the source reports it
		}
		if os.SameFile(sfi, dfi) {
			what := "the input file"
			if depth > 0 {
				what = fmt.Sprintf("backing file %s of the input file %s", name, srcPath)
			}
			return fmt.Errorf("the output file is %s (same inode %d): refusing to overwrite what is being copied", what, inode(sfi))
		}
		im, err := qcow2.Open(name, qcow2.OpenOptions{ReadOnly: true, NoBacking: true, ForceShare: true})
		if err != nil {
			return nil
		}
		b := im.Info().BackingFile
		im.Close()
		name = pathCombine(name, b)
	}
	return nil
}

// extentsOf lists the ranges of src that must be copied (everything else
// reads as zeros).
func extentsOf(src device) ([][2]uint64, error) {
	size := src.Size()
	if size == 0 {
		return nil, nil
	}
	im, ok := src.(*qcow2.Image)
	if z, isZ := src.(zonedDevice); isZ {
		im, ok = z.d.Image(), true
	}
	if ok {
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

// convert copies src into a new image at dstPath: written to a temporary
// file in DST's directory, made durable, then renamed over dstPath while a
// writer's lock on the old DST (if any) shows nobody else has it open.
// srcWPs are a zoned source's write pointers (nil otherwise).
func convert(src device, srcWPs []uint64, dstPath, dstFmt string, co qcow2.CreateOptions) (err error) {
	size := src.Size()
	exts, err := extentsOf(src)
	if err != nil {
		return err
	}
	// An existing DST is replaced only if it could be opened for writing
	// (qemu-img convert: "Failed to get \"write\" lock" while someone
	// uses it). The lock is held across the rename.
	if old, err := os.OpenFile(dstPath, os.O_RDWR, 0); err == nil {
		defer old.Close()
		if err := qcow2.LockFileFor(old, qcow2.OpenOptions{}); err != nil {
			return err
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	tmp, err := tempName(dstPath)
	if err != nil {
		return err
	}
	done := false
	defer func() {
		if !done {
			os.Remove(tmp)
		}
	}()

	var dst device
	var zdst *qcow2.Image // a zoned destination: write pointers set after the copy
	// A destination with a backing file must get explicit zeros; a new
	// image without one already reads as zeros everywhere.
	writeZeros := false
	if dstFmt == fmtQcow2 {
		if co.Zoned != nil && co.BackingFile != "" {
			return errors.New("a zoned output (zone.mode) cannot have a backing file: its write pointers would not describe the backing data")
		}
		if _, err := qcow2.Create(tmp, co); err != nil {
			return err
		}
		im, err := qcow2.Open(tmp, qcow2.OpenOptions{})
		if err != nil {
			return err
		}
		dst = im
		writeZeros = co.BackingFile != ""
		if im.Info().Zoned != nil {
			zdst = im
		}
	} else {
		rd, err := createRawImage(tmp, size)
		if err != nil {
			return err
		}
		dst = rd
	}
	defer func() {
		if dst == nil {
			return
		}
		if cerr := dst.Close(); err == nil {
			err = cerr
		}
	}()

	var zc *zoneCopy
	if zdst != nil {
		if zc, err = newZoneCopy(zdst, srcWPs); err != nil {
			return err
		}
	}
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
					if zc != nil {
						if err := zc.wrote(off+i, off+j, p[i:j]); err != nil {
							return err
						}
					}
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
	if zc != nil {
		if err := zc.finish(); err != nil {
			return err
		}
	}
	if err := dst.Flush(); err != nil {
		return err
	}
	d := dst
	dst = nil
	if err := d.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, dstPath); err != nil {
		return err
	}
	done = true
	return syncDir(filepath.Dir(dstPath))
}

// tempName returns an unused name beside path for the new image.
func tempName(path string) (string, error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".convert-*")
	if err != nil {
		return "", err
	}
	name := f.Name()
	f.Close()
	return name, os.Chmod(name, 0o644)
}

// createRawImage makes a raw image of size bytes at path (which tempName made),
// locked as a writer.
func createRawImage(path string, size uint64) (*rawDevice, error) {
	rd, err := openRaw(path, openMode{})
	if err != nil {
		return nil, err
	}
	if err := rd.f.Truncate(int64(size)); err != nil {
		rd.f.Close()
		return nil, err
	}
	return rd, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// zoneCopy places the write pointers of a zoned destination: in each
// sequential zone the pointer goes to the end of the last byte copied into
// it (rounded up to 512), or to the source's own pointer when the source is
// a zoned image with the same zone layout, so that everything copied reads
// back (reads at or past a pointer return zeros) and the zone holds what a
// sequential writer would have left. Data the zone rules cannot hold is
// refused before anything is renamed: data past a zone's capacity, or more
// partially written (closed) zones than max_active_zones allows.
type zoneCopy struct {
	im  *qcow2.Image
	z   qcow2.ZonedExt
	wps []uint64 // per zone: the pointer to set (zone start: EMPTY)
	end uint64   // virtual size
}

func newZoneCopy(im *qcow2.Image, srcWPs []uint64) (*zoneCopy, error) {
	inf := im.Info()
	z := *inf.Zoned
	wps, _, err := im.WritePointers()
	if err != nil {
		return nil, err
	}
	zc := &zoneCopy{im: im, z: z, wps: wps, end: inf.VirtualSize}
	// A zoned source with the same layout: its pointers carry over (zeros
	// written below a pointer are data too).
	if len(srcWPs) == len(wps) {
		for i := z.ConventionalZones; i < z.NrZones; i++ {
			start := uint64(i) * z.ZoneSize
			if wp := srcWPs[i]; wp >= start && wp <= z.WritableEnd(i, zc.end) {
				zc.wps[i] = max(zc.wps[i], wp)
			}
		}
	}
	return zc, nil
}

// wrote records that [from, to) of p is copied, refusing what a zone
// cannot hold.
func (zc *zoneCopy) wrote(from, to uint64, p []byte) error {
	z := zc.z
	for off := from; off < to; {
		i := uint32(off / z.ZoneSize)
		zend := min(uint64(i+1)*z.ZoneSize, to)
		if i >= z.ConventionalZones {
			wend := z.WritableEnd(i, zc.end)
			if zend > wend {
				// Find the first non-zero byte past the capacity.
				at := max(off, wend)
				for k := at; k < zend; k++ {
					if p[k-from] != 0 {
						return fmt.Errorf("cannot convert into zone.size=%d zone.capacity=%d: the source has data at offset %d, in zone %d past its capacity (writable end %d), which a zoned image reads as zeros",
							z.ZoneSize, z.ZoneCapacity, k, i, wend)
					}
				}
			}
			// The pointer goes past the last non-zero byte, rounded up to
			// a sector (the zero tail of a copied block is not data).
			last := min(zend, wend)
			for last > off && p[last-1-from] == 0 {
				last--
			}
			if last > off {
				zc.wps[i] = max(zc.wps[i], min((last+511)&^511, wend))
			}
		}
		off = zend
	}
	return nil
}

// finish checks the open/active budget and writes the pointers.
func (zc *zoneCopy) finish() error {
	z := zc.z
	partial := 0
	for i := z.ConventionalZones; i < z.NrZones; i++ {
		if wp := zc.wps[i]; wp != uint64(i)*z.ZoneSize && wp < z.WritableEnd(i, zc.end) {
			partial++
		}
	}
	if ma := z.MaxActiveZones; ma != 0 && uint32(partial) > ma {
		return fmt.Errorf("cannot convert into zone.max_active_zones=%d: the copy leaves %d sequential zones partially written (closed, so active); raise zone.max_active_zones or use zone.max_active_zones=0",
			ma, partial)
	}
	for i := z.ConventionalZones; i < z.NrZones; i++ {
		if wp := zc.wps[i]; wp != uint64(i)*z.ZoneSize {
			if err := zc.im.SetWritePointer(i, wp); err != nil {
				return err
			}
		}
	}
	return nil
}
