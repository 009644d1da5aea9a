package zoned

import (
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

// BenchmarkZoneWrites writes 128 KiB sequentially into one zone, and into 8
// zones from 8 goroutines, through the device; the same writes go to a raw
// file, and to a plain (not zoned) qcow2 image, in the same run. Reported:
// the three throughputs, ratio = zoned/raw (goal ≥ 0.8) and zone-cost =
// zoned/qcow2 (what the zone engine adds to the image layer). So that no
// run pays for another's dirty pages, each timed run starts after a
// sync(2) of everything, and the order rotates from one iteration to the
// next.
func BenchmarkZoneWrites(b *testing.B) {
	const zs, bs = 32 << 20, 128 << 10
	for _, zones := range []int{1, 8} {
		b.Run(map[int]string{1: "1-zone", 8: "8-zones-parallel"}[zones], func(b *testing.B) {
			var dSec, rSec, qSec float64
			var bytes float64
			for i := 0; i < b.N; i++ {
				dir := b.TempDir()
				path := filepath.Join(dir, "z.qcow2")
				if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: 8 * zs, Zoned: &qcow2.ZonedOptions{ZoneSize: p64(zs)}}); err != nil {
					b.Fatal(err)
				}
				d, err := Open(path, OpenOptions{})
				if err != nil {
					b.Fatal(err)
				}
				plain := filepath.Join(dir, "plain.qcow2")
				if _, err := qcow2.Create(plain, qcow2.CreateOptions{Size: 8 * zs}); err != nil {
					b.Fatal(err)
				}
				q, err := qcow2.Open(plain, qcow2.OpenOptions{})
				if err != nil {
					b.Fatal(err)
				}
				raw, err := os.Create(filepath.Join(dir, "raw"))
				if err != nil {
					b.Fatal(err)
				}
				raw.Truncate(8 * zs)
				run := func(write func(p []byte, off int64) error) float64 {
					syscall.Sync()
					start := time.Now()
					var wg sync.WaitGroup
					for z := 0; z < zones; z++ {
						wg.Add(1)
						go func(z int) {
							defer wg.Done()
							p := make([]byte, bs)
							for off := 0; off < zs; off += bs {
								if err := write(p, int64(z*zs+off)); err != nil {
									b.Error(err)
									return
								}
							}
						}(z)
					}
					wg.Wait()
					return time.Since(start).Seconds()
				}
				runs := []func(){
					func() {
						dSec += run(func(p []byte, off int64) error { _, err := d.WriteAt(p, off, false); return err })
					},
					func() { rSec += run(func(p []byte, off int64) error { _, err := raw.WriteAt(p, off); return err }) },
					func() { qSec += run(func(p []byte, off int64) error { _, err := q.WriteAt(p, off); return err }) },
				}
				for k := range runs {
					runs[(i+k)%len(runs)]()
				}
				bytes += float64(zones * zs)
				d.Close()
				q.Close()
				raw.Close()
			}
			b.ReportMetric(bytes/dSec/(1<<20), "zoned-MiB/s")
			b.ReportMetric(bytes/rSec/(1<<20), "raw-MiB/s")
			b.ReportMetric(bytes/qSec/(1<<20), "qcow2-MiB/s")
			b.ReportMetric(rSec/dSec, "ratio")
			b.ReportMetric(qSec/dSec, "zone-cost")
		})
	}
}

// BenchmarkReportAllZones reports every zone of a device with 2^20 zones.
func BenchmarkReportAllZones(b *testing.B) {
	path := filepath.Join(b.TempDir(), "z.qcow2")
	if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: 1 << 40, Zoned: &qcow2.ZonedOptions{ZoneSize: p64(1 << 20)}}); err != nil {
		b.Fatal(err)
	}
	d, err := Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if r := d.Report(0, MaxZones); len(r) != MaxZones {
			b.Fatalf("%d zones", len(r))
		}
	}
}

// BenchmarkCreate1TiB creates a 1 TiB zoned image with 2^20 zones (the
// largest table) and reports its file size.
func BenchmarkCreate1TiB(b *testing.B) {
	dir := b.TempDir()
	var size int64
	for i := 0; i < b.N; i++ {
		path := filepath.Join(dir, "big.qcow2")
		if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: 1 << 40, Zoned: &qcow2.ZonedOptions{ZoneSize: p64(1 << 20)}}); err != nil {
			b.Fatal(err)
		}
		st, _ := os.Stat(path)
		size = st.Size()
		os.Remove(path)
	}
	b.ReportMetric(float64(size)/(1<<20), "file-MiB")
}
