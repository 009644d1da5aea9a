package nbdattach

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// testClient is a deliberately small NBD client for driving the server
// through paths that real clients will not take (bad magic, unknown
// commands, raw options). It speaks the wire format through the same
// encode/decode functions as the server, plus the client-side reading of
// replies, which the server has no use for.
type testClient struct {
	c          net.Conn
	br         *bufio.Reader
	size       uint64
	flags      TransmissionFlags
	structured bool
	contexts   map[uint32]string
	minBlock   uint32
	maxBlock   uint32
}

// optReply is one option reply as read by the client.
type optReply struct {
	option, typ uint32
	data        []byte
}

// reply is one complete transmission reply.
type reply struct {
	handle uint64
	errno  Errno
	msg    string
	data   []byte              // simple read data, or OFFSET_DATA payload (offset stripped)
	offset uint64              // OFFSET_DATA offset
	status map[uint32][]Extent // BLOCK_STATUS by context id
	chunks int
}

func newRawClient(c net.Conn) *testClient {
	return &testClient{c: c, br: bufio.NewReader(c)}
}

// greet reads the server greeting and sends client flags.
func (tc *testClient) greet(clientFlags uint32) (uint16, error) {
	var g [18]byte
	if _, err := io.ReadFull(tc.br, g[:]); err != nil {
		return 0, err
	}
	if binary.BigEndian.Uint64(g[0:8]) != nbdMagic || binary.BigEndian.Uint64(g[8:16]) != ihaveOptMagic {
		return 0, fmt.Errorf("bad greeting % x", g)
	}
	var cf [4]byte
	binary.BigEndian.PutUint32(cf[:], clientFlags)
	_, err := tc.c.Write(cf[:])
	return binary.BigEndian.Uint16(g[16:18]), err
}

func (tc *testClient) sendOption(opt uint32, data []byte) error {
	b := make([]byte, optionHeaderSize, optionHeaderSize+len(data))
	optionHeader{option: opt, length: uint32(len(data))}.encode(b)
	_, err := tc.c.Write(append(b, data...))
	return err
}

func (tc *testClient) readOptReply() (optReply, error) {
	var hb [optReplyHeaderSize]byte
	if _, err := io.ReadFull(tc.br, hb[:]); err != nil {
		return optReply{}, err
	}
	h, err := decodeOptReplyHeader(hb[:])
	if err != nil {
		return optReply{}, err
	}
	if h.length > 1<<20 {
		return optReply{}, fmt.Errorf("option reply of %d bytes", h.length)
	}
	data := make([]byte, h.length)
	_, err = io.ReadFull(tc.br, data)
	return optReply{option: h.option, typ: h.typ, data: data}, err
}

// optionAll sends an option and collects replies up to the final one (an
// ACK or an error).
func (tc *testClient) optionAll(opt uint32, data []byte) ([]optReply, error) {
	if err := tc.sendOption(opt, data); err != nil {
		return nil, err
	}
	var out []optReply
	for {
		r, err := tc.readOptReply()
		if err != nil {
			return out, err
		}
		if r.option != opt {
			return out, fmt.Errorf("reply for option %d, want %d", r.option, opt)
		}
		out = append(out, r)
		if r.typ == repAck || r.typ&(1<<31) != 0 {
			return out, nil
		}
	}
}

func infoData(name string, reqs ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(reqs)))
	for _, r := range reqs {
		b = binary.BigEndian.AppendUint16(b, r)
	}
	return b
}

