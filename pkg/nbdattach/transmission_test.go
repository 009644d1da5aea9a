package nbdattach

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func TestTransmissionErrors(t *testing.T) {
	const size = 1 << 20
	tests := []struct {
		name    string
		exp     func(m *memBackend) *Export
		req     request
		payload int // WRITE payload bytes actually sent
		want    Errno
	}{
		{name: "read", req: request{typ: cmdRead, length: 4096}},
		{name: "read zero length", req: request{typ: cmdRead}},
		{name: "read beyond end", req: request{typ: cmdRead, offset: size, length: 512}, want: EINVAL},
		{name: "read offset overflow", req: request{typ: cmdRead, offset: 1<<64 - 512, length: 1024}, want: EINVAL},
		{name: "read misaligned offset", req: request{typ: cmdRead, offset: 100, length: 512}, want: EINVAL},
		{name: "read misaligned length", req: request{typ: cmdRead, length: 100}, want: EINVAL},
		{name: "read above max payload", req: request{typ: cmdRead, length: 1<<20 + 512},
			exp: func(m *memBackend) *Export {
				return &Export{Backend: newMemBackend(4 << 20), MaxPayload: 1 << 20}
			}, want: EINVAL},
		{name: "read with unknown flag", req: request{typ: cmdRead, flags: 1 << 9, length: 512}, want: EINVAL},
		{name: "read with FUA is accepted", req: request{typ: cmdRead, flags: cmdFlagFUA, length: 512}},
		{name: "read with DF", req: request{typ: cmdRead, flags: cmdFlagDF, length: 512}},
		{name: "write", req: request{typ: cmdWrite, length: 4096}, payload: 4096},
		{name: "write FUA", req: request{typ: cmdWrite, flags: cmdFlagFUA, length: 4096}, payload: 4096},
		{name: "write beyond end", req: request{typ: cmdWrite, offset: size - 512, length: 1024}, payload: 1024, want: ENOSPC},
		{name: "write above max payload is drained", req: request{typ: cmdWrite, length: 33 << 20}, payload: 33 << 20,
			exp: func(m *memBackend) *Export { return &Export{Backend: newMemBackend(64 << 20)} }, want: EINVAL},
		{name: "write on read-only export is drained", req: request{typ: cmdWrite, length: 4096}, payload: 4096,
			exp: func(m *memBackend) *Export { return &Export{Backend: m, ReadOnly: true} }, want: EPERM},
		{name: "write on read-only backend", req: request{typ: cmdWrite, length: 4096}, payload: 4096,
			exp: func(m *memBackend) *Export { m.readOnly = true; return &Export{Backend: m} }, want: EPERM},
		{name: "write with DF flag", req: request{typ: cmdWrite, flags: cmdFlagDF, length: 512}, payload: 512, want: EINVAL},
		{name: "write misaligned at 4Kn", req: request{typ: cmdWrite, length: 512}, payload: 512,
			exp: func(m *memBackend) *Export { return &Export{Backend: m, MinBlockSize: 4096} }, want: EINVAL},
		{name: "write unaligned tail of unaligned export", req: request{typ: cmdWrite, offset: 4096, length: 100}, payload: 100,
			exp: func(m *memBackend) *Export { return &Export{Backend: newMemBackend(4196)} }},
		{name: "flush", req: request{typ: cmdFlush}},
		{name: "flush with NO_HOLE", req: request{typ: cmdFlush, flags: cmdFlagNoHole}, want: EINVAL},
		{name: "trim", req: request{typ: cmdTrim, length: 64 << 10}},
		{name: "trim beyond end", req: request{typ: cmdTrim, offset: size, length: 512}, want: EINVAL},
		{name: "trim on read-only export", req: request{typ: cmdTrim, length: 512},
			exp: func(m *memBackend) *Export { return &Export{Backend: m, ReadOnly: true} }, want: EPERM},
		{name: "trim larger than max payload is fine", req: request{typ: cmdTrim, length: size},
			exp: func(m *memBackend) *Export { return &Export{Backend: m, MaxPayload: 64 << 10} }},
		{name: "write zeroes", req: request{typ: cmdWriteZeroes, flags: cmdFlagNoHole, length: size}},
		{name: "write zeroes beyond end", req: request{typ: cmdWriteZeroes, offset: size, length: 512}, want: ENOSPC},
		{name: "fast zero unsupported", req: request{typ: cmdWriteZeroes, flags: cmdFlagFastZero, length: 4096}, want: ENOTSUP},
		{name: "fast zero without FastZeroer", req: request{typ: cmdWriteZeroes, flags: cmdFlagFastZero, length: 4096},
			exp: func(m *memBackend) *Export { m.fastZero = true; return &Export{Backend: plainBackend{m}} }, want: ENOTSUP},
		{name: "fast zero supported", req: request{typ: cmdWriteZeroes, flags: cmdFlagFastZero, length: 4096},
			exp: func(m *memBackend) *Export { m.fastZero = true; return &Export{Backend: m} }},
		{name: "cache", req: request{typ: cmdCache, length: size}},
		{name: "cache with REQ_ONE", req: request{typ: cmdCache, flags: cmdFlagReqOne, length: 512}, want: EINVAL},
		{name: "unknown command", req: request{typ: 42, length: 512}, want: EINVAL},
		{name: "resize is unknown", req: request{typ: 8, offset: 1 << 30}, want: EINVAL},
		{name: "block status without contexts", req: request{typ: cmdBlockStatus, length: 512}, want: EINVAL},
		{name: "backend EIO", req: request{typ: cmdRead, length: 512},
			exp: func(m *memBackend) *Export {
				m.hook = failOnce(&os.PathError{Op: "read", Path: "x", Err: syscall.EIO})
				return &Export{Backend: m}
			}, want: EIO},
		{name: "backend ENOSPC", req: request{typ: cmdWrite, length: 512}, payload: 512,
			exp: func(m *memBackend) *Export {
				m.hook = failOnce(fmt.Errorf("alloc: %w", syscall.ENOSPC))
				return &Export{Backend: m}
			}, want: ENOSPC},
		{name: "backend plain error", req: request{typ: cmdFlush},
			exp: func(m *memBackend) *Export {
				m.hook = failOnce(errors.New("boom"))
				return &Export{Backend: m}
			}, want: EIO},
		{name: "backend panic", req: request{typ: cmdTrim, length: 512},
			exp: func(m *memBackend) *Export {
				var once sync.Once
				m.hook = func(string, int64) error { once.Do(func() { panic("backend bug") }); return nil }
				return &Export{Backend: m}
			}, want: EIO},
	}
	for _, structured := range []bool{false, true} {
		for _, tt := range tests {
			name := tt.name + map[bool]string{false: "/simple", true: "/structured"}[structured]
			t.Run(name, func(t *testing.T) {
				m := newMemBackend(size)
				exp := &Export{Backend: m}
				if tt.exp != nil {
					exp = tt.exp(m)
				}
				if tt.req.flags&cmdFlagDF != 0 && tt.req.typ == cmdRead && !structured {
					t.Skip("DF needs structured replies")
				}
				tc, wait := connect(t, exp, clientOpts{structured: structured})
				tt.req.handle = 0xfeed
				payload := make([]byte, tt.payload)
				r, err := tc.do(tt.req, payload)
				if err != nil {
					t.Fatalf("request: %v", err)
				}
				if r.handle != 0xfeed || r.errno != tt.want {
					t.Fatalf("reply handle %x errno %v (%q), want errno %v", r.handle, r.errno, r.msg, tt.want)
				}
				if structured && r.errno != 0 && r.msg == "" {
					t.Errorf("structured error without a message")
				}
				if tt.req.typ == cmdRead && r.errno == 0 && len(r.data) != int(tt.req.length) {
					t.Errorf("read returned %d bytes", len(r.data))
				}
				// The connection is still usable and in sync.
				r, err = tc.do(request{typ: cmdRead, handle: 2, length: 4096}, nil)
				if err != nil || r.errno != 0 || r.handle != 2 || len(r.data) != 4096 {
					t.Fatalf("follow-up read: %+v %v", r, err)
				}
				tc.send(request{typ: cmdDisc}, nil)
				if err := wait(); err != nil {
					t.Fatalf("ServeConn: %v", err)
				}
			})
		}
	}
}

