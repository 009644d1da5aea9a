package driver

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	mount "k8s.io/mount-utils"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
	"github.com/zq-csi/zq-csi/pkg/nbdattach/ublk"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// fakeZoned stands for the ublk attacher: a file attacher of kind "ublk"
// that, like the real one, takes only backends serving the zone interface
// (ublk.Backend) and uses it at attach (geometry, zone report), so a
// slotBackend that stopped forwarding it fails here. Like the real one it
// cannot resize (the file attacher is a field, not embedded, so its Resize
// is not promoted).
type fakeZoned struct {
	files              *FileAttacher
	attaches, detaches atomic.Int32
	recoverGate        chan struct{} // when set, Recover waits for it
}

func (f *fakeZoned) Kind() string { return "ublk" }

func (f *fakeZoned) Attach(ctx context.Context, req nbdattach.AttachRequest) (*nbdattach.Attachment, error) {
	zb, ok := req.Backend.(ublk.Backend)
	if !ok {
		return nil, fmt.Errorf("fake ublk: backend %T does not serve the zone interface", req.Backend)
	}
	g := zb.Geometry()
	if g.ZoneSize == 0 || g.Size == 0 {
		return nil, fmt.Errorf("fake ublk: backend geometry %+v", g)
	}
	if reps := zb.Report(0, 1<<20); uint64(len(reps)) != g.Size/g.ZoneSize {
		return nil, fmt.Errorf("fake ublk: %d zones reported, geometry says %d", len(reps), g.Size/g.ZoneSize)
	}
	f.attaches.Add(1)
	return f.files.Attach(ctx, req)
}

func (f *fakeZoned) Detach(ctx context.Context, volumeID string) error {
	f.detaches.Add(1)
	return f.files.Detach(ctx, volumeID)
}

func (f *fakeZoned) Recover(ctx context.Context, open func(nbdattach.Attachment) (nbdattach.Backend, error)) ([]nbdattach.Attachment, error) {
	if f.recoverGate != nil {
		<-f.recoverGate
	}
	return f.files.Recover(ctx, open)
}

func (f *fakeZoned) List(ctx context.Context) ([]nbdattach.Attachment, error) {
	return f.files.List(ctx)
}

// exporterDriver is a --mode all driver with the file attacher as the
// ordinary one and, when withUblk, a fake zoned attacher.
type exporterDriver struct {
	*testDriver
	file  *FileAttacher
	zoned *fakeZoned // nil without ublk
}

const noUblkReason = "/dev/ublk-control is missing (test)"

func newExporterDriver(t *testing.T, dir string, withUblk bool, gate chan struct{}) *exporterDriver {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	file, err := NewFileAttacher(filepath.Join(dir, "state", "fileattach"), 0)
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{NodeID: "n1", Mode: ModeAll, DataDir: filepath.Join(dir, "data"), StateDir: filepath.Join(dir, "state"),
		Attacher: file, Mounter: mount.NewFakeMounter(nil), ZonedUnavailable: noUblkReason}
	ed := &exporterDriver{file: file}
	if withUblk {
		za, err := NewFileAttacher(filepath.Join(dir, "state", "ublk"), 0)
		if err != nil {
			t.Fatal(err)
		}
		ed.zoned = &fakeZoned{files: za, recoverGate: gate}
		cfg.ZonedAttacher, cfg.ZonedUnavailable = ed.zoned, ""
	}
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ed.testDriver = &testDriver{Driver: d, dir: dir, ctrl: &controllerServer{d: d}, node: &nodeServer{d: d}, grp: &groupControllerServer{d: d}}
	if gate == nil {
		if err := d.Recover(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	return ed
}

func stageCtx(td *testDriver, v *csi.Volume) error {
	_, err := td.node.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: v.VolumeId,
		StagingTargetPath: filepath.Join(td.dir, "staging", v.VolumeId), VolumeCapability: blockCap, VolumeContext: v.VolumeContext})
	return err
}

func attached(t *testing.T, a nbdattach.Attacher, id string) bool {
	t.Helper()
	atts, err := a.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range atts {
		if x.VolumeID == id {
			return true
		}
	}
	return false
}

