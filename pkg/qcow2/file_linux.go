package qcow2

import (
	"os"

	"golang.org/x/sys/unix"
)

// punchFileHole deallocates [off, off+n) of f, keeping its size.
func punchFileHole(f *os.File, off, n int64) error {
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_KEEP_SIZE|unix.FALLOC_FL_PUNCH_HOLE, off, n)
}
