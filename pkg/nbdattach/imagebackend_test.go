package nbdattach

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

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

// countImageFlushes counts the image flushes (fdatasync) ImageBackend does
// until the test ends. Call it before starting a server, so that the
// server has stopped when the count is unhooked.
func countImageFlushes(t *testing.T) *atomic.Int64 {
	var n atomic.Int64
	orig := flushImage
	flushImage = func(im *qcow2.Image) error { n.Add(1); return orig(im) }
	t.Cleanup(func() { flushImage = orig })
	return &n
}

// TestImageBackendFUA: on a qcow2 image, every command with FUA is answered
// only after the image was flushed (fdatasync); without FUA there is no
// flush before NBD_CMD_FLUSH.
func TestImageBackendFUA(t *testing.T) {
	flushes := countImageFlushes(t)
	im, _ := newImage(t, false)
	tc, wait := connect(t, &Export{Backend: ImageBackend{Img: im}}, clientOpts{structured: true})
	data := bytes.Repeat([]byte{0xcd}, 64<<10)
	for i, s := range []struct {
		name    string
		req     request
		payload []byte
		flush   bool
	}{
		{"write", request{typ: cmdWrite, length: 64 << 10}, data, false},
		{"trim", request{typ: cmdTrim, offset: 64 << 10, length: 64 << 10}, nil, false},
		{"write zeroes", request{typ: cmdWriteZeroes, offset: 128 << 10, length: 4096}, nil, false},
		{"write FUA", request{typ: cmdWrite, flags: cmdFlagFUA, offset: 256 << 10, length: 64 << 10}, data, true},
		{"trim FUA", request{typ: cmdTrim, flags: cmdFlagFUA, offset: 0, length: 64 << 10}, nil, true},
		{"write zeroes FUA", request{typ: cmdWriteZeroes, flags: cmdFlagFUA, offset: 256 << 10, length: 4096}, nil, true},
		{"flush", request{typ: cmdFlush}, nil, true},
	} {
		s.req.handle = uint64(i + 1)
		before := flushes.Load()
		if r, err := tc.do(s.req, s.payload); err != nil || r.errno != 0 {
			t.Fatalf("%s: %v %v %s", s.name, err, r.errno, r.msg)
		}
		if got := flushes.Load() - before; (got > 0) != s.flush {
			t.Errorf("%s: %d image flushes before the reply, want flushed=%v", s.name, got, s.flush)
		}
	}
	tc.send(request{typ: cmdDisc}, nil)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
}

// unixServer serves exports on a unix socket until the test ends, and
// passes on the error of each connection that ends with one.
type unixServer struct {
	sock string
	errs chan error
}

func startUnixServer(t *testing.T, exports ExportList) *unixServer {
	t.Helper()
	us := &unixServer{errs: make(chan error, 16)}
	var l net.Listener
	us.sock, l = listenUnix(t)
	serveUntilCleanup(t, NewServer(exports, WithConnErrorHandler(func(_ net.Conn, err error) { us.errs <- err })), l)
	return us
}

// listenUnix listens on a unix socket in a fresh directory under the system
// temporary directory (t.TempDir's paths can be too long for a socket).
func listenUnix(t testing.TB) (string, net.Listener) {
	t.Helper()
	dir, err := os.MkdirTemp("", "nbdattach")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	return sock, l
}

// serveUntilCleanup serves l with srv until the test ends, then stops it
// and fails the test if Serve returned an error.
func serveUntilCleanup(t testing.TB, srv *Server, l net.Listener) {
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
}