func TestExporterSelection(t *testing.T) {
	for _, tc := range []struct {
		name     string
		withUblk bool
		exporter string // "" leaves the parameter out
		want     string // attacher kind, or the error code's name
		wantMsg  string
	}{
		{"auto (default) with ublk", true, "", "ublk", ""},
		{"auto with ublk", true, "auto", "ublk", ""},
		{"ublk with ublk", true, "ublk", "ublk", ""},
		{"nbd with ublk", true, "nbd", "file", ""},
		{"auto (default) without ublk", false, "", "file", ""},
		{"auto without ublk", false, "auto", "file", ""},
		{"nbd without ublk", false, "nbd", "file", ""},
		{"ublk without ublk", false, "ublk", "FailedPrecondition", "has exporter=ublk, but node n1 has no zoned ublk: " + noUblkReason},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ed := newExporterDriver(t, "", tc.withUblk, nil)
			p := map[string]string{"zone.size": "1M"}
			if tc.exporter != "" {
				p[ParamExporter] = tc.exporter
			}
			v := mustCreate(t, ed.testDriver, "v", 4*mib, p)
			wantCtx := tc.exporter
			if wantCtx == "" {
				wantCtx = ExporterAuto
			}
			if got := v.VolumeContext["exporter"]; got != wantCtx {
				t.Errorf("volume context exporter=%q, want %q", got, wantCtx)
			}
			err := stageCtx(ed.testDriver, v)
			if tc.wantMsg != "" {
				if code(err).String() != tc.want || !strings.Contains(err.Error(), tc.wantMsg) {
					t.Fatalf("stage: %v (%v), want %s with %q", code(err), err, tc.want, tc.wantMsg)
				}
				if attached(t, ed.file, v.VolumeId) {
					t.Error("a refused stage left an attachment")
				}
				if _, err := ed.node.d.node.get(v.VolumeId); err == nil {
					t.Error("a refused stage left a record")
				}
				return
			}
			if err != nil {
				t.Fatalf("stage: %v", err)
			}
			st, err := ed.node.d.node.get(v.VolumeId)
			if err != nil {
				t.Fatal(err)
			}
			if st.Attacher != tc.want || st.ExporterReason == "" {
				t.Errorf("record: attacher %q (reason %q), want %q", st.Attacher, st.ExporterReason, tc.want)
			}
			inFile := attached(t, ed.file, v.VolumeId)
			inUblk := ed.zoned != nil && attached(t, ed.zoned, v.VolumeId)
			if inFile != (tc.want == "file") || inUblk != (tc.want == "ublk") {
				t.Errorf("attached through file %v, ublk %v; want %s", inFile, inUblk, tc.want)
			}
			// Health and unstage go to the attacher that staged it.
			h, err := ed.node.NodeGetVolumeHealth(context.Background(), &csi.NodeGetVolumeHealthRequest{VolumeId: v.VolumeId})
			if err != nil || len(h.VolumeHealth.HealthStatuses) != 0 {
				t.Errorf("health: %v %v", h, err)
			}
			// An exporter=ublk volume cannot be grown in place.
			_, err = ed.node.NodeExpandVolume(context.Background(), &csi.NodeExpandVolumeRequest{VolumeId: v.VolumeId,
				VolumePath: filepath.Join(ed.dir, "staging", v.VolumeId)})
			if wantErr := tc.want == "ublk"; (err != nil) != wantErr || (wantErr && (code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "the ublk attacher cannot resize"))) {
				t.Errorf("expand: %v", err)
			}
			unstage(t, ed.testDriver, v.VolumeId)
			if attached(t, ed.file, v.VolumeId) || (ed.zoned != nil && attached(t, ed.zoned, v.VolumeId)) {
				t.Error("still attached after unstage")
			}
			if ed.zoned != nil && tc.want == "file" && ed.zoned.detaches.Load() != 0 {
				t.Errorf("unstage of a %s volume detached through ublk", tc.want)
			}
		})
	}
}

func TestExporterInVolumeContextIsChecked(t *testing.T) {
	ed := newExporterDriver(t, "", true, nil)
	v := mustCreate(t, ed.testDriver, "v", 4*mib, map[string]string{"zone.size": "1M"})
	v.VolumeContext["exporter"] = "tape"
	if err := stageCtx(ed.testDriver, v); code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "exporter=tape: must be auto, ublk or nbd") {
		t.Fatalf("stage with exporter=tape: %v", err)
	}
	// A PV without the key (made before it existed, or by hand) is auto.
	delete(v.VolumeContext, "exporter")
	if err := stageCtx(ed.testDriver, v); err != nil {
		t.Fatal(err)
	}
	if ed.zoned.attaches.Load() != 1 {
		t.Errorf("no exporter in the volume context: %d ublk attaches, want 1 (auto)", ed.zoned.attaches.Load())
	}
}

func TestNodeGetInfoReportsExporter(t *testing.T) {
	for _, withUblk := range []bool{true, false} {
		ed := newExporterDriver(t, "", withUblk, nil)
		info, err := ed.node.NodeGetInfo(context.Background(), &csi.NodeGetInfoRequest{})
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]string{TopologyKey: "n1", ExporterTopologyKey: "nbd"}
		if withUblk {
			want[ExporterTopologyKey] = "ublk"
		}
		if got := info.AccessibleTopology.GetSegments(); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("ublk %v: segments %v, want %v", withUblk, got, want)
		}
	}
}

