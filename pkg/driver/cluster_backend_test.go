package driver

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/fake"
	ktesting "k8s.io/client-go/testing"
	"sigs.k8s.io/yaml"
)

// fakeCluster is client-go's fake dynamic client taught the two API
// server behaviours the cluster backend relies on: metadata.generation
// bumps when spec changes, and a delete of an object with finalizers only
// marks it (deletionTimestamp) until an update removes the last one.
func fakeCluster(t testing.TB) *fake.FakeDynamicClient {
	t.Helper()
	c := fake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), ClusterGVRs())
	tr := c.Tracker()
	c.PrependReactor("create", "*", func(a ktesting.Action) (bool, runtime.Object, error) {
		if u, ok := a.(ktesting.CreateAction).GetObject().(*unstructured.Unstructured); ok {
			u.SetGeneration(1)
		}
		return false, nil, nil
	})
	c.PrependReactor("update", "*", func(a ktesting.Action) (bool, runtime.Object, error) {
		ua := a.(ktesting.UpdateAction)
		u, ok := ua.GetObject().(*unstructured.Unstructured)
		if !ok {
			return false, nil, nil
		}
		old, err := tr.Get(a.GetResource(), "", u.GetName())
		if err != nil {
			return false, nil, nil
		}
		ou := old.(*unstructured.Unstructured)
		if a.GetSubresource() == "status" {
			// The status subresource changes status only.
			nu := ou.DeepCopy()
			nu.Object["status"] = u.Object["status"]
			*u = *nu
			return false, nil, nil
		}
		u.SetGeneration(ou.GetGeneration())
		if !reflect.DeepEqual(ou.Object["spec"], u.Object["spec"]) {
			u.SetGeneration(ou.GetGeneration() + 1)
		}
		u.Object["status"] = ou.Object["status"]
		u.SetDeletionTimestamp(ou.GetDeletionTimestamp())
		if u.GetDeletionTimestamp() != nil && len(u.GetFinalizers()) == 0 {
			return true, u, tr.Delete(a.GetResource(), "", u.GetName())
		}
		return false, nil, nil
	})
	c.PrependReactor("delete", "*", func(a ktesting.Action) (bool, runtime.Object, error) {
		name := a.(ktesting.DeleteAction).GetName()
		old, err := tr.Get(a.GetResource(), "", name)
		if err != nil {
			return false, nil, nil
		}
		u := old.(*unstructured.Unstructured).DeepCopy()
		if len(u.GetFinalizers()) == 0 {
			return false, nil, nil
		}
		if u.GetDeletionTimestamp() == nil {
			now := metav1.Now()
			u.SetDeletionTimestamp(&now)
			return true, nil, tr.Update(a.GetResource(), u, "")
		}
		return true, nil, nil
	})
	return c
}

// clusterFixture is a controller on the cluster backend and one node's
// agent, both over one fake API server.
type clusterFixture struct {
	c      *fake.FakeDynamicClient
	ctrl   *controllerServer
	grp    *groupControllerServer
	images *Images // the node's
	stop   func()
}

func newClusterFixture(t *testing.T, startAgent bool) *clusterFixture {
	t.Helper()
	dir := t.TempDir()
	c := fakeCluster(t)
	d, err := New(Config{NodeID: "controller", Mode: ModeController, DataDir: filepath.Join(dir, "ctrl-data"),
		StateDir: filepath.Join(dir, "ctrl-state"), Backend: NewClusterBackend(c, ClusterBackendOptions{DefaultWait: 20 * time.Second})})
	if err != nil {
		t.Fatal(err)
	}
	images, err := NewImages(filepath.Join(dir, "node-data"))
	if err != nil {
		t.Fatal(err)
	}
	f := &clusterFixture{c: c, ctrl: &controllerServer{d: d}, grp: &groupControllerServer{d: d}, images: images, stop: func() {}}
	if startAgent {
		f.startAgent(t)
	}
	t.Cleanup(func() { f.stop() })
	return f
}

func (f *clusterFixture) startAgent(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	agent := NewNodeAgent(f.c, f.images, NodeAgentConfig{Node: "n1", Attacher: "file", MaxVolumes: 8,
		Resync: 200 * time.Millisecond, CapacityEvery: 100 * time.Millisecond})
	wait, err := agent.Start(ctx)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	f.stop = func() { cancel(); wait() }
}

