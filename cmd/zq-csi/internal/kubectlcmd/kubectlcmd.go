// Package kubectlcmd is the kubectl plugin `kubectl zq` (the zq-csi binary
// installed as kubectl-zq, or `zq-csi kubectl`). It follows a PVC to its
// PV, the node that holds the volume and the zq-csi node plugin pod on that
// node, and runs `zq-csi volume` in the plugin's container through the exec
// subresource: only the node plugin has a staged volume's live zone state.
package kubectlcmd

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/httpstream"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/remotecommand"

	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/volumecmd"
	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/zoneview"
	"github.com/zq-csi/zq-csi/pkg/driver"
)

// Env is what the command needs from its process.
type Env struct {
	Stdout, Stderr io.Writer
}

// DefaultPluginSelector selects the node plugin pods of the chart
// (charts/zq-csi/templates/node.yaml).
const DefaultPluginSelector = "app.kubernetes.io/name=zq-csi,app.kubernetes.io/component=node"

const usage = `Usage: kubectl zq <command> PVC [flags]

Shows a zq-csi volume as the node plugin that serves it sees it. The plugin
pod is found on the volume's node and 'zq-csi volume' runs in it through
'kubectl exec' (the pods/exec permission is needed).

Commands:
  zones PVC      the live zone report of the PVC's volume, in the format of
                 'zq-csi img io -c "zrp 0 N"' (512-byte sectors); -o json;
                 -o wide: a picture, a cell per zone coloured by condition and
                 filled up to the write pointer; -o svg: the same as an SVG file
  describe PVC   the PVC, its PV and zone geometry, the node, and the plugin's
                 view: image, device, attachment, zone states

Flags:
  -n, --namespace NS        the PVC's namespace (default: the kubeconfig context's)
  --kubeconfig PATH         kubeconfig file (default: $KUBECONFIG, ~/.kube/config)
  --context NAME            kubeconfig context
  --driver-namespace NS     where the node plugin pods run (default: all namespaces)
  --driver-name NAME        the CSI driver name (default ` + driver.DefaultDriverName + `)
  --plugin-selector SEL     label selector of the node plugin pods
                            (default ` + DefaultPluginSelector + `)
  -o FORMAT                 zones, describe: text (default) or json (the plugin's part);
                            zones: wide or svg (pictures)
  --start N, --count N      zones: report N zones from zone index N
`

type options struct {
	namespace, kubeconfig, context      string
	driverNamespace, driverName, output string
	selector                            string
	start, count                        int
}

// execFunc runs cmd in a container and streams its output; a command that
// ran and failed returns an error with ExitStatus() (client-go's
// exec.CodeExitError).
type execFunc func(ctx context.Context, namespace, pod, container string, cmd []string, stdout, stderr io.Writer) error

// clients are the API connections of one run; tests pass fakes.
type clients struct {
	kube kubernetes.Interface
	dyn  dynamic.Interface // nil: no ZonedVolume lookups
	exec execFunc
	// namespace is the kubeconfig context's namespace.
	namespace string
}

// Main runs `kubectl zq ARGS...` and returns the exit status.
func Main(args []string, env Env) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	return run(ctx, args, env, connect)
}