// TestExporterTopology: exporter=ublk volumes are not placed on nodes
// whose exporter segment says they have no zoned ublk.
func TestExporterTopology(t *testing.T) {
	ed := newExporterDriver(t, "", false, nil)
	ctx := context.Background()
	topo := func(exp string) *csi.Topology {
		return &csi.Topology{Segments: map[string]string{TopologyKey: "n1", ExporterTopologyKey: exp}}
	}
	req := func(name, exporter, seg string) *csi.CreateVolumeRequest {
		r := createReq(name, 4*mib, map[string]string{"zone.size": "1M", ParamExporter: exporter})
		r.AccessibilityRequirements = &csi.TopologyRequirement{Requisite: []*csi.Topology{topo(seg)}, Preferred: []*csi.Topology{topo(seg)}}
		return r
	}
	_, err := ed.ctrl.CreateVolume(ctx, req("a", "ublk", "nbd"))
	if code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "exporter=ublk: the requested node(s) [n1] have no zoned ublk") {
		t.Errorf("exporter=ublk on an nbd node: %v", err)
	}
	for _, c := range []struct{ exporter, seg string }{{"ublk", "ublk"}, {"nbd", "nbd"}, {"auto", "nbd"}, {"nbd", "ublk"}} {
		if _, err := ed.ctrl.CreateVolume(ctx, req("v-"+c.exporter+"-"+c.seg, c.exporter, c.seg)); err != nil {
			t.Errorf("exporter=%s on a %s node: %v", c.exporter, c.seg, err)
		}
	}
	capOf := func(exporter, seg string) int64 {
		r, err := ed.ctrl.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: map[string]string{ParamExporter: exporter}, AccessibleTopology: topo(seg)})
		if err != nil {
			t.Fatal(err)
		}
		return r.AvailableCapacity
	}
	if capOf("ublk", "nbd") != 0 || capOf("ublk", "ublk") == 0 || capOf("nbd", "nbd") == 0 || capOf("auto", "nbd") == 0 {
		t.Errorf("capacity ublk@nbd %d, ublk@ublk %d, nbd@nbd %d, auto@nbd %d; want only the first 0",
			capOf("ublk", "nbd"), capOf("ublk", "ublk"), capOf("nbd", "nbd"), capOf("auto", "nbd"))
	}
	if _, err := ed.ctrl.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: map[string]string{ParamExporter: "fast"}}); code(err) != codes.InvalidArgument {
		t.Errorf("GetCapacity exporter=fast: %v", err)
	}
}

// TestExporterRecover: after a restart both attachers take their records
// back and each staged volume returns to the attacher that staged it;
// Probe says not ready until both have recovered; a plugin restarted
// without ublk marks the ublk volume lost and can still unstage it.
func TestExporterRecover(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	ed := newExporterDriver(t, dir, true, nil)
	p := map[string]string{"zone.size": "1M"}
	u := mustCreate(t, ed.testDriver, "u", 4*mib, map[string]string{"zone.size": "1M", ParamExporter: "ublk"})
	n := mustCreate(t, ed.testDriver, "n", 4*mib, map[string]string{"zone.size": "1M", ParamExporter: "nbd"})
	a := mustCreate(t, ed.testDriver, "a", 4*mib, p)
	for _, v := range []*csi.Volume{u, n, a} {
		if err := stageCtx(ed.testDriver, v); err != nil {
			t.Fatal(err)
		}
	}
	data := writeZones(t, ed.testDriver, u.VolumeId, mib)

	// Restart with ublk: Recover blocks in the zoned attacher.
	processDied(ed.Driver)
	gate := make(chan struct{})
	ed2 := newExporterDriver(t, dir, true, gate)
	ids := &identityServer{d: ed2.Driver}
	done := make(chan error, 1)
	go func() { done <- ed2.Recover(ctx) }()
	time.Sleep(50 * time.Millisecond)
	if pr, _ := ids.Probe(ctx, &csi.ProbeRequest{}); pr.GetReady().GetValue() {
		t.Error("Probe ready while the ublk attachments are still being recovered")
	}
	close(gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if pr, _ := ids.Probe(ctx, &csi.ProbeRequest{}); !pr.GetReady().GetValue() {
		t.Error("Probe not ready after both attachers recovered")
	}
	for _, c := range []struct {
		v    *csi.Volume
		kind string
	}{{u, "ublk"}, {n, "file"}, {a, "ublk"}} {
		st, err := ed2.node.d.node.get(c.v.VolumeId)
		if err != nil || st.Lost || st.Attacher != c.kind {
			t.Errorf("%s after restart: %+v %v; want staged through %s, not lost", c.v.VolumeId, st, err, c.kind)
		}
		h, err := ed2.node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: c.v.VolumeId})
		if err != nil || len(h.VolumeHealth.HealthStatuses) != 0 {
			t.Errorf("%s health after restart: %v %v", c.kind, h, err)
		}
	}
	if !attached(t, ed2.zoned, u.VolumeId) || !attached(t, ed2.file, n.VolumeId) || attached(t, ed2.file, u.VolumeId) {
		t.Error("recovered attachments are not where they were staged")
	}
	unstage(t, ed2.testDriver, n.VolumeId)
	if ed2.zoned.detaches.Load() != 0 || attached(t, ed2.file, n.VolumeId) {
		t.Errorf("unstage of the nbd volume: %d ublk detaches, still attached %v", ed2.zoned.detaches.Load(), attached(t, ed2.file, n.VolumeId))
	}
	unstage(t, ed2.testDriver, a.VolumeId)
	if ed2.zoned.detaches.Load() != 1 || attached(t, ed2.zoned, a.VolumeId) {
		t.Errorf("unstage of the auto (ublk) volume: %d ublk detaches", ed2.zoned.detaches.Load())
	}

	// Restart without ublk: the ublk volume's attachment cannot come back.
	processDied(ed2.Driver)
	ed3 := newExporterDriver(t, dir, false, nil)
	st, err := ed3.node.d.node.get(u.VolumeId)
	if err != nil || !st.Lost {
		t.Fatalf("ublk volume after a restart without ublk: %+v %v; want lost", st, err)
	}
	h, err := ed3.node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: u.VolumeId})
	if err != nil || len(h.VolumeHealth.HealthStatuses) == 0 || !strings.Contains(h.VolumeHealth.HealthStatuses[0].Message, "ublk attachment") {
		t.Errorf("health of the lost ublk volume: %v %v", h, err)
	}
	unstage(t, ed3.testDriver, u.VolumeId)
	if attached(t, ed3.file, u.VolumeId) {
		t.Error("the lost ublk volume was attached through the file attacher")
	}
	checkZones(t, ed3.testDriver, u.VolumeId, mib, data, 4)
}

