package imgcmd

import (
	"errors"
	"io"
	"os"
	"syscall"
)

const (
	fallocKeepSize  = 0x01 // FALLOC_FL_KEEP_SIZE
	fallocPunchHole = 0x02 // FALLOC_FL_PUNCH_HOLE
	seekData        = 3    // SEEK_DATA
	seekHole        = 4    // SEEK_HOLE
)

func punchHole(f *os.File, off, n int64) error {
	return syscall.Fallocate(int(f.Fd()), fallocPunchHole|fallocKeepSize, off, n)
}

// dataRanges lists the [start, end) ranges of f in [0, size) that may hold
// data, using SEEK_DATA/SEEK_HOLE like qemu's file driver. Everything else
// is a hole.
func dataRanges(f *os.File, size int64) ([][2]int64, error) {
	var out [][2]int64
	for off := int64(0); off < size; {
		d, err := f.Seek(off, seekData)
		if errors.Is(err, syscall.ENXIO) {
			break // no data after off
		}
		if err != nil {
			// No SEEK_DATA support: everything is data.
			return [][2]int64{{0, size}}, nil
		}
		if d >= size {
			break
		}
		h, err := f.Seek(d, seekHole)
		if err != nil || h > size {
			h = size
		}
		out = append(out, [2]int64{d, h})
		off = h
	}
	_, _ = f.Seek(0, io.SeekStart)
	return out, nil
}

// diskUsage is what qemu-img info calls "disk size": allocated blocks.
func diskUsage(fi os.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}

// inode is the inode number of fi, for messages.
func inode(fi os.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}
