package driver

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// BenchmarkCreateVolume makes 100 volumes of 1 GiB with 256 MiB zones per
// iteration, one after the other and all at once, and reports the p50 and
// p99 latency of a call (issue #6). Run with -benchtime=1x.
func BenchmarkCreateVolume(b *testing.B) {
	params := map[string]string{"zone.size": "256M"}
	for _, parallel := range []bool{false, true} {
		name := "sequential"
		if parallel {
			name = "parallel"
		}
		b.Run(name, func(b *testing.B) {
			var lat []time.Duration
			for it := 0; it < b.N; it++ {
				b.StopTimer()
				td := newTestDriver(b, "")
				b.StartTimer()
				var mu sync.Mutex
				var wg sync.WaitGroup
				call := func(i int) {
					start := time.Now()
					_, err := td.ctrl.CreateVolume(context.Background(), createReq(fmt.Sprintf("bench-%d-%d", it, i), 1<<30, params))
					d := time.Since(start)
					if err != nil {
						b.Error(err)
					}
					mu.Lock()
					lat = append(lat, d)
					mu.Unlock()
				}
				for i := range 100 {
					if parallel {
						wg.Add(1)
						go func() { defer wg.Done(); call(i) }()
					} else {
						call(i)
					}
				}
				wg.Wait()
			}
			reportLatency(b, lat)
		})
	}
}

// BenchmarkListVolumes lists 1,000 volumes in pages of 100.
func BenchmarkListVolumes(b *testing.B) {
	td := newTestDriver(b, "")
	for i := range 1000 {
		if _, err := td.ctrl.CreateVolume(context.Background(), createReq(fmt.Sprintf("l%d", i), 1<<20, map[string]string{"zone.size": "1M"})); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	var lat []time.Duration
	for range b.N {
		start := time.Now()
		token, n := "", 0
		for {
			r, err := td.ctrl.ListVolumes(context.Background(), &csi.ListVolumesRequest{MaxEntries: 100, StartingToken: token})
			if err != nil {
				b.Fatal(err)
			}
			n += len(r.Entries)
			if token = r.NextToken; token == "" {
				break
			}
		}
		if n != 1000 {
			b.Fatalf("listed %d volumes", n)
		}
		lat = append(lat, time.Since(start))
	}
	reportLatency(b, lat)
}

func reportLatency(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	pct := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000 }
	b.ReportMetric(pct(0.50), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
}
