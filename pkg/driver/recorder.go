package driver

import (
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
)

// EventTarget is the object a Kubernetes Event about e is attached to:
// the volume's PVC when the driver knows it (the volume context names it
// when the provisioner runs with --extra-create-metadata), else the
// volume's ZonedVolume (cluster backend), else the node.
func EventTarget(e Event, nodeName string) *corev1.ObjectReference {
	switch {
	case e.PVCName != "":
		return &corev1.ObjectReference{APIVersion: "v1", Kind: "PersistentVolumeClaim", Namespace: e.PVCNamespace, Name: e.PVCName}
	case e.VolumeID != "":
		return &corev1.ObjectReference{APIVersion: CRDGroup + "/" + CRDVersion, Kind: "ZonedVolume", Name: e.VolumeID}
	}
	// kubectl describe node finds a node's events by its name as UID, as
	// the kubelet records them.
	return &corev1.ObjectReference{APIVersion: "v1", Kind: "Node", Name: nodeName, UID: types.UID(nodeName)}
}

// RecordEvents returns a Config.OnEvent that records each driver event
// through rec on its EventTarget. The recorder's broadcaster aggregates
// repeats; the driver rate-limits the ZoneRuleRefused events itself.
func RecordEvents(rec record.EventRecorder, nodeName string) func(Event) {
	return func(e Event) {
		msg := e.Message
		if e.VolumeID != "" && e.PVCName != "" {
			msg = "volume " + e.VolumeID + ": " + msg
		}
		rec.Event(EventTarget(e, nodeName), e.Type, e.Reason, msg)
	}
}
