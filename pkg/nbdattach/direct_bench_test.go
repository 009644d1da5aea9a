package nbdattach

import (
	"fmt"
	"math"
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
				benchPipelined(b, ImageBackend{Img: im}, size, cmdRead, bs, 4)
			})
		}
	}
}
