package nbdattach

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
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
			sock := filepath.Join(b.TempDir(), "s")
			l, err := net.Listen("unix", sock)
			if err != nil {
				b.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			served := make(chan error, 1)
			srv := NewServer(ExportList{{Backend: newMemBackend(size)}})
			go func() { served <- srv.Serve(ctx, l) }()
			defer func() { cancel(); <-served }()

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
			const depth = 16
			window := make(chan struct{}, depth)
			errc := make(chan error, 1)
			b.SetBytes(int64(bs))
			b.ResetTimer()
			go func() {
				for i := 0; i < b.N; i++ {
					window <- struct{}{}
					off := uint64(i*bs) % size
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
		})
	}
}
