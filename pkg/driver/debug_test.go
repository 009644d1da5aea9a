package driver

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// debugGet runs one request through h and decodes the answer into out (or
// a DebugError when the status is not 200).
func debugGet(t *testing.T, h http.Handler, url string, out any) (int, *DebugError) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, url, nil))
	if rec.Code != http.StatusOK {
		var e DebugError
		if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil {
			t.Fatalf("GET %s: status %d, body %q is not a DebugError: %v", url, rec.Code, rec.Body, err)
		}
		return rec.Code, &e
	}
	if err := json.Unmarshal(rec.Body.Bytes(), out); err != nil {
		t.Fatalf("GET %s: %v\n%s", url, err, rec.Body)
	}
	return rec.Code, nil
}

// stageForDebug creates and stages an 8-zone volume (1 MiB zones, the
// first conventional) and returns its id and live device.
func stageForDebug(t *testing.T, td *testDriver) (string, *zoned.Device) {
	t.Helper()
	vol := mustCreate(t, td, "dbg", 8*mib, map[string]string{"zone.size": "1M", "zone.conventional_zones": "1", "zone.max_open_zones": "3"})
	id := vol.GetVolumeId()
	_, err := td.node.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: id,
		StagingTargetPath: filepath.Join(td.dir, "staging", id), VolumeCapability: blockCap})
	if err != nil {
		t.Fatal(err)
	}
	td.images.mu.Lock()
	dev := td.images.slots[id].dev
	td.images.mu.Unlock()
	if dev == nil {
		t.Fatal("staged volume has no open device")
	}
	return id, dev
}

// TestDebugZoneReport writes through the staged volume's live device and
// checks that the debug API reports the write pointers the zone engine
// holds in memory, and that they are the ones the image keeps once the
// volume is unstaged (the durable state, read back with a fresh Open).
func TestDebugZoneReport(t *testing.T) {
	td := newTestDriver(t, "")
	id, dev := stageForDebug(t, td)
	const z = mib
	if _, err := dev.WriteAt(make([]byte, 8192), 1*z, false); err != nil { // zone 1: implicitly open
		t.Fatal(err)
	}
	if _, err := dev.WriteAt(make([]byte, z), 2*z, false); err != nil { // zone 2: full
		t.Fatal(err)
	}
	if err := dev.Mgmt(zoned.OpOpen, 3*z, z); err != nil { // zone 3: explicitly open
		t.Fatal(err)
	}
	if _, err := dev.WriteAt(make([]byte, 4096), 4*z, false); err != nil { // zone 4: closed below
		t.Fatal(err)
	}
	if err := dev.Mgmt(zoned.OpClose, 4*z, z); err != nil {
		t.Fatal(err)
	}
	h := td.DebugHandler()

	var rep DebugZoneReport
	if code, e := debugGet(t, h, "/v1/volumes/"+id+"/zones", &rep); e != nil {
		t.Fatalf("zones: %d %v", code, e)
	}
	type zc struct {
		wp   uint64
		cond string
		typ  string
	}
	want := []zc{
		{0, "NOT_WP", "CONVENTIONAL"},
		{1*z + 8192, "IMP_OPEN", "SEQWRITE_REQ"},
		{3 * z, "FULL", "SEQWRITE_REQ"},
		{3 * z, "EXP_OPEN", "SEQWRITE_REQ"},
		{4*z + 4096, "CLOSED", "SEQWRITE_REQ"},
		{5 * z, "EMPTY", "SEQWRITE_REQ"},
		{6 * z, "EMPTY", "SEQWRITE_REQ"},
		{7 * z, "EMPTY", "SEQWRITE_REQ"},
	}
	if len(rep.Zones) != len(want) {
		t.Fatalf("%d zones, want %d: %+v", len(rep.Zones), len(want), rep.Zones)
	}
	for i, w := range want {
		got := rep.Zones[i]
		if g := (zc{got.WP, got.CondName, got.TypeName}); g != w {
			t.Errorf("zone %d: %+v, want %+v", i, g, w)
		}
		if got.Start != uint64(i)*z || got.Len != z || got.Cap != z {
			t.Errorf("zone %d: start %#x len %#x cap %#x", i, got.Start, got.Len, got.Cap)
		}
		if zoned.Cond(got.Cond).String() != got.CondName || zoned.ZoneType(got.Type).String() != got.TypeName {
			t.Errorf("zone %d: numeric cond/type %d/%d disagree with %s/%s", i, got.Cond, got.Type, got.CondName, got.TypeName)
		}
	}
	if rep.VolumeID != id || rep.Node != "n1" || rep.Start != 0 || rep.Geometry.NrZones != 8 ||
		rep.Geometry.ZoneSize != z || rep.Geometry.Conventional != 1 || rep.Geometry.MaxOpen != 3 {
		t.Errorf("report header: %+v", rep)
	}

	// A range: zones 2 and 3.
	var part DebugZoneReport
	if _, e := debugGet(t, h, "/v1/volumes/"+id+"/zones?start=2&count=2", &part); e != nil {
		t.Fatal(e)
	}
	if part.Start != 2 || !reflect.DeepEqual(part.Zones, rep.Zones[2:4]) {
		t.Errorf("range 2+2: start %d zones %+v, want %+v", part.Start, part.Zones, rep.Zones[2:4])
	}
	// A count past the end stops at the last zone.
	if _, e := debugGet(t, h, "/v1/volumes/"+id+"/zones?start=6&count=100", &part); e != nil || len(part.Zones) != 2 {
		t.Errorf("range 6+100: %v, %d zones", e, len(part.Zones))
	}

	// The same state, durable in the image after unstage.
	if _, err := td.node.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: id,
		StagingTargetPath: filepath.Join(td.dir, "staging", id)}); err != nil {
		t.Fatal(err)
	}
	img, err := zoned.Open(td.images.VolumePath(id), zoned.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	// Open conditions are not persisted: reopened, a zone with data is
	// CLOSED and one without is EMPTY; everything else must be equal.
	for i, r := range img.Report(0, 8) {
		want := rep.Zones[i].Report()
		if c := want.Cond; c == zoned.CondImpOpen || c == zoned.CondExpOpen || c == zoned.CondClosed {
			want.Cond = zoned.CondClosed
			if want.WP == want.Start {
				want.Cond = zoned.CondEmpty
			}
		}
		if r != want {
			t.Errorf("zone %d: image after unstage %+v, debug API said %+v", i, r, rep.Zones[i])
		}
	}
	// Unstaged: the API says so.
	if code, e := debugGet(t, h, "/v1/volumes/"+id+"/zones", &rep); code != http.StatusNotFound || e.Reason != "NotFound" ||
		!strings.Contains(e.Message, "not staged on node n1") {
		t.Errorf("zones of an unstaged volume: %d %+v", code, e)
	}
}

