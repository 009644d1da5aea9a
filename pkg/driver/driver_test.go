package driver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	mount "k8s.io/mount-utils"

	"github.com/zq-csi/zq-csi/pkg/zoned"
)

const mib = 1 << 20

// testDriver is a --mode all driver on temporary directories with the
// file attacher and a fake mounter (no root needed).
type testDriver struct {
	*Driver
	dir  string
	ctrl *controllerServer
	node *nodeServer
	grp  *groupControllerServer
}

func newTestDriver(t testing.TB, dir string) *testDriver {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	att, err := NewFileAttacher(filepath.Join(dir, "state", "fileattach"), 0)
	if err != nil {
		t.Fatal(err)
	}
	d, err := New(Config{NodeID: "n1", Mode: ModeAll, DataDir: filepath.Join(dir, "data"),
		StateDir: filepath.Join(dir, "state"), Attacher: att, Mounter: mount.NewFakeMounter(nil)})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Recover(context.Background()); err != nil {
		t.Fatal(err)
	}
	return &testDriver{Driver: d, dir: dir, ctrl: &controllerServer{d: d}, node: &nodeServer{d: d}, grp: &groupControllerServer{d: d}}
}

var blockCap = &csi.VolumeCapability{
	AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
	AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
}

func createReq(name string, size int64, params map[string]string) *csi.CreateVolumeRequest {
	return &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap}, Parameters: params}
}

// code runs an error through the driver's one mapping place.
func code(err error) codes.Code { return status.Code(toStatus(err)) }

func mustCreate(t testing.TB, td *testDriver, name string, size int64, params map[string]string) *csi.Volume {
	t.Helper()
	resp, err := td.ctrl.CreateVolume(context.Background(), createReq(name, size, params))
	if err != nil {
		t.Fatalf("CreateVolume %s: %v", name, err)
	}
	return resp.GetVolume()
}

func TestInvalidParameters(t *testing.T) {
	td := newTestDriver(t, "")
	for _, tc := range []struct {
		name   string
		params map[string]string
		size   int64
		want   string // must appear in the message
	}{
		{"unknown parameter", map[string]string{"backing_file": "/etc/passwd"}, 8 * mib, "backing_file"},
		{"unknown key", map[string]string{"zone.colour": "red"}, 8 * mib, "zone.colour"},
		{"zone mode", map[string]string{"zone.mode": "host-aware"}, 8 * mib, "zone.mode=host-aware"},
		{"zone size not power of two", map[string]string{"zone.size": "3M"}, 9 * mib, "zone.size=3M"},
		{"zone size syntax", map[string]string{"zone.size": "lots"}, 8 * mib, "zone.size=lots"},
		{"zone size below 512", map[string]string{"zone.size": "256"}, 8 * mib, "zone.size=256"},
		{"capacity above size", map[string]string{"zone.size": "1M", "zone.capacity": "2M"}, 8 * mib, "zone.capacity=2M"},
		{"capacity zero", map[string]string{"zone.size": "1M", "zone.capacity": "0"}, 8 * mib, "zone.capacity=0"},
		{"capacity unaligned", map[string]string{"zone.size": "1M", "zone.capacity": "1000"}, 8 * mib, "zone.capacity=1000"},
		{"conventional not a number", map[string]string{"zone.size": "1M", "zone.conventional_zones": "two"}, 8 * mib, "zone.conventional_zones=two"},
		{"all zones conventional", map[string]string{"zone.size": "1M", "zone.conventional_zones": "8"}, 8 * mib, "zone.conventional_zones=8"},
		// Limits above what the zones allow are clamped, not refused
		// (TestSmallVolumesClamp); what cannot be clamped is refused.
		{"conventional zones fill a small volume", map[string]string{"zone.size": "64Mi", "zone.conventional_zones": "2"}, 100 * mib,
			"zone.conventional_zones=2"},
		{"max append unaligned", map[string]string{"zone.size": "1M", "zone.max_append_bytes": "1000"}, 8 * mib, "zone.max_append_bytes=1000"},
		{"max append too large", map[string]string{"zone.size": "1M", "zone.max_append_bytes": "1M"}, 8 * mib, "zone.max_append_bytes=1M"},
		{"cluster size", map[string]string{"clusterSize": "3K"}, 8 * mib, "clusterSize=3K"},
		{"two spellings disagree", map[string]string{"zone.max_open_zones": "1", "zone.max-open-zones": "2"}, 8 * mib, "zone.max"},
		{"empty value", map[string]string{"zone.size": ""}, 8 * mib, "zone.size"},
		{"comma smuggling", map[string]string{"zone.size": "1M,backing_file=/etc/passwd"}, 8 * mib, "zone.size"},
		{"exporter unknown", map[string]string{"exporter": "zoned"}, 8 * mib, "parameter exporter=zoned: must be auto, ublk or nbd"},
		{"exporter case", map[string]string{"exporter": "UBLK"}, 8 * mib, "parameter exporter=UBLK: must be auto, ublk or nbd"},
		{"exporter empty", map[string]string{"exporter": ""}, 8 * mib, "parameter exporter: empty value"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := td.ctrl.CreateVolume(context.Background(), createReq("v-"+strings.ReplaceAll(tc.name, " ", "-"), tc.size, tc.params))
			if code(err) != codes.InvalidArgument {
				t.Fatalf("code %v (%v), want InvalidArgument", code(err), err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("message %q does not contain %q", err.Error(), tc.want)
			}
		})
	}
}

