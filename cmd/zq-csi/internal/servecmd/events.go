package servecmd

import (
	"context"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/record"

	"github.com/zq-csi/zq-csi/pkg/driver"
)

// eventRecorder returns the Config.OnEvent that records the driver's
// events as Kubernetes Events (--backend cluster), and the function that
// flushes and stops the recorder.
func eventRecorder(rc *rest.Config, o options) (func(driver.Event), func(), error) {
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, nil, err
	}
	b := record.NewBroadcaster(record.WithContext(context.Background()))
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: cs.CoreV1().Events("")})
	component := "zq-csi-node"
	if o.mode == "controller" {
		component = "zq-csi-controller"
	}
	rec := b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: component, Host: o.nodeID})
	return driver.RecordEvents(rec, o.nodeID), b.Shutdown, nil
}
