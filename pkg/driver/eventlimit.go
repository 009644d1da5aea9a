package driver

import (
	"fmt"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// Event reasons of the node plugin beyond events.go's.
const (
	// ReasonZoneRuleRefused: the zone engine refused a request of a
	// staged volume (written off the write pointer, past a zone's
	// capacity, beyond an open or active zone limit, ...). At most one
	// event per volume and kind per RefusalEventInterval; the message
	// says how many were refused since the previous event.
	ReasonZoneRuleRefused = "ZoneRuleRefused"
	// ReasonExporterChosen: NodeStageVolume staged the volume through
	// an exporter, and says why that one.
	ReasonExporterChosen = "ExporterChosen"
	// ReasonVolumeRecovered: after a restart of the node plugin, the
	// volume's attachment was taken back (guest I/O resumes).
	ReasonVolumeRecovered = "VolumeRecovered"
	// ReasonVolumeLost: after a restart, a volume staged before had no
	// attachment any more (its device is gone; the pod needs restaging).
	ReasonVolumeLost = "VolumeAttachmentLost"
)

// RefusalEventInterval is the least time between two ZoneRuleRefused
// events of one volume and refusal kind.
const RefusalEventInterval = time.Minute

// refusalLimiter rate-limits the ZoneRuleRefused events.
type refusalLimiter struct {
	mu    sync.Mutex
	now   func() time.Time
	state map[[2]string]*refusalState
}

type refusalState struct {
	last       time.Time
	suppressed int
}

func newRefusalLimiter() *refusalLimiter {
	return &refusalLimiter{now: time.Now, state: map[[2]string]*refusalState{}}
}

// allow reports whether a refusal of kind on volume id gets an event now,
// and how many refusals (this one included) it stands for.
func (l *refusalLimiter) allow(id, kind string) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	k := [2]string{id, kind}
	s := l.state[k]
	now := l.now()
	if s == nil {
		l.state[k] = &refusalState{last: now}
		return true, 1
	}
	if now.Sub(s.last) < RefusalEventInterval {
		s.suppressed++
		return false, 0
	}
	n := s.suppressed + 1
	s.last, s.suppressed = now, 0
	return true, n
}

// forget drops volume id's state (unstaged).
func (l *refusalLimiter) forget(id string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for k := range l.state {
		if k[0] == id {
			delete(l.state, k)
		}
	}
}

// refusalEvent records a zone-rule refusal of volume id (rate-limited).
func (d *Driver) refusalEvent(id, kind string, err error) {
	ok, n := d.refusals.allow(id, kind)
	if !ok {
		return
	}
	msg := fmt.Sprintf("zone rule %s: %v", kind, err)
	if n > 1 {
		msg = fmt.Sprintf("%d requests refused by zone rule %s in the last %s or more (at most one event per %s); the latest: %v",
			n, kind, RefusalEventInterval, RefusalEventInterval, err)
	}
	d.event(Event{Type: EventWarning, Reason: ReasonZoneRuleRefused, VolumeID: id, Message: msg})
}

// The claim's name and namespace, as the external provisioner passes them
// to CreateVolume with --extra-create-metadata. CreateVolume copies them
// into the volume context, so NodeStageVolume learns the PVC its events
// are about.
const (
	pvcNameKey      = provisionerPrefix + "pvc/name"
	pvcNamespaceKey = provisionerPrefix + "pvc/namespace"
)

// withPVC adds the claim named in CreateVolume's parameters to v's
// volume context.
func withPVC(v *csi.Volume, params map[string]string) *csi.Volume {
	if n, ns := params[pvcNameKey], params[pvcNamespaceKey]; n != "" && ns != "" {
		v.VolumeContext[pvcNameKey] = n
		v.VolumeContext[pvcNamespaceKey] = ns
	}
	return v
}

// pvcFromContext returns the claim a volume context names.
func pvcFromContext(vc map[string]string) (namespace, name string) {
	if vc[pvcNameKey] == "" || vc[pvcNamespaceKey] == "" {
		return "", ""
	}
	return vc[pvcNamespaceKey], vc[pvcNameKey]
}

// pvcOf returns the claim of a volume staged here, when its volume
// context named one.
func (d *Driver) pvcOf(id string) (namespace, name string) {
	if d.node == nil {
		return "", ""
	}
	st, err := d.node.get(id)
	if err != nil {
		return "", ""
	}
	return st.PVCNamespace, st.PVCName
}