func TestDebugListAndDescribe(t *testing.T) {
	td := newTestDriver(t, "")
	h := td.DebugHandler()
	var list DebugVolumeList
	if _, e := debugGet(t, h, "/v1/volumes", &list); e != nil {
		t.Fatal(e)
	}
	if list.Node != "n1" || list.Driver != DefaultDriverName || !reflect.DeepEqual(list.Attachers, []string{"file"}) || list.Volumes == nil || len(list.Volumes) != 0 {
		t.Errorf("empty node: %+v", list)
	}

	id, dev := stageForDebug(t, td)
	if _, err := dev.WriteAt(make([]byte, 4096), 1*mib, false); err != nil {
		t.Fatal(err)
	}
	if _, e := debugGet(t, h, "/v1/volumes", &list); e != nil {
		t.Fatal(e)
	}
	if len(list.Volumes) != 1 {
		t.Fatalf("%d volumes: %+v", len(list.Volumes), list.Volumes)
	}
	v := list.Volumes[0]
	wantCounts := DebugZoneCounts{Conventional: 1, Empty: 6, ImplicitOpen: 1}
	if v.ID != id || !v.Attached || v.Attacher != "file" || v.Generation != 1 || !v.Open || v.Lost || v.ReadOnly ||
		v.ImagePath != td.images.VolumePath(id) || v.DevicePath == "" || v.AccessMode != "SINGLE_NODE_WRITER" ||
		v.Geometry == nil || v.Geometry.Size != 8*mib || v.Zones == nil || *v.Zones != wantCounts || v.Problem != "" {
		t.Errorf("listed volume: %+v (geometry %+v, zones %+v)", v, v.Geometry, v.Zones)
	}
	if got := v.Zones.String(); got != "conv=1 empty=6 open=1 closed=0 full=0" {
		t.Errorf("counts string %q", got)
	}
	var one DebugVolume
	if _, e := debugGet(t, h, "/v1/volumes/"+id, &one); e != nil {
		t.Fatal(e)
	}
	if !reflect.DeepEqual(one, v) {
		t.Errorf("describe %+v\nlist     %+v", one, v)
	}

	for _, tc := range []struct {
		url, reason, msg string
		code             int
	}{
		{"/v1/volumes/zqv-00000000000000000000", "NotFound", "volume zqv-00000000000000000000 is not staged on node n1", 404},
		{"/v1/volumes/zqv-00000000000000000000/zones", "NotFound", "is not staged on node n1", 404},
		{"/v1/volumes/pvc-1234", "NotFound", `"pvc-1234" is not a zq-csi volume id`, 404},
		{"/v1/volumes/" + id + "/zones?start=x", "InvalidArgument", "start=x", 400},
		{"/v1/volumes/" + id + "/zones?count=-1", "InvalidArgument", "count=-1", 400},
		{"/v1/volumes/" + id + "/zones?start=8", "InvalidArgument", "start=8: the volume has 8 zones", 400},
	} {
		code, e := debugGet(t, h, tc.url, &one)
		if e == nil || code != tc.code || e.Reason != tc.reason || !strings.Contains(e.Message, tc.msg) {
			t.Errorf("GET %s: %d %+v, want %d %s %q", tc.url, code, e, tc.code, tc.reason, tc.msg)
		}
	}
	// Only GET.
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodDelete, "/v1/volumes/"+id, nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Errorf("DELETE: %d", rec.Code)
	}
}

