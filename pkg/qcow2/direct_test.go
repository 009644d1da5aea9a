package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// readDirect reads [off, off+n) through ReadDirect: data extents with pread
// of the file it hands out, zero extents as zeros. It checks the extents
// tile the range, are never empty, and that neighbours which could have
// been joined (two zero extents, two data extents contiguous on the host)
// were joined.
func readDirect(t *testing.T, im *Image, off, n int64) ([]byte, []DirectExtent, error) {
	t.Helper()
	var out []byte
	var exts []DirectExtent
	called := false
	err := im.ReadDirect(off, n, func(f *os.File, ext []DirectExtent) error {
		called = true
		exts = append([]DirectExtent(nil), ext...)
		for i, x := range ext {
			if x.Length <= 0 {
				return fmt.Errorf("extent %d is empty: %+v", i, x)
			}
			if i > 0 {
				p := ext[i-1]
				if p.Zero && x.Zero || !p.Zero && !x.Zero && p.HostOffset+p.Length == x.HostOffset {
					return fmt.Errorf("extents %d and %d should have been joined: %+v %+v", i-1, i, p, x)
				}
			}
			b := make([]byte, x.Length)
			if !x.Zero {
				if _, err := f.ReadAt(b, x.HostOffset); err != nil {
					return fmt.Errorf("pread of extent %+v: %v", x, err)
				}
			}
			out = append(out, b...)
		}
		return nil
	})
	if err == nil && int64(len(out)) != n {
		t.Fatalf("ReadDirect(%d, %d): extents cover %d bytes", off, n, len(out))
	}
	if err != nil && called && errors.Is(err, ErrNotDirect) {
		t.Fatalf("ReadDirect(%d, %d) called fn and then returned %v", off, n, err)
	}
	return out, exts, err
}

func mustReadAt(t *testing.T, im *Image, off, n int64) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := im.ReadAt(b, off); err != nil {
		t.Fatalf("ReadAt(%d, %d): %v", off, n, err)
	}
	return b
}

// TestReadDirectMatchesReadAt builds a mixed layout around an L2-region
// boundary (data written in and out of host order, partial clusters, zero
// clusters that keep their host cluster and that do not, discarded and
// never-written clusters) for cluster sizes 512 B, 64 KiB and 2 MiB, and
// checks that ReadDirect's extents read back what ReadAt reads, for the
// whole window and for random sub-ranges.
func TestReadDirectMatchesReadAt(t *testing.T) {
	for _, cb := range []uint32{9, 16, 21} {
		cs := int64(1) << cb
		t.Run(fmt.Sprintf("cluster=%d", cs), func(t *testing.T) {
			region := cs * (cs / 8) // bytes one L2 table maps
			size := 2 * region
			if cb == 9 {
				size = 128 * region // 4 MiB: reads over more regions than there are lock stripes
			}
			path := filepath.Join(t.TempDir(), "d.qcow2")
			if _, err := Create(path, CreateOptions{Size: uint64(size), ClusterSize: uint32(cs)}); err != nil {
				t.Fatal(err)
			}
			im, err := Open(path, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			rng := rand.New(rand.NewPCG(uint64(cb), 1))
			src := rand.NewChaCha8([32]byte{byte(cb)})
			rnd := func(n int64) []byte {
				b := make([]byte, n)
				src.Read(b)
				return b
			}
			// The window: 16 clusters each side of the first region
			// boundary (at least 32 KiB each side).
			span := max(16*cs, 32<<10)
			lo := region - span
			write := func(off, n int64) {
				if _, err := im.WriteAt(rnd(n), lo+off); err != nil {
					t.Fatal(err)
				}
			}
			write(0, 4*cs)         // four clusters in one allocation: host-contiguous
			write(6*cs, cs)        // out of host order: 6 after 5
			write(5*cs, cs)        //
			write(8*cs+100, cs)    // partial clusters
			write(span-cs, 3*cs)   // across the region boundary
			write(span+4*cs, 2*cs) //
			// Zero flag, host cluster kept; then deallocated, discarded.
			if err := im.WriteZeroes(lo+span+4*cs, cs, false); err != nil {
				t.Fatal(err)
			}
			if err := im.WriteZeroes(lo+5*cs, cs, true); err != nil {
				t.Fatal(err)
			}
			if err := im.Discard(lo+span, cs); err != nil {
				t.Fatal(err)
			}

			got, exts, err := readDirect(t, im, lo, 2*span)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, mustReadAt(t, im, lo, 2*span)) {
				t.Fatalf("whole window differs from ReadAt; extents %+v", exts)
			}
			var data, zero int
			for _, x := range exts {
				if x.Zero {
					zero++
				} else {
					data++
				}
			}
			if data < 3 || zero < 3 {
				t.Errorf("whole window: %d data and %d zero extents, want at least 3 of each: %+v", data, zero, exts)
			}
			// The four clusters written at once are one extent.
			if _, e, err := readDirect(t, im, lo, 4*cs); err != nil || len(e) != 1 || e[0].Zero || e[0].Length != 4*cs {
				t.Errorf("four host-contiguous clusters: %v, extents %+v; want one data extent of %d", err, e, 4*cs)
			}
			for range 200 {
				off := rng.Int64N(2 * span)
				n := rng.Int64N(min(2*span-off, 1<<20) + 1)
				got, _, err := readDirect(t, im, lo+off, n)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, mustReadAt(t, im, lo+off, n)) {
					t.Fatalf("ReadDirect(%d, %d) differs from ReadAt", lo+off, n)
				}
			}
			if cb == 9 {
				// 32 L2 tables, and 96 (more than the 64 lock stripes, so
				// the range's regions share stripes).
				for _, n := range []int64{1 << 20, 3 << 20} {
					got, _, err := readDirect(t, im, 0, n)
					if err != nil || !bytes.Equal(got, mustReadAt(t, im, 0, n)) {
						t.Fatalf("%d bytes over %d L2 tables: %v, equal %t", n, n/region, err, bytes.Equal(got, mustReadAt(t, im, 0, n)))
					}
				}
			}
			if err := im.ReadDirect(size-512, 1024, func(*os.File, []DirectExtent) error { return nil }); !errors.Is(err, ErrOutOfRange) {
				t.Errorf("range past the end: %v, want ErrOutOfRange", err)
			}
		})
	}
}

