package driver

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"

	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// scrape GETs /metrics from the driver's metrics server and returns the
// text and its samples ("name{labels}" → value).
func scrape(t *testing.T, addr string) (string, map[string]string) {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %d %v", resp.StatusCode, err)
	}
	samples := map[string]string{}
	for _, line := range strings.Split(string(body), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		samples[line[:i]] = line[i+1:]
	}
	return string(body), samples
}

// fileBackend is the backend the file attacher holds for volume id: what
// an exporter would serve the kernel from.
func fileBackend(t *testing.T, td *testDriver, id string) *slotBackend {
	t.Helper()
	fa := td.cfg.Attacher.(*FileAttacher)
	fa.mu.Lock()
	defer fa.mu.Unlock()
	a, ok := fa.atts[id]
	if !ok {
		t.Fatalf("volume %s is not attached", id)
	}
	return a.backend.(*slotBackend)
}

// metricsWorkload stages a volume through the CSI interceptor and runs a
// known workload through its backend. It returns the driver, the volume
// id and the metrics server's address.
func metricsWorkload(t *testing.T) (*testDriver, *eventLog, string, string) {
	td, ev := newEventDriver(t, "", nil)
	addr, stop, err := td.ServeMetrics("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	params := map[string]string{"zone.size": "1M", "zone.conventional_zones": "1", "zone.max_open_zones": "2",
		"zone.max_active_zones": "3", "zone.max_append_bytes": "65536",
		pvcNameKey: "logs", pvcNamespaceKey: "team-a"}
	v := mustCreate(t, td, "metrics", 8*mib, params)
	id := v.GetVolumeId()

	ic := td.UnaryInterceptor()
	call := func(method string, req any, h grpc.UnaryHandler) error {
		_, err := ic(context.Background(), req, &grpc.UnaryServerInfo{FullMethod: "/csi.v1.Node/" + method}, h)
		return err
	}
	stageReq := &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(td.dir, "staging", id),
		VolumeCapability: blockCap, VolumeContext: v.GetVolumeContext()}
	stageH := func(ctx context.Context, req any) (any, error) {
		return td.node.NodeStageVolume(ctx, req.(*csi.NodeStageVolumeRequest))
	}
	if err := call("NodeStageVolume", stageReq, stageH); err != nil {
		t.Fatal(err)
	}
	if err := call("NodeStageVolume", stageReq, stageH); err != nil { // a repeat: OK again
		t.Fatal(err)
	}
	if err := call("NodeStageVolume", &csi.NodeStageVolumeRequest{}, stageH); err == nil {
		t.Fatal("NodeStageVolume without a volume id succeeded")
	}

	b := fileBackend(t, td, id)
	const z = 1 << 20
	mustOK := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	mustRefuse := func(what string, err error, sentinel error) {
		t.Helper()
		if err == nil || !errorsIs(err, sentinel) {
			t.Fatalf("%s: %v, want %v", what, err, sentinel)
		}
	}
	_, err = b.WriteAt(make([]byte, 65536), 1*z, false)
	mustOK("write zone 1", err)
	_, err = b.WriteAt(make([]byte, 4096), 2*z, false)
	mustOK("write zone 2", err)
	for range 3 {
		_, err = b.WriteAt(make([]byte, 4096), 1*z, false) // the write pointer is 64 KiB further
		mustRefuse("write off the write pointer", err, zoned.ErrNotAtWritePointer)
	}
	_, err = b.WriteAt(make([]byte, 4096), 3*z, false) // closes zone 1 (max_open_zones=2): 3 active
	mustOK("write zone 3", err)
	_, err = b.WriteAt(make([]byte, 4096), 4*z, false)
	mustRefuse("write a fourth active zone", err, zoned.ErrTooManyActiveZones)
	_, err = b.ReadAt(make([]byte, 8192), 0)
	mustOK("read", err)
	mustOK("reset zone 1", b.Mgmt(zoned.OpReset, 1*z, z))
	mustOK("reset zone 2", b.Mgmt(zoned.OpReset, 2*z, z))
	mustOK("finish zone 3", b.Mgmt(zoned.OpFinish, 3*z, z))
	_, err = b.Append(4, make([]byte, 4096), false)
	mustOK("append zone 4", err)
	return td, ev, id, addr
}

func errorsIs(err, target error) bool {
	return refusalKind(err) != "" && refusalKind(err) == refusalKind(target)
}

