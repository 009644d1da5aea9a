package qcow2

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// readFuzzSeed decodes a committed FuzzOpen corpus file ([]byte("...")).
func readFuzzSeed(t *testing.T, name string) []byte {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("testdata", "fuzz", "FuzzOpen", name))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitN(strings.TrimSpace(string(raw)), "\n", 2)
	if len(lines) != 2 || !strings.HasPrefix(lines[1], "[]byte(") || !strings.HasSuffix(lines[1], ")") {
		t.Fatalf("%s: not a one-value corpus file", name)
	}
	s, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(lines[1], "[]byte("), ")"))
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return []byte(s)
}

// TestAllocatorRefusesHeaderClaimedFree replays the input FuzzOpen found:
// its refcounts say clusters 0-3 are free, so the allocator used to hand out
// cluster 0, write a refcount block over the header and loop forever. The
// write must now fail with a corruption error naming the header, and the
// header must be exactly as before.
func TestAllocatorRefusesHeaderClaimedFree(t *testing.T) {
	img := readFuzzSeed(t, "26211101b73b95b7")
	p := filepath.Join(t.TempDir(), "bad.qcow2")
	if err := os.WriteFile(p, img, 0o644); err != nil {
		t.Fatal(err)
	}
	im, err := Open(p, OpenOptions{NoBacking: true})
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	_, err = im.WriteAt(bytes.Repeat([]byte{0xab}, 4096), 0)
	var fe *FormatError
	if !errors.Is(err, ErrCorrupt) || !errors.As(err, &fe) || fe.Offset != 0 || !strings.Contains(fe.Reason, "image header") {
		t.Fatalf("write into an image whose refcounts free the header: got %v, want a corruption error at offset 0 naming the image header", err)
	}
	im.Close()
	after, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(after[:4096], img[:4096]) {
		t.Fatalf("the header cluster changed: first bytes % x", after[:8])
	}
}

