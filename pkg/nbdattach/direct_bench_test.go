package nbdattach

import (
	"context"
	"fmt"
	"math"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

// BenchmarkNBDReadImage reads a qcow2 image (64 KiB clusters, all data,
// on tmpfs when there is one) through a unix socket with 4 requests in
// flight, with READ data copied through a buffer and sent with sendfile,
// for block sizes around directMin.
func BenchmarkNBDReadImage(b *testing.B) {
	const size = 64 << 20
	dir := b.TempDir()
	if d, err := os.MkdirTemp("/dev/shm", "nbdbench"); err == nil {
		dir = d
		defer os.RemoveAll(d)
	}
	path := filepath.Join(dir, "b.qcow2")
	if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: size}); err != nil {
		b.Fatal(err)
	}
	im, err := qcow2.Open(path, qcow2.OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer im.Close()
	fill := make([]byte, 1<<20)
	for i := range fill {
		fill[i] = byte(i*7 + 1)
	}
	for off := int64(0); off < size; off += int64(len(fill)) {
		if _, err := im.WriteAt(fill, off); err != nil {
			b.Fatal(err)
		}
	}
	saved := directMin
	defer func() { directMin = saved }()
	for _, bs := range []int{4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20} {
		for _, path := range []string{"copy", "sendfile"} {
			b.Run(fmt.Sprintf("bs=%dk/%s", bs>>10, path), func(b *testing.B) {
				directMin = math.MaxUint32
				if path == "sendfile" {
					directMin = 0
				}
				benchReadImage(b, im, size, bs)
			})
		}
	}
}

func benchReadImage(b *testing.B, im *qcow2.Image, size, bs int) {
	sock := filepath.Join(b.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- NewServer(ExportList{{Backend: ImageBackend{Img: im}}}).Serve(ctx, l) }()
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
	const depth = 4
	window := make(chan struct{}, depth)
	errc := make(chan error, 1)
	b.SetBytes(int64(bs))
	b.ResetTimer()
	go func() {
		for i := 0; i < b.N; i++ {
			window <- struct{}{}
			off := uint64(i*bs) % uint64(size)
			if err := tc.send(request{typ: cmdRead, handle: uint64(i), offset: off, length: uint32(bs)}, nil); err != nil {
				errc <- err
				return
			}
		}
		errc <- nil
	}()
	for i := 0; i < b.N; i++ {
		r, err := tc.readReply(func(uint64) (uint32, bool) { return uint32(bs), true })
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
