package zoned

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The live write-pointer table: a small sidecar file beside the image that
// receives every write pointer change before it is acknowledged (written to
// the page cache, not synced), tagged with the boot it was written in. See
// Device for why it exists.
//
// Layout: "ZQWPLIV1" | u32 nr_zones | u32 reserved | 48-byte boot id |
// nr_zones × u64 little-endian write pointers, starting at byte 64.

const (
	liveMagic  = "ZQWPLIV1"
	liveHeader = 64
)

type liveTable struct {
	f    *os.File
	path string
	nr   uint32
	// m maps the whole table (after reset): a pointer update is a store
	// into the page cache, as durable as a write(2) of it and without the
	// system call on every acknowledged write.
	m []byte
}

// bootID identifies this boot of the kernel; "" if unknown (then live
// tables are never trusted). It is read once per process. Tests replace it
// to simulate a reboot.
var bootID = sync.OnceValue(func() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return string(bytes.TrimSpace(b))
})

// openLiveTable reads the sidecar at path and returns the pointers it holds
// if it was written during this boot for nr zones (else nil), and a table to
// write to (nil when read-only).
func openLiveTable(path string, nr uint32, ro bool) (*liveTable, []uint64, error) {
	boot := bootID()
	var ptrs []uint64
	if b, err := os.ReadFile(path); err == nil && boot != "" {
		if len(b) >= liveHeader+8*int(nr) && string(b[:8]) == liveMagic &&
			binary.LittleEndian.Uint32(b[8:]) == nr && string(bytes.TrimRight(b[16:64], "\x00")) == boot {
			ptrs = make([]uint64, nr)
			for i := range ptrs {
				ptrs[i] = binary.LittleEndian.Uint64(b[liveHeader+8*i:])
			}
		}
	} else if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, nil, err
	}
	if ro {
		return nil, ptrs, nil
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, nil, err
	}
	return &liveTable{f: f, path: path, nr: nr}, ptrs, nil
}

// reset rewrites the whole table for this boot and maps it.
func (t *liveTable) reset(wps []uint64) error {
	if t == nil {
		return nil
	}
	b := make([]byte, liveHeader+8*len(wps))
	copy(b, liveMagic)
	binary.LittleEndian.PutUint32(b[8:], t.nr)
	copy(b[16:64], bootID())
	for i, wp := range wps {
		binary.LittleEndian.PutUint64(b[liveHeader+8*i:], wp)
	}
	if _, err := t.f.WriteAt(b, 0); err != nil {
		return err
	}
	if err := t.f.Truncate(int64(len(b))); err != nil {
		return err
	}
	if t.m == nil {
		m, err := unix.Mmap(int(t.f.Fd()), 0, len(b), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			return fmt.Errorf("map the live write-pointer table %s: %w", t.path, err)
		}
		t.m = m
	}
	return nil
}

// set records zone i's write pointer: one aligned 8-byte store into the
// mapped table, so a reader (the next process, after a crash) sees the old
// or the new pointer, never a mix.
func (t *liveTable) set(i uint32, wp uint64) error {
	if t == nil {
		return nil
	}
	if t.m == nil {
		return errors.New("live write-pointer table used before reset")
	}
	// The table starts at a page boundary and each entry at a multiple of
	// 8: the store is aligned.
	atomic.StoreUint64((*uint64)(unsafe.Pointer(&t.m[liveHeader+8*int(i)])), wp)
	return nil
}

func (t *liveTable) close() {
	if t != nil {
		t.unmap()
		t.f.Close()
	}
}

func (t *liveTable) unmap() {
	if t.m != nil {
		unix.Munmap(t.m)
		t.m = nil
	}
}

// remove deletes the sidecar after a clean close: the durable table in the
// image is then complete.
func (t *liveTable) remove() error {
	if t == nil {
		return nil
	}
	t.unmap()
	t.f.Close()
	err := os.Remove(t.path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}