// TestMetricsAfterWorkload scrapes /metrics after a known workload and
// checks the exact values, then that unstaging removes the volume's series.
func TestMetricsAfterWorkload(t *testing.T) {
	td, ev, id, addr := metricsWorkload(t)
	_, got := scrape(t, addr)
	vol := fmt.Sprintf(`volume_id="%s"`, id)
	want := map[string]string{
		`zq_csi_operations_total{grpc_code="OK",method="NodeStageVolume"}`:                   "2",
		`zq_csi_operations_total{grpc_code="InvalidArgument",method="NodeStageVolume"}`:      "1",
		`zq_csi_operation_duration_seconds_count{grpc_code="OK",method="NodeStageVolume"}`:   "2",
		`zq_csi_volume_info{exporter="file",` + vol + `}`:                                    "1",
		`zq_csi_staged_volumes{exporter="file"}`:                                             "1",
		`zq_csi_volume_zone_refusals_total{kind="off_wp",` + vol + `}`:                       "3",
		`zq_csi_volume_zone_refusals_total{kind="active_limit",` + vol + `}`:                 "1",
		`zq_csi_volume_written_bytes_total{` + vol + `}`:                                     "77824", // 64 KiB + 3 × 4 KiB (writes to zones 2 and 3, the append)
		`zq_csi_volume_read_bytes_total{` + vol + `}`:                                        "8192",
		`zq_csi_volume_zone_resets_total{` + vol + `}`:                                       "2",
		`zq_csi_volume_zone_finishes_total{` + vol + `}`:                                     "1",
		`zq_csi_volume_zone_appends_total{` + vol + `}`:                                      "1",
		`zq_csi_volume_zone_open_close_total{` + vol + `}`:                                   "0",
		`zq_csi_volume_zones{condition="not_write_pointer",` + vol + `}`:                     "1",
		`zq_csi_volume_zones{condition="empty",` + vol + `}`:                                 "5",
		`zq_csi_volume_zones{condition="implicit_open",` + vol + `}`:                         "1",
		`zq_csi_volume_zones{condition="closed",` + vol + `}`:                                "0",
		`zq_csi_volume_zones{condition="full",` + vol + `}`:                                  "1",
		`zq_csi_volume_open_zones{` + vol + `}`:                                              "1",
		`zq_csi_volume_active_zones{` + vol + `}`:                                            "1",
		`zq_csi_volume_max_open_zones{` + vol + `}`:                                          "2",
		`zq_csi_volume_max_active_zones{` + vol + `}`:                                        "3",
		`zq_csi_volume_write_pointer_bytes{` + vol + `}`:                                     "1052672", // zone 3 full + 4 KiB appended
		`zq_csi_volume_zone_capacity_bytes{` + vol + `}`:                                     "7340032",
		`zq_csi_export_request_duration_seconds_count{exporter="file",op="write"}`:           "7",
		`zq_csi_export_request_duration_seconds_count{exporter="file",op="read"}`:            "1",
		`zq_csi_export_request_duration_seconds_count{exporter="file",op="zone_management"}`: "3",
		`zq_csi_export_request_duration_seconds_count{exporter="file",op="zone_append"}`:     "1",
		`zq_csi_events_total{reason="ZoneRuleRefused",type="Warning"}`:                       "2",
		`zq_csi_events_total{reason="ExporterChosen",type="Normal"}`:                         "1",
	}
	for k, v := range want {
		g, err := strconv.ParseFloat(got[k], 64)
		w, _ := strconv.ParseFloat(v, 64)
		if err != nil || g != w {
			t.Errorf("%s = %q, want %s", k, got[k], v)
		}
	}
	for _, k := range []string{"zq_csi_node_data_dir_capacity_bytes", "zq_csi_node_data_dir_free_bytes", "go_goroutines", "process_open_fds"} {
		if got[k] == "" || got[k] == "0" {
			t.Errorf("%s = %q, want a positive value", k, got[k])
		}
	}
	// The events: one per refusal kind (rate-limited), on the claim.
	refused := ev.withReason(ReasonZoneRuleRefused)
	if len(refused) != 2 {
		t.Fatalf("%d ZoneRuleRefused events, want 2 (one per kind): %+v", len(refused), refused)
	}
	for _, e := range refused {
		if e.VolumeID != id || e.PVCNamespace != "team-a" || e.PVCName != "logs" || e.Type != EventWarning {
			t.Errorf("event %+v: want volume %s on claim team-a/logs", e, id)
		}
	}
	if ch := ev.withReason(ReasonExporterChosen); len(ch) != 1 || !strings.Contains(ch[0].Message, "file exporter") || ch[0].PVCName != "logs" {
		t.Errorf("ExporterChosen events %+v", ch)
	}

	unstage(t, td, id)
	_, got = scrape(t, addr)
	for k := range got {
		if strings.Contains(k, id) {
			t.Errorf("after unstage the scrape still has %s", k)
		}
	}
	if got[`zq_csi_operations_total{grpc_code="OK",method="NodeStageVolume"}`] != "2" {
		t.Error("operation counters must survive an unstage")
	}
}

