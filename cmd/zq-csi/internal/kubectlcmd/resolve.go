package kubectlcmd

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/volumecmd"
	"github.com/zq-csi/zq-csi/pkg/driver"
)

var listAll = metav1.ListOptions{}

// gvrZonedVolume is the ZonedVolume resource (pkg/driver/crd.go), named
// like the PV's volumeHandle.
var gvrZonedVolume = schema.GroupVersionResource{Group: driver.CRDGroup, Version: driver.CRDVersion, Resource: "zonedvolumes"}

// target is a PVC's zq-csi volume and where it lives.
type target struct {
	PVC      *corev1.PersistentVolumeClaim
	PV       *corev1.PersistentVolume
	VolumeID string
	Node     string
	NodeFrom string                     // where Node came from, for describe
	ZV       *unstructured.Unstructured // the ZonedVolume, when there is one
}

// resolveVolume follows PVC ns/name to its bound PV and checks that the PV
// is a volume of driverName; then finds its node: the PV's node affinity on
// the topology key, else the "node" volume attribute the controller
// returns, else the ZonedVolume's spec.node.
func resolveVolume(ctx context.Context, c *clients, ns, name, driverName string) (*target, error) {
	pvc, err := c.kube.CoreV1().PersistentVolumeClaims(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("PVC %q not found in namespace %q", name, ns)
	}
	if err != nil {
		return nil, fmt.Errorf("get PVC %s/%s: %w", ns, name, err)
	}
	if pvc.Spec.VolumeName == "" || pvc.Status.Phase != corev1.ClaimBound {
		hint := ""
		if pvc.Status.Phase == corev1.ClaimPending {
			hint = "; with a WaitForFirstConsumer storage class the volume is made when the first pod using the PVC is scheduled (see kubectl describe pvc)"
		}
		return nil, fmt.Errorf("PVC %s/%s is not bound (phase %s)%s", ns, name, orDash(string(pvc.Status.Phase)), hint)
	}
	pv, err := c.kube.CoreV1().PersistentVolumes().Get(ctx, pvc.Spec.VolumeName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("PVC %s/%s is bound to PV %s, which does not exist", ns, name, pvc.Spec.VolumeName)
	}
	if err != nil {
		return nil, fmt.Errorf("get PV %s: %w", pvc.Spec.VolumeName, err)
	}
	if pv.Spec.CSI == nil {
		return nil, fmt.Errorf("PVC %s/%s is bound to PV %s, which is not a CSI volume, so not a zq-csi volume (driver %s)", ns, name, pv.Name, driverName)
	}
	if pv.Spec.CSI.Driver != driverName {
		return nil, fmt.Errorf("PVC %s/%s is bound to PV %s of CSI driver %s: not a zq-csi volume (driver %s; see --driver-name)", ns, name, pv.Name, pv.Spec.CSI.Driver, driverName)
	}
	t := &target{PVC: pvc, PV: pv, VolumeID: pv.Spec.CSI.VolumeHandle}
	if c.dyn != nil {
		// Best effort: the local backend has no ZonedVolumes, and the
		// user may not be allowed to read them.
		if zv, err := c.dyn.Resource(gvrZonedVolume).Get(ctx, t.VolumeID, metav1.GetOptions{}); err == nil {
			t.ZV = zv
		}
	}
	switch {
	case affinityNode(pv) != "":
		t.Node, t.NodeFrom = affinityNode(pv), "PV node affinity "+driver.TopologyKey
	case pv.Spec.CSI.VolumeAttributes["node"] != "":
		t.Node, t.NodeFrom = pv.Spec.CSI.VolumeAttributes["node"], "PV volume attribute node"
	case t.ZV != nil && zvString(t.ZV, "spec", "node") != "":
		t.Node, t.NodeFrom = zvString(t.ZV, "spec", "node"), "ZonedVolume "+t.VolumeID
	default:
		return nil, fmt.Errorf("cannot tell which node holds volume %s (PV %s): the PV has no %s node affinity nor node volume attribute, and there is no ZonedVolume %s",
			t.VolumeID, pv.Name, driver.TopologyKey, t.VolumeID)
	}
	return t, nil
}

// affinityNode is the node a PV's required node affinity names on the
// topology key (zq-csi volumes are node-local: one term, one value).
func affinityNode(pv *corev1.PersistentVolume) string {
	if pv.Spec.NodeAffinity == nil || pv.Spec.NodeAffinity.Required == nil {
		return ""
	}
	for _, term := range pv.Spec.NodeAffinity.Required.NodeSelectorTerms {
		for _, e := range term.MatchExpressions {
			if e.Key == driver.TopologyKey && e.Operator == corev1.NodeSelectorOpIn && len(e.Values) > 0 {
				return e.Values[0]
			}
		}
	}
	return ""
}

func zvString(zv *unstructured.Unstructured, fields ...string) string {
	s, _, _ := unstructured.NestedString(zv.Object, fields...)
	return s
}

// plugin is the node plugin container to exec in, and how.
type plugin struct {
	Pod       *corev1.Pod
	Container string
	Command   []string // the zq-csi binary (and any leading words)
	Socket    string   // its debug socket
}

