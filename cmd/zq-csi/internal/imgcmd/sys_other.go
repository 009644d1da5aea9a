//go:build !linux

package imgcmd

import (
	"errors"
	"os"
)

func punchHole(f *os.File, off, n int64) error { return errors.ErrUnsupported }

func dataRanges(f *os.File, size int64) ([][2]int64, error) {
	if size == 0 {
		return nil, nil
	}
	return [][2]int64{{0, size}}, nil
}

func diskUsage(fi os.FileInfo) int64 { return fi.Size() }

func inode(fi os.FileInfo) uint64 { return 0 }