// failOnce returns a memBackend hook that fails the first operation only.
func failOnce(err error) func(string, int64) error {
	var once sync.Once
	return func(string, int64) error {
		var e error
		once.Do(func() { e = err })
		return e
	}
}

func TestTransmissionData(t *testing.T) {
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprint("structured=", structured), func(t *testing.T) {
			m := newMemBackend(1 << 20)
			tc, wait := connect(t, &Export{Backend: m}, clientOpts{structured: structured})
			want := bytes.Repeat([]byte("zq-csi!\n"), 8192)
			if r, err := tc.do(request{typ: cmdWrite, handle: 1, offset: 128 << 10, length: uint32(len(want))}, want); err != nil || r.errno != 0 {
				t.Fatalf("write: %+v %v", r, err)
			}
			r, err := tc.do(request{typ: cmdRead, handle: 2, offset: 128 << 10, length: uint32(len(want))}, nil)
			if err != nil || r.errno != 0 || !bytes.Equal(r.data, want) {
				t.Fatalf("read back: errno %v err %v equal %v", r.errno, err, bytes.Equal(r.data, want))
			}
			if structured && (r.offset != 128<<10 || r.chunks != 1) {
				t.Errorf("structured read: offset %d in %d chunks", r.offset, r.chunks)
			}
			if r, _ := tc.do(request{typ: cmdWriteZeroes, handle: 3, offset: 128 << 10, length: 4096}, nil); r.errno != 0 {
				t.Fatalf("write zeroes: %v", r.errno)
			}
			r, _ = tc.do(request{typ: cmdRead, handle: 4, offset: 128 << 10, length: 8192}, nil)
			if !bytes.Equal(r.data[:4096], make([]byte, 4096)) || !bytes.Equal(r.data[4096:], want[4096:8192]) {
				t.Errorf("after write zeroes: wrong data")
			}
			tc.send(request{typ: cmdDisc}, nil)
			if err := wait(); err != nil {
				t.Fatal(err)
			}
			if m.flushes.Load() == 0 {
				t.Errorf("no flush at disconnect after writes")
			}
		})
	}
}

