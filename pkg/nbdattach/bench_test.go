package nbdattach

import (
	"fmt"
	"net"
	"testing"
)

// BenchmarkNBDRead and BenchmarkNBDWrite measure the server through a unix
// socket with a memory backend and 16 requests in flight, so the figures are
// protocol and copying overhead, not storage.
func BenchmarkNBDRead(b *testing.B)  { benchNBD(b, cmdRead) }
func BenchmarkNBDWrite(b *testing.B) { benchNBD(b, cmdWrite) }

func benchNBD(b *testing.B, typ command) {
	const size = 64 << 20
	for _, bs := range []int{4 << 10, 128 << 10, 1 << 20} {
		b.Run(fmt.Sprintf("bs=%dk", bs>>10), func(b *testing.B) {
			benchPipelined(b, newMemBackend(size), size, typ, bs, 16)
		})
	}
}

// benchPipelined serves backend on a unix socket and drives it with b.N
// requests of typ and bs bytes, sequential over size bytes, depth of them
// in flight (structured replies).
func benchPipelined(b *testing.B, backend Backend, size int, typ command, bs, depth int) {
	sock, l := listenUnix(b)
	serveUntilCleanup(b, NewServer(ExportList{{Backend: backend}}), l)
	c, err := net.Dial("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	tc := newRawClient(c)
	if err := tc.handshake(clientOpts{structured: true}); err != nil {
		b.Fatal(err)
	}
	var payload []byte
	if typ == cmdWrite {
		payload = make([]byte, bs)
	}
	window := make(chan struct{}, depth)
	errc := make(chan error, 1)
	b.SetBytes(int64(bs))
	b.ResetTimer()
	go func() {
		for i := 0; i < b.N; i++ {
			window <- struct{}{}
			off := uint64(i*bs) % uint64(size)
			if err := tc.send(request{typ: typ, handle: uint64(i), offset: off, length: uint32(bs)}, payload); err != nil {
				errc <- err
				return
			}
		}
		errc <- nil
	}()
	for i := 0; i < b.N; i++ {
		r, err := tc.readReply(func(uint64) (uint32, bool) { return uint32(bs), typ == cmdRead })
		if err != nil || r.errno != 0 {
			b.Fatalf("reply: %+v %v", r, err)
		}
		<-window
	}
	if err := <-errc; err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	tc.send(request{typ: cmdDisc}, nil)
}