func (f *clusterFixture) volume(t *testing.T, id string) *zonedVolume {
	t.Helper()
	u, err := f.c.Resource(gvrVolume).Get(context.Background(), id, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	zv, err := fromUnstructured[zonedVolume](u)
	if err != nil {
		t.Fatal(err)
	}
	return zv
}

func TestClusterBackendLifecycle(t *testing.T) {
	f := newClusterFixture(t, true)
	ctx := context.Background()
	params := map[string]string{"zone.size": "1M", "zone.conventional_zones": "1", "zone.max_open_zones": "3"}

	// Nodes and capacity come from the agent's ZonedNode.
	nodes, err := f.ctrl.be().Nodes(ctx)
	if err != nil || !reflect.DeepEqual(nodes, []string{"n1"}) {
		t.Fatalf("Nodes = %v, %v; want [n1]", nodes, err)
	}
	capResp, err := f.ctrl.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: params,
		AccessibleTopology: &csi.Topology{Segments: map[string]string{TopologyKey: "n1"}}})
	if err != nil || capResp.GetAvailableCapacity() <= 0 {
		t.Fatalf("GetCapacity = %v, %v; want the node's free bytes", capResp, err)
	}

	vol := mustCreateCluster(t, f, "pvc-1", 4*mib, params)
	id := vol.GetVolumeId()
	if !f.images.Exists(id) {
		t.Fatalf("the agent made no image for %s", id)
	}
	zv := f.volume(t, id)
	if zv.Status.Phase != phaseReady || zv.Status.Geometry.NrZones != 4 || zv.Status.Zones == nil ||
		zv.Status.Zones.Conventional != 1 || zv.Status.Zones.Empty != 3 || zv.Annotations[annotationState] != stateReady {
		t.Fatalf("status after create = %+v (annotations %v)", zv.Status, zv.Annotations)
	}
	// The controller's final write (record state ready) leaves spec, and so
	// the generation the agent answered, alone.
	if zv.Generation != 1 || zv.Status.ObservedGeneration != 1 {
		t.Fatalf("generation %d, observed %d; want 1 and 1", zv.Generation, zv.Status.ObservedGeneration)
	}
	if !strings.Contains(zv.Status.Zones.Summary, "empty=3") || zv.Spec.Node != "n1" || zv.Labels[labelNode] != "n1" {
		t.Fatalf("resource = %+v", zv)
	}
	// Same name, same parameters: the same volume (csi-sanity idempotency).
	again := mustCreateCluster(t, f, "pvc-1", 4*mib, params)
	if again.GetVolumeId() != id {
		t.Fatalf("repeat CreateVolume made %s, first made %s", again.GetVolumeId(), id)
	}
	if _, err := f.ctrl.CreateVolume(ctx, createReq("pvc-1", 4*mib, map[string]string{"zone.size": "2M"})); code(err) != codes.AlreadyExists {
		t.Fatalf("same name, other parameters: %v; want AlreadyExists", err)
	}

	// Expansion and limits go through spec and come back in status.
	exp, err := f.ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 6 * mib}})
	if err != nil || exp.GetCapacityBytes() != 6*mib {
		t.Fatalf("expand = %v, %v", exp, err)
	}
	if g, _ := f.images.Geometry(id); g.Size != 6*mib || g.NrZones != 6 {
		t.Fatalf("image after expand: %+v", g)
	}
	if _, err := f.ctrl.ControllerModifyVolume(ctx, &csi.ControllerModifyVolumeRequest{VolumeId: id,
		MutableParameters: map[string]string{"zone.max_open_zones": "2"}}); err != nil {
		t.Fatal(err)
	}
	if g, _ := f.images.Geometry(id); g.MaxOpen != 2 {
		t.Fatalf("image after modify: %+v", g)
	}
	if zv := f.volume(t, id); zv.Spec.Limits.MaxOpenZones != 2 || zv.Status.Geometry.MaxOpen != 2 || zv.Spec.MutableParameters[ParamMaxOpen] != "2" {
		t.Fatalf("resource after modify: spec %+v status %+v", zv.Spec, zv.Status)
	}

	// Snapshot, restore, clone.
	snap, err := f.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-1", SourceVolumeId: id})
	if err != nil || !snap.GetSnapshot().GetReadyToUse() {
		t.Fatalf("CreateSnapshot = %v, %v", snap, err)
	}
	sid := snap.GetSnapshot().GetSnapshotId()
	if !f.images.SnapshotExists(sid) {
		t.Fatalf("no snapshot image for %s", sid)
	}
	restore := createReq("pvc-restore", 8*mib, params)
	restore.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: sid}}}
	rv, err := f.ctrl.CreateVolume(ctx, restore)
	if err != nil || rv.GetVolume().GetCapacityBytes() != 8*mib {
		t.Fatalf("restore = %v, %v", rv, err)
	}
	clone := createReq("pvc-clone", 6*mib, params)
	clone.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
		Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
	if _, err := f.ctrl.CreateVolume(ctx, clone); err != nil {
		t.Fatalf("clone: %v", err)
	}
	list, err := f.ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{})
	if err != nil || len(list.GetEntries()) != 1 || list.GetEntries()[0].GetSnapshot().GetCreationTime().AsTime() != snap.GetSnapshot().GetCreationTime().AsTime() {
		t.Fatalf("ListSnapshots = %v, %v", list, err)
	}

	// Group snapshot: the members are taken together.
	gs, err := f.grp.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "grp-1",
		SourceVolumeIds: []string{id, rv.GetVolume().GetVolumeId()}})
	if err != nil || len(gs.GetGroupSnapshot().GetSnapshots()) != 2 || !gs.GetGroupSnapshot().GetReadyToUse() {
		t.Fatalf("group snapshot = %v, %v", gs, err)
	}
	for _, s := range gs.GetGroupSnapshot().GetSnapshots() {
		if !f.images.SnapshotExists(s.GetSnapshotId()) {
			t.Fatalf("no image for group member %s", s.GetSnapshotId())
		}
	}
	if _, err := f.grp.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{
		GroupSnapshotId: gs.GetGroupSnapshot().GetGroupSnapshotId()}); err != nil {
		t.Fatal(err)
	}

	// Deleting goes through the finalizer: the image goes, then the resource.
	if _, err := f.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: sid}); err != nil {
		t.Fatal(err)
	}
	if f.images.SnapshotExists(sid) {
		t.Fatal("snapshot image still there after DeleteSnapshot")
	}
	if _, err := f.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
	if f.images.Exists(id) {
		t.Fatal("image still there after DeleteVolume")
	}
	if _, err := f.c.Resource(gvrVolume).Get(ctx, id, metav1.GetOptions{}); err == nil {
		t.Fatal("ZonedVolume still there after DeleteVolume")
	}
	// Deleting the resource directly (kubectl delete) deletes the image too.
	cid := rv.GetVolume().GetVolumeId()
	if err := f.c.Resource(gvrVolume).Delete(ctx, cid, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "image of a kubectl-deleted ZonedVolume to go", func() bool { return !f.images.Exists(cid) })
}

