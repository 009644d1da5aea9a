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
//
// So that neither side pays for the other's writeback, each timed run is
// followed by an untimed flush of its file, and the side that runs first
// alternates between iterations.
//
// Workloads: sequential 1 MiB writes and reads; 4 KiB random writes that
// all allocate (each lands in a cluster nothing was written to: the
// allocation-heavy case); 4 KiB random writes over the whole image (about a
// quarter allocate, the rest overwrite); 4 KiB random reads.
func BenchmarkVsRaw(b *testing.B) {
	type target interface {
		io.ReaderAt
		io.WriterAt
	}
	const cs = DefaultClusterSize
	workloads := []struct {
		name  string
		size  int
		bs    int
		write bool
		offs  func(size, bs int) []int64 // nil: sequential over the image
	}{
		{"seq-write-1M", 256 << 20, 1 << 20, true, nil},
		{"seq-read-1M", 256 << 20, 1 << 20, false, nil},
		{"rand-write-4K-fresh-cluster", 1 << 30, 4096, true, func(size, bs int) []int64 {
			rng := rand.New(rand.NewSource(3))
			offs := make([]int64, size/cs)
			for k, c := range rng.Perm(len(offs)) {
				offs[k] = int64(c)*cs + int64(rng.Intn(cs/bs)*bs)
			}
			return offs
		}},
		{"rand-write-4K-alloc", 256 << 20, 4096, true, randomOffsets},
		{"rand-read-4K", 256 << 20, 4096, false, randomOffsets},
	}
	for _, w := range workloads {
		b.Run(w.name, func(b *testing.B) {
			var offs []int64
			if w.offs != nil {
				offs = w.offs(w.size, w.bs)
			} else {
				for off := 0; off < w.size; off += w.bs {
					offs = append(offs, int64(off))
				}
			}
			var qSec, rSec float64
			for i := 0; i < b.N; i++ {
				dir := b.TempDir()
				qp, rp := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "a.raw")
				if _, err := Create(qp, CreateOptions{Size: uint64(w.size)}); err != nil {
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
				if err := rf.Truncate(int64(w.size)); err != nil {
					b.Fatal(err)
				}
				run := func(t target, flush func() error) float64 {
					buf := make([]byte, w.bs)
					rand.New(rand.NewSource(1)).Read(buf)
					if !w.write { // reads need allocated data
						big := make([]byte, 1<<20)
						for off := 0; off < w.size; off += len(big) {
							if _, err := t.WriteAt(big, int64(off)); err != nil {
								b.Fatal(err)
							}
						}
						if err := flush(); err != nil {
							b.Fatal(err)
						}
					}
					start := time.Now()
					for _, off := range offs {
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
					sec := time.Since(start).Seconds()
					if err := flush(); err != nil { // untimed: keep writeback out of the other side's run
						b.Fatal(err)
					}
					return sec
				}
				if i%2 == 0 {
					qSec += run(im, im.Flush)
					rSec += run(rf, rf.Sync)
				} else {
					rSec += run(rf, rf.Sync)
					qSec += run(im, im.Flush)
				}
				im.Close()
				rf.Close()
			}
			bytes := float64(len(offs)*w.bs) * float64(b.N)
			q, r := bytes/qSec/(1<<20), bytes/rSec/(1<<20)
			b.ReportMetric(q, "qcow2-MiB/s")
			b.ReportMetric(r, "raw-MiB/s")
			b.ReportMetric(q/r, "ratio")
		})
	}
}

// randomOffsets returns 16384 block-aligned offsets drawn at random (with
// repeats) from the whole image.
func randomOffsets(size, bs int) []int64 {
	rng := rand.New(rand.NewSource(2))
	offs := make([]int64, 16384)
	for k := range offs {
		offs[k] = int64(rng.Intn(size/bs)) * int64(bs)
	}
	return offs
}