func TestBlockStatus(t *testing.T) {
	m := newMemBackend(1 << 20)
	// Allocated: [64K, 72K) and [200K, 204K).
	m.WriteAt(make([]byte, 8192), 64<<10, false)
	m.WriteAt(make([]byte, 4096), 200<<10, false)
	tc, wait := connect(t, &Export{Backend: m}, clientOpts{structured: true, contexts: []string{BaseAllocation, testContext}})
	ids := map[string]uint32{}
	for id, name := range tc.contexts {
		ids[name] = id
	}
	hz := StateHole | StateZero
	tests := []struct {
		name       string
		req        request
		base, test []Extent
	}{
		{name: "whole", req: request{length: 256 << 10},
			base: []Extent{{64 << 10, hz}, {8 << 10, 0}, {128 << 10, hz}, {4 << 10, 0}, {52 << 10, hz}},
			test: []Extent{{64 << 10, 0}, {64 << 10, 1}, {64 << 10, 2}, {64 << 10, 3}}},
		{name: "req one", req: request{flags: cmdFlagReqOne, offset: 66 << 10, length: 256 << 10},
			base: []Extent{{6 << 10, 0}}, test: []Extent{{62 << 10, 1}}},
		{name: "req one shorter than extent", req: request{flags: cmdFlagReqOne, length: 4096},
			base: []Extent{{4096, hz}}, test: []Extent{{4096, 0}}},
		{name: "unaligned tail clipped to request", req: request{offset: 1<<20 - 1024, length: 1024},
			base: []Extent{{1024, hz}}, test: []Extent{{1024, 3}}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.req.typ, tt.req.handle = cmdBlockStatus, uint64(i)
			r, err := tc.do(tt.req, nil)
			if err != nil || r.errno != 0 {
				t.Fatalf("%+v %v", r, err)
			}
			if r.chunks != 2 {
				t.Errorf("%d chunks, want one per context", r.chunks)
			}
			if got := r.status[ids[BaseAllocation]]; !slices.Equal(got, tt.base) {
				t.Errorf("base:allocation %v, want %v", got, tt.base)
			}
			if got := r.status[ids[testContext]]; !slices.Equal(got, tt.test) {
				t.Errorf("%s %v, want %v", testContext, got, tt.test)
			}
		})
	}
	r, _ := tc.do(request{typ: cmdBlockStatus, handle: 9, offset: 1 << 20, length: 512}, nil)
	if r.errno != EINVAL {
		t.Errorf("block status beyond end: %v", r.errno)
	}
	tc.send(request{typ: cmdDisc}, nil)
	wait()
}