// TestOverlapChecksRefuseMetadataWrites damages the mappings of a good image
// so that a guest write, an L2 update or a refcount update would land on
// other metadata; each must be refused with ErrCorrupt naming the structure,
// and the metadata must be unchanged.
func TestOverlapChecksRefuseMetadataWrites(t *testing.T) {
	const cs = 4096
	// Create lays out: cluster 0 header, 1 refcount table, 2 refcount
	// block, 3 L1 table; the first write adds an L2 table and data.
	cases := []struct {
		name      string
		damage    func(t *testing.T, p string, l2off uint64)
		write     int64 // guest offset written after the damage
		want      string
		untouched bool // refused before allocating: refcount block and L2 table unchanged too
	}{
		{"data entry points at the refcount table", func(t *testing.T, p string, l2off uint64) {
			patch(t, p, int64(l2off), be64(1*cs|oflagCopied))
		}, 0, "refcount table", true},
		{"shared data entry points at the refcount table", func(t *testing.T, p string, l2off uint64) {
			// Not COPIED: the write goes to a new cluster, then the old
			// one is released, which must not free (punch) the table.
			patch(t, p, int64(l2off), be64(1*cs))
		}, 0, "refcount table", false},
		{"L1 entry points at the refcount block", func(t *testing.T, p string, _ uint64) {
			patch(t, p, 3*cs, be64(2*cs|oflagCopied))
		}, 8192, "refcount block", true},
		{"refcount table entry points at the L1 table", func(t *testing.T, p string, _ uint64) {
			// Read as refcounts, the L1 entry makes cluster 0 look taken
			// and cluster 1 free: the allocator picks the refcount table.
			patch(t, p, 1*cs, be64(3*cs))
		}, 8192, "refcount table at 4096", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := mkImage(t, CreateOptions{Size: 1 << 20, ClusterSize: cs})
			im, err := Open(p, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := im.WriteAt(bytes.Repeat([]byte{1}, cs), 0); err != nil {
				t.Fatal(err)
			}
			l2off := im.l1[0] & l1OffsetMask
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			tc.damage(t, p, l2off)
			before, _ := os.ReadFile(p)
			im, err = Open(p, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			_, err = im.WriteAt(bytes.Repeat([]byte{2}, cs), tc.write)
			var fe *FormatError
			if !errors.Is(err, ErrCorrupt) || !errors.As(err, &fe) || !strings.Contains(fe.Reason, tc.want) {
				t.Fatalf("got %v, want a corruption error naming the %s", err, tc.want)
			}
			im.Close()
			after, _ := os.ReadFile(p)
			same := func(c uint64) bool { return bytes.Equal(after[c:c+cs], before[c:c+cs]) }
			if !same(0) || !same(1*cs) || !same(3*cs) || tc.untouched && (!same(2*cs) || !same(l2off)) {
				t.Fatal("metadata changed although the write was refused")
			}
		})
	}
}

// TestAllocationPoolLeaksOnlyOnCrash: single-cluster allocations come from
// a run reserved at the end of the image in one refcount write. A process
// killed with clusters still reserved leaves leaks and nothing worse (every
// acknowledged write reads back, check finds no corruption); the repairing
// open of the dirty image removes them. A clean Close gives the reserve
// back and trims the file, so the image checks clean.
func TestAllocationPoolLeaksOnlyOnCrash(t *testing.T) {
	const cs = 4096
	p := mkImage(t, CreateOptions{Size: 64 << 20, ClusterSize: cs})
	im, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want := map[int64]byte{}
	for i := int64(0); i < 10; i++ {
		off := (i*977 + 5) % 16384 * cs
		want[off] = byte(i + 1)
		if _, err := im.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, cs), off); err != nil {
			t.Fatal(err)
		}
	}
	if im.pool.end <= im.pool.next {
		t.Fatal("no clusters reserved: the test does not exercise the pool")
	}
	// What kill -9 would leave: the file as written so far.
	crashed := filepath.Join(t.TempDir(), "crashed.qcow2")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(crashed, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	res, err := Check(p, CheckOptions{})
	if err != nil || res.ExitCode() != 0 {
		t.Fatalf("after Close: %+v %v", res, err)
	}
	if st, _ := os.Stat(p); uint64(st.Size()) > res.ImageEndOffset {
		t.Fatalf("file of %d bytes not trimmed to the image end %d", st.Size(), res.ImageEndOffset)
	}

	leaky := filepath.Join(t.TempDir(), "leaky.qcow2")
	if err := os.WriteFile(leaky, b, 0o644); err != nil {
		t.Fatal(err)
	}
	res, err = Check(crashed, CheckOptions{})
	if err != nil || res.Corruptions != 0 || res.Leaks == 0 || res.ExitCode() != 3 {
		t.Fatalf("crashed image: want leaks only, got %+v %v", res, err)
	}
	im, err = Open(crashed, OpenOptions{}) // dirty: repairs
	if err != nil {
		t.Fatal(err)
	}
	for off, v := range want {
		got := make([]byte, cs)
		if _, err := im.ReadAt(got, off); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{v}, cs)) {
			t.Fatalf("acknowledged write at %d lost after the crash: %v", off, err)
		}
	}
	im.Close()
	if res, err := Check(crashed, CheckOptions{}); err != nil || res.ExitCode() != 0 {
		t.Fatalf("after the repairing open: %+v %v", res, err)
	}
	q := needTool(t, "qemu-img", "qemu-utils")
	out, err := exec.Command(q, "check", leaky).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 3 {
		t.Fatalf("qemu-img check on the crashed image: want exit 3 (leaks only), got %v\n%s", err, out)
	}
}

// TestFreshClusterWriteIsSparse: a 4 KiB write into a cluster nothing was
// written to writes those 4 KiB only; the rest of the cluster is a hole in
// the file that reads as zeros.
func TestFreshClusterWriteIsSparse(t *testing.T) {
	const cs = 65536
	p := mkImage(t, CreateOptions{Size: 64 << 20, ClusterSize: cs})
	im, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	const n = 256
	for i := int64(0); i < n; i++ {
		off := (i*37)%1024*cs + (i%16)*4096
		if _, err := im.WriteAt(bytes.Repeat([]byte{0xcd}, 4096), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	// Data written: 256 × 4 KiB = 1 MiB, plus a few metadata clusters.
	// Zero-filling the clusters would take 16 MiB.
	if used := st.Blocks * 512; used > 4<<20 {
		t.Fatalf("%d bytes on disk for %d 4 KiB writes into fresh 64 KiB clusters: the rest of each cluster was written", used, n)
	}
	got := readAll(t, p)
	off := int64(37) * cs // i = 1: data at 4096..8191 of its cluster
	if !bytes.Equal(got[off:off+4096], make([]byte, 4096)) || got[off+4096] != 0xcd || got[off+8192] != 0 {
		t.Fatal("a fresh cluster does not read as the write plus zeros")
	}
}