// findPlugin finds the running node plugin pod of o.driverName on node.
func findPlugin(ctx context.Context, c *clients, node string, o options) (*plugin, error) {
	where := "in all namespaces"
	if o.driverNamespace != "" {
		where = "in namespace " + o.driverNamespace
	}
	pods, err := c.kube.CoreV1().Pods(o.driverNamespace).List(ctx, metav1.ListOptions{
		LabelSelector: o.selector,
		FieldSelector: fields.OneTermEqualSelector("spec.nodeName", node).String(),
	})
	if err != nil {
		return nil, fmt.Errorf("list node plugin pods (%s) %s: %w", o.selector, where, err)
	}
	var cands []*plugin
	for i := range pods.Items {
		p := &pods.Items[i]
		if p.Spec.NodeName != node { // fake clients ignore field selectors
			continue
		}
		ct := pluginContainer(p)
		if ct == nil || !servesDriver(ct, o.driverName) {
			continue
		}
		cands = append(cands, &plugin{Pod: p, Container: ct.Name, Command: pluginCommand(ct), Socket: debugSocket(ct)})
	}
	if len(cands) == 0 {
		return nil, fmt.Errorf("no zq-csi node plugin pod (driver %s, labels %s) on node %s %s; is the driver installed there? (see --driver-namespace, --plugin-selector)",
			o.driverName, o.selector, node, where)
	}
	// Several (a rolling update): the running one whose container runs.
	slices.SortStableFunc(cands, func(a, b *plugin) int { return running(b) - running(a) })
	if p := cands[0]; running(p) < 2 {
		return nil, fmt.Errorf("the zq-csi node plugin pod %s/%s on node %s is not running (phase %s, container %s %s)",
			p.Pod.Namespace, p.Pod.Name, node, orDash(string(p.Pod.Status.Phase)), p.Container, containerState(p))
	}
	return cands[0], nil
}

// running ranks a candidate: 2 its pod and container run, 1 the pod runs,
// 0 neither.
func running(p *plugin) int {
	if p.Pod.Status.Phase != corev1.PodRunning {
		return 0
	}
	for _, s := range p.Pod.Status.ContainerStatuses {
		if s.Name == p.Container && s.State.Running != nil {
			return 2
		}
	}
	return 1
}

func containerState(p *plugin) string {
	for _, s := range p.Pod.Status.ContainerStatuses {
		if s.Name != p.Container {
			continue
		}
		switch {
		case s.State.Running != nil:
			return "running"
		case s.State.Waiting != nil:
			return "waiting: " + s.State.Waiting.Reason
		case s.State.Terminated != nil:
			return "terminated: " + s.State.Terminated.Reason
		}
	}
	return "not started"
}

// pluginContainer is the pod's zq-csi container: the chart's "zq-csi", or
// the one that runs `serve`.
func pluginContainer(p *corev1.Pod) *corev1.Container {
	for i, ct := range p.Spec.Containers {
		if ct.Name == "zq-csi" {
			return &p.Spec.Containers[i]
		}
	}
	for i, ct := range p.Spec.Containers {
		if slices.Contains(ct.Args, "serve") || slices.Contains(ct.Command, "serve") {
			return &p.Spec.Containers[i]
		}
	}
	return nil
}

// servesDriver: the container's --driver-name (flag, else environment) is
// name; a container that does not say serves the default.
func servesDriver(ct *corev1.Container, name string) bool {
	v := flagValue(ct, "driver-name", "ZQ_CSI_DRIVER_NAME")
	if v == "" {
		v = driver.DefaultDriverName
	}
	return v == name
}

// pluginCommand is the zq-csi binary in the container: its command when
// the pod sets one (up to the serve subcommand), else the image's
// entrypoint, /zq-csi in the images this project builds.
func pluginCommand(ct *corev1.Container) []string {
	if len(ct.Command) > 0 {
		if i := slices.Index(ct.Command, "serve"); i > 0 {
			return slices.Clone(ct.Command[:i])
		}
		return []string{ct.Command[0]}
	}
	return []string{"/zq-csi"}
}

// debugSocket is where the container's plugin serves its debug API:
// <state-dir>/debug.sock, the state dir defaulting to <data-dir>/state as
// `zq-csi serve` does.
func debugSocket(ct *corev1.Container) string {
	dir := flagValue(ct, "state-dir", "ZQ_CSI_STATE_DIR")
	if dir == "" {
		if data := flagValue(ct, "data-dir", "ZQ_CSI_DATA_DIR"); data != "" {
			dir = filepath.Join(data, "state")
		}
	}
	if dir == "" {
		dir = volumecmd.DefaultStateDir
	}
	return filepath.Join(dir, driver.DebugSocketName)
}

// flagValue reads `zq-csi serve`'s flag name from the container's command
// line (--name=v, --name v, one dash too), else its literal environment
// variable env; "" when neither is set.
func flagValue(ct *corev1.Container, name, env string) string {
	argv := append(slices.Clone(ct.Command), ct.Args...)
	for i, a := range argv {
		for _, prefix := range []string{"--", "-"} {
			rest, ok := strings.CutPrefix(a, prefix+name)
			if !ok {
				continue
			}
			if v, ok := strings.CutPrefix(rest, "="); ok {
				return v
			}
			if rest == "" && i+1 < len(argv) {
				return argv[i+1]
			}
		}
	}
	for _, e := range ct.Env {
		if e.Name == env && e.ValueFrom == nil {
			return e.Value
		}
	}
	return ""
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