// TestReadDirectNotDirect: compressed clusters (qemu-img convert -c) and
// clusters that show a backing file cannot be sent from the file:
// ReadDirect returns ErrNotDirect without calling fn. The parts of the same
// images that are plain mappings still go direct.
func TestReadDirectNotDirect(t *testing.T) {
	qimg := needTool(t, "qemu-img", "qemu-utils")
	dir := t.TempDir()
	src := filepath.Join(dir, "src.qcow2")
	if _, err := Create(src, CreateOptions{Size: 4 << 20}); err != nil {
		t.Fatal(err)
	}
	im, err := Open(src, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("compress me "), 20000)[:192<<10]
	if _, err := im.WriteAt(data, 1<<20); err != nil {
		t.Fatal(err)
	}
	im.Close()
	comp := filepath.Join(dir, "comp.qcow2")
	run(t, qimg, "convert", "-c", "-O", "qcow2", src, comp)
	cim, err := Open(comp, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer cim.Close()
	if _, _, err := readDirect(t, cim, 1<<20-4096, 8192); !errors.Is(err, ErrNotDirect) {
		t.Errorf("range touching a compressed cluster: %v, want ErrNotDirect", err)
	}
	if got, _, err := readDirect(t, cim, 2<<20, 1<<20); err != nil || !bytes.Equal(got, make([]byte, 1<<20)) {
		t.Errorf("unallocated range of the compressed image: %v", err)
	}

	over := filepath.Join(dir, "over.qcow2")
	if _, err := Create(over, CreateOptions{Size: 4 << 20, BackingFile: src, BackingFormat: "qcow2"}); err != nil {
		t.Fatal(err)
	}
	oim, err := Open(over, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer oim.Close()
	if _, err := oim.WriteAt(bytes.Repeat([]byte{7}, 128<<10), 0); err != nil {
		t.Fatal(err)
	}
	if got, _, err := readDirect(t, oim, 0, 128<<10); err != nil || !bytes.Equal(got, mustReadAt(t, oim, 0, 128<<10)) {
		t.Errorf("clusters allocated in the overlay: %v", err)
	}
	if _, _, err := readDirect(t, oim, 64<<10, 128<<10); !errors.Is(err, ErrNotDirect) {
		t.Errorf("range reaching a cluster of the backing file: %v, want ErrNotDirect", err)
	}
	if _, _, err := readDirect(t, oim, 3<<20, 64<<10); !errors.Is(err, ErrNotDirect) {
		t.Errorf("unallocated range over a backing file: %v, want ErrNotDirect", err)
	}
}

// TestReadDirectConcurrentReallocation: while one goroutine reads a range
// through ReadDirect, others discard and rewrite that range and another
// one. A discarded cluster is free for the next allocation, so a mapping
// that was not held while fn ran could end up pointing at the other
// range's data. Each 512-byte sector the direct reads see must be one of
// the patterns written to that range (or zeros), never the other range's.
// Run with -race.
func TestReadDirectConcurrentReallocation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.qcow2")
	if _, err := Create(path, CreateOptions{Size: 8 << 20, ClusterSize: 4096}); err != nil {
		t.Fatal(err)
	}
	im, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	const a, b, n = 0, 4 << 20, 256 << 10
	var stop atomic.Bool
	var wg sync.WaitGroup
	churn := func(off int64, patterns ...byte) {
		defer wg.Done()
		for i := 0; !stop.Load(); i++ {
			if err := im.Discard(off, n); err != nil {
				t.Error(err)
				return
			}
			if _, err := im.WriteAt(bytes.Repeat([]byte{patterns[i%len(patterns)]}, n), off); err != nil {
				t.Error(err)
				return
			}
		}
	}
	wg.Add(2)
	go churn(a, 0xa1, 0xa2)
	go churn(b, 0xb1, 0xb2)
	reads := 0
	for ; reads < 300 && !t.Failed(); reads++ {
		err := im.ReadDirect(a, n, func(f *os.File, ext []DirectExtent) error {
			time.Sleep(200 * time.Microsecond) // a slow socket: widen the window
			buf := make([]byte, 0, n)
			for _, x := range ext {
				p := make([]byte, x.Length)
				if !x.Zero {
					if _, err := f.ReadAt(p, x.HostOffset); err != nil {
						return err
					}
				}
				buf = append(buf, p...)
			}
			for s := 0; s < n; s += 512 {
				sec := buf[s : s+512]
				if v := sec[0]; (v != 0 && v != 0xa1 && v != 0xa2) || !bytes.Equal(sec, bytes.Repeat([]byte{v}, 512)) {
					return fmt.Errorf("sector at %d (starting 0x%x) is not one of the patterns written to this range", s, v)
				}
			}
			return nil
		})
		if err != nil {
			t.Error(err)
			break
		}
	}
	stop.Store(true)
	wg.Wait()
}
