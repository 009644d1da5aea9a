package kubectlcmd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	dynfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	utilexec "k8s.io/client-go/util/exec"

	"github.com/zq-csi/zq-csi/pkg/driver"
)

const volID = "zqv-0123456789abcdef0123"

// The cluster of the tests: PVC apps/data bound to PV pv-data, a zq-csi
// volume on node-a, used by pod apps/writer; node plugin pods on node-a and
// node-b in namespace zq-system.

func pvc(name, pv string, phase corev1.PersistentVolumeClaimPhase) *corev1.PersistentVolumeClaim {
	return &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: name},
		Spec: corev1.PersistentVolumeClaimSpec{VolumeName: pv}, Status: corev1.PersistentVolumeClaimStatus{Phase: phase}}
}

// pv is a zq-csi PV; edit changes it.
func pv(name, handle string, edit func(*corev1.PersistentVolume)) *corev1.PersistentVolume {
	block := corev1.PersistentVolumeBlock
	p := &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.PersistentVolumeSpec{
		Capacity:                      corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("512Mi")},
		AccessModes:                   []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
		PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimDelete,
		StorageClassName:              "zoned",
		VolumeMode:                    &block,
		PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{
			Driver: driver.DefaultDriverName, VolumeHandle: handle,
			VolumeAttributes: map[string]string{"zone.size": "67108864", "zone.nr_zones": "8", "zone.conventional_zones": "0", "node": "node-a"},
		}},
		NodeAffinity: &corev1.VolumeNodeAffinity{Required: &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{
			MatchExpressions: []corev1.NodeSelectorRequirement{{Key: driver.TopologyKey, Operator: corev1.NodeSelectorOpIn, Values: []string{"node-a"}}},
		}}}},
	}}
	if edit != nil {
		edit(p)
	}
	return p
}

// pluginPod is a running node plugin pod as the chart makes it.
func pluginPod(name, node string, edit func(*corev1.Pod)) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "zq-system", Name: name,
			Labels: map[string]string{"app.kubernetes.io/name": "zq-csi", "app.kubernetes.io/component": "node", "app.kubernetes.io/instance": "zq"}},
		Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{
			{Name: "zq-csi", Image: "docker.io/zq-csi/zq-csi:e2e", Args: []string{"serve", "--mode=node", "--endpoint=unix:///csi/csi.sock",
				"--driver-name=" + driver.DefaultDriverName, "--data-dir=/var/lib/zq-csi", "--state-dir=/var/lib/zq-csi/state"}},
			{Name: "node-driver-registrar", Image: "registrar"},
		}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, ContainerStatuses: []corev1.ContainerStatus{
			{Name: "zq-csi", State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{}}},
		}},
	}
	if edit != nil {
		edit(p)
	}
	return p
}

func appPod(name, claim, node string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: name},
		Spec: corev1.PodSpec{NodeName: node, Volumes: []corev1.Volume{{Name: "v", VolumeSource: corev1.VolumeSource{
			PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: claim}}}}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning}}
}

func cluster() []runtime.Object {
	return []runtime.Object{
		pvc("data", "pv-data", corev1.ClaimBound), pv("pv-data", volID, nil),
		appPod("writer", "data", "node-a"),
		pluginPod("zq-csi-node-a1", "node-a", nil), pluginPod("zq-csi-node-b1", "node-b", nil),
	}
}

// execCall is one command the fake exec ran.
type execCall struct {
	ns, pod, container string
	cmd                []string
}

// fakeExec answers every exec with stdout, stderr and err, as the
// plugin's container would; the real executor reports a failed command as
// client-go's CodeExitError, so exit statuses come that way here too.
type fakeExec struct {
	calls          []execCall
	stdout, stderr string
	err            error
}

func (f *fakeExec) exec(_ context.Context, ns, pod, container string, cmd []string, stdout, stderr io.Writer) error {
	f.calls = append(f.calls, execCall{ns, pod, container, cmd})
	io.WriteString(stdout, f.stdout)
	io.WriteString(stderr, f.stderr)
	return f.err
}

func exitErr(code int) error {
	return utilexec.CodeExitError{Err: fmt.Errorf("command terminated with exit code %d", code), Code: code}
}