func TestDescriptors(t *testing.T) {
	tr := &transmitter{cfg: &exportConfig{minBlock: 512}}
	tests := []struct {
		name string
		req  request
		ext  []Extent
		want []Extent
	}{
		{name: "merged and clipped", req: request{length: 4096},
			ext: []Extent{{1024, 1}, {1024, 1}, {4096, 2}}, want: []Extent{{2048, 1}, {2048, 2}}},
		{name: "cut at unaligned boundary", req: request{length: 4096},
			ext: []Extent{{1000, 1}, {3096, 2}}, want: []Extent{{512, 1}}},
		{name: "first extent below block size", req: request{length: 4096},
			ext: []Extent{{100, 1}, {3996, 2}}, want: []Extent{{512, 0}}},
		{name: "empty from backend", req: request{length: 4096}, ext: nil, want: []Extent{{512, 0}}},
		{name: "zero length stops", req: request{length: 4096},
			ext: []Extent{{1024, 1}, {0, 2}, {1024, 3}}, want: []Extent{{1024, 1}}},
		{name: "longer than 4 GiB splits", req: request{length: 0xFFFFFE00},
			ext: []Extent{{1 << 40, 1}}, want: []Extent{{0xFFFFFE00, 1}}},
		{name: "req one", req: request{flags: cmdFlagReqOne, length: 4096},
			ext: []Extent{{1024, 1}, {3072, 2}}, want: []Extent{{1024, 1}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tr.descriptors(BaseAllocation, tt.req, tt.ext); !slices.Equal(got, tt.want) {
				t.Errorf("got %v, want %v", got, tt.want)
			}
		})
	}
}

// TestOutOfOrderReplies holds the first read in the backend until a later
// write has been answered: replies must not wait for one another.
func TestOutOfOrderReplies(t *testing.T) {
	m := newMemBackend(1 << 20)
	release := make(chan struct{})
	m.hook = func(op string, off int64) error {
		if op == "read" && off == 0 {
			<-release
		}
		return nil
	}
	tc, wait := connect(t, &Export{Backend: m}, clientOpts{structured: true})
	lens := map[uint64]uint32{1: 4096}
	tc.send(request{typ: cmdRead, handle: 1, length: 4096}, nil)
	tc.send(request{typ: cmdWrite, handle: 2, offset: 8192, length: 4096}, make([]byte, 4096))
	tc.send(request{typ: cmdFlush, handle: 3}, nil)
	var order []uint64
	for range 2 {
		r, err := tc.readReply(func(h uint64) (uint32, bool) { l, ok := lens[h]; return l, ok })
		if err != nil {
			t.Fatal(err)
		}
		order = append(order, r.handle)
	}
	close(release)
	r, err := tc.readReply(func(h uint64) (uint32, bool) { l, ok := lens[h]; return l, ok })
	if err != nil {
		t.Fatal(err)
	}
	order = append(order, r.handle)
	if !slices.Equal(order[2:], []uint64{1}) || !slices.Contains(order[:2], 2) || !slices.Contains(order[:2], 3) {
		t.Fatalf("reply order %v, want the slow read (1) last", order)
	}
	tc.send(request{typ: cmdDisc}, nil)
	wait()
}

// TestDisconnectFinishesInFlight sends a slow write and NBD_CMD_DISC right
// behind it: the write must complete and be answered before the close.
func TestDisconnectFinishesInFlight(t *testing.T) {
	m := newMemBackend(1 << 20)
	m.hook = func(op string, off int64) error {
		if op == "write" {
			time.Sleep(50 * time.Millisecond)
		}
		return nil
	}
	tc, wait := connect(t, &Export{Backend: m}, clientOpts{})
	tc.send(request{typ: cmdWrite, handle: 1, length: 512}, bytes.Repeat([]byte{0xab}, 512))
	tc.send(request{typ: cmdDisc}, nil)
	r, err := tc.readReply(func(uint64) (uint32, bool) { return 0, false })
	if err != nil || r.handle != 1 || r.errno != 0 {
		t.Fatalf("write reply: %+v %v", r, err)
	}
	if _, err := tc.br.ReadByte(); err != io.EOF {
		t.Errorf("after DISC: %v, want EOF", err)
	}
	if err := wait(); err != nil {
		t.Fatal(err)
	}
	if m.data[0] != 0xab || m.flushes.Load() == 0 {
		t.Errorf("write lost or not flushed (flushes %d)", m.flushes.Load())
	}
}