func run(ctx context.Context, args []string, env Env, conn func(options) (*clients, error)) int {
	if len(args) == 0 {
		fmt.Fprint(env.Stderr, usage)
		return volumecmd.ExitUsage
	}
	cmd := args[0]
	switch cmd {
	case "-h", "--help", "help":
		fmt.Fprint(env.Stdout, usage)
		return 0
	case "zones", "describe":
	default:
		fmt.Fprintf(env.Stderr, "kubectl zq: unknown command %q\n\n%s", cmd, usage)
		return volumecmd.ExitUsage
	}
	fs := flag.NewFlagSet("kubectl zq "+cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var o options
	fs.StringVar(&o.namespace, "n", "", "")
	fs.StringVar(&o.namespace, "namespace", "", "")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "")
	fs.StringVar(&o.context, "context", "", "")
	fs.StringVar(&o.driverNamespace, "driver-namespace", "", "")
	fs.StringVar(&o.driverName, "driver-name", driver.DefaultDriverName, "")
	fs.StringVar(&o.selector, "plugin-selector", DefaultPluginSelector, "")
	fs.StringVar(&o.output, "o", "text", "")
	fs.StringVar(&o.output, "output", "text", "")
	fs.IntVar(&o.start, "start", 0, "")
	fs.IntVar(&o.count, "count", -1, "")
	pos, err := volumecmd.ParseInterspersed(fs, args[1:])
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(env.Stdout, usage)
		return 0
	}
	switch {
	case err != nil:
	case len(pos) == 0:
		err = errors.New("missing PVC name")
	case len(pos) > 1:
		err = fmt.Errorf("unexpected argument %q", pos[1])
	case (o.output == "wide" || o.output == "svg") && cmd != "zones":
		err = fmt.Errorf("-o %s: a picture of the zones, for zones only; %s takes text or json", o.output, cmd)
	case o.output != "text" && o.output != "json" && o.output != "wide" && o.output != "svg":
		err = fmt.Errorf("-o %s: must be text, json, or for zones wide or svg (a picture)", o.output)
	case cmd != "zones" && (o.start != 0 || o.count != -1):
		err = errors.New("--start and --count apply to zones only")
	}
	if err != nil {
		fmt.Fprintf(env.Stderr, "kubectl zq %s: %v\nRun 'kubectl zq --help' for usage.\n", cmd, err)
		return volumecmd.ExitUsage
	}
	c, err := conn(o)
	if err != nil {
		fmt.Fprintf(env.Stderr, "kubectl zq: %v\n", err)
		return 1
	}
	if o.namespace == "" {
		o.namespace = c.namespace
	}
	if o.namespace == "" {
		o.namespace = "default"
	}
	if cmd == "zones" {
		err = zones(ctx, c, o, pos[0], env)
	} else {
		err = describe(ctx, c, o, pos[0], env)
	}
	if err != nil {
		fmt.Fprintf(env.Stderr, "kubectl zq %s: %v\n", cmd, err)
		return 1
	}
	return 0
}

// connect builds the clients from kubeconfig as kubectl does (the default
// loading rules: --kubeconfig, $KUBECONFIG, ~/.kube/config).
func connect(o options) (*clients, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = o.kubeconfig
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{CurrentContext: o.context})
	rc, err := cc.ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	rc.UserAgent = "kubectl-zq"
	ns, _, err := cc.Namespace()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	kube, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	return &clients{kube: kube, dyn: dyn, exec: podExec(rc, kube), namespace: ns}, nil
}

// podExec runs commands through the exec subresource: WebSocket first,
// SPDY when the API server (or a proxy) refuses the upgrade, as kubectl
// exec does.
func podExec(rc *rest.Config, kube kubernetes.Interface) execFunc {
	return func(ctx context.Context, ns, pod, container string, cmd []string, stdout, stderr io.Writer) error {
		req := kube.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name(pod).SubResource("exec").
			VersionedParams(&corev1.PodExecOptions{Container: container, Command: cmd, Stdout: true, Stderr: true}, scheme.ParameterCodec)
		spdy, err := remotecommand.NewSPDYExecutor(rc, "POST", req.URL())
		if err != nil {
			return err
		}
		ws, err := remotecommand.NewWebSocketExecutor(rc, "GET", req.URL().String())
		if err != nil {
			return err
		}
		ex, err := remotecommand.NewFallbackExecutor(ws, spdy, func(err error) bool {
			return httpstream.IsUpgradeFailure(err) || httpstream.IsHTTPSProxyError(err)
		})
		if err != nil {
			return err
		}
		return ex.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: stdout, Stderr: stderr})
	}
}

// exitStatus is the remote command's exit status, or -1 when err is not
// the exit of a command that ran.
func exitStatus(err error) int {
	var ee interface{ ExitStatus() int }
	if errors.As(err, &ee) {
		return ee.ExitStatus()
	}
	return -1
}

// volumeCommand is `zq-csi volume SUB ... ID` as the plugin container runs it.
func volumeCommand(p *plugin, sub string, o options, id string) []string {
	cmd := append(append([]string{}, p.Command...), "volume", sub, "--socket", p.Socket)
	if o.output == "json" {
		cmd = append(cmd, "-o", "json")
	}
	if sub == "zones" {
		if o.start > 0 {
			cmd = append(cmd, "--start", fmt.Sprint(o.start))
		}
		if o.count >= 0 {
			cmd = append(cmd, "--count", fmt.Sprint(o.count))
		}
	}
	return append(cmd, "--", id)
}