func mustCreateCluster(t *testing.T, f *clusterFixture, name string, size int64, params map[string]string) *csi.Volume {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := f.ctrl.CreateVolume(ctx, createReq(name, size, params))
	if err != nil {
		t.Fatalf("CreateVolume %s: %v", name, err)
	}
	return resp.GetVolume()
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

// TestClusterBackendDeadlineAndRetry: with no agent answering, CreateVolume
// ends with DeadlineExceeded (the provisioner retries); the retry, once an
// agent runs, finishes the same volume.
func TestClusterBackendDeadlineAndRetry(t *testing.T) {
	f := newClusterFixture(t, false)
	// A ZonedNode as an agent that stopped a moment ago left it.
	zn, _ := toUnstructured(&zonedNode{ObjectMeta: metav1.ObjectMeta{Name: "n1"},
		Status: zonedNodeStatus{CapacityBytes: 1 << 30, Heartbeat: time.Now().UTC().Format(time.RFC3339)}}, "ZonedNode")
	if _, err := f.c.Resource(gvrNode).Create(context.Background(), zn, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err := f.ctrl.CreateVolume(ctx, createReq("pvc-slow", 2*mib, map[string]string{"zone.size": "1M"}))
	if code(err) != codes.DeadlineExceeded {
		t.Fatalf("CreateVolume without an agent: %v; want DeadlineExceeded", err)
	}
	rec, err := f.ctrl.be().VolumeByName("pvc-slow")
	if err != nil || rec.State != stateCreating {
		t.Fatalf("record after the timeout: %+v, %v; want one in state creating", rec, err)
	}
	f.startAgent(t)
	vol := mustCreateCluster(t, f, "pvc-slow", 2*mib, map[string]string{"zone.size": "1M"})
	if vol.GetVolumeId() != rec.ID {
		t.Fatalf("retry made %s, the first attempt recorded %s", vol.GetVolumeId(), rec.ID)
	}
}

// TestClusterBackendNodeErrors: an error of the node's image work reaches
// the CO with the code it has on the node.
func TestClusterBackendNodeErrors(t *testing.T) {
	f := newClusterFixture(t, true)
	vol := mustCreateCluster(t, f, "pvc-src", 2*mib, map[string]string{"zone.size": "1M"})
	snap, err := f.ctrl.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: vol.GetVolumeId()})
	if err != nil {
		t.Fatal(err)
	}
	// The snapshot's image vanishes behind the driver's back.
	if err := os.Remove(f.images.snapshotPath(snap.GetSnapshot().GetSnapshotId())); err != nil {
		t.Fatal(err)
	}
	req := createReq("pvc-restore", 2*mib, map[string]string{"zone.size": "1M"})
	req.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.GetSnapshot().GetSnapshotId()}}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = f.ctrl.CreateVolume(ctx, req)
	if code(err) != codes.NotFound || !strings.Contains(err.Error(), "node agent") {
		t.Fatalf("restore from a vanished snapshot image: %v; want NotFound from the node agent", err)
	}
}