func TestBadRequestMagicCloses(t *testing.T) {
	tc, wait := connect(t, &Export{Backend: newMemBackend(1 << 20)}, clientOpts{})
	tc.c.Write(make([]byte, requestSize))
	if err := wait(); !errors.Is(err, errBadRequestMagic) {
		t.Fatalf("ServeConn = %v, want bad magic", err)
	}
}

// TestGracefulShutdown cancels the context while a request is in flight: it
// completes and is answered, the backend is flushed, and the connection ends.
func TestGracefulShutdown(t *testing.T) {
	m := newMemBackend(1 << 20)
	started := make(chan struct{})
	m.hook = func(op string, off int64) error {
		if op == "write" {
			close(started)
			time.Sleep(100 * time.Millisecond)
		}
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	srv := NewServer(ExportList{{Backend: m}})
	cc, wait := pipeServer(t, ctx, srv)
	cc.SetDeadline(time.Now().Add(10 * time.Second))
	tc := newRawClient(cc)
	if err := tc.handshake(clientOpts{}); err != nil {
		t.Fatal(err)
	}
	tc.send(request{typ: cmdWrite, handle: 5, length: 512}, make([]byte, 512))
	<-started
	cancel()
	r, err := tc.readReply(func(uint64) (uint32, bool) { return 0, false })
	if err != nil || r.handle != 5 || r.errno != 0 {
		t.Fatalf("in-flight reply: %+v %v", r, err)
	}
	if err := wait(); err != nil {
		t.Fatalf("ServeConn = %v", err)
	}
	if m.flushes.Load() == 0 {
		t.Errorf("not flushed at shutdown")
	}
}

func TestServeTransmission(t *testing.T) {
	m := newMemBackend(1 << 20)
	exp := &Export{Backend: m}
	flags, err := exp.Flags()
	if err != nil {
		t.Fatal(err)
	}
	if flags&FlagSendDF != 0 || flags&FlagSendFastZero == 0 {
		t.Fatalf("kernel flags %v", flags)
	}
	srv := NewServer(nil)
	if err := srv.ServeTransmission(context.Background(), nopConn{}, exp, flags|FlagSendDF); err == nil {
		t.Errorf("SEND_DF accepted for a simple-reply peer")
	}

	sc, cc := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- srv.ServeTransmission(context.Background(), sc, exp, flags|FlagReadOnly) }()
	tc := newRawClient(cc)
	r, err := tc.do(request{typ: cmdRead, handle: 1, length: 4096}, nil)
	if err != nil || r.errno != 0 || len(r.data) != 4096 {
		t.Fatalf("read: %+v %v", r, err)
	}
	// Without a handshake there are no structured replies, and block status
	// has no context.
	if r, _ := tc.do(request{typ: cmdBlockStatus, handle: 2, length: 4096}, nil); r.errno != EINVAL {
		t.Errorf("block status: %v", r.errno)
	}
	// READ_ONLY in the flags makes the export read-only.
	if r, _ := tc.do(request{typ: cmdWrite, handle: 3, length: 512}, make([]byte, 512)); r.errno != EPERM {
		t.Errorf("write with READ_ONLY: %v", r.errno)
	}
	tc.send(request{typ: cmdDisc}, nil)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

type nopConn struct{ net.Conn }

func (nopConn) Close() error { return nil }

// TestServeDeadClient: a client that stops reading replies must not stall
// other clients, and shutdown must still complete.
func TestServeDeadClient(t *testing.T) {
	m := newMemBackend(4 << 20)
	ctx, cancel := context.WithCancel(context.Background())
	srv := NewServer(ExportList{{Backend: m}}, WithShutdownTimeout(200*time.Millisecond))
	sock := t.TempDir() + "/s"
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }()

	dial := func() *testClient {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		tc := newRawClient(c)
		if err := tc.handshake(clientOpts{}); err != nil {
			t.Fatal(err)
		}
		return tc
	}
	dead := dial()
	// Fill the socket buffers with replies nobody reads.
	for i := range 64 {
		dead.send(request{typ: cmdRead, handle: uint64(i), length: 1 << 20}, nil)
	}
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tc := dial()
			for i := range 20 {
				r, err := tc.do(request{typ: cmdRead, handle: uint64(i), offset: uint64(i) * 4096, length: 4096}, nil)
				if err != nil || r.errno != 0 {
					t.Errorf("live client: %+v %v", r, err)
					return
				}
			}
			tc.send(request{typ: cmdDisc}, nil)
		}()
	}
	wg.Wait()
	cancel()
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("Serve = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after cancel with a dead client connected")
	}
}

