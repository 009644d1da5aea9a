package nbdattach

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"slices"
	"strings"
	"testing"
	"time"
)

func testExports() ExportList {
	return ExportList{
		{Name: "vol", Description: "test volume", Backend: newMemBackend(1 << 20)},
		{Name: "ro", Backend: newMemBackend(64 << 10), ReadOnly: true, MinBlockSize: 4096},
	}
}

func startHandshake(t *testing.T, exports ExportSource, opts ...Option) (*testClient, func() error) {
	t.Helper()
	srv := NewServer(exports, opts...)
	cc, wait := pipeServer(t, context.Background(), srv)
	cc.SetDeadline(time.Now().Add(10 * time.Second))
	tc := newRawClient(cc)
	flags, err := tc.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	if err != nil {
		t.Fatalf("greet: %v", err)
	}
	if want := flagFixedNewstyle | flagNoZeroes; flags != want {
		t.Fatalf("handshake flags 0x%x, want 0x%x", flags, want)
	}
	return tc, wait
}

func TestHandshakeOptions(t *testing.T) {
	u32 := func(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
	tests := []struct {
		name  string
		opt   uint32
		data  []byte
		types []uint32 // reply types, in order
		check func(t *testing.T, rs []optReply)
	}{
		{name: "unknown option", opt: 99, types: []uint32{repErrUnsup}},
		{name: "peek export (withdrawn)", opt: optPeekExport, types: []uint32{repErrUnsup}},
		{name: "starttls refused", opt: optStartTLS, types: []uint32{repErrUnsup}},
		{name: "starttls with data", opt: optStartTLS, data: []byte{1}, types: []uint32{repErrInvalid}},
		{name: "structured reply with data", opt: optStructuredReply, data: []byte{1}, types: []uint32{repErrInvalid}},
		{name: "list", opt: optList, types: []uint32{repServer, repServer, repAck}, check: func(t *testing.T, rs []optReply) {
			d := rs[0].data
			if n := binary.BigEndian.Uint32(d); string(d[4:4+n]) != "vol" || string(d[4+n:]) != "test volume" {
				t.Errorf("first NBD_REP_SERVER = %q", d)
			}
		}},
		{name: "list with data", opt: optList, data: []byte{0}, types: []uint32{repErrInvalid}},
		{name: "info unknown export", opt: optInfo, data: infoData("nope"), types: []uint32{repErrUnknown}},
		{name: "info truncated", opt: optInfo, data: u32(10), types: []uint32{repErrInvalid}},
		{name: "info trailing bytes", opt: optInfo, data: append(infoData("vol"), 0), types: []uint32{repErrInvalid}},
		{name: "info name too long", opt: optInfo, data: u32(5000), types: []uint32{repErrInvalid}},
		{name: "info", opt: optInfo, data: infoData("vol", infoName, infoDescription, infoBlockSize, 77),
			types: []uint32{repInfo, repInfo, repInfo, repInfo, repAck}, check: func(t *testing.T, rs []optReply) {
				got := map[uint16][]byte{}
				for _, r := range rs[:4] {
					got[binary.BigEndian.Uint16(r.data)] = r.data[2:]
				}
				exp := got[infoExport]
				if size := binary.BigEndian.Uint64(exp); size != 1<<20 {
					t.Errorf("size %d", size)
				}
				flags := TransmissionFlags(binary.BigEndian.Uint16(exp[8:]))
				// Structured replies were not negotiated: no SEND_DF.
				want := FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes | FlagSendCache | FlagSendFastZero
				if flags != want {
					t.Errorf("flags %v, want %v", flags, want)
				}
				if string(got[infoName]) != "vol" || string(got[infoDescription]) != "test volume" {
					t.Errorf("name %q description %q", got[infoName], got[infoDescription])
				}
				bs := got[infoBlockSize]
				if mn, pr, mx := binary.BigEndian.Uint32(bs), binary.BigEndian.Uint32(bs[4:]), binary.BigEndian.Uint32(bs[8:]); mn != 512 || pr != 4096 || mx != 32<<20 {
					t.Errorf("block sizes %d/%d/%d", mn, pr, mx)
				}
			}},
		{name: "info read-only export", opt: optInfo, data: infoData("ro"), types: []uint32{repInfo, repInfo, repAck}, check: func(t *testing.T, rs []optReply) {
			flags := TransmissionFlags(binary.BigEndian.Uint16(rs[0].data[10:]))
			if want := FlagHasFlags | FlagReadOnly | FlagSendFlush | FlagSendFUA | FlagSendCache; flags != want {
				t.Errorf("flags %v, want %v", flags, want)
			}
			if mn := binary.BigEndian.Uint32(rs[1].data[2:]); mn != 4096 {
				t.Errorf("minimum block size %d", mn)
			}
		}},
		{name: "list meta contexts: all", opt: optListMetaContext, data: metaData("vol"), types: []uint32{repMetaContext, repMetaContext, repAck}},
		{name: "list meta contexts: base namespace", opt: optListMetaContext, data: metaData("vol", "base:"), types: []uint32{repMetaContext, repAck}, check: func(t *testing.T, rs []optReply) {
			if id, name := binary.BigEndian.Uint32(rs[0].data), string(rs[0].data[4:]); id != 0 || name != BaseAllocation {
				t.Errorf("context %d %q", id, name)
			}
		}},
		{name: "list meta contexts: zq namespace", opt: optListMetaContext, data: metaData("vol", "zq:"), types: []uint32{repMetaContext, repAck}},
		{name: "list meta contexts: unknown namespace ignored", opt: optListMetaContext, data: metaData("vol", "qemu:dirty-bitmap:x", "base:nope"), types: []uint32{repAck}},
		{name: "list meta contexts: no namespace", opt: optListMetaContext, data: metaData("vol", "allocation"), types: []uint32{repErrInvalid}},
		{name: "list meta contexts: unknown export", opt: optListMetaContext, data: metaData("nope"), types: []uint32{repErrUnknown}},
		{name: "list meta contexts: bad query count", opt: optListMetaContext, data: append(metaData("vol"), 1), types: []uint32{repErrInvalid}},
		{name: "set meta context needs structured replies", opt: optSetMetaContext, data: metaData("vol", BaseAllocation), types: []uint32{repErrInvalid}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tc, wait := startHandshake(t, testExports())
			rs, err := tc.optionAll(tt.opt, tt.data)
			if err != nil {
				t.Fatalf("option: %v", err)
			}
			var types []uint32
			for _, r := range rs {
				types = append(types, r.typ)
			}
			if !slices.Equal(types, tt.types) {
				t.Fatalf("reply types %x, want %x", types, tt.types)
			}
			if tt.check != nil {
				tt.check(t, rs)
			}
			// Negotiation carries on after every one of these.
			if err := tc.handshake2(clientOpts{name: "vol"}); err != nil {
				t.Fatalf("GO after %s: %v", tt.name, err)
			}
			tc.send(request{typ: cmdDisc}, nil)
			if err := wait(); err != nil {
				t.Errorf("ServeConn: %v", err)
			}
		})
	}
}