func TestCapacityAndIdempotency(t *testing.T) {
	td := newTestDriver(t, "")
	ctx := context.Background()
	p := map[string]string{"zone.size": "1M", "zone.max_open_zones": "4"}
	v := mustCreate(t, td, "a", 5*mib+1, p) // rounds up to whole zones
	if v.CapacityBytes != 6*mib {
		t.Fatalf("capacity %d, want %d", v.CapacityBytes, 6*mib)
	}
	if got := v.VolumeContext["zone.nr_zones"]; got != "6" {
		t.Errorf("zone.nr_zones=%s, want 6 (context %v)", got, v.VolumeContext)
	}
	for k, want := range map[string]string{"zone.size": "1048576", "zone.capacity": "1048576", "zone.max_open_zones": "4",
		"zone.max_active_zones": "0", "zone.conventional_zones": "0", "zone.max_append_bytes": "65536"} {
		if v.VolumeContext[k] != want {
			t.Errorf("%s=%s, want %s", k, v.VolumeContext[k], want)
		}
	}
	again := mustCreate(t, td, "a", 6*mib, map[string]string{"zone.max-open-zones": "4", "zone.size": "1M"})
	if again.VolumeId != v.VolumeId {
		t.Errorf("same name and parameters gave %s, then %s", v.VolumeId, again.VolumeId)
	}
	if _, err := td.ctrl.CreateVolume(ctx, createReq("a", 6*mib, map[string]string{"zone.size": "1M"})); code(err) != codes.AlreadyExists {
		t.Errorf("other parameters: %v, want AlreadyExists", err)
	}
	if _, err := td.ctrl.CreateVolume(ctx, createReq("a", 7*mib, p)); code(err) != codes.AlreadyExists {
		t.Errorf("larger size: %v, want AlreadyExists", err)
	}
	req := createReq("b", 3*mib/2, p)
	req.CapacityRange.LimitBytes = 3 * mib / 2
	if _, err := td.ctrl.CreateVolume(ctx, req); code(err) != codes.OutOfRange {
		t.Errorf("limit below the rounded size: %v, want OutOfRange", err)
	}
	mreq := createReq("m", 4*mib, nil)
	mreq.VolumeCapabilities[0] = &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: blockCap.AccessMode}
	if _, err := td.ctrl.CreateVolume(ctx, mreq); code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "raw block") {
		t.Errorf("mount access: %v, want InvalidArgument explaining raw block", err)
	}
	topo := createReq("t", 4*mib, nil)
	topo.AccessibilityRequirements = &csi.TopologyRequirement{Requisite: []*csi.Topology{{Segments: map[string]string{TopologyKey: "elsewhere"}}}}
	if _, err := td.ctrl.CreateVolume(ctx, topo); code(err) != codes.ResourceExhausted {
		t.Errorf("other node: %v, want ResourceExhausted", err)
	}
}