func TestDefaultErrorMapper(t *testing.T) {
	tests := []struct {
		err  error
		want Errno
	}{
		{syscall.EIO, EIO},
		{&os.PathError{Err: syscall.EINVAL}, EINVAL},
		{fmt.Errorf("x: %w", syscall.ENOSPC), ENOSPC},
		{syscall.EDQUOT, ENOSPC},
		{syscall.EFBIG, ENOSPC},
		{syscall.EOVERFLOW, EOVERFLOW},
		{syscall.EPERM, EPERM},
		{syscall.EROFS, EPERM},
		{syscall.ENOMEM, ENOMEM},
		{syscall.ESHUTDOWN, ESHUTDOWN},
		{syscall.EOPNOTSUPP, ENOTSUP},
		{syscall.ETOOMANYREFS, EIO},
		{fmt.Errorf("zone: %w", ENOSPC), ENOSPC},
		{context.Canceled, ESHUTDOWN},
		{errors.New("other"), EIO},
	}
	for _, tt := range tests {
		if got := DefaultErrorMapper(tt.err); got != tt.want {
			t.Errorf("DefaultErrorMapper(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}

func TestCustomErrorMapper(t *testing.T) {
	m := newMemBackend(1 << 20)
	m.hook = func(string, int64) error { return errors.New("zone full") }
	tc, wait := connect(t, &Export{Backend: m}, clientOpts{}, WithErrorMapper(func(error) Errno { return ENOSPC }))
	if r, _ := tc.do(request{typ: cmdTrim, handle: 1, length: 512}, nil); r.errno != ENOSPC {
		t.Errorf("errno %v", r.errno)
	}
	tc.send(request{typ: cmdDisc}, nil)
	wait()
}

func TestExportConfig(t *testing.T) {
	m := newMemBackend(1 << 20)
	tests := []struct {
		name string
		exp  *Export
		ok   bool
	}{
		{"defaults", &Export{Backend: m}, true},
		{"no backend", &Export{}, false},
		{"min block not power of two", &Export{Backend: m, MinBlockSize: 1000}, false},
		{"min block too large", &Export{Backend: m, MinBlockSize: 128 << 10}, false},
		{"4Kn", &Export{Backend: m, MinBlockSize: 4096}, true},
		{"preferred below min", &Export{Backend: m, MinBlockSize: 4096, PreferredBlockSize: 512}, false},
		{"max not multiple of min", &Export{Backend: m, MinBlockSize: 4096, MaxPayload: 1<<20 + 512}, false},
		{"max too large", &Export{Backend: m, MaxPayload: 2 << 30}, false},
	}
	for _, tt := range tests {
		if _, err := tt.exp.config(); (err == nil) != tt.ok {
			t.Errorf("%s: err %v, want ok=%v", tt.name, err, tt.ok)
		}
	}
}

func TestTransmissionFlagsString(t *testing.T) {
	if got := (FlagHasFlags | FlagReadOnly | 1<<15).String(); got != "HAS_FLAGS|READ_ONLY|0x8000" {
		t.Errorf("String = %q", got)
	}
}

func TestBufferPool(t *testing.T) {
	for _, n := range []int{0, 1, 4096, 4097, 1 << 20, 32 << 20, 32<<20 + 1} {
		b := getBuffer(n)
		if len(b.b) != n {
			t.Errorf("getBuffer(%d) has length %d", n, len(b.b))
		}
		b.release()
	}
}

// growingBackend is a memBackend whose size can grow while it is served,
// as a volume resized under a kernel device (NetlinkAttacher.Resize).
type growingBackend struct {
	*memBackend
	size atomic.Int64
}

func (g *growingBackend) Size() int64 { return g.size.Load() }

// TestPipelinedOutOfRangeRefreshesSize pipelines READs, TRIMs and WRITEs
// past the end of the export: each makes the server ask the backend for its
// size again (it may have grown), from the reader goroutine (WRITE) and
// from several workers at once (READ, TRIM). Under -race this proves the
// refresh is synchronised; without -race it still checks the answers. Once
// the backend has grown, the same requests reach the new blocks.
func TestPipelinedOutOfRangeRefreshesSize(t *testing.T) {
	const old, grown = 1 << 20, 2 << 20
	g := &growingBackend{memBackend: newMemBackend(grown)}
	g.size.Store(old)
	tc, wait := connect(t, &Export{Backend: g}, clientOpts{structured: true})
	if tc.size != old {
		t.Fatalf("export size %d, want %d", tc.size, old)
	}
	const n = 96
	pipeline := func(base uint64) map[uint64]reply {
		t.Helper()
		sendErr := make(chan error, 1)
		go func() {
			for i := range uint64(n) {
				req := request{handle: base + i, offset: old + i%8*4096, length: 4096}
				var payload []byte
				switch i % 3 {
				case 0:
					req.typ = cmdRead
				case 1:
					req.typ = cmdTrim
				case 2:
					req.typ, payload = cmdWrite, bytes.Repeat([]byte{byte(i)}, 4096)
				}
				if err := tc.send(req, payload); err != nil {
					sendErr <- err
					return
				}
			}
			sendErr <- nil
		}()
		got := map[uint64]reply{}
		for range n {
			r, err := tc.readReply(func(uint64) (uint32, bool) { return 0, false })
			if err != nil {
				t.Fatal(err)
			}
			got[r.handle-base] = r
		}
		if err := <-sendErr; err != nil {
			t.Fatal(err)
		}
		return got
	}
	for i, r := range pipeline(1000) {
		want := map[uint64]Errno{0: EINVAL, 1: EINVAL, 2: ENOSPC}[i%3]
		if r.errno != want {
			t.Errorf("request %d (%d past the end): errno %v (%s), want %v", i, i%8*4096, r.errno, r.msg, want)
		}
	}
	g.size.Store(grown)
	for i, r := range pipeline(2000) {
		if r.errno != 0 {
			t.Errorf("request %d after the backend grew: errno %v (%s)", i, r.errno, r.msg)
		}
		if i%3 == 0 && len(r.data) != 4096 {
			t.Errorf("read %d returned %d bytes", i, len(r.data))
		}
	}
	tc.send(request{typ: cmdDisc}, nil)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
}

// TestFUAReachesBackend: WRITE, TRIM and WRITE_ZEROES with NBD_CMD_FLAG_FUA
// are answered only once their effect is on stable storage (the
// memBackend's durable copy), whether the backend is told (WriteAt's fua)
// or the server flushes after it (TRIM, WRITE_ZEROES). Without FUA nothing
// reaches stable storage before a FLUSH, so the check can fail.
func TestFUAReachesBackend(t *testing.T) {
	const size = 1 << 20
	ones := bytes.Repeat([]byte{1}, 64<<10)
	steps := []struct {
		name    string
		req     request
		payload []byte
		durable func(d []byte) bool // what must be durable once answered
	}{
		{"write without FUA", request{typ: cmdWrite, offset: 0, length: 64 << 10}, ones,
			func(d []byte) bool { return bytes.Equal(d[:64<<10], make([]byte, 64<<10)) }},
		{"write FUA", request{typ: cmdWrite, flags: cmdFlagFUA, offset: 128 << 10, length: 64 << 10}, ones,
			func(d []byte) bool { return bytes.Equal(d[128<<10:192<<10], ones) }},
		{"flush", request{typ: cmdFlush}, nil,
			func(d []byte) bool { return bytes.Equal(d[:64<<10], ones) }},
		{"trim FUA", request{typ: cmdTrim, flags: cmdFlagFUA, offset: 0, length: 32 << 10}, nil,
			func(d []byte) bool { return bytes.Equal(d[:32<<10], make([]byte, 32<<10)) }},
		{"write zeroes FUA", request{typ: cmdWriteZeroes, flags: cmdFlagFUA, offset: 128 << 10, length: 4096}, nil,
			func(d []byte) bool { return bytes.Equal(d[128<<10:132<<10], make([]byte, 4096)) }},
		{"write zeroes NO_HOLE FUA", request{typ: cmdWriteZeroes, flags: cmdFlagFUA | cmdFlagNoHole, offset: 136 << 10, length: 4096}, nil,
			func(d []byte) bool { return bytes.Equal(d[136<<10:140<<10], make([]byte, 4096)) }},
	}
	for _, structured := range []bool{false, true} {
		m := newDurableMemBackend(size)
		tc, wait := connect(t, &Export{Backend: m}, clientOpts{structured: structured})
		if tc.flags&FlagSendFUA == 0 {
			t.Fatalf("FUA not advertised: %v", tc.flags)
		}
		for i, s := range steps {
			s.req.handle = uint64(i + 1)
			flushes, fuas := m.flushes.Load(), m.fuaWrites.Load()
			if r, err := tc.do(s.req, s.payload); err != nil || r.errno != 0 {
				t.Fatalf("%s: %v %v", s.name, err, r.errno)
			}
			if !s.durable(m.durableBytes()) {
				t.Errorf("structured=%v: %s: answered before it was durable (flushes +%d, FUA writes +%d)",
					structured, s.name, m.flushes.Load()-flushes, m.fuaWrites.Load()-fuas)
			}
			if s.req.typ == cmdWrite && (m.fuaWrites.Load()-fuas == 1) != (s.req.flags&cmdFlagFUA != 0) {
				t.Errorf("%s: the backend saw %d FUA writes", s.name, m.fuaWrites.Load()-fuas)
			}
		}
		tc.send(request{typ: cmdDisc}, nil)
		if err := wait(); err != nil {
			t.Fatal(err)
		}
	}
}

// wrappedConn hides the concrete connection, as a listener that tracks its
// connections does; with buffers it opts back into writev (BuffersWriter).
type wrappedConn struct {
	net.Conn
	writes, buffers *atomic.Int64
}

func (c wrappedConn) Write(p []byte) (int, error) { c.writes.Add(1); return c.Conn.Write(p) }

type buffersConn struct{ wrappedConn }

func (c buffersConn) WriteBuffers(b *net.Buffers) (int64, error) {
	c.buffers.Add(1)
	return b.WriteTo(c.Conn)
}

type wrappingListener struct {
	net.Listener
	buffers         bool
	writes, written atomic.Int64
}

func (l *wrappingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	w := wrappedConn{Conn: c, writes: &l.writes, buffers: &l.written}
	if l.buffers {
		return buffersConn{w}, nil
	}
	return w, nil
}

// TestReplyWrites: a READ reply leaves in one system call where it can, so
// the client gets it in one piece: a writev of header and data on the
// connection or on a wrapper that implements BuffersWriter; on a wrapper
// that does not, a short reply is coalesced into one write, and a long one
// is not copied (one write per buffer).
func TestReplyWrites(t *testing.T) {
	for _, buffers := range []bool{false, true} {
		sock := filepath.Join(t.TempDir(), "s")
		ul, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		l := &wrappingListener{Listener: ul, buffers: buffers}
		ctx, cancel := context.WithCancel(context.Background())
		served := make(chan error, 1)
		go func() { served <- NewServer(ExportList{{Backend: newMemBackend(4 << 20)}}).Serve(ctx, l) }()
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(20 * time.Second))
		tc := newRawClient(c)
		if err := tc.handshake(clientOpts{structured: true}); err != nil {
			t.Fatal(err)
		}
		for _, n := range []uint32{4096, coalesceMax - 512, 1 << 20} {
			w0, b0 := l.writes.Load(), l.written.Load()
			if r, err := tc.do(request{typ: cmdRead, handle: 1, length: n}, nil); err != nil || r.errno != 0 || len(r.data) != int(n) {
				t.Fatalf("read %d: %v %v", n, err, r.errno)
			}
			writes, written := l.writes.Load()-w0, l.written.Load()-b0
			switch {
			case buffers && (writes != 0 || written != 1):
				t.Errorf("BuffersWriter, %d-byte read: %d writes, %d WriteBuffers; want one WriteBuffers", n, writes, written)
			case !buffers && n < coalesceMax && writes != 1:
				t.Errorf("plain wrapper, %d-byte read: %d writes, want 1", n, writes)
			case !buffers && n >= coalesceMax && writes != 2:
				t.Errorf("plain wrapper, %d-byte read: %d writes, want 2 (header, data)", n, writes)
			}
		}
		tc.send(request{typ: cmdDisc}, nil)
		cancel()
		if err := <-served; err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
}