// runInPlugin runs `zq-csi volume SUB` for t's volume, streaming its
// output to stdout. A volume the plugin does not have staged is
// errNotStaged; other failures carry the plugin's message.
func runInPlugin(ctx context.Context, c *clients, p *plugin, t *target, sub string, o options, stdout io.Writer) error {
	var stderr bytes.Buffer
	err := c.exec(ctx, p.Pod.Namespace, p.Pod.Name, p.Container, volumeCommand(p, sub, o, t.VolumeID), stdout, &stderr)
	if err == nil {
		return nil
	}
	if exitStatus(err) == volumecmd.ExitNotStaged {
		return &notStagedError{t: t, users: podsUsing(ctx, c, t.PVC)}
	}
	msg := strings.TrimSpace(stderr.String())
	if msg == "" {
		msg = err.Error()
	}
	return fmt.Errorf("in node plugin pod %s/%s (container %s) on node %s: %s", p.Pod.Namespace, p.Pod.Name, p.Container, t.Node, msg)
}

// notStagedError: the plugin on the volume's node does not serve it,
// which means no pod using the PVC runs there now.
type notStagedError struct {
	t     *target
	users []string
}

func (e *notStagedError) Error() string {
	s := fmt.Sprintf("volume %s of PVC %s/%s is not staged on node %s: the node plugin serves a volume, and has its live zone state, only while a pod using the PVC runs there",
		e.t.VolumeID, e.t.PVC.Namespace, e.t.PVC.Name, e.t.Node)
	if len(e.users) == 0 {
		return s + " (no pod uses the PVC)"
	}
	return s + " (pods using it: " + strings.Join(e.users, ", ") + ")"
}

func zones(ctx context.Context, c *clients, o options, pvc string, env Env) error {
	t, err := resolveVolume(ctx, c, o.namespace, pvc, o.driverName)
	if err != nil {
		return err
	}
	p, err := findPlugin(ctx, c, t.Node, o)
	if err != nil {
		return err
	}
	if o.output != "wide" && o.output != "svg" {
		return runInPlugin(ctx, c, p, t, "zones", o, env.Stdout)
	}
	// Pictures are drawn here, from the plugin's JSON report: colours
	// depend on this terminal, and older plugin images draw none.
	pic := o.output
	o.output = "json"
	var js bytes.Buffer
	if err := runInPlugin(ctx, c, p, t, "zones", o, &js); err != nil {
		return err
	}
	var rep driver.DebugZoneReport
	if err := json.Unmarshal(js.Bytes(), &rep); err != nil {
		return fmt.Errorf("the zone report of node plugin pod %s/%s: %w", p.Pod.Namespace, p.Pod.Name, err)
	}
	rep.VolumeID = fmt.Sprintf("%s (PVC %s/%s)", rep.VolumeID, t.PVC.Namespace, t.PVC.Name)
	return volumecmd.ZonePicture(env.Stdout, &rep, pic, zoneview.ColorFor(env.Stdout, os.Getenv))
}

// podsUsing lists the pods of pvc's namespace that mount it, with their
// phase and node ("ns/name (Running on n1)"); best effort.
func podsUsing(ctx context.Context, c *clients, pvc *corev1.PersistentVolumeClaim) []string {
	pods, err := c.kube.CoreV1().Pods(pvc.Namespace).List(ctx, listAll)
	if err != nil {
		return nil
	}
	var out []string
	for _, p := range pods.Items {
		for _, v := range p.Spec.Volumes {
			if v.PersistentVolumeClaim != nil && v.PersistentVolumeClaim.ClaimName == pvc.Name {
				where := p.Spec.NodeName
				if where == "" {
					where = "no node yet"
				} else {
					where = "on " + where
				}
				out = append(out, fmt.Sprintf("%s/%s (%s %s)", p.Namespace, p.Name, p.Status.Phase, where))
				break
			}
		}
	}
	return out
}