// TestNodeAgentNeverRemakesLostImages: an image that was made and has
// vanished is reported (status Failed, health inaccessible), not remade
// empty; a snapshot likewise is not retaken from the volume's current data.
func TestNodeAgentNeverRemakesLostImages(t *testing.T) {
	f := newClusterFixture(t, true)
	ctx := context.Background()
	vol := mustCreateCluster(t, f, "pvc-lost", 2*mib, map[string]string{"zone.size": "1M"})
	id := vol.GetVolumeId()
	snap, err := f.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s-lost", SourceVolumeId: id})
	if err != nil {
		t.Fatal(err)
	}
	sid := snap.GetSnapshot().GetSnapshotId()
	if err := os.Remove(f.images.VolumePath(id)); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(f.images.snapshotPath(sid)); err != nil {
		t.Fatal(err)
	}
	// The resync (1 s here) notices.
	waitFor(t, "the agent to report the lost image", func() bool {
		zv := f.volume(t, id)
		return zv.Status.Phase == phaseFailed && zv.Status.Reason == codes.NotFound.String()
	})
	h, err := f.ctrl.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: id})
	if err != nil || len(h.GetVolumeHealth().GetHealthStatuses()) == 0 ||
		h.GetVolumeHealth().GetHealthStatuses()[0].GetStatus() != csi.VolumeHealthErrorType_INACCESSIBLE {
		t.Fatalf("health of a volume whose image is gone: %v, %v", h, err)
	}
	waitFor(t, "the agent to report the lost snapshot", func() bool {
		u, err := f.c.Resource(gvrSnapshot).Get(ctx, sid, metav1.GetOptions{})
		if err != nil {
			return false
		}
		phase, _, _ := unstructured.NestedString(u.Object, "status", "phase")
		return phase == phaseFailed
	})
	if f.images.Exists(id) || f.images.SnapshotExists(sid) {
		t.Fatal("the agent remade a lost image")
	}
}