func metaData(name string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

type clientOpts struct {
	name       string
	structured bool
	contexts   []string
}

// handshake negotiates like a modern client: STRUCTURED_REPLY, then
// SET_META_CONTEXT, then GO with a block size request.
func (tc *testClient) handshake(o clientOpts) error {
	if _, err := tc.greet(clientFlagFixedNewstyle | clientFlagNoZeroes); err != nil {
		return err
	}
	if o.structured {
		rs, err := tc.optionAll(optStructuredReply, nil)
		if err != nil {
			return err
		}
		if rs[len(rs)-1].typ != repAck {
			return fmt.Errorf("STRUCTURED_REPLY: reply type 0x%x", rs[len(rs)-1].typ)
		}
		tc.structured = true
	}
	if len(o.contexts) > 0 {
		rs, err := tc.optionAll(optSetMetaContext, metaData(o.name, o.contexts...))
		if err != nil {
			return err
		}
		tc.contexts = map[uint32]string{}
		for _, r := range rs {
			if r.typ == repMetaContext {
				tc.contexts[binary.BigEndian.Uint32(r.data)] = string(r.data[4:])
			}
		}
	}
	rs, err := tc.optionAll(optGo, infoData(o.name, infoBlockSize))
	if err != nil {
		return err
	}
	for _, r := range rs {
		switch {
		case r.typ == repInfo && binary.BigEndian.Uint16(r.data) == infoExport:
			tc.size = binary.BigEndian.Uint64(r.data[2:10])
			tc.flags = TransmissionFlags(binary.BigEndian.Uint16(r.data[10:12]))
		case r.typ == repInfo && binary.BigEndian.Uint16(r.data) == infoBlockSize:
			tc.minBlock = binary.BigEndian.Uint32(r.data[2:6])
			tc.maxBlock = binary.BigEndian.Uint32(r.data[10:14])
		case r.typ&(1<<31) != 0:
			return fmt.Errorf("GO: error reply 0x%x: %s", r.typ, r.data)
		}
	}
	return nil
}

func (tc *testClient) send(req request, payload []byte) error {
	b := make([]byte, requestSize, requestSize+len(payload))
	req.encode(b)
	_, err := tc.c.Write(append(b, payload...))
	return err
}

// readReply reads one reply. readLen maps handles of outstanding simple-reply
// reads to their length, since a simple reply does not say whether data
// follows.
func (tc *testClient) readReply(readLen func(handle uint64) (uint32, bool)) (reply, error) {
	var mb [4]byte
	if _, err := io.ReadFull(tc.br, mb[:]); err != nil {
		return reply{}, err
	}
	switch binary.BigEndian.Uint32(mb[:]) {
	case simpleReplyMagic:
		var b [simpleReplySize]byte
		copy(b[:], mb[:])
		if _, err := io.ReadFull(tc.br, b[4:]); err != nil {
			return reply{}, err
		}
		sr, err := decodeSimpleReply(b[:])
		if err != nil {
			return reply{}, err
		}
		r := reply{handle: sr.handle, errno: sr.errno}
		if n, ok := readLen(sr.handle); ok && sr.errno == 0 {
			r.data = make([]byte, n)
			_, err = io.ReadFull(tc.br, r.data)
		}
		return r, err
	case structuredReplyMagic:
		r := reply{}
		for first := true; ; first = false {
			if !first {
				if _, err := io.ReadFull(tc.br, mb[:]); err != nil {
					return r, err
				}
			}
			var b [structuredHeaderSize]byte
			copy(b[:], mb[:])
			if _, err := io.ReadFull(tc.br, b[4:]); err != nil {
				return r, err
			}
			h, err := decodeChunkHeader(b[:])
			if err != nil {
				return r, err
			}
			if !first && h.handle != r.handle {
				return r, fmt.Errorf("interleaved chunk for handle %d inside reply %d", h.handle, r.handle)
			}
			r.handle = h.handle
			r.chunks++
			payload := make([]byte, h.length)
			if _, err := io.ReadFull(tc.br, payload); err != nil {
				return r, err
			}
			switch h.typ {
			case replyTypeNone:
			case replyTypeOffsetData:
				r.offset = binary.BigEndian.Uint64(payload)
				r.data = payload[8:]
			case replyTypeBlockStatus:
				if r.status == nil {
					r.status = map[uint32][]Extent{}
				}
				id := binary.BigEndian.Uint32(payload)
				for p := payload[4:]; len(p) >= 8; p = p[8:] {
					r.status[id] = append(r.status[id], Extent{Length: int64(binary.BigEndian.Uint32(p)), Flags: binary.BigEndian.Uint32(p[4:])})
				}
			case replyTypeError:
				r.errno = Errno(binary.BigEndian.Uint32(payload))
				ml := binary.BigEndian.Uint16(payload[4:])
				r.msg = string(payload[6 : 6+ml])
			default:
				return r, fmt.Errorf("unexpected chunk type %d", h.typ)
			}
			if h.flags&replyFlagDone != 0 {
				return r, nil
			}
		}
	default:
		return reply{}, fmt.Errorf("bad reply magic % x", mb)
	}
}

// do sends one request and waits for its reply (no other request may be
// outstanding).
func (tc *testClient) do(req request, payload []byte) (reply, error) {
	if err := tc.send(req, payload); err != nil {
		return reply{}, err
	}
	return tc.readReply(func(h uint64) (uint32, bool) {
		return req.length, req.typ == cmdRead && h == req.handle
	})
}

// pipeServer starts ServeConn on one end of a net.Pipe and returns the
// other end, and a function that waits for ServeConn and returns its error.
func pipeServer(t testing.TB, ctx context.Context, srv *Server) (net.Conn, func() error) {
	t.Helper()
	sc, cc := net.Pipe()
	var (
		wg  sync.WaitGroup
		err error
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		err = srv.ServeConn(ctx, sc)
	}()
	wait := func() error {
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
			return err
		case <-time.After(10 * time.Second):
			t.Fatalf("ServeConn did not return")
			return nil
		}
	}
	t.Cleanup(func() { cc.Close(); wg.Wait() })
	return cc, wait
}

// connect starts a server for exp and completes a handshake.
func connect(t testing.TB, exp *Export, o clientOpts, opts ...Option) (*testClient, func() error) {
	t.Helper()
	srv := NewServer(ExportList{exp}, opts...)
	cc, wait := pipeServer(t, context.Background(), srv)
	cc.SetDeadline(time.Now().Add(20 * time.Second))
	tc := newRawClient(cc)
	if err := tc.handshake(o); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	return tc, wait
}
