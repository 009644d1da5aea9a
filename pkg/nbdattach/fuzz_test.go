package nbdattach

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

func encodeRequest(r request) []byte {
	b := make([]byte, requestSize)
	r.encode(b)
	return b
}

// FuzzDecodeRequest: decodeRequest parses untrusted bytes. It must not
// panic, and whatever it accepts must encode back to the same bytes.
// testdata/fuzz/FuzzDecodeRequest holds extra seeds.
func FuzzDecodeRequest(f *testing.F) {
	f.Add(encodeRequest(request{typ: cmdRead, handle: 1, length: 4096}))
	f.Add(encodeRequest(request{typ: cmdWrite, flags: cmdFlagFUA, handle: 1<<64 - 1, offset: 1<<64 - 1, length: 1<<32 - 1}))
	f.Add(encodeRequest(request{typ: cmdBlockStatus, flags: cmdFlagReqOne}))
	f.Add(make([]byte, requestSize))
	f.Add([]byte{0x25, 0x60, 0x95})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := decodeRequest(b)
		if err != nil {
			return
		}
		if len(b) < requestSize {
			t.Fatalf("accepted %d bytes", len(b))
		}
		if got := encodeRequest(r); !bytes.Equal(got, b[:requestSize]) {
			t.Fatalf("round trip: % x != % x", got, b[:requestSize])
		}
	})
}

// clientStream builds the bytes a well-behaved client sends, as fuzz seeds.
type clientStream struct{ b []byte }

func (c *clientStream) flags(f uint32) *clientStream {
	c.b = binary.BigEndian.AppendUint32(c.b, f)
	return c
}

func (c *clientStream) option(opt uint32, data []byte) *clientStream {
	h := make([]byte, optionHeaderSize)
	optionHeader{option: opt, length: uint32(len(data))}.encode(h)
	c.b = append(append(c.b, h...), data...)
	return c
}

func (c *clientStream) request(r request, payload []byte) *clientStream {
	c.b = append(append(c.b, encodeRequest(r)...), payload...)
	return c
}

// FuzzHandshake feeds arbitrary client bytes to ServeConn over a net.Pipe:
// through option negotiation and, when the bytes get that far, into the
// transmission phase. The server must neither panic nor hang.
// testdata/fuzz/FuzzHandshake holds client streams recorded from nbdinfo,
// nbdcopy, qemu-io and nbdsh (see recordingListener in peers_test.go).
func FuzzHandshake(f *testing.F) {
	full := (&clientStream{}).flags(clientFlagFixedNewstyle|clientFlagNoZeroes).
		option(optStructuredReply, nil).
		option(optListMetaContext, metaData("vol", "base:")).
		option(optSetMetaContext, metaData("vol", BaseAllocation, testContext)).
		option(optInfo, infoData("vol", infoName, infoDescription, infoBlockSize)).
		option(optGo, infoData("vol", infoBlockSize)).
		request(request{typ: cmdWrite, handle: 1, length: 512}, make([]byte, 512)).
		request(request{typ: cmdRead, handle: 2, length: 4096}, nil).
		request(request{typ: cmdBlockStatus, handle: 3, length: 64 << 10}, nil).
		request(request{typ: cmdWriteZeroes, flags: cmdFlagFastZero, handle: 4, length: 4096}, nil).
		request(request{typ: 99, handle: 5}, nil).
		request(request{typ: cmdDisc}, nil)
	f.Add(full.b)
	f.Add((&clientStream{}).flags(clientFlagFixedNewstyle).option(optList, nil).option(optStartTLS, nil).option(optAbort, nil).b)
	f.Add((&clientStream{}).flags(0).option(optExportName, []byte("ro")).request(request{typ: cmdWrite, length: 1 << 20}, nil).b)
	f.Add((&clientStream{}).flags(clientFlagFixedNewstyle).option(optGo, infoData("")).request(request{typ: cmdRead, length: 512}, nil).b)
	f.Add((&clientStream{}).flags(clientFlagFixedNewstyle).option(optSetMetaContext, []byte{0, 0, 0, 3, 'v', 'o', 'l', 0xff, 0xff, 0xff, 0xff}).b)
	f.Fuzz(func(t *testing.T, in []byte) {
		m := newMemBackend(256 << 10)
		exports := ExportList{
			{Name: "vol", Description: "fuzz", Backend: m, MaxPayload: 64 << 10, PreferredBlockSize: 4096},
			{Name: "ro", Backend: plainBackend{newMemBackend(64 << 10)}, ReadOnly: true, MinBlockSize: 4096},
		}
		srv := NewServer(exports, WithHandshakeTimeout(2*time.Second), WithWriteTimeout(2*time.Second), WithWorkers(4))
		sc, cc := net.Pipe()
		done := make(chan error, 1)
		go func() { done <- srv.ServeConn(context.Background(), sc) }()
		go io.Copy(io.Discard, cc)
		cc.SetWriteDeadline(time.Now().Add(2 * time.Second))
		cc.Write(in)
		cc.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatalf("ServeConn hung on input % x", in)
		}
	})
}
