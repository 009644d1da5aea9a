package servecmd

import (
	"context"
	"os"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/zq-csi/zq-csi/pkg/driver"
	"github.com/zq-csi/zq-csi/test/kubetest"
)

// TestEventRecorderRealAPIServer records the driver's events through the
// recorder serve wires in (--backend cluster) against a real
// kube-apiserver, and finds them on the PVC, the ZonedVolume and the Node.
func TestEventRecorderRealAPIServer(t *testing.T) {
	const root = "../../../.."
	what, how, err := kubetest.Missing(root)
	if err != nil {
		t.Fatal(err)
	}
	if what != "" {
		if os.Getenv("ZQ_REQUIRE_PEERS") == "1" {
			t.Fatalf("%s is missing (%s builds it) (ZQ_REQUIRE_PEERS=1)", what, how)
		}
		t.Skipf("SKIPPED: %s is missing (%s builds it)", what, how)
	}
	dir := t.TempDir()
	kubeconfig := kubetest.Start(t, root, dir)
	rc, err := restConfig(kubeconfig, 50, 100)
	if err != nil {
		t.Fatal(err)
	}
	cs := kubernetes.NewForConfigOrDie(rc)
	ctx := context.Background()
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "team-a"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	onEvent, stop, err := eventRecorder(rc, options{mode: "node", nodeID: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	onEvent(driver.Event{Type: driver.EventWarning, Reason: driver.ReasonZoneRuleRefused, VolumeID: "zqv-1",
		PVCNamespace: "team-a", PVCName: "logs", Message: "zone rule off_wp: write does not start at the write pointer"})
	onEvent(driver.Event{Type: driver.EventNormal, Reason: driver.ReasonVolumeRecovered, VolumeID: "zqv-2", Message: "taken back"})
	onEvent(driver.Event{Type: driver.EventWarning, Reason: driver.ReasonRecordQuarantined, Message: "moved aside"})

	want := []struct{ ns, kind, name, reason string }{
		{"team-a", "PersistentVolumeClaim", "logs", driver.ReasonZoneRuleRefused},
		{"default", "ZonedVolume", "zqv-2", driver.ReasonVolumeRecovered},
		{"default", "Node", "n1", driver.ReasonRecordQuarantined},
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, w := range want {
		for {
			evs, err := cs.CoreV1().Events(w.ns).List(ctx, metav1.ListOptions{})
			if err != nil {
				t.Fatal(err)
			}
			found := false
			for _, e := range evs.Items {
				if e.InvolvedObject.Kind == w.kind && e.InvolvedObject.Name == w.name && e.Reason == w.reason {
					found = e.Source.Component == "zq-csi-node" && e.Source.Host == "n1"
					if !found {
						t.Errorf("event %s: source %+v, want zq-csi-node on n1", e.Name, e.Source)
					}
				}
			}
			if found {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no %s event on %s %s/%s: %+v", w.reason, w.kind, w.ns, w.name, evs.Items)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}