// TestStaleNodeHasNoCapacity: a node whose agent stopped reporting offers
// nothing (GetCapacity 0, CreateVolume ResourceExhausted).
func TestStaleNodeHasNoCapacity(t *testing.T) {
	f := newClusterFixture(t, false)
	old := time.Now().Add(-time.Hour).UTC().Format(time.RFC3339)
	zn, _ := toUnstructured(&zonedNode{ObjectMeta: metav1.ObjectMeta{Name: "n1"},
		Status: zonedNodeStatus{CapacityBytes: 1 << 30, Heartbeat: old}}, "ZonedNode")
	if _, err := f.c.Resource(gvrNode).Create(context.Background(), zn, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if avail, err := f.ctrl.be().Capacity(context.Background(), "n1"); err != nil || avail != 0 {
		t.Fatalf("capacity of a stale node = %d, %v; want 0", avail, err)
	}
	_, err := f.ctrl.CreateVolume(context.Background(), createReq("pvc-stale", 2*mib, map[string]string{"zone.size": "1M"}))
	if code(err) != codes.ResourceExhausted {
		t.Fatalf("CreateVolume on a stale node: %v; want ResourceExhausted", err)
	}
}

func TestErrorReasonRoundTrip(t *testing.T) {
	for _, kind := range []error{ErrInvalidArgument, ErrNotFound, ErrResourceExhausted, ErrFailedPrecondition, ErrOutOfRange, ErrBusy} {
		err := errorf(kind, "boom")
		back := nodeError("op", errorReason(err), err.Error())
		if !errors.Is(back, kind) || code(back) != code(err) {
			t.Errorf("%v: came back as %v (%v)", kind, back, code(back))
		}
	}
	if back := nodeError("op", errorReason(errors.New("disk on fire")), "disk on fire"); code(back) != codes.Internal {
		t.Errorf("an unclassified error came back as %v", code(back))
	}
}

// TestCRDsMatchTheCode checks deploy/crds against the names the code uses
// and that every printer column points into the schema.
func TestCRDsMatchTheCode(t *testing.T) {
	files, err := filepath.Glob("../../deploy/crds/*.yaml")
	if err != nil || len(files) != len(ClusterGVRs()) {
		t.Fatalf("deploy/crds holds %d files (%v); want one per resource (%d)", len(files), err, len(ClusterGVRs()))
	}
	seen := map[string]bool{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var crd map[string]any
		if err := yaml.Unmarshal(b, &crd); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		u := unstructured.Unstructured{Object: crd}
		group, _, _ := unstructured.NestedString(u.Object, "spec", "group")
		plural, _, _ := unstructured.NestedString(u.Object, "spec", "names", "plural")
		listKind, _, _ := unstructured.NestedString(u.Object, "spec", "names", "listKind")
		if group != CRDGroup || u.GetName() != plural+"."+group {
			t.Errorf("%s: group %q name %q", f, group, u.GetName())
		}
		seen[plural] = true
		for gvr, lk := range ClusterGVRs() {
			if gvr.Resource == plural && lk != listKind {
				t.Errorf("%s: listKind %s, code says %s", f, listKind, lk)
			}
		}
		versions, _, _ := unstructured.NestedSlice(u.Object, "spec", "versions")
		if len(versions) != 1 {
			t.Fatalf("%s: %d versions", f, len(versions))
		}
		v := versions[0].(map[string]any)
		if v["name"] != CRDVersion {
			t.Errorf("%s: version %v", f, v["name"])
		}
		schema, _, _ := unstructured.NestedMap(v, "schema", "openAPIV3Schema")
		cols, _, _ := unstructured.NestedSlice(v, "additionalPrinterColumns")
		for _, c := range cols {
			path := c.(map[string]any)["jsonPath"].(string)
			if strings.HasPrefix(path, ".metadata.") {
				continue
			}
			fields := []string{}
			for _, p := range strings.Split(strings.TrimPrefix(path, "."), ".") {
				fields = append(fields, "properties", p)
			}
			if _, ok, _ := unstructured.NestedMap(schema, fields...); !ok {
				t.Errorf("%s: printer column %s is not in the schema", f, path)
			}
		}
	}
	for gvr := range ClusterGVRs() {
		if !seen[gvr.Resource] {
			t.Errorf("no CRD for %s in deploy/crds", gvr.Resource)
		}
	}
}

var _ dynamic.Interface = (*fake.FakeDynamicClient)(nil)

// TestNodeAgentFollowsServedZones: the zone summary of a volume staged on
// the node follows the guest's writes (ZonesEvery) and its unstaging, not
// only the slow resync.
func TestNodeAgentFollowsServedZones(t *testing.T) {
	f := newClusterFixture(t, false)
	ctx, cancel := context.WithCancel(context.Background())
	agent := NewNodeAgent(f.c, f.images, NodeAgentConfig{Node: "n1", Attacher: "file", MaxVolumes: 8,
		Resync: time.Hour, CapacityEvery: time.Hour, ZonesEvery: 50 * time.Millisecond})
	wait, err := agent.Start(ctx)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	f.stop = func() { cancel(); wait() }
	id := mustCreateCluster(t, f, "pvc-z", 4*mib, map[string]string{"zone.size": "1M"}).GetVolumeId()
	summary := func() string {
		zv := f.volume(t, id)
		if zv.Status.Zones == nil {
			return ""
		}
		return zv.Status.Zones.Summary
	}
	waitFor := func(want string) {
		t.Helper()
		for end := time.Now().Add(10 * time.Second); !strings.Contains(summary(), want); time.Sleep(20 * time.Millisecond) {
			if time.Now().After(end) {
				t.Fatalf("zone summary %q never showed %q", summary(), want)
			}
		}
	}
	waitFor("empty=4")
	s, err := f.images.acquire(id)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.dev.WriteAt(make([]byte, 4096), 1*mib, false); err != nil {
		t.Fatal(err)
	}
	waitFor("open=1") // while served, from the live device
	// Staging itself triggered a refresh; only the periodic one sees this.
	if _, err := s.dev.WriteAt(make([]byte, 4096), 2*mib, false); err != nil {
		t.Fatal(err)
	}
	waitFor("open=2")
	if err := f.images.release(id); err != nil {
		t.Fatal(err)
	}
	waitFor("closed=2") // unstaged: the zones were closed with the device
	if got := f.images.Served(); len(got) != 0 {
		t.Fatalf("Served() after release = %v", got)
	}
}

// Issue 14 on the cluster backend: a CreateVolume that stopped with its
// ZonedVolume "creating" and was never retried is collected after the
// grace period (the agent removes the image, then the resource goes).
func TestClusterOrphanCollection(t *testing.T) {
	f := newClusterFixture(t, false)
	zn, _ := toUnstructured(&zonedNode{ObjectMeta: metav1.ObjectMeta{Name: "n1"},
		Status: zonedNodeStatus{CapacityBytes: 1 << 30, Heartbeat: time.Now().UTC().Format(time.RFC3339)}}, "ZonedNode")
	if _, err := f.c.Resource(gvrNode).Create(context.Background(), zn, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, err := f.ctrl.CreateVolume(ctx, createReq("pvc-gone", 2*mib, map[string]string{"zone.size": "1M"})); code(err) != codes.DeadlineExceeded {
		t.Fatalf("CreateVolume without an agent: %v", err)
	}
	rec, err := f.ctrl.be().VolumeByName("pvc-gone")
	if err != nil || rec.State != stateCreating {
		t.Fatalf("record: %+v, %v", rec, err)
	}
	f.startAgent(t) // makes the image the spec asks for; nobody marks the record ready
	waitFor(t, "the agent to make the image", func() bool { return f.images.Exists(rec.ID) })

	d := f.ctrl.d
	if n, err := d.CollectOrphans(context.Background()); err != nil || n != 0 {
		t.Fatalf("within the grace: collected %d, %v", n, err)
	}
	d.cfg.OrphanGrace = time.Millisecond
	time.Sleep(2 * time.Millisecond)
	if n, err := d.CollectOrphans(context.Background()); err != nil || n != 1 {
		t.Fatalf("after the grace: collected %d, %v; want 1", n, err)
	}
	if _, err := f.c.Resource(gvrVolume).Get(context.Background(), rec.ID, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("ZonedVolume %s: %v, want gone", rec.ID, err)
	}
	if f.images.Exists(rec.ID) {
		t.Errorf("image of %s still on the node", rec.ID)
	}
}
