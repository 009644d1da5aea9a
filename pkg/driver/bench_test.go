package driver

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// BenchmarkCreateVolume makes 100 volumes of 1 GiB with 256 MiB zones per
// iteration, one after the other and all at once, and reports the p50 and
// p99 latency of a call (issue #6). Run with -benchtime=1x. This is the
// local backend (--mode all); BenchmarkCreateVolumeCluster is the same
// over a real kube-apiserver.
func BenchmarkCreateVolume(b *testing.B) {
	benchCreateVolume(b, func(b *testing.B) (*controllerServer, *csi.TopologyRequirement) {
		return newTestDriver(b, "").ctrl, nil
	})
}

// BenchmarkCreateVolumeCluster is BenchmarkCreateVolume on the cluster
// backend: a controller (--backend cluster) and one node agent (default
// settings: 2 workers) over etcd and kube-apiserver started on loopback,
// so a call's latency includes the API round trips, the agent's informer
// delay and the controller's wait for the agent's status. Each
// sub-benchmark gets a fresh node (its own data directory and ZonedNode).
// The client's rate limiter is ZQ_BENCH_QPS/ZQ_BENCH_BURST (default
// 500/1000, as the sanity harness; 0/0 means client-go's defaults, which
// is what `zq-csi serve` runs with).
func BenchmarkCreateVolumeCluster(b *testing.B) {
	qps, burst := float32(500), 1000
	if v := os.Getenv("ZQ_BENCH_QPS"); v != "" {
		f, err := strconv.ParseFloat(v, 32)
		if err != nil {
			b.Fatalf("ZQ_BENCH_QPS: %v", err)
		}
		qps = float32(f)
	}
	if v := os.Getenv("ZQ_BENCH_BURST"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			b.Fatalf("ZQ_BENCH_BURST: %v", err)
		}
		burst = n
	}
	c := realAPIServer(b, qps, burst)
	nodes := 0
	benchCreateVolume(b, func(b *testing.B) (*controllerServer, *csi.TopologyRequirement) {
		nodes++
		node := fmt.Sprintf("bench-node-%d", nodes)
		dir := b.TempDir()
		images, err := NewImages(filepath.Join(dir, "node-data"))
		if err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		wait, err := NewNodeAgent(c, images, NodeAgentConfig{Node: node, Attacher: "file", MaxVolumes: 1000}).Start(ctx)
		if err != nil {
			cancel()
			b.Fatal(err)
		}
		b.Cleanup(func() { cancel(); wait() })
		d, err := New(Config{NodeID: "controller", Mode: ModeController, DataDir: filepath.Join(dir, "ctrl-data"),
			StateDir: filepath.Join(dir, "ctrl-state"), Backend: NewClusterBackend(c, ClusterBackendOptions{})})
		if err != nil {
			b.Fatal(err)
		}
		topo := &csi.TopologyRequirement{Preferred: []*csi.Topology{{Segments: map[string]string{TopologyKey: node}}}}
		return &controllerServer{d: d}, topo
	})
}

var benchRuns atomic.Int64

// benchCreateVolume runs the sequential and parallel CreateVolume
// benchmark against the controller newCtrl returns for each iteration.
func benchCreateVolume(b *testing.B, newCtrl func(b *testing.B) (*controllerServer, *csi.TopologyRequirement)) {
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
				ctrl, topo := newCtrl(b)
				run := benchRuns.Add(1) // -count reruns this closure; names stay unique
				b.StartTimer()
				var mu sync.Mutex
				var wg sync.WaitGroup
				call := func(i int) {
					req := createReq(fmt.Sprintf("bench-%s-%d-%d", name, run, i), 1<<30, params)
					req.AccessibilityRequirements = topo
					ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
					defer cancel()
					start := time.Now()
					_, err := ctrl.CreateVolume(ctx, req)
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
