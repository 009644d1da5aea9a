package qcow2

import (
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// BenchmarkVsRaw runs each workload through the engine and on a raw file of
// the same size, on the same machine in the same run, and reports both
// throughputs and their ratio (engine / raw). Writes go to the page cache
// (no fsync), as they do for the NBD server between flushes.
func BenchmarkVsRaw(b *testing.B) {
	const size = 256 << 20
	type target interface {
		io.ReaderAt
		io.WriterAt
	}
	workloads := []struct {
		name  string
		bs    int
		rand  bool
		write bool
	}{
		{"seq-write-1M", 1 << 20, false, true},
		{"seq-read-1M", 1 << 20, false, false},
		{"rand-write-4K-alloc", 4096, true, true},
		{"rand-read-4K", 4096, true, false},
	}
	for _, w := range workloads {
		b.Run(w.name, func(b *testing.B) {
			var qSec, rSec float64
			var bytes int64
			for i := 0; i < b.N; i++ {
				dir := b.TempDir()
				qp, rp := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "a.raw")
				if _, err := Create(qp, CreateOptions{Size: size}); err != nil {
					b.Fatal(err)
				}
				im, err := Open(qp, OpenOptions{})
				if err != nil {
					b.Fatal(err)
				}
				rf, err := os.Create(rp)
				if err != nil {
					b.Fatal(err)
				}
				rf.Truncate(size)
				run := func(t target, prefill bool) float64 {
					buf := make([]byte, w.bs)
					rand.New(rand.NewSource(1)).Read(buf)
					n := size / w.bs
					if !w.rand {
						n = size / w.bs
					} else {
						n = 16384
					}
					if prefill { // reads need allocated data
						big := make([]byte, 1<<20)
						for off := 0; off < size; off += len(big) {
							t.WriteAt(big, int64(off))
						}
					}
					rng := rand.New(rand.NewSource(2))
					start := time.Now()
					for k := 0; k < n; k++ {
						off := int64(k * w.bs)
						if w.rand {
							off = int64(rng.Intn(size/w.bs)) * int64(w.bs)
						}
						var err error
						if w.write {
							_, err = t.WriteAt(buf, off)
						} else {
							_, err = t.ReadAt(buf, off)
						}
						if err != nil {
							b.Fatal(err)
						}
					}
					bytes = int64(n * w.bs)
					return time.Since(start).Seconds()
				}
				qSec += run(im, !w.write)
				rSec += run(rf, !w.write)
				im.Close()
				rf.Close()
			}
			q := float64(bytes) * float64(b.N) / qSec / (1 << 20)
			r := float64(bytes) * float64(b.N) / rSec / (1 << 20)
			b.ReportMetric(q, "qcow2-MiB/s")
			b.ReportMetric(r, "raw-MiB/s")
			b.ReportMetric(q/r, "ratio")
		})
	}
}