// handshake2 finishes a handshake whose greeting is already done.
func (tc *testClient) handshake2(o clientOpts) error {
	rs, err := tc.optionAll(optGo, infoData(o.name))
	if err != nil {
		return err
	}
	if last := rs[len(rs)-1]; last.typ != repAck {
		return errors.New("GO refused: " + string(last.data))
	}
	return nil
}

func TestHandshakeSetMetaContext(t *testing.T) {
	tc, wait := startHandshake(t, testExports()[:1])
	if rs, _ := tc.optionAll(optStructuredReply, nil); rs[0].typ != repAck {
		t.Fatalf("STRUCTURED_REPLY: 0x%x", rs[0].typ)
	}
	// "base:" selects nothing during SET; unknown names are ignored;
	// duplicates count once.
	rs, err := tc.optionAll(optSetMetaContext, metaData("vol", "base:", testContext, BaseAllocation, "zq:nope", testContext))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]uint32{}
	for _, r := range rs[:len(rs)-1] {
		got[string(r.data[4:])] = binary.BigEndian.Uint32(r.data)
	}
	if len(got) != 2 || got[testContext] == got[BaseAllocation] || rs[len(rs)-1].typ != repAck {
		t.Fatalf("selected %v (final 0x%x)", got, rs[len(rs)-1].typ)
	}
	// Entering transmission for the same export (by its default name) keeps
	// the contexts.
	rs, err = tc.optionAll(optGo, infoData(""))
	if err != nil || rs[len(rs)-1].typ != repAck {
		t.Fatalf("GO: %v %v", rs, err)
	}
	tc.structured = true
	r, err := tc.do(request{typ: cmdBlockStatus, handle: 1, length: 128 << 10}, nil)
	if err != nil || r.errno != 0 || len(r.status) != 2 {
		t.Fatalf("block status: %+v %v", r, err)
	}
	tc.send(request{typ: cmdDisc}, nil)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
}