// runWith runs `kubectl zq ARGS` against objs (and ZonedVolumes zvs).
func runWith(fe *fakeExec, objs []runtime.Object, zvs []runtime.Object, args ...string) (code int, stdout, stderr string) {
	conn := func(options) (*clients, error) {
		c := &clients{kube: fake.NewClientset(objs...), exec: fe.exec, namespace: "apps"}
		c.dyn = dynfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), driver.ClusterGVRs(), zvs...)
		return c, nil
	}
	var o, e bytes.Buffer
	code = run(context.Background(), args, Env{Stdout: &o, Stderr: &e}, conn)
	return code, o.String(), e.String()
}

const zrpOut = "start: 0x0, len 0x20000, cap 0x20000, wptr 0x10, zcond:2, [type: 2]\n"

func TestZones(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		cmd  []string
	}{
		{"default namespace from kubeconfig", []string{"zones", "data"},
			[]string{"/zq-csi", "volume", "zones", "--socket", "/var/lib/zq-csi/state/debug.sock", "--", volID}},
		{"flags after the PVC", []string{"zones", "data", "-n", "apps", "-o", "json", "--start", "2", "--count", "3"},
			[]string{"/zq-csi", "volume", "zones", "--socket", "/var/lib/zq-csi/state/debug.sock", "-o", "json", "--start", "2", "--count", "3", "--", volID}},
		{"driver namespace", []string{"zones", "--driver-namespace", "zq-system", "--namespace=apps", "data"},
			[]string{"/zq-csi", "volume", "zones", "--socket", "/var/lib/zq-csi/state/debug.sock", "--", volID}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fe := &fakeExec{stdout: zrpOut}
			code, out, errOut := runWith(fe, cluster(), nil, tc.args...)
			if code != 0 || out != zrpOut {
				t.Fatalf("exit %d, stdout %q, stderr %q", code, out, errOut)
			}
			want := execCall{"zq-system", "zq-csi-node-a1", "zq-csi", tc.cmd}
			if len(fe.calls) != 1 || fe.calls[0].ns != want.ns || fe.calls[0].pod != want.pod ||
				fe.calls[0].container != want.container || !slices.Equal(fe.calls[0].cmd, want.cmd) {
				t.Errorf("exec %+v, want %+v", fe.calls, want)
			}
		})
	}
}