func TestZonedAttacherKindMustDiffer(t *testing.T) {
	dir := t.TempDir()
	a, _ := NewFileAttacher(filepath.Join(dir, "a"), 0)
	b, _ := NewFileAttacher(filepath.Join(dir, "b"), 0)
	_, err := New(Config{NodeID: "n1", DataDir: dir, StateDir: dir, Attacher: a, ZonedAttacher: b})
	if err == nil || !strings.Contains(err.Error(), `both of kind "file"`) {
		t.Fatalf("New with two file attachers: %v", err)
	}
}

// The slot backend forwards the zone interface to the zoned device.
func TestSlotBackendZoneInterface(t *testing.T) {
	td := newTestDriver(t, "")
	v := mustCreate(t, td, "v", 4*mib, map[string]string{"zone.size": "1M"})
	stage(t, td, v.VolumeId)
	b := &slotBackend{s: td.images.slot(v.VolumeId)}
	if g := b.Geometry(); g.ZoneSize != mib || g.Size != 4*mib {
		t.Fatalf("geometry %+v", g)
	}
	at, err := b.Append(1, make([]byte, 4096), false)
	if err != nil || at != mib {
		t.Fatalf("append to zone 1: at %d, %v; want %d", at, err, mib)
	}
	if r := b.Report(1, 1); len(r) != 1 || r[0].WP != mib+4096 {
		t.Fatalf("report after append: %+v", r)
	}
	if err := b.Mgmt(zoned.OpReset, mib, mib); err != nil {
		t.Fatal(err)
	}
	if r := b.Report(1, 1); r[0].WP != mib || r[0].Cond != zoned.CondEmpty {
		t.Fatalf("report after reset: %+v", r)
	}
	ro := &slotBackend{s: b.s, ro: true}
	if _, err := ro.Append(1, make([]byte, 4096), false); !errors.Is(err, syscall.EPERM) {
		t.Errorf("read-only append: %v", err)
	}
	unstage(t, td, v.VolumeId)
	if r := b.Report(0, 4); r != nil {
		t.Errorf("report of an unstaged volume: %+v", r)
	}
}

// The exporter is a driver option, not an image option: through the
// cluster backend the node agent builds the image without it, and the
// volume context still carries it.
func TestExporterThroughClusterBackend(t *testing.T) {
	f := newClusterFixture(t, true)
	v := mustCreateCluster(t, f, "e", 4*mib, map[string]string{"zone.size": "1M", ParamExporter: "ublk"})
	if v.VolumeContext["exporter"] != "ublk" || v.VolumeContext["zone.nr_zones"] != "4" {
		t.Fatalf("volume context %v", v.VolumeContext)
	}
	if !f.images.Exists(v.VolumeId) {
		t.Fatal("the node agent made no image")
	}
}