func TestHandshakeContextsForOtherExportDropped(t *testing.T) {
	tc, wait := startHandshake(t, testExports())
	tc.optionAll(optStructuredReply, nil)
	tc.optionAll(optSetMetaContext, metaData("ro", BaseAllocation))
	if err := tc.handshake2(clientOpts{name: "vol"}); err != nil {
		t.Fatal(err)
	}
	tc.structured = true
	r, err := tc.do(request{typ: cmdBlockStatus, handle: 1, length: 4096}, nil)
	if err != nil || r.errno != EINVAL {
		t.Fatalf("block status without contexts for this export: errno %v, err %v", r.errno, err)
	}
	tc.send(request{typ: cmdDisc}, nil)
	wait()
}

func TestHandshakeExportName(t *testing.T) {
	for _, noZeroes := range []bool{false, true} {
		t.Run(map[bool]string{false: "zeroes", true: "no zeroes"}[noZeroes], func(t *testing.T) {
			srv := NewServer(testExports())
			cc, wait := pipeServer(t, context.Background(), srv)
			tc := newRawClient(cc)
			cf := clientFlagFixedNewstyle
			if noZeroes {
				cf |= clientFlagNoZeroes
			}
			tc.greet(cf)
			tc.sendOption(optExportName, []byte("ro"))
			n := 10
			if !noZeroes {
				n += exportNameZeroes
			}
			b := make([]byte, n)
			if _, err := io.ReadFull(tc.br, b); err != nil {
				t.Fatal(err)
			}
			if size := binary.BigEndian.Uint64(b); size != 64<<10 {
				t.Errorf("size %d", size)
			}
			if f := TransmissionFlags(binary.BigEndian.Uint16(b[8:])); f&FlagReadOnly == 0 {
				t.Errorf("flags %v lack READ_ONLY", f)
			}
			if !bytes.Equal(b[10:], make([]byte, n-10)) {
				t.Errorf("padding not zero")
			}
			// The stream is now in transmission: a read works.
			r, err := tc.do(request{typ: cmdRead, handle: 7, length: 4096}, nil)
			if err != nil || r.errno != 0 || len(r.data) != 4096 || r.handle != 7 {
				t.Fatalf("read after EXPORT_NAME: %+v %v", r, err)
			}
			tc.send(request{typ: cmdDisc}, nil)
			if err := wait(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestHandshakeTerminations(t *testing.T) {
	tests := []struct {
		name    string
		client  func(t *testing.T, tc *testClient)
		wantErr string // "" means ServeConn returns nil
	}{
		{name: "abort", client: func(t *testing.T, tc *testClient) {
			tc.greet(clientFlagFixedNewstyle)
			rs, _ := tc.optionAll(optAbort, []byte("ignored"))
			if len(rs) != 1 || rs[0].typ != repAck {
				t.Errorf("abort answered with %v", rs)
			}
		}},
		{name: "abort and leave without reading", client: func(t *testing.T, tc *testClient) {
			tc.greet(clientFlagFixedNewstyle)
			tc.sendOption(optAbort, nil)
			tc.c.Close()
		}},
		{name: "close before options", client: func(t *testing.T, tc *testClient) {
			tc.greet(clientFlagFixedNewstyle)
			tc.c.Close()
		}},
		{name: "unknown client flags", client: func(t *testing.T, tc *testClient) { tc.greet(1 << 5) }, wantErr: "unknown client flags"},
		{name: "bad option magic", client: func(t *testing.T, tc *testClient) {
			tc.greet(clientFlagFixedNewstyle)
			tc.c.Write(make([]byte, optionHeaderSize))
		}, wantErr: "bad option magic"},
		{name: "export name unknown", client: func(t *testing.T, tc *testClient) {
			tc.greet(clientFlagFixedNewstyle)
			tc.sendOption(optExportName, []byte("nope"))
		}, wantErr: "no such export"},
		{name: "truncated option data", client: func(t *testing.T, tc *testClient) {
			tc.greet(clientFlagFixedNewstyle)
			b := make([]byte, optionHeaderSize)
			optionHeader{option: optInfo, length: 100}.encode(b)
			tc.c.Write(append(b, 1, 2, 3))
			tc.c.Close()
		}, wantErr: "unexpected EOF"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := NewServer(testExports())
			cc, wait := pipeServer(t, context.Background(), srv)
			cc.SetDeadline(time.Now().Add(5 * time.Second))
			tc := newRawClient(cc)
			tt.client(t, tc)
			err := wait()
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("ServeConn = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

func TestHandshakeOversizeOption(t *testing.T) {
	tc, wait := startHandshake(t, testExports())
	data := make([]byte, maxOptionData+1)
	go tc.sendOption(99, data) // net.Pipe: the write completes as the server drains
	r, err := tc.readOptReply()
	if err != nil || r.typ != repErrTooBig {
		t.Fatalf("reply 0x%x, %v", r.typ, err)
	}
	if err := tc.handshake2(clientOpts{name: "vol"}); err != nil {
		t.Fatal(err)
	}
	tc.send(request{typ: cmdDisc}, nil)
	wait()
}

func TestHandshakeTimeout(t *testing.T) {
	srv := NewServer(testExports(), WithHandshakeTimeout(100*time.Millisecond))
	cc, wait := pipeServer(t, context.Background(), srv)
	tc := newRawClient(cc)
	tc.greet(clientFlagFixedNewstyle) // then say nothing
	start := time.Now()
	err := wait()
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("ServeConn = %v, want a timeout", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("took %v", d)
	}
}

func TestHandshakeCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	srv := NewServer(testExports())
	cc, wait := pipeServer(t, ctx, srv)
	tc := newRawClient(cc)
	tc.greet(clientFlagFixedNewstyle)
	cancel()
	if err := wait(); err != nil {
		t.Fatalf("ServeConn after cancel = %v, want nil", err)
	}
}

func TestExportFunc(t *testing.T) {
	vol := &Export{Name: "pvc-1", Backend: newMemBackend(1 << 20)}
	lookup := ExportFunc(func(name string) (*Export, bool) { return vol, name == vol.Name })
	tc, wait := startHandshake(t, lookup)
	if rs, err := tc.optionAll(optList, nil); err != nil || len(rs) != 1 || rs[0].typ != repAck {
		t.Fatalf("LIST: %v %v", rs, err)
	}
	if rs, _ := tc.optionAll(optGo, infoData("")); rs[0].typ != repErrUnknown {
		t.Fatalf("GO for the default export: 0x%x", rs[0].typ)
	}
	if err := tc.handshake2(clientOpts{name: "pvc-1"}); err != nil {
		t.Fatal(err)
	}
	tc.send(request{typ: cmdDisc}, nil)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
}