func TestResolveErrors(t *testing.T) {
	hostPath := pv("pv-host", "", func(p *corev1.PersistentVolume) {
		p.Spec.PersistentVolumeSource = corev1.PersistentVolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/x"}}
	})
	ebs := pv("pv-ebs", "vol-1", func(p *corev1.PersistentVolume) { p.Spec.CSI.Driver = "ebs.csi.aws.com" })
	nowhere := pv("pv-nowhere", volID, func(p *corev1.PersistentVolume) {
		p.Spec.NodeAffinity = nil
		delete(p.Spec.CSI.VolumeAttributes, "node")
	})
	onC := pv("pv-c", volID, func(p *corev1.PersistentVolume) {
		p.Spec.NodeAffinity.Required.NodeSelectorTerms[0].MatchExpressions[0].Values = []string{"node-c"}
	})
	base := cluster()
	for _, tc := range []struct {
		name string
		objs []runtime.Object
		args []string
		msg  string
	}{
		{"PVC not found", base, []string{"zones", "nope"}, `PVC "nope" not found in namespace "apps"`},
		{"PVC in another namespace", base, []string{"zones", "data", "-n", "other"}, `PVC "data" not found in namespace "other"`},
		{"PVC pending", append(base, pvc("waiting", "", corev1.ClaimPending)), []string{"describe", "waiting"},
			"PVC apps/waiting is not bound (phase Pending); with a WaitForFirstConsumer storage class"},
		{"PV gone", append(base, pvc("orphan", "pv-gone", corev1.ClaimBound)), []string{"zones", "orphan"},
			"PVC apps/orphan is bound to PV pv-gone, which does not exist"},
		{"not CSI", append(base, pvc("host", "pv-host", corev1.ClaimBound), hostPath), []string{"zones", "host"},
			"PVC apps/host is bound to PV pv-host, which is not a CSI volume, so not a zq-csi volume (driver zq-csi.zq-csi.io)"},
		{"another driver", append(base, pvc("ebs", "pv-ebs", corev1.ClaimBound), ebs), []string{"zones", "ebs"},
			"PVC apps/ebs is bound to PV pv-ebs of CSI driver ebs.csi.aws.com: not a zq-csi volume (driver zq-csi.zq-csi.io; see --driver-name)"},
		{"no node", append(base, pvc("nowhere", "pv-nowhere", corev1.ClaimBound), nowhere), []string{"zones", "nowhere"},
			"cannot tell which node holds volume " + volID + " (PV pv-nowhere)"},
		{"no plugin on the node", append(base, pvc("c", "pv-c", corev1.ClaimBound), onC), []string{"zones", "c"},
			"no zq-csi node plugin pod (driver zq-csi.zq-csi.io, labels " + DefaultPluginSelector + ") on node node-c in all namespaces"},
		{"plugins in another namespace", base, []string{"zones", "data", "--driver-namespace", "kube-system"},
			"no zq-csi node plugin pod (driver zq-csi.zq-csi.io, labels " + DefaultPluginSelector + ") on node node-a in namespace kube-system"},
		{"plugin of another driver name", []runtime.Object{base[0], base[1], pluginPod("other-node-a", "node-a", func(p *corev1.Pod) {
			p.Spec.Containers[0].Args[3] = "--driver-name=zq-test.example.com"
		})}, []string{"zones", "data"}, "no zq-csi node plugin pod (driver zq-csi.zq-csi.io"},
		{"plugin not running", []runtime.Object{base[0], base[1], pluginPod("zq-csi-node-a1", "node-a", func(p *corev1.Pod) {
			p.Status = corev1.PodStatus{Phase: corev1.PodPending, ContainerStatuses: []corev1.ContainerStatus{{Name: "zq-csi",
				State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}}}}}
		})}, []string{"zones", "data"},
			"the zq-csi node plugin pod zq-system/zq-csi-node-a1 on node node-a is not running (phase Pending, container zq-csi waiting: ContainerCreating)"},
		{"plugin crashing", []runtime.Object{base[0], base[1], pluginPod("zq-csi-node-a1", "node-a", func(p *corev1.Pod) {
			p.Status.ContainerStatuses[0].State = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "CrashLoopBackOff"}}
		})}, []string{"zones", "data"}, "is not running (phase Running, container zq-csi waiting: CrashLoopBackOff)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fe := &fakeExec{stdout: zrpOut}
			code, out, errOut := runWith(fe, tc.objs, nil, tc.args...)
			if code != 1 || !strings.Contains(errOut, tc.msg) {
				t.Errorf("exit %d, stderr %q; want 1 and %q", code, errOut, tc.msg)
			}
			if tc.args[0] == "zones" && (len(fe.calls) != 0 || out != "") {
				t.Errorf("exec ran (%+v) or output %q", fe.calls, out)
			}
		})
	}
}

// TestNodeSources: the node comes from the PV's node affinity, else its
// node volume attribute, else the ZonedVolume.
func TestNodeSources(t *testing.T) {
	attrOnly := pv("pv-data", volID, func(p *corev1.PersistentVolume) {
		p.Spec.NodeAffinity = nil
		p.Spec.CSI.VolumeAttributes["node"] = "node-b"
	})
	zvOnly := pv("pv-data", volID, func(p *corev1.PersistentVolume) {
		p.Spec.NodeAffinity = nil
		delete(p.Spec.CSI.VolumeAttributes, "node")
	})
	zv := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": driver.CRDGroup + "/" + driver.CRDVersion, "kind": "ZonedVolume",
		"metadata": map[string]any{"name": volID},
		"spec":     map[string]any{"node": "node-b", "size": int64(512 << 20)},
		"status":   map[string]any{"phase": "Ready", "imagePath": "/var/lib/zq-csi/volumes/" + volID + ".qcow2", "zones": map[string]any{"summary": "conv=0 empty=8 open=0 closed=0 full=0"}},
	}}
	for _, tc := range []struct {
		name           string
		pv             *corev1.PersistentVolume
		zvs            []runtime.Object
		node, pod, src string
	}{
		{"affinity", pv("pv-data", volID, nil), nil, "node-a", "zq-csi-node-a1", "PV node affinity " + driver.TopologyKey},
		{"volume attribute", attrOnly, nil, "node-b", "zq-csi-node-b1", "PV volume attribute node"},
		{"ZonedVolume", zvOnly, []runtime.Object{zv}, "node-b", "zq-csi-node-b1", "ZonedVolume " + volID},
	} {
		t.Run(tc.name, func(t *testing.T) {
			objs := cluster()
			objs[1] = tc.pv
			fe := &fakeExec{stdout: "Volume: " + volID + "\n"}
			code, out, errOut := runWith(fe, objs, tc.zvs, "describe", "data")
			if code != 0 || len(fe.calls) != 1 || fe.calls[0].pod != tc.pod {
				t.Fatalf("exit %d, exec %+v, stderr %s", code, fe.calls, errOut)
			}
			if !strings.Contains(squeeze(out), "Node: "+tc.node+" (from "+tc.src+")") {
				t.Errorf("describe does not name the node's source %q:\n%s", tc.src, out)
			}
		})
	}
}