func TestBusyVolumeIsAborted(t *testing.T) {
	td := newTestDriver(t, "")
	v := mustCreate(t, td, "busy", 4*mib, map[string]string{"zone.size": "1M"})
	unlock, err := td.ctrlLocks.tryLock("volume/" + v.VolumeId)
	if err != nil {
		t.Fatal(err)
	}
	_, err = td.ctrl.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: v.VolumeId})
	if code(err) != codes.Aborted {
		t.Fatalf("DeleteVolume on a busy volume: %v, want Aborted", err)
	}
	unlock()
	if _, err := td.ctrl.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: v.VolumeId}); err != nil {
		t.Fatal(err)
	}
	// Concurrent creates of one name: every call returns the one volume or Aborted.
	var wg sync.WaitGroup
	ids := make([]string, 8)
	errs := make([]error, 8)
	for i := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := td.ctrl.CreateVolume(context.Background(), createReq("race", 4*mib, nil))
			errs[i] = err
			if err == nil {
				ids[i] = r.Volume.VolumeId
			}
		}()
	}
	wg.Wait()
	seen := map[string]bool{}
	for i := range ids {
		if errs[i] != nil && code(errs[i]) != codes.Aborted {
			t.Errorf("concurrent create: %v", errs[i])
		}
		if ids[i] != "" {
			seen[ids[i]] = true
		}
	}
	if len(seen) > 1 {
		t.Errorf("one name made %d volumes: %v", len(seen), seen)
	}
}

func stage(t testing.TB, td *testDriver, id string) {
	t.Helper()
	_, err := td.node.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: id,
		StagingTargetPath: filepath.Join(td.dir, "staging", id), VolumeCapability: blockCap})
	if err != nil {
		t.Fatalf("stage %s: %v", id, err)
	}
}

func unstage(t testing.TB, td *testDriver, id string) {
	t.Helper()
	_, err := td.node.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: id,
		StagingTargetPath: filepath.Join(td.dir, "staging", id)})
	if err != nil {
		t.Fatalf("unstage %s: %v", id, err)
	}
}

// writeZones writes pattern data through the staged volume's backend: zone
// 0 filled to half, zone 1 one block. It returns the bytes written per zone.
func writeZones(t testing.TB, td *testDriver, id string, zoneSize int64) [][]byte {
	t.Helper()
	s := td.images.slot(id)
	b := &slotBackend{s: s}
	data := [][]byte{bytes.Repeat([]byte("zq0-"), int(zoneSize/8)), bytes.Repeat([]byte{0xa5}, 4096)}
	for i, p := range data {
		if _, err := b.WriteAt(p, int64(i)*zoneSize, false); err != nil {
			t.Fatalf("write zone %d: %v", i, err)
		}
	}
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	return data
}

// checkZones opens a volume's image as a zoned device and checks the data
// and write pointers writeZones left, and that zones from emptyFrom on are
// EMPTY.
func checkZones(t testing.TB, td *testDriver, id string, zoneSize int64, data [][]byte, nrZones int) {
	t.Helper()
	dev, err := zoned.Open(td.images.VolumePath(id), zoned.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	rep := dev.Report(0, 1<<20)
	if len(rep) != nrZones {
		t.Fatalf("%d zones, want %d", len(rep), nrZones)
	}
	for i, z := range rep {
		want := uint64(i) * uint64(zoneSize)
		if i < len(data) {
			want += uint64(len(data[i]))
			got := make([]byte, len(data[i]))
			if _, err := dev.ReadAt(got, int64(i)*zoneSize); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data[i]) {
				t.Errorf("zone %d: data differs", i)
			}
		}
		if z.WP != want {
			t.Errorf("zone %d: write pointer %d, want %d", i, z.WP, want)
		}
	}
}

