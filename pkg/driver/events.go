package driver

import (
	"slices"

	"k8s.io/klog/v2"
)

// Event is something an operator should see beside the log: a Kubernetes
// Event once a recorder is wired in (Config.OnEvent). Type is "Normal" or
// "Warning", Reason CamelCase, as corev1.Event has them.
type Event struct {
	Type    string
	Reason  string
	Message string
	// VolumeID names the volume concerned, when there is one (the object
	// a recorder would attach the event to); empty: the node or plugin.
	VolumeID string
	// PVCNamespace and PVCName name the volume's claim when the driver
	// knows it (the provisioner's --extra-create-metadata puts it in the
	// volume context): the object a recorder attaches the event to first.
	PVCNamespace, PVCName string
}

// Event types and reasons of the driver.
const (
	EventNormal  = "Normal"
	EventWarning = "Warning"

	// ReasonRecordQuarantined: a state record file could not be loaded and
	// was moved aside (QuarantinedRecord).
	ReasonRecordQuarantined = "RecordQuarantined"
	// ReasonZoneLimitsClamped: a volume's max open/active zone limits were
	// larger than its zones allow and were lowered (spec §2).
	ReasonZoneLimitsClamped = "ZoneLimitsClamped"
	// ReasonOrphanCollected: a volume or snapshot left "creating" by an
	// interrupted CreateVolume/CreateSnapshot that nobody retried within
	// the grace period was removed with its partial image.
	ReasonOrphanCollected = "OrphanCollected"
)

// event logs e and hands it to Config.OnEvent. The log line is the
// record that always exists; OnEvent is the hook a Kubernetes event
// recorder plugs into.
func (d *Driver) event(e Event) {
	if e.VolumeID != "" && e.PVCName == "" {
		e.PVCNamespace, e.PVCName = d.pvcOf(e.VolumeID)
	}
	kv := []any{"reason", e.Reason, "message", e.Message}
	if e.VolumeID != "" {
		kv = append(kv, "volumeID", e.VolumeID)
	}
	if e.PVCName != "" {
		kv = append(kv, "pvc", e.PVCNamespace+"/"+e.PVCName)
	}
	if e.Type == EventWarning {
		klog.ErrorS(nil, "Event", kv...)
	} else {
		klog.InfoS("Event", kv...)
	}
	d.metrics.events.WithLabelValues(e.Type, e.Reason).Inc()
	if d.cfg.OnEvent != nil {
		d.cfg.OnEvent(e)
	}
}

// quarantiner is a record store that can say which files it moved aside.
type quarantiner interface{ Quarantined() []QuarantinedRecord }

// Quarantined lists the state record files this plugin could not load and
// moved aside, at this start or an earlier one: the controller's records
// (local backend), the node's staged-volume records and the file
// attacher's. `zq-csi volume list` and the debug API's /v1/health show
// them; NodeGetStorageHealth reports them as degraded.
func (d *Driver) Quarantined() []QuarantinedRecord {
	out := append(d.storeQuarantined(), d.attacherQuarantined()...)
	slices.SortFunc(out, func(a, b QuarantinedRecord) int {
		if c := a.Time.Compare(b.Time); c != 0 {
			return c
		}
		if a.Path < b.Path {
			return -1
		}
		return 1
	})
	return out
}

// reportQuarantined logs and events the files in q (moved aside by this
// start, or still aside from an earlier one).
func (d *Driver) reportQuarantined(q []QuarantinedRecord) {
	for _, q := range q {
		if q.Earlier {
			klog.InfoS("State record quarantined by an earlier start is still set aside", "path", q.Path)
			continue
		}
		d.event(Event{Type: EventWarning, Reason: ReasonRecordQuarantined,
			Message: "state record " + q.Original + " could not be loaded (" + q.Reason + "); moved aside to " + q.Path + " and started without it"})
	}
}

// storeQuarantined lists what the record stores (not the attachers) set
// aside.
func (d *Driver) storeQuarantined() []QuarantinedRecord {
	var out []QuarantinedRecord
	if q, ok := d.backend.(quarantiner); ok {
		out = append(out, q.Quarantined()...)
	}
	if d.node != nil {
		out = append(out, d.node.d.quarantined...)
	}
	return out
}

// attacherQuarantined lists what the attachers' Recover set aside.
func (d *Driver) attacherQuarantined() []QuarantinedRecord {
	var out []QuarantinedRecord
	for _, a := range []any{d.cfg.Attacher, d.cfg.ZonedAttacher} {
		if q, ok := a.(quarantiner); ok {
			out = append(out, q.Quarantined()...)
		}
	}
	return out
}