// squeeze collapses the alignment spaces of tabwriter output.
func squeeze(s string) string {
	var lines []string
	for _, l := range strings.Split(s, "\n") {
		lines = append(lines, strings.Join(strings.Fields(l), " "))
	}
	return strings.Join(lines, "\n")
}

func TestNotStaged(t *testing.T) {
	fe := &fakeExec{stderr: "zq-csi volume zones: volume " + volID + " is not staged on node node-a\n", err: exitErr(3)}
	code, _, errOut := runWith(fe, cluster(), nil, "zones", "data")
	want := "volume " + volID + " of PVC apps/data is not staged on node node-a"
	if code != 1 || !strings.Contains(errOut, want) || !strings.Contains(errOut, "(pods using it: apps/writer (Running on node-a))") {
		t.Errorf("exit %d, stderr %q", code, errOut)
	}
	// No pod uses it.
	objs := slices.DeleteFunc(cluster(), func(o runtime.Object) bool { p, ok := o.(*corev1.Pod); return ok && p.Name == "writer" })
	_, _, errOut = runWith(fe, objs, nil, "zones", "data")
	if !strings.Contains(errOut, "(no pod uses the PVC)") {
		t.Errorf("stderr %q", errOut)
	}
	// describe reports it and succeeds: it is the answer, not a failure.
	code, out, errOut := runWith(fe, objs, nil, "describe", "data")
	if code != 0 || !strings.Contains(out, "Staged: no; the node plugin serves the volume only while a pod using the PVC runs on node node-a") || !strings.Contains(out, "no pod uses the PVC") {
		t.Errorf("describe: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
}

func TestRemoteFailure(t *testing.T) {
	fe := &fakeExec{stderr: "zq-csi volume zones: cannot reach the node plugin's debug socket /var/lib/zq-csi/state/debug.sock\n", err: exitErr(1)}
	code, _, errOut := runWith(fe, cluster(), nil, "zones", "data")
	if code != 1 || !strings.Contains(errOut, "in node plugin pod zq-system/zq-csi-node-a1 (container zq-csi) on node node-a: zq-csi volume zones: cannot reach") {
		t.Errorf("exit %d, stderr %q", code, errOut)
	}
	// An exec that never ran (no pods/exec permission, say) shows its error.
	fe = &fakeExec{err: errors.New(`pods "zq-csi-node-a1" is forbidden: User "dev" cannot create resource "pods/exec"`)}
	code, _, errOut = runWith(fe, cluster(), nil, "zones", "data")
	if code != 1 || !strings.Contains(errOut, `cannot create resource "pods/exec"`) {
		t.Errorf("exit %d, stderr %q", code, errOut)
	}
}

func TestDescribe(t *testing.T) {
	remote := "Volume: " + volID + "\nAttachment: nbd, generation 2\n"
	fe := &fakeExec{stdout: remote}
	code, out, errOut := runWith(fe, cluster(), nil, "describe", "data")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	want := []string{
		"PVC: apps/data (Bound)", "PV: pv-data", "Volume: " + volID, "Driver: " + driver.DefaultDriverName,
		"Capacity: 512Mi (536870912 bytes)", "Storage class: zoned", "Volume mode: Block, ReadWriteOnce",
		"Reclaim policy: Delete", "Node: node-a (from PV node affinity " + driver.TopologyKey + ")",
		"Zone geometry: zone.conventional_zones=0", "zone.nr_zones=8", "zone.size=67108864",
		"Used by: apps/writer (Running on node-a)", "Node plugin: zq-system/zq-csi-node-a1 (container zq-csi)",
		"On node node-a (zq-csi volume describe):",
	}
	sq := squeeze(out)
	for _, w := range want {
		if !strings.Contains(sq, w+"\n") {
			t.Errorf("describe lacks %q:\n%s", w, out)
		}
	}
	if !strings.HasSuffix(out, remote) {
		t.Errorf("describe does not end with the plugin's output:\n%s", out)
	}
	if len(fe.calls) != 1 || !slices.Equal(fe.calls[0].cmd, []string{"/zq-csi", "volume", "describe", "--socket", "/var/lib/zq-csi/state/debug.sock", "--", volID}) {
		t.Errorf("exec %+v", fe.calls)
	}
	// -o json: the plugin's JSON alone.
	fe = &fakeExec{stdout: `{"id":"` + volID + `"}` + "\n"}
	code, out, _ = runWith(fe, cluster(), nil, "describe", "data", "-o", "json")
	if code != 0 || out != fe.stdout || !slices.Contains(fe.calls[0].cmd, "json") {
		t.Errorf("-o json: exit %d %q %+v", code, out, fe.calls)
	}
}

// TestPluginContainer: the socket follows the container's state and data
// directories, the binary its command.
func TestPluginContainer(t *testing.T) {
	for _, tc := range []struct {
		name         string
		ct           corev1.Container
		socket       string
		command      []string
		serves       string
		servesOthers bool
	}{
		{"chart", corev1.Container{Args: []string{"serve", "--state-dir=/s", "--data-dir=/d"}}, "/s/debug.sock", []string{"/zq-csi"}, driver.DefaultDriverName, false},
		{"data dir only", corev1.Container{Args: []string{"serve", "--data-dir", "/d"}}, "/d/state/debug.sock", []string{"/zq-csi"}, driver.DefaultDriverName, false},
		{"environment", corev1.Container{Args: []string{"serve"}, Env: []corev1.EnvVar{{Name: "ZQ_CSI_STATE_DIR", Value: "/e"}, {Name: "ZQ_CSI_DRIVER_NAME", Value: "x.example.com"}}},
			"/e/debug.sock", []string{"/zq-csi"}, "x.example.com", false},
		{"flag beats environment", corev1.Container{Args: []string{"serve", "-state-dir=/f"}, Env: []corev1.EnvVar{{Name: "ZQ_CSI_STATE_DIR", Value: "/e"}}},
			"/f/debug.sock", []string{"/zq-csi"}, driver.DefaultDriverName, false},
		{"defaults", corev1.Container{}, "/var/lib/zq-csi/state/debug.sock", []string{"/zq-csi"}, driver.DefaultDriverName, false},
		{"command", corev1.Container{Command: []string{"/usr/bin/zq-csi", "serve", "--mode=node"}}, "/var/lib/zq-csi/state/debug.sock", []string{"/usr/bin/zq-csi"}, driver.DefaultDriverName, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := debugSocket(&tc.ct); got != tc.socket {
				t.Errorf("socket %s, want %s", got, tc.socket)
			}
			if got := pluginCommand(&tc.ct); !slices.Equal(got, tc.command) {
				t.Errorf("command %q, want %q", got, tc.command)
			}
			if !servesDriver(&tc.ct, tc.serves) || servesDriver(&tc.ct, "other.example.com") {
				t.Errorf("servesDriver: want %s only", tc.serves)
			}
		})
	}
}

// TestRollingUpdate: of two plugin pods on the node, the running one.
func TestRollingUpdate(t *testing.T) {
	old := pluginPod("zq-csi-node-a0", "node-a", func(p *corev1.Pod) {
		p.Status.ContainerStatuses[0].State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{Reason: "Completed"}}
	})
	objs := append(cluster(), old)
	fe := &fakeExec{stdout: zrpOut}
	if code, _, errOut := runWith(fe, objs, nil, "zones", "data"); code != 0 || fe.calls[0].pod != "zq-csi-node-a1" {
		t.Errorf("exit %d %s, exec %+v", code, errOut, fe.calls)
	}
}

func TestUsage(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{nil, 2, "Usage: kubectl zq"},
		{[]string{"zones"}, 2, "missing PVC name"},
		{[]string{"zones", "a", "b"}, 2, `unexpected argument "b"`},
		{[]string{"zones", "a", "-o", "yaml"}, 2, "-o yaml: must be text, json, or for zones wide or svg"},
		{[]string{"describe", "a", "--count", "3"}, 2, "--start and --count apply to zones only"},
		{[]string{"frob"}, 2, `unknown command "frob"`},
		{[]string{"help"}, 0, ""},
	} {
		fe := &fakeExec{}
		code, out, errOut := runWith(fe, cluster(), nil, tc.args...)
		if code != tc.code || !strings.Contains(errOut, tc.msg) || len(fe.calls) != 0 {
			t.Errorf("%q: exit %d, stderr %q, stdout %q", tc.args, code, errOut, out)
		}
	}
}