// TestRefusalEventRateLimit: within RefusalEventInterval one event per
// volume and kind; the next one after it counts the suppressed ones.
func TestRefusalEventRateLimit(t *testing.T) {
	td, ev := newEventDriver(t, "", nil)
	now := td.refusals.now()
	td.refusals.now = func() time.Time { return now }
	err := &zoned.ZoneError{Op: zoned.OpWrite, Zone: 1, Offset: 4096, Err: zoned.ErrNotAtWritePointer}
	for range 5 {
		td.refusalEvent("zqv-a", RefusalOffWP, err)
	}
	td.refusalEvent("zqv-b", RefusalOffWP, err)
	td.refusalEvent("zqv-a", RefusalOpenLimit, err)
	if n := len(ev.withReason(ReasonZoneRuleRefused)); n != 3 {
		t.Fatalf("%d events, want 3 (a/off_wp, b/off_wp, a/open_limit)", n)
	}
	now = now.Add(RefusalEventInterval)
	td.refusalEvent("zqv-a", RefusalOffWP, err)
	evs := ev.withReason(ReasonZoneRuleRefused)
	if len(evs) != 4 || !strings.HasPrefix(evs[3].Message, "5 requests refused by zone rule off_wp") {
		t.Fatalf("events %+v: want a fourth saying 5 (4 suppressed and this one)", evs)
	}
}

// promtoolPath finds promtool: on PATH, or built by scripts/promtool.sh
// into the tools cache.
func promtoolPath() string {
	if p, err := exec.LookPath("promtool"); err == nil {
		return p
	}
	m, _ := filepath.Glob("/var/cache/zq-csi/tools/promtool-*/promtool")
	if len(m) > 0 {
		return m[len(m)-1]
	}
	return ""
}

// TestMetricsPromtool runs Prometheus's own linter on a scrape.
func TestMetricsPromtool(t *testing.T) {
	p := promtoolPath()
	if p == "" {
		if os.Getenv("ZQ_REQUIRE_PEERS") == "1" {
			t.Fatal("promtool not found: run scripts/promtool.sh (builds it from the Go module proxy) (ZQ_REQUIRE_PEERS=1)")
		}
		t.Skip("SKIP: promtool not found (not on PATH, not in /var/cache/zq-csi/tools): run scripts/promtool.sh to build it")
	}
	_, _, _, addr := metricsWorkload(t)
	text, _ := scrape(t, addr)
	cmd := exec.Command(p, "check", "metrics")
	cmd.Stdin = strings.NewReader(text)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("promtool check metrics: %v\n%s", err, out.String())
	}
	if s := strings.TrimSpace(out.String()); s != "" {
		t.Errorf("promtool check metrics has findings:\n%s", s)
	}
}

// TestMetricsScrapeDuringIO scrapes while the volume is written and
// snapshotted (its device closed and reopened under the gate): under
// -race this checks the collector's locking; the written bytes it
// reports only grow.
func TestMetricsScrapeDuringIO(t *testing.T) {
	td, _ := newEventDriver(t, "", nil)
	addr, stop, err := td.ServeMetrics("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	v := mustCreate(t, td, "busy", 4*mib, map[string]string{"zone.size": "1M"})
	id := v.GetVolumeId()
	if err := stageCtx(td, v); err != nil {
		t.Fatal(err)
	}
	b := fileBackend(t, td, id)
	done := make(chan error, 1)
	go func() {
		var err error
		for off := int64(1 << 20); off < 2<<20 && err == nil; off += 16384 {
			_, err = b.WriteAt(make([]byte, 16384), off, false)
		}
		done <- err
	}()
	snaps := make(chan error, 1)
	go func() {
		_, err := td.ctrl.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: "s1", SourceVolumeId: id})
		snaps <- err
	}()
	key := fmt.Sprintf(`zq_csi_volume_written_bytes_total{volume_id="%s"}`, id)
	last := -1.0
	for range 20 {
		_, got := scrape(t, addr)
		n, err := strconv.ParseFloat(got[key], 64)
		if err != nil || n < last {
			t.Fatalf("%s = %q after %v", key, got[key], last)
		}
		last = n
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := <-snaps; err != nil {
		t.Fatal(err)
	}
	if _, got := scrape(t, addr); got[key] != "1.048576e+06" && got[key] != "1048576" {
		t.Errorf("%s = %q, want 1048576", key, got[key])
	}
}