// TestDebugNotReady: until Recover has run, the API answers 503 like the
// node service does.
func TestDebugNotReady(t *testing.T) {
	dir := t.TempDir()
	att, err := NewFileAttacher(filepath.Join(dir, "state", "fileattach"), 0)
	if err != nil {
		t.Fatal(err)
	}
	d, err := New(Config{NodeID: "n1", Mode: ModeNode, DataDir: filepath.Join(dir, "data"), StateDir: filepath.Join(dir, "state"), Attacher: att})
	if err != nil {
		t.Fatal(err)
	}
	var list DebugVolumeList
	if code, e := debugGet(t, d.DebugHandler(), "/v1/volumes", &list); code != http.StatusServiceUnavailable || e.Reason != "NotReady" {
		t.Errorf("before Recover: %d %+v", code, e)
	}
}

// TestServeDebug serves the API on a real unix socket: owner-only, and
// removed when stopped.
func TestServeDebug(t *testing.T) {
	td := newTestDriver(t, "")
	sock := filepath.Join(td.dir, "state", DebugSocketName)
	if err := os.WriteFile(sock, nil, 0o600); err != nil { // a stale file from a killed plugin
		t.Fatal(err)
	}
	stop, err := td.ServeDebug(sock)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v", fi.Mode())
	}
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	resp, err := c.Get("http://zq-csi/v1/volumes")
	if err != nil {
		t.Fatal(err)
	}
	var list DebugVolumeList
	err = json.NewDecoder(resp.Body).Decode(&list)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 200 || list.Node != "n1" {
		t.Errorf("over the socket: %d %+v %v", resp.StatusCode, list, err)
	}
	c.CloseIdleConnections()
	stop()
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left after stop: %v", err)
	}
}