func (us *unixServer) dial(t *testing.T, name string) *testClient {
	t.Helper()
	c, err := net.Dial("unix", us.sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	tc := newRawClient(c)
	if err := tc.handshake(clientOpts{name: name, structured: true}); err != nil {
		t.Fatalf("handshake with %q: %v", name, err)
	}
	return tc
}

// connError waits for the error that ended a connection.
func (us *unixServer) connError(t *testing.T) error {
	t.Helper()
	select {
	case err := <-us.errs:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("the abandoned connection did not end")
		return nil
	}
}

// stillServes checks that a client connected before the abandoned one, and
// a new one, are served normally.
func stillServes(t *testing.T, us *unixServer, tc *testClient, name string) {
	t.Helper()
	for i, c := range []*testClient{tc, us.dial(t, name)} {
		p := bytes.Repeat([]byte{byte(0x30 + i)}, 4096)
		if r, err := c.do(request{typ: cmdWrite, handle: 1, offset: 512 << 10, length: 4096}, p); err != nil || r.errno != 0 {
			t.Fatalf("%q, client %d, after the other client left: write %v %v", name, i, err, r.errno)
		}
		if r, err := c.do(request{typ: cmdRead, handle: 2, offset: 512 << 10, length: 4096}, nil); err != nil || r.errno != 0 || !bytes.Equal(r.data, p) {
			t.Fatalf("%q, client %d, after the other client left: read %v %v", name, i, err, r.errno)
		}
		c.send(request{typ: cmdDisc}, nil)
	}
}

// TestDisconnectMidWrite: a client has a write acknowledged, then sends the
// header and half the payload of another and closes the socket. The server
// must end that connection without crashing, flush the image, keep the
// acknowledged write (read back through the server and, after the image is
// closed, from the file) and not apply the incomplete one; clients of this
// and of another export keep being served.
func TestDisconnectMidWrite(t *testing.T) {
	flushes := countImageFlushes(t)
	im, path := newImage(t, false)
	us := startUnixServer(t, ExportList{
		{Name: "img", Backend: ImageBackend{Img: im}},
		{Name: "mem", Backend: newMemBackend(1 << 20)},
	})
	otherExport, sameExport := us.dial(t, "mem"), us.dial(t, "img")

	acked := bytes.Repeat([]byte{0xa1}, 64<<10)
	a := us.dial(t, "img")
	if r, err := a.do(request{typ: cmdWrite, handle: 1, length: 64 << 10}, acked); err != nil || r.errno != 0 {
		t.Fatalf("acknowledged write: %v %v", err, r.errno)
	}
	before := flushes.Load()
	hdr := make([]byte, requestSize)
	request{typ: cmdWrite, handle: 2, offset: 64 << 10, length: 64 << 10}.encode(hdr)
	if _, err := a.c.Write(append(hdr, bytes.Repeat([]byte{0xb2}, 32<<10)...)); err != nil {
		t.Fatal(err)
	}
	a.c.Close()
	if err := us.connError(t); err == nil || !strings.Contains(err.Error(), "write payload") {
		t.Errorf("connection ended with %v, want an error about the write payload", err)
	}
	if flushes.Load() == before {
		t.Errorf("the image was not flushed when the client left after a write")
	}

	stillServes(t, us, otherExport, "mem")
	want := make([]byte, 128<<10)
	copy(want, acked)
	b := us.dial(t, "img")
	if r, err := b.do(request{typ: cmdRead, handle: 1, length: 128 << 10}, nil); err != nil || r.errno != 0 || !bytes.Equal(r.data, want) {
		t.Errorf("read back through the server: %v %v; acknowledged data intact %v, incomplete write absent %v",
			err, r.errno, bytes.Equal(r.data[:64<<10], want[:64<<10]), bytes.Equal(r.data[64<<10:], want[64<<10:]))
	}
	b.send(request{typ: cmdDisc}, nil)
	stillServes(t, us, sameExport, "img")

	// Reopen the image: the acknowledged write is in the file.
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	im2, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im2.Close()
	got := make([]byte, 128<<10)
	if _, err := im2.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Errorf("reopened image: %v; acknowledged data intact %v, incomplete write absent %v",
			err, bytes.Equal(got[:64<<10], want[:64<<10]), bytes.Equal(got[64<<10:], want[64<<10:]))
	}
}

// TestDisconnectDuringReadReply: a client sends reads far larger than the
// socket buffers and closes without reading the replies. The server must
// end that connection with a write error (not block, not crash), and other
// clients of the same export and of another one keep being served.
func TestDisconnectDuringReadReply(t *testing.T) {
	im, _ := newImage(t, false)
	us := startUnixServer(t, ExportList{
		{Name: "img", Backend: ImageBackend{Img: im}},
		{Name: "mem", Backend: newMemBackend(32 << 20)},
	})
	otherExport, sameExport := us.dial(t, "img"), us.dial(t, "mem")
	a := us.dial(t, "mem")
	for i := range 4 {
		if err := a.send(request{typ: cmdRead, handle: uint64(i), offset: uint64(i) << 23, length: 8 << 20}, nil); err != nil {
			t.Fatal(err)
		}
	}
	// Take part of the first reply, then go.
	if _, err := io.ReadFull(a.br, make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	a.c.Close()
	if err := us.connError(t); err == nil || !strings.Contains(err.Error(), "writing reply") {
		t.Errorf("connection ended with %v, want a reply write error", err)
	}
	stillServes(t, us, sameExport, "mem")
	stillServes(t, us, otherExport, "img")
}
