package nbdattach

import (
	"bytes"
	"path/filepath"
	"slices"
	"testing"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

// newImage creates a 1 MiB qcow2 image with 64 KiB clusters.
func newImage(t *testing.T, ro bool) (*qcow2.Image, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "img.qcow2")
	if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	im, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: ro})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { im.Close() })
	return im, path
}

// TestImageBackend drives a qcow2 image through the server: data round
// trips, FUA and FLUSH succeed, TRIM and WRITE_ZEROES read back as zeros,
// and base:allocation follows the image's map (what qemu-nbd reports).
func TestImageBackend(t *testing.T) {
	im, _ := newImage(t, false)
	b := ImageBackend{Img: im}
	tc, wait := connect(t, &Export{Backend: b}, clientOpts{structured: true, contexts: []string{BaseAllocation}})
	if tc.size != 1<<20 || tc.flags&FlagReadOnly != 0 || tc.flags&FlagSendTrim == 0 {
		t.Fatalf("size %d flags %v", tc.size, tc.flags)
	}
	var baseID uint32
	for id := range tc.contexts {
		baseID = id
	}
	data := bytes.Repeat([]byte{0xab}, 128<<10)
	steps := []struct {
		name    string
		req     request
		payload []byte
	}{
		{"write 128K at 64K with FUA", request{typ: cmdWrite, flags: cmdFlagFUA, offset: 64 << 10, length: 128 << 10}, data},
		{"write 64K at 512K", request{typ: cmdWrite, offset: 512 << 10, length: 64 << 10}, data[:64<<10]},
		{"flush", request{typ: cmdFlush}, nil},
		{"trim the cluster at 128K", request{typ: cmdTrim, offset: 128 << 10, length: 64 << 10}, nil},
		{"zero 4K at 512K, keeping it allocated", request{typ: cmdWriteZeroes, flags: cmdFlagNoHole, offset: 512 << 10, length: 4096}, nil},
	}
	for i, s := range steps {
		s.req.handle = uint64(i + 1)
		if r, err := tc.do(s.req, s.payload); err != nil || r.errno != 0 {
			t.Fatalf("%s: %v errno %v %s", s.name, err, r.errno, r.msg)
		}
	}
	want := make([]byte, 1<<20)
	copy(want[64<<10:128<<10], data)
	copy(want[516<<10:576<<10], data)
	r, err := tc.do(request{typ: cmdRead, handle: 10, length: 1 << 20}, nil)
	if err != nil || r.errno != 0 || !bytes.Equal(r.data, want) {
		t.Fatalf("read back: %v errno %v, equal %t", err, r.errno, bytes.Equal(r.data, want))
	}
	r, err = tc.do(request{typ: cmdBlockStatus, handle: 11, length: 1 << 20}, nil)
	if err != nil || r.errno != 0 {
		t.Fatalf("block status: %v %v", err, r.errno)
	}
	hz := StateHole | StateZero
	wantExt := []Extent{{64 << 10, hz}, {64 << 10, 0}, {64 << 10, hz}, {320 << 10, hz}, {64 << 10, 0}, {448 << 10, hz}}
	// Coalesce the expected runs the way the server sends them.
	var merged []Extent
	for _, e := range wantExt {
		if k := len(merged) - 1; k >= 0 && merged[k].Flags == e.Flags {
			merged[k].Length += e.Length
			continue
		}
		merged = append(merged, e)
	}
	if got := r.status[baseID]; !slices.Equal(got, merged) {
		t.Errorf("base:allocation %v, want %v", got, merged)
	}
	tc.send(request{typ: cmdDisc}, nil)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
}

// TestImageBackendReadOnly: an image opened read-only is exported
// read-only, so clients see the flag instead of a failing write.
func TestImageBackendReadOnly(t *testing.T) {
	im, _ := newImage(t, true)
	tc, wait := connect(t, &Export{Backend: ImageBackend{Img: im, RO: true}}, clientOpts{structured: true})
	if tc.flags&FlagReadOnly == 0 {
		t.Errorf("flags %v lack READ_ONLY", tc.flags)
	}
	r, err := tc.do(request{typ: cmdWrite, handle: 1, length: 512}, make([]byte, 512))
	if err != nil || r.errno != EPERM {
		t.Errorf("write to read-only export: %v errno %v, want EPERM", err, r.errno)
	}
	tc.send(request{typ: cmdDisc}, nil)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
}

// TestImageBackendStatusBounded: one BLOCK_STATUS call walks at most
// maxStatusSpan of the image; the client asks again for the rest.
func TestImageBackendStatusBounded(t *testing.T) {
	path := filepath.Join(t.TempDir(), "big.qcow2")
	if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: 4 << 30}); err != nil {
		t.Fatal(err)
	}
	im, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	ext, err := ImageBackend{Img: im}.BlockStatus(BaseAllocation, 0, 4<<30)
	if err != nil {
		t.Fatal(err)
	}
	if len(ext) != 1 || ext[0].Length != maxStatusSpan || ext[0].Flags != StateHole|StateZero {
		t.Errorf("got %v, want one hole of %d bytes", ext, maxStatusSpan)
	}
}