func TestSnapshotsClonesExpansionKeepData(t *testing.T) {
	td := newTestDriver(t, "")
	ctx := context.Background()
	p := map[string]string{"zone.size": "1M", "zone.max_open_zones": "4"}
	v := mustCreate(t, td, "src", 4*mib, p)
	stage(t, td, v.VolumeId)
	data := writeZones(t, td, v.VolumeId, mib)

	// Snapshot and clone while staged (frozen, flushed, copied).
	snap, err := td.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s1", SourceVolumeId: v.VolumeId})
	if err != nil {
		t.Fatal(err)
	}
	clone := createReq("clone", 4*mib, p)
	clone.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: v.VolumeId}}}
	cv, err := td.ctrl.CreateVolume(ctx, clone)
	if err != nil {
		t.Fatal(err)
	}
	// Writes after the snapshot must not show in it.
	b := &slotBackend{s: td.images.slot(v.VolumeId)}
	if _, err := b.WriteAt([]byte(strings.Repeat("late", 128)), 2*mib, false); err != nil {
		t.Fatal(err)
	}
	// Expansion while staged: new EMPTY zones, data and pointers kept.
	exp, err := td.ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.VolumeId,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 6 * mib}})
	if err != nil {
		t.Fatal(err)
	}
	if exp.CapacityBytes != 6*mib {
		t.Errorf("expanded to %d, want %d", exp.CapacityBytes, 6*mib)
	}
	if _, err := b.WriteAt([]byte(strings.Repeat("new!", 128)), 5*mib, false); err != nil {
		t.Fatalf("write into an added zone: %v", err)
	}
	// Modify the limits while staged.
	if _, err := td.ctrl.ControllerModifyVolume(ctx, &csi.ControllerModifyVolumeRequest{VolumeId: v.VolumeId,
		MutableParameters: map[string]string{"zone.max_open_zones": "2"}}); err != nil {
		t.Fatal(err)
	}
	unstage(t, td, v.VolumeId)

	// Restore, larger than the snapshot.
	restore := createReq("restored", 8*mib, p)
	restore.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.Snapshot.SnapshotId}}}
	rv, err := td.ctrl.CreateVolume(ctx, restore)
	if err != nil {
		t.Fatal(err)
	}
	checkZones(t, td, rv.Volume.VolumeId, mib, data, 8)
	checkZones(t, td, cv.Volume.VolumeId, mib, data, 4)
	g, err := td.images.Geometry(v.VolumeId)
	if err != nil {
		t.Fatal(err)
	}
	if g.NrZones != 6 || g.MaxOpen != 2 {
		t.Errorf("source after expand+modify: %+v", g)
	}
	dev, err := zoned.Open(td.images.VolumePath(v.VolumeId), zoned.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	rep := dev.Report(0, 10)
	dev.Close()
	wantWP := []uint64{mib / 2, mib + 4096, 2*mib + 512, 3 * mib, 4 * mib, 5*mib + 512}
	for i, z := range rep {
		if z.WP != wantWP[i] {
			t.Errorf("source zone %d: wp %d, want %d", i, z.WP, wantWP[i])
		}
	}
}

func TestGroupSnapshot(t *testing.T) {
	td := newTestDriver(t, "")
	ctx := context.Background()
	a := mustCreate(t, td, "data", 4*mib, map[string]string{"zone.size": "1M"})
	b := mustCreate(t, td, "meta", 2*mib, map[string]string{"zone.size": "1M"})
	stage(t, td, a.VolumeId)
	data := writeZones(t, td, a.VolumeId, mib)
	req := &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{b.VolumeId, a.VolumeId}}
	g, err := td.grp.CreateVolumeGroupSnapshot(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if len(g.GroupSnapshot.Snapshots) != 2 {
		t.Fatalf("%d snapshots", len(g.GroupSnapshot.Snapshots))
	}
	g2, err := td.grp.CreateVolumeGroupSnapshot(ctx, req)
	if err != nil || g2.GroupSnapshot.GroupSnapshotId != g.GroupSnapshot.GroupSnapshotId {
		t.Fatalf("repeat: %v %v", g2, err)
	}
	var snapOfA string
	for _, s := range g.GroupSnapshot.Snapshots {
		if s.SourceVolumeId == a.VolumeId {
			snapOfA = s.SnapshotId
		}
		if _, err := td.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: s.SnapshotId}); code(err) != codes.FailedPrecondition {
			t.Errorf("deleting a member: %v, want FailedPrecondition", err)
		}
	}
	r := createReq("from-group", 4*mib, map[string]string{"zone.size": "1M"})
	r.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapOfA}}}
	rv, err := td.ctrl.CreateVolume(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	checkZones(t, td, rv.Volume.VolumeId, mib, data, 4)
	if _, err := td.grp.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshot.GroupSnapshotId}); err != nil {
		t.Fatal(err)
	}
	if _, err := td.grp.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g.GroupSnapshot.GroupSnapshotId}); code(err) != codes.NotFound {
		t.Errorf("after delete: %v, want NotFound", err)
	}
	unstage(t, td, a.VolumeId)
}