// TestDebugAfterRestart: after a plugin restart the API shows the
// reattached volume (a new generation, the write pointer of the crashed
// process) and the one whose attachment did not come back as lost.
func TestDebugAfterRestart(t *testing.T) {
	dir := t.TempDir()
	td := newTestDriver(t, dir)
	id, dev := stageForDebug(t, td)
	if _, err := dev.WriteAt(make([]byte, 8192), 1*mib, false); err != nil {
		t.Fatal(err)
	}
	gone := mustCreate(t, td, "gone", 2*mib, map[string]string{"zone.size": "1M"}).GetVolumeId()
	if _, err := td.node.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: gone,
		StagingTargetPath: filepath.Join(dir, "staging", gone), VolumeCapability: blockCap}); err != nil {
		t.Fatal(err)
	}
	var v DebugVolume
	if _, e := debugGet(t, td.DebugHandler(), "/v1/volumes/"+gone, &v); e != nil {
		t.Fatal(e)
	}
	if err := os.Remove(v.DevicePath); err != nil { // its device vanishes with the process
		t.Fatal(err)
	}
	// The old process dies without unstaging.
	processDied(td.Driver)

	td2 := newTestDriver(t, dir)
	h := td2.DebugHandler()
	if _, e := debugGet(t, h, "/v1/volumes/"+id, &v); e != nil {
		t.Fatal(e)
	}
	if !v.Attached || v.Generation != 2 || !v.Open || v.Lost || v.Zones == nil ||
		*v.Zones != (DebugZoneCounts{Conventional: 1, Closed: 1, Empty: 6}) {
		t.Errorf("reattached volume: %+v zones %+v", v, v.Zones)
	}
	var rep DebugZoneReport
	if _, e := debugGet(t, h, "/v1/volumes/"+id+"/zones?start=1&count=1", &rep); e != nil {
		t.Fatal(e)
	}
	if len(rep.Zones) != 1 || rep.Zones[0].WP != mib+8192 || rep.Zones[0].CondName != "CLOSED" {
		t.Errorf("zone 1 after restart: %+v", rep.Zones)
	}
	var lost DebugVolume // fresh: decoding leaves omitted fields as they were
	if _, e := debugGet(t, h, "/v1/volumes/"+gone, &lost); e != nil {
		t.Fatal(e)
	}
	if lost.Attached || !lost.Lost || lost.Open || lost.Zones != nil || !strings.Contains(lost.Problem, "no open device") {
		t.Errorf("lost volume: %+v", lost)
	}
	if code, e := debugGet(t, h, "/v1/volumes/"+gone+"/zones", &rep); code != http.StatusConflict || e.Reason != "FailedPrecondition" ||
		!strings.Contains(e.Message, "volume "+gone+" is staged but the node plugin has no open device for it") {
		t.Errorf("zones of a lost volume: %d %+v", code, e)
	}
}

// TestDebugDuringIOAndSnapshots reads the API while guest writes go
// through the volume's backend and snapshots close and reopen its device
// under it (run with -race): every answer is whole, and the write pointer
// it shows never goes back.
func TestDebugDuringIOAndSnapshots(t *testing.T) {
	td := newTestDriver(t, "")
	id, _ := stageForDebug(t, td)
	td.images.mu.Lock()
	be := &slotBackend{s: td.images.slots[id]}
	td.images.mu.Unlock()
	h := td.DebugHandler()

	const writes = 64
	done := make(chan error, 1)
	go func() {
		buf := make([]byte, 4096)
		for i := range writes {
			if _, err := be.WriteAt(buf, mib+int64(i)*4096, false); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	snaps := make(chan error, 1)
	go func() {
		for range 3 {
			if err := td.images.Snapshot([]string{id}, []string{newID(snapshotPrefix)}); err != nil {
				snaps <- err
				return
			}
		}
		snaps <- nil
	}()
	var last uint64
	for finished := 0; finished < 2; {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			finished++
		case err := <-snaps:
			if err != nil {
				t.Fatal(err)
			}
			finished++
		default:
		}
		var rep DebugZoneReport
		if code, e := debugGet(t, h, "/v1/volumes/"+id+"/zones?start=1&count=1", &rep); e != nil {
			t.Fatalf("zones: %d %+v", code, e)
		}
		if wp := rep.Zones[0].WP; wp < last {
			t.Fatalf("write pointer went back from %#x to %#x", last, wp)
		} else {
			last = wp
		}
		var v DebugVolume
		if code, e := debugGet(t, h, "/v1/volumes/"+id, &v); e != nil || !v.Open {
			t.Fatalf("describe: %d %+v %+v", code, e, v)
		}
	}
	var rep DebugZoneReport
	if _, e := debugGet(t, h, "/v1/volumes/"+id+"/zones?start=1&count=1", &rep); e != nil || rep.Zones[0].WP != mib+writes*4096 {
		t.Errorf("after the writes: %+v %v", rep.Zones, e)
	}
}
