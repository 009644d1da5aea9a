package driver

import (
	"strings"
	"testing"

	"k8s.io/client-go/tools/record"
)

// TestRecordEventsTargets: the driver's events reach a client-go recorder
// on the PVC when the volume context named one, else on the ZonedVolume,
// else on the node; ZoneRuleRefused once per volume and kind per interval.
func TestRecordEventsTargets(t *testing.T) {
	rec := record.NewFakeRecorder(100)
	rec.IncludeObject = true
	td, _ := newEventDriver(t, "", func(c *Config) { c.OnEvent = RecordEvents(rec, "n1") })
	v := mustCreate(t, td, "ev", 4*mib, map[string]string{"zone.size": "1M", pvcNameKey: "db", pvcNamespaceKey: "prod"})
	if got := v.GetVolumeContext()[pvcNameKey]; got != "db" {
		t.Fatalf("volume context %v: want the claim's name", v.GetVolumeContext())
	}
	if err := stageCtx(td, v); err != nil {
		t.Fatal(err)
	}
	id := v.GetVolumeId()
	b := fileBackend(t, td, id)
	for range 4 {
		if _, err := b.WriteAt(make([]byte, 4096), 1<<20+4096, false); err == nil {
			t.Fatal("a write off the write pointer succeeded")
		}
	}
	td.event(Event{Type: EventWarning, Reason: ReasonOrphanCollected, VolumeID: "zqv-gone", Message: "collected"})
	td.event(Event{Type: EventWarning, Reason: ReasonRecordQuarantined, Message: "moved aside"})
	var got []string
	for len(rec.Events) > 0 {
		got = append(got, <-rec.Events)
	}
	want := []string{
		"Normal ExporterChosen volume " + id + ": staged on node n1",
		"Warning ZoneRuleRefused volume " + id + ": zone rule off_wp",
		"Warning OrphanCollected collected",
		"Warning RecordQuarantined moved aside",
	}
	if len(got) != len(want) {
		t.Fatalf("events %q: want %d (4 refusals within a minute are one event)", got, len(want))
	}
	objs := []string{"involvedObject{kind=PersistentVolumeClaim,apiVersion=v1}", "involvedObject{kind=PersistentVolumeClaim,apiVersion=v1}",
		"involvedObject{kind=ZonedVolume,apiVersion=zq-csi.io/v1alpha1}", "involvedObject{kind=Node,apiVersion=v1}"}
	for i := range want {
		if !strings.HasPrefix(got[i], want[i]) || !strings.Contains(got[i], objs[i]) {
			t.Errorf("event %d: %q; want %q on %s", i, got[i], want[i], objs[i])
		}
	}
	// The fake recorder prints kinds only: the names, from EventTarget.
	if r := EventTarget(Event{VolumeID: id, PVCNamespace: "prod", PVCName: "db"}, "n1"); r.Namespace != "prod" || r.Name != "db" {
		t.Errorf("PVC target %+v", r)
	}
	if r := EventTarget(Event{VolumeID: "zqv-gone"}, "n1"); r.Name != "zqv-gone" || r.Namespace != "" {
		t.Errorf("ZonedVolume target %+v", r)
	}
	if r := EventTarget(Event{}, "n1"); r.Name != "n1" || r.UID != "n1" {
		t.Errorf("Node target %+v", r)
	}
}