// processDied closes the images a driver holds open, as the death of its
// process does: a restart test's second driver runs in the same process,
// and the image locks (qcow2 lock.go) of the first one's open devices
// would refuse it, as they refuse a second node plugin on a live one.
// Nothing is unstaged.
func processDied(d *Driver) {
	m := d.images
	m.mu.Lock()
	slots := maps.Clone(m.slots)
	m.mu.Unlock()
	for _, s := range slots {
		s.mu.Lock()
		if s.dev != nil {
			s.dev.Close()
			s.dev = nil
		}
		s.mu.Unlock()
	}
}

// TestRestart: a driver restarted on the same directories answers for the
// volumes made before (issue #6, "Must show").
func TestRestart(t *testing.T) {
	dir := t.TempDir()
	td := newTestDriver(t, dir)
	ctx := context.Background()
	p := map[string]string{"zone.size": "1M"}
	keep := mustCreate(t, td, "keep", 4*mib, p)
	drop := mustCreate(t, td, "drop", 4*mib, p)
	stage(t, td, keep.VolumeId)
	data := writeZones(t, td, keep.VolumeId, mib)
	// The old process dies without unstaging: only its files remain.
	processDied(td.Driver)

	td2 := newTestDriver(t, dir)
	again := mustCreate(t, td2, "keep", 4*mib, p)
	if again.VolumeId != keep.VolumeId {
		t.Errorf("after restart CreateVolume gave %s, want %s", again.VolumeId, keep.VolumeId)
	}
	h, err := td2.node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: keep.VolumeId})
	if err != nil || len(h.VolumeHealth.HealthStatuses) != 0 {
		t.Errorf("health after restart: %v %v", h, err)
	}
	unstage(t, td2, keep.VolumeId)
	if _, err := td2.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: drop.VolumeId}); err != nil {
		t.Fatal(err)
	}
	list, err := td2.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{})
	if err != nil || len(list.Entries) != 1 {
		t.Fatalf("list after restart: %v %v", list, err)
	}
	checkZones(t, td2, keep.VolumeId, mib, data, 4)
}

func TestPagination(t *testing.T) {
	td := newTestDriver(t, "")
	ctx := context.Background()
	want := map[string]bool{}
	for i := range 25 {
		want[mustCreate(t, td, fmt.Sprintf("p%d", i), 1*mib, map[string]string{"zone.size": "1M"}).VolumeId] = true
	}
	seen := map[string]bool{}
	token := ""
	for pages := 0; ; pages++ {
		r, err := td.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: 4, StartingToken: token})
		if err != nil {
			t.Fatal(err)
		}
		if len(r.Entries) > 4 {
			t.Fatalf("page of %d", len(r.Entries))
		}
		for _, e := range r.Entries {
			if seen[e.Volume.VolumeId] {
				t.Fatalf("%s listed twice", e.Volume.VolumeId)
			}
			seen[e.Volume.VolumeId] = true
			if pages == 1 && len(seen) == 5 { // a deletion between pages keeps tokens valid
				if _, err := td.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: e.Volume.VolumeId}); err != nil {
					t.Fatal(err)
				}
			}
		}
		if token = r.NextToken; token == "" {
			break
		}
	}
	if len(seen) != len(want) {
		t.Errorf("listed %d of %d", len(seen), len(want))
	}
	if _, err := td.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: "zzz"}); code(err) != codes.Aborted {
		t.Errorf("bad token: %v, want Aborted", err)
	}
}

func TestStripSecrets(t *testing.T) {
	req := &csi.NodeStageVolumeRequest{VolumeId: "v", Secrets: map[string]string{"password": "hunter2"},
		VolumeCapability: blockCap}
	out := fmt.Sprint(stripSecrets(req))
	if strings.Contains(out, "hunter2") || !strings.Contains(out, strippedValue) {
		t.Errorf("secrets not stripped: %s", out)
	}
	if req.Secrets["password"] != "hunter2" {
		t.Error("the request itself was changed")
	}
}

func TestErrorMapping(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want codes.Code
	}{
		{errorf(ErrNotFound, "x"), codes.NotFound},
		{fmt.Errorf("wrapped: %w", errorf(ErrBusy, "x")), codes.Aborted},
		{errors.New("plain"), codes.Internal},
		{context.DeadlineExceeded, codes.DeadlineExceeded},
		{errorf(ErrInvalidArgument, "bad %w", errors.New("cause")), codes.InvalidArgument},
	} {
		if got := code(tc.err); got != tc.want {
			t.Errorf("%v: %v, want %v", tc.err, got, tc.want)
		}
	}
}
