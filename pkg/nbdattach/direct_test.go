package nbdattach

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

// startDirectServer serves exports on a fresh unix or TCP (loopback, port
// chosen by the kernel) listener and returns a dial function.
func startDirectServer(t *testing.T, network string, exports ExportList) func(o clientOpts) *testClient {
	t.Helper()
	addr := "127.0.0.1:0"
	if network == "unix" {
		dir, err := os.MkdirTemp("", "nbddirect") // a socket path must be short
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		addr = filepath.Join(dir, "s")
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- NewServer(exports).Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return func(o clientOpts) *testClient {
		t.Helper()
		c, err := net.Dial(network, l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(20 * time.Second))
		tc := newRawClient(c)
		if err := tc.handshake(o); err != nil {
			t.Fatalf("handshake: %v", err)
		}
		return tc
	}
}

// pipelinedReads sends every read before reading any reply, so that the
// replies go out concurrently and must not interleave, then checks each
// one against want (the export's contents) and returns how many of them
// went out through sendfile.
func pipelinedReads(t *testing.T, tc *testClient, want []byte, reqs []request) int64 {
	t.Helper()
	before := directReplies.Load()
	byHandle := map[uint64]request{}
	for i, r := range reqs {
		r.typ = cmdRead
		r.handle = uint64(100 + i)
		byHandle[r.handle] = r
		if err := tc.send(r, nil); err != nil {
			t.Fatal(err)
		}
	}
	for range reqs {
		rep, err := tc.readReply(func(h uint64) (uint32, bool) { r, ok := byHandle[h]; return r.length, ok })
		if err != nil {
			t.Fatalf("reply: %v", err)
		}
		req, ok := byHandle[rep.handle]
		if !ok {
			t.Fatalf("reply for unknown handle %d", rep.handle)
		}
		delete(byHandle, rep.handle)
		if rep.errno != 0 {
			t.Errorf("read %d+%d: errno %v %s", req.offset, req.length, rep.errno, rep.msg)
			continue
		}
		if tc.structured && (rep.chunks != 1 || rep.offset != req.offset) {
			t.Errorf("read %d+%d: %d chunks, data offset %d; want one chunk at the request offset", req.offset, req.length, rep.chunks, rep.offset)
		}
		if !bytes.Equal(rep.data, want[req.offset:req.offset+uint64(req.length)]) {
			t.Errorf("read %d+%d (simple %t): data differs from the image", req.offset, req.length, !tc.structured)
		}
	}
	return directReplies.Load() - before
}

// TestDirectReadsImage: READs of a qcow2 image with data, unallocated and
// zero-flag clusters go out through sendfile once they are at least
// directMin long, over unix and TCP sockets, with simple and structured
// replies, pipelined; every reply carries the image's data.
func TestDirectReadsImage(t *testing.T) {
	path := filepath.Join(t.TempDir(), "d.qcow2")
	if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: 4 << 20}); err != nil {
		t.Fatal(err)
	}
	im, err := qcow2.Open(path, qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	rnd := rand.NewChaCha8([32]byte{1})
	wr := func(off, n int64) {
		b := make([]byte, n)
		rnd.Read(b)
		if _, err := im.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	wr(0, 1<<20)
	wr(1536<<10, 256<<10)
	if err := im.WriteZeroes(1600<<10, 64<<10, false); err != nil { // zero flag, cluster kept
		t.Fatal(err)
	}
	wr(3<<20, 128<<10)
	want := make([]byte, 4<<20)
	if _, err := im.ReadAt(want, 0); err != nil {
		t.Fatal(err)
	}
	reqs := []request{
		{offset: 0, length: 1 << 20},                    // data
		{offset: 512 << 10, length: 1 << 20},            // data, hole
		{offset: 1280 << 10, length: 1 << 20},           // hole, data, zero flag, data, hole
		{offset: 3 << 20, length: 1 << 20},              // to the end
		{offset: 2 << 20, length: 1 << 20},              // only a hole
		{offset: 64 << 10, length: directMin},           // the threshold
		{offset: 4096, length: 4096},                    // below it: copied
		{offset: 1 << 20, length: 2 << 20, flags: 0},    // 2 MiB
		{offset: 768 << 10, length: directMin - 4096},   // just below
		{offset: 3<<20 + 4096, length: 512 << 10},       // unaligned to clusters
		{offset: 1536<<10 + 512, length: 128<<10 - 512}, // inside clusters
	}
	const belowMin = 2
	exp := ExportList{{Backend: ImageBackend{Img: im}}}
	for _, network := range []string{"unix", "tcp"} {
		dial := startDirectServer(t, network, exp)
		for _, structured := range []bool{false, true} {
			tc := dial(clientOpts{structured: structured})
			if n := pipelinedReads(t, tc, want, reqs); n != int64(len(reqs)-belowMin) {
				t.Errorf("%s, structured %t: %d of %d replies went through sendfile, want %d", network, structured, n, len(reqs), len(reqs)-belowMin)
			}
			if structured {
				// NBD_CMD_FLAG_DF: one chunk, which the direct path sends anyway.
				if n := pipelinedReads(t, tc, want, []request{{offset: 1280 << 10, length: 1 << 20, flags: cmdFlagDF}}); n != 1 {
					t.Errorf("%s: DF read went through sendfile %d times, want 1", network, n)
				}
			}
			tc.send(request{typ: cmdDisc}, nil)
		}
	}
	// Writes between reads are seen by the next direct read.
	dial := startDirectServer(t, "unix", exp)
	tc := dial(clientOpts{structured: true})
	p := bytes.Repeat([]byte{0x5a}, 96<<10)
	if r, err := tc.do(request{typ: cmdWrite, handle: 1, offset: 2<<20 + 8192, length: uint32(len(p))}, p); err != nil || r.errno != 0 {
		t.Fatalf("write: %v %v", err, r.errno)
	}
	copy(want[2<<20+8192:], p)
	if n := pipelinedReads(t, tc, want, []request{{offset: 2 << 20, length: 1 << 20}}); n != 1 {
		t.Errorf("read after write: %d direct replies, want 1", n)
	}
}

// TestDirectReadsZoned: a zoned export's READs across a sequential zone's
// write pointer and into the next zone go through sendfile and carry the
// device's data, zeros past the write pointer included.
func TestDirectReadsZoned(t *testing.T) {
	d := newZonedDevice(t)
	p := bytes.Repeat([]byte{0x3c}, 256<<10)
	if _, err := d.WriteAt(p, 2<<20, false); err != nil { // zone 2: WP at 2M+256K
		t.Fatal(err)
	}
	if _, err := d.WriteAt(p, 512<<10, false); err != nil { // conventional zone 0
		t.Fatal(err)
	}
	want := make([]byte, d.Size())
	if _, err := d.ReadAt(want, 0); err != nil {
		t.Fatal(err)
	}
	reqs := []request{
		{offset: 2<<20 + 128<<10, length: 1 << 20}, // across the WP into zone 3
		{offset: 1536 << 10, length: 1 << 20},      // conventional zone 1 into zone 2
		{offset: 0, length: 1 << 20},               // conventional zone 0
		{offset: 5 << 20, length: 1 << 20},         // an empty zone: zeros, no file
	}
	dial := startDirectServer(t, "unix", ExportList{{Backend: ZonedBackend{D: d}, MinBlockSize: 4096}})
	for _, structured := range []bool{false, true} {
		tc := dial(clientOpts{structured: structured})
		if n := pipelinedReads(t, tc, want, reqs); n != int64(len(reqs)) {
			t.Errorf("structured %t: %d of %d replies went through sendfile", structured, n, len(reqs))
		}
		tc.send(request{typ: cmdDisc}, nil)
	}
}

// TestDirectReadFallback: where sendfile cannot be used the reply still
// carries the data, through ReadAt: compressed clusters (the image says
// ErrNotDirect) and a connection that is not a socket (net.Pipe).
func TestDirectReadFallback(t *testing.T) {
	qimg := requirePeer(t, "qemu-img", "qemu-utils")
	dir := t.TempDir()
	src, comp := filepath.Join(dir, "src.raw"), filepath.Join(dir, "c.qcow2")
	want := bytes.Repeat([]byte("squeeze this "), (2<<20)/13+1)[:2<<20]
	if err := os.WriteFile(src, want, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(qimg, "convert", "-c", "-f", "raw", "-O", "qcow2", src, comp).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert -c: %v\n%s", err, out)
	}
	im, err := qcow2.Open(comp, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if m, _ := im.Map(0, 1<<20); len(m) == 0 || !m[0].Compressed {
		t.Fatalf("qemu-img convert -c did not compress: %+v", m)
	}
	exp := &Export{Backend: ImageBackend{Img: im, RO: true}}
	reqs := []request{{offset: 0, length: 1 << 20}, {offset: 1 << 20, length: 1 << 20}}
	tc := startDirectServer(t, "unix", ExportList{exp})(clientOpts{structured: true})
	if n := pipelinedReads(t, tc, want, reqs); n != 0 {
		t.Errorf("compressed image: %d replies went through sendfile, want 0", n)
	}
	tc.send(request{typ: cmdDisc}, nil)
	tc2, wait := connect(t, exp, clientOpts{structured: true})
	if n := pipelinedReads(t, tc2, want, reqs); n != 0 {
		t.Errorf("net.Pipe connection: %d replies went through sendfile, want 0", n)
	}
	tc2.send(request{typ: cmdDisc}, nil)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
}

// TestDisconnectDuringDirectReply: a client sends direct reads far larger
// than the socket buffers and leaves without reading the replies. The
// connection must end with a write error, and the image must stay usable:
// the region locks the direct reads held are released (a write to the same
// range through another client goes through).
func TestDisconnectDuringDirectReply(t *testing.T) {
	path := filepath.Join(t.TempDir(), "d.qcow2")
	if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: 32 << 20}); err != nil {
		t.Fatal(err)
	}
	im, err := qcow2.Open(path, qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if _, err := im.WriteAt(bytes.Repeat([]byte{0x77}, 32<<20), 0); err != nil {
		t.Fatal(err)
	}
	us := startUnixServer(t, ExportList{{Name: "img", Backend: ImageBackend{Img: im}}})
	other := us.dial(t, "img")
	a := us.dial(t, "img")
	before := directReplies.Load()
	for i := range 4 {
		if err := a.send(request{typ: cmdRead, handle: uint64(i), offset: uint64(i) << 23, length: 8 << 20}, nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.br.Read(make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	a.c.Close()
	if err := us.connError(t); err == nil || !strings.Contains(err.Error(), "writing reply") {
		t.Errorf("connection ended with %v, want a reply write error", err)
	}
	if n := directReplies.Load() - before; n == 4 {
		t.Errorf("all 4 replies counted as sent to a client that left")
	}
	stillServes(t, us, other, "img")
}

// TestDirectReplyStalledClient: a client asks for 8 MiB and does not read
// the reply, so the socket fills in the middle of the sendfile. The image's
// mapping must not stay held meanwhile: another client's writes that
// allocate and free clusters in the same L2 region (which need that region
// exclusively) complete while the first client is stalled. The stalled
// reply then arrives whole; the clusters trimmed while it waited read as
// their data or as zeros, never as anything else.
func TestDirectReplyStalledClient(t *testing.T) {
	path := filepath.Join(t.TempDir(), "d.qcow2")
	if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: 64 << 20}); err != nil {
		t.Fatal(err)
	}
	im, err := qcow2.Open(path, qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	orig := make([]byte, 8<<20)
	rand.NewChaCha8([32]byte{2}).Read(orig)
	if _, err := im.WriteAt(orig, 0); err != nil {
		t.Fatal(err)
	}
	dial := startDirectServer(t, "unix", ExportList{{Backend: ImageBackend{Img: im}}})
	stalled, other := dial(clientOpts{structured: true}), dial(clientOpts{structured: true})
	before := directReplies.Load()
	if err := stalled.send(request{typ: cmdRead, handle: 1, length: 8 << 20}, nil); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // let the reply fill the socket
	done := make(chan error, 1)
	go func() {
		p := bytes.Repeat([]byte{0xee}, 64<<10)
		for i, req := range []request{
			{typ: cmdWrite, offset: 32 << 20, length: 64 << 10}, // allocates
			{typ: cmdTrim, offset: 6 << 20, length: 1 << 20},    // frees clusters the read still has to send
			{typ: cmdWrite, offset: 40 << 20, length: 64 << 10}, // may reuse them
		} {
			req.handle = uint64(10 + i)
			var payload []byte
			if req.typ == cmdWrite {
				payload = p
			}
			if r, err := other.do(req, payload); err != nil || r.errno != 0 {
				done <- fmt.Errorf("%v: %v %v", req.typ, err, r.errno)
				return
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("writes to the region of a stalled direct read did not complete: the read holds the mapping while the client does not read")
	}
	r, err := stalled.readReply(func(uint64) (uint32, bool) { return 8 << 20, true })
	if err != nil || r.errno != 0 || len(r.data) != 8<<20 {
		t.Fatalf("stalled reply: %v %v, %d bytes", err, r.errno, len(r.data))
	}
	zero := make([]byte, 512)
	for s := 0; s < 8<<20; s += 512 {
		if got := r.data[s : s+512]; !bytes.Equal(got, orig[s:s+512]) && !bytes.Equal(got, zero) {
			t.Fatalf("sector at %d is neither its data nor zeros", s)
		}
	}
	if !bytes.Equal(r.data[:6<<20], orig[:6<<20]) {
		t.Errorf("data before the trimmed range differs")
	}
	if n := directReplies.Load() - before; n != 1 {
		t.Errorf("%d direct replies, want 1", n)
	}
}

// TestDirectReadsManyInFlight keeps 4 direct 1 MiB reads in flight for a
// few hundred requests while the client reads replies as they come, so
// the socket fills and drains again and again: a reply that waits for
// room must be woken even when the room appeared before it began to wait
// (a lost wakeup hangs here until the connection deadline).
func TestDirectReadsManyInFlight(t *testing.T) {
	path := filepath.Join(t.TempDir(), "d.qcow2")
	if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: 16 << 20}); err != nil {
		t.Fatal(err)
	}
	im, err := qcow2.Open(path, qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	want := make([]byte, 16<<20)
	rand.NewChaCha8([32]byte{3}).Read(want)
	if _, err := im.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	tc := startDirectServer(t, "unix", ExportList{{Backend: ImageBackend{Img: im}}})(clientOpts{structured: true})
	const total, depth = 300, 4
	before := directReplies.Load()
	errc := make(chan error, 1)
	window := make(chan struct{}, depth)
	go func() {
		for i := range total {
			window <- struct{}{}
			if err := tc.send(request{typ: cmdRead, handle: uint64(i), offset: uint64(i%16) << 20, length: 1 << 20}, nil); err != nil {
				errc <- err
				return
			}
		}
		errc <- nil
	}()
	for range total {
		r, err := tc.readReply(func(uint64) (uint32, bool) { return 1 << 20, true })
		if err != nil || r.errno != 0 {
			t.Fatalf("reply: %v %v (a hang ends at the connection deadline)", err, r.errno)
		}
		if off := (r.handle % 16) << 20; !bytes.Equal(r.data, want[off:off+1<<20]) {
			t.Fatalf("reply %d: data differs", r.handle)
		}
		<-window
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if n := directReplies.Load() - before; n != total {
		t.Errorf("%d of %d replies went through sendfile", n, total)
	}
}
