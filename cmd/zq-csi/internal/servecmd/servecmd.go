// Package servecmd is `zq-csi serve`: it parses flags (each also from an
// environment variable) into a driver.Config and runs the driver.
package servecmd

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	"k8s.io/klog/v2/textlogger"

	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/cli"

	"github.com/zq-csi/zq-csi/pkg/driver"
	"github.com/zq-csi/zq-csi/pkg/driver/registration"
	"github.com/zq-csi/zq-csi/pkg/nbdattach"
)

// Env is what the command needs from its process.
type Env struct {
	Stdout, Stderr io.Writer
	Getenv         func(string) string // nil: os.Getenv
	Version        string
	// Context, when set, ends the server as SIGINT/SIGTERM do (tests).
	Context context.Context
}

type options struct {
	endpoint, mode, nodeID, dataDir, stateDir, driverName, attacher string
	backend, kubeconfig                                             string
	maxVolumes                                                      int64
	kubeQPS                                                         float64
	ublkQueues                                                      int
	kubeBurst                                                       int
	verbosity                                                       verbosity
	logToStderr                                                     bool
	exporter                                                        string
	kubeletRegDir, kubeletRegPath                                   string
	orphanGrace                                                     time.Duration
	metricsAddress                                                  string
}

// verbosity is --v: klog's level, checked where it is given so that a bad
// value is refused with the flag's rule, not a strconv error.
type verbosity int

func (v *verbosity) String() string { return strconv.Itoa(int(*v)) }
func (v *verbosity) Set(s string) error {
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > 10 {
		return fmt.Errorf("must be a whole number from 0 to 10 (2: every CSI call)")
	}
	*v = verbosity(n)
	return nil
}

// envNames lists, per flag, the environment variables read when the flag
// is not given (first set one wins). The CSI_ENDPOINT and node-name
// spellings are the ones Kubernetes manifests conventionally use.
var envNames = map[string][]string{
	"endpoint":        {"ZQ_CSI_ENDPOINT", "CSI_ENDPOINT"},
	"mode":            {"ZQ_CSI_MODE"},
	"node-id":         {"ZQ_CSI_NODE_ID", "NODE_NAME", "KUBE_NODE_NAME"},
	"data-dir":        {"ZQ_CSI_DATA_DIR"},
	"state-dir":       {"ZQ_CSI_STATE_DIR"},
	"driver-name":     {"ZQ_CSI_DRIVER_NAME"},
	"attacher":        {"ZQ_CSI_ATTACHER"},
	"max-volumes":     {"ZQ_CSI_MAX_VOLUMES"},
	"backend":         {"ZQ_CSI_BACKEND"},
	"kubeconfig":      {"KUBECONFIG"},
	"kube-api-qps":    {"ZQ_CSI_KUBE_API_QPS"},
	"kube-api-burst":  {"ZQ_CSI_KUBE_API_BURST"},
	"v":               {"ZQ_CSI_V"},
	"exporter":        {"ZQ_CSI_EXPORTER"},
	"ublk-queues":     {"ZQ_CSI_UBLK_QUEUES"},
	"orphan-grace":    {"ZQ_CSI_ORPHAN_GRACE"},
	"metrics-address": {"ZQ_CSI_METRICS_ADDRESS"},

	"kubelet-registration-dir":  {"ZQ_CSI_KUBELET_REGISTRATION_DIR"},
	"kubelet-registration-path": {"ZQ_CSI_KUBELET_PLUGIN_SOCKET"},
}

const usage = `Usage: zq-csi serve [flags]

Runs the zq-csi CSI driver. Every flag can also be given by the environment
variable shown in brackets; a flag on the command line wins. One process
per --state-dir: a second one on the same state directory (or on an
endpoint a process answers on) refuses to start.

Flags:
`

func newFlags(o *options) *flag.FlagSet {
	fs := flag.NewFlagSet("zq-csi serve", flag.ContinueOnError)
	// The flag package would print the whole usage after every error; a
	// usage error is one line here (cli.FlagError), help is --help.
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.endpoint, "endpoint", "unix:///csi/csi.sock", "CSI endpoint: unix:///path or tcp://host:port")
	fs.StringVar(&o.mode, "mode", "all", "services to run: controller, node or all (controller and node in one process, local backend)")
	fs.StringVar(&o.nodeID, "node-id", "", "this node's name (the topology.zq-csi/node segment); required")
	fs.StringVar(&o.dataDir, "data-dir", "/var/lib/zq-csi", "directory holding the volume and snapshot images")
	fs.StringVar(&o.stateDir, "state-dir", "", "directory holding records and attachment state (default <data-dir>/state); must survive plugin restarts")
	fs.StringVar(&o.driverName, "driver-name", driver.DefaultDriverName, "CSI driver name")
	fs.StringVar(&o.attacher, "attacher", "nbd", "how staged volumes reach the kernel: nbd (netlink NBD), fuse-loop (a FUSE file with a loop device, for nodes without nbd), auto (nbd when the module is present or loads, else fuse-loop), or file (a stand-in file for conformance runs on machines without nbd; data does not reach the image)")
	fs.Int64Var(&o.maxVolumes, "max-volumes", 0, "volumes per node reported by NodeGetInfo (0: the attacher's device count)")
	fs.StringVar(&o.backend, "backend", "local", "where the controller keeps records and how image work reaches nodes: local (one process, --mode all) or cluster (ZonedVolume resources in the API server; node agents in --mode node do the image work)")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig for --backend cluster (default: the in-cluster service account)")
	fs.Float64Var(&o.kubeQPS, "kube-api-qps", 50, "requests per second to the API server (--backend cluster; a CreateVolume makes about 7)")
	fs.IntVar(&o.kubeBurst, "kube-api-burst", 100, "burst of requests to the API server (--backend cluster)")
	fs.Var(&o.verbosity, "v", "log verbosity, 0 to 10 (2: every CSI call, secrets stripped)")
	o.logToStderr = true
	fs.BoolVar(&o.logToStderr, "logtostderr", true, "accepted as the other Kubernetes components accept it: zq-csi always logs to stderr (false is refused)")
	fs.StringVar(&o.exporter, "exporter", "auto", "the exporters this node offers: auto (ublk as well as --attacher when /dev/ublk-control exists, or modprobe ublk_drv loads it, and the kernel has zoned ublk), nbd (--attacher only), or ublk (as auto, but fail at start without zoned ublk); volumes pick with their exporter parameter")
	fs.IntVar(&o.ublkQueues, "ublk-queues", 1, "hardware queues of each ublk device, a thread each (0: one per CPU, at most 4); two queues measured slower than one in the VM lane (2 vCPUs: 0.80x zoned write, 0.87x random read), try more on nodes with many real CPUs")
	fs.DurationVar(&o.orphanGrace, "orphan-grace", driver.DefaultOrphanGrace, "how long a volume or snapshot may stay half-created (an interrupted CreateVolume that nobody retries) before the controller removes it and its partial image; 0 or less: never")
	fs.StringVar(&o.metricsAddress, "metrics-address", "", "host:port to serve Prometheus metrics on at /metrics (CSI operations, per staged volume zones, bytes and zone-rule refusals, export latency, node data-dir space); empty: no metrics server")
	fs.StringVar(&o.kubeletRegDir, "kubelet-registration-dir", "", "the kubelet's plugins_registry directory: when set, the node plugin registers itself with the kubelet there (no csi-node-driver-registrar sidecar)")
	fs.StringVar(&o.kubeletRegPath, "kubelet-registration-path", "", "the CSI socket's path as the kubelet dials it, on the host (default: the --endpoint path)")
	return fs
}

// writeHelp prints the usage with every flag once: its environment
// variables, what it does and its default (unless the text already says).
func writeHelp(w io.Writer, fs *flag.FlagSet) {
	fmt.Fprint(w, usage)
	fs.VisitAll(func(f *flag.Flag) {
		line := "  --" + f.Name
		if env := envNames[f.Name]; len(env) > 0 {
			line += " [" + strings.Join(env, ", ") + "]"
		}
		text := f.Usage
		if f.DefValue != "" && !strings.Contains(text, "(default") {
			text += " (default " + f.DefValue + ")"
		}
		fmt.Fprintf(w, "%s\n\t%s\n", line, text)
	})
}

// Main runs `zq-csi serve` until SIGINT/SIGTERM and returns the exit code:
// 0 after a clean stop, 1 when serving fails, 2 for a bad invocation (which
// touches nothing on disk).
func Main(args []string, env Env) int {
	if env.Getenv == nil {
		env.Getenv = os.Getenv
	}
	var o options
	fs := newFlags(&o)
	if err := fs.Parse(args); err != nil {
		if cli.IsHelp(err) {
			writeHelp(env.Stdout, fs)
			return cli.ExitOK
		}
		return cli.FlagError(env.Stderr, "zq-csi serve", fs, err, "zq-csi serve")
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(env.Stderr, "zq-csi serve: unexpected argument %q (serve takes flags only)\nRun 'zq-csi serve --help' for usage.\n", fs.Arg(0))
		return cli.ExitUsage
	}
	if err := fromEnv(fs, env.Getenv); err != nil {
		fmt.Fprintf(env.Stderr, "zq-csi serve: %v\n", err)
		return cli.ExitUsage
	}
	if o.stateDir == "" {
		o.stateDir = filepath.Join(o.dataDir, "state")
	}
	if err := o.check(); err != nil {
		fmt.Fprintf(env.Stderr, "zq-csi serve: %v\nRun 'zq-csi serve --help' for usage.\n", err)
		return cli.ExitUsage
	}
	// First thing on disk: the state directory's lock. Everything after
	// (attacher records, recovery, sockets) belongs to its holder.
	lock, err := driver.LockStateDir(o.stateDir)
	if err != nil {
		fmt.Fprintf(env.Stderr, "zq-csi serve: %v\n", err)
		return cli.ExitError
	}
	defer lock.Unlock()
	flush := setupLogging(env.Stderr, int(o.verbosity))
	defer flush()

	ctx := env.Context
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o, env.Version); err != nil {
		fmt.Fprintf(env.Stderr, "zq-csi serve: %v\n", err)
		return cli.ExitError
	}
	return cli.ExitOK
}

// setupLogging sends klog's output, once per entry, to w. klog's own file
// output with SetOutput writes each entry to the writer of its severity
// and of every lower one, and errors to os.Stderr besides: an error
// appeared four times. A text logger writing klog's formatted lines is one
// output. It is installed once per process (klog is global); later calls
// (tests running serve more than once) only change the writer and the
// verbosity, which klog itself applies.
func setupLogging(w io.Writer, v int) (flush func()) {
	logOnce.Do(func() {
		klog.InitFlags(klogFlags)
		// klog's -v filters; the text logger passes what klog lets through.
		cfg := textlogger.NewConfig(textlogger.Verbosity(10), textlogger.Output(logOut))
		klog.SetLoggerWithOptions(textlogger.NewLogger(cfg))
	})
	logOut.set(w)
	klogFlags.Set("v", strconv.Itoa(v))
	return klog.Flush
}

var (
	logOnce   sync.Once
	klogFlags = flag.NewFlagSet("klog", flag.ContinueOnError)
	logOut    = &swapWriter{}
)

// swapWriter is the log's destination, replaceable while logging.
type swapWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *swapWriter) set(w io.Writer) {
	s.mu.Lock()
	s.w = w
	s.mu.Unlock()
}

func (s *swapWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.w == nil {
		return len(p), nil
	}
	return s.w.Write(p)
}

// check validates the flags before anything is created: a bad invocation
// leaves nothing behind.
func (o options) check() error {
	if !o.logToStderr {
		return errors.New("--logtostderr=false: zq-csi logs to stderr only (collect it there, as the kubelet does)")
	}
	if _, _, err := driver.ParseEndpoint(o.endpoint); err != nil {
		return fmt.Errorf("--endpoint=%s: %w", o.endpoint, err)
	}
	switch o.mode {
	case "controller", "node", "all":
	default:
		return fmt.Errorf("--mode=%s: must be controller, node or all", o.mode)
	}
	switch o.backend {
	case "local", "cluster":
	default:
		return fmt.Errorf("--backend=%s: must be local or cluster", o.backend)
	}
	switch o.attacher {
	case "nbd", "fuse-loop", "auto", "file":
	default:
		return fmt.Errorf("--attacher=%s: must be nbd, fuse-loop, auto or file", o.attacher)
	}
	switch o.exporter {
	case "auto", "nbd", "ublk":
	default:
		return fmt.Errorf("--exporter=%s: must be auto, nbd or ublk", o.exporter)
	}
	if o.nodeID == "" {
		return errors.New("--node-id is required (the node's name, the topology.zq-csi/node segment; or NODE_NAME)")
	}
	if o.maxVolumes < 0 {
		return fmt.Errorf("--max-volumes=%d: must be 0 (the attacher's device count) or more", o.maxVolumes)
	}
	if o.ublkQueues < 0 || o.ublkQueues > 4096 {
		return fmt.Errorf("--ublk-queues=%d: must be 0 (one per CPU, at most 4) to 4096", o.ublkQueues)
	}
	if o.backend == "cluster" && (o.kubeQPS <= 0 || o.kubeBurst <= 0) {
		return fmt.Errorf("--kube-api-qps=%v --kube-api-burst=%d: both must be positive", o.kubeQPS, o.kubeBurst)
	}
	if o.metricsAddress != "" {
		if _, _, err := net.SplitHostPort(o.metricsAddress); err != nil {
			return fmt.Errorf("--metrics-address=%s: must be host:port (e.g. :9809, 127.0.0.1:0): %v", o.metricsAddress, err)
		}
	}
	if o.kubeletRegDir != "" && o.mode == "controller" {
		return errors.New("--kubelet-registration-dir: only the node plugin (--mode node or all) registers with the kubelet")
	}
	return o.config().Check()
}

// config is the driver configuration of the flags (without attachers).
func (o options) config() driver.Config {
	grace := o.orphanGrace
	if grace <= 0 {
		grace = -1 // off
	}
	return driver.Config{
		DriverName:        o.driverName,
		NodeID:            o.nodeID,
		Mode:              driver.Mode(o.mode),
		DataDir:           o.dataDir,
		StateDir:          o.stateDir,
		MaxVolumesPerNode: o.maxVolumes,
		OrphanGrace:       grace,
	}
}

// fromEnv fills every flag not set on the command line from its variables.
func fromEnv(fs *flag.FlagSet, getenv func(string) string) error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || err != nil {
			return
		}
		for _, name := range envNames[f.Name] {
			if v := getenv(name); v != "" {
				if e := f.Value.Set(v); e != nil {
					err = fmt.Errorf("%s=%s: %v", name, v, e)
				}
				return
			}
		}
	})
	return err
}

func run(ctx context.Context, o options, version string) (err error) {
	cfg := o.config()
	cfg.Version = version
	var kube dynamic.Interface
	switch o.backend {
	case "local":
	case "cluster":
		rc, err := restConfig(o.kubeconfig, float32(o.kubeQPS), o.kubeBurst)
		if err != nil {
			return err
		}
		if kube, err = dynamic.NewForConfig(rc); err != nil {
			return err
		}
		onEvent, stopEvents, err := eventRecorder(rc, o)
		if err != nil {
			return err
		}
		defer stopEvents()
		cfg.OnEvent = onEvent
		if cfg.Mode != driver.ModeNode {
			cfg.Backend = driver.NewClusterBackend(kube, driver.ClusterBackendOptions{})
		}
	default:
		return fmt.Errorf("--backend=%s: must be local or cluster", o.backend)
	}
	if cfg.Mode != driver.ModeController {
		att, err := newAttacher(o.attacher, filepath.Join(o.stateDir, "attach-"+o.attacher))
		if err != nil {
			return err
		}
		if s, ok := att.(interface{ Shutdown(context.Context) error }); ok {
			defer s.Shutdown(context.Background())
		}
		cfg.Attacher = att
		zatt, why, err := newZonedAttacher(o.exporter, filepath.Join(o.stateDir, "attach-ublk"), o.ublkQueues)
		if err != nil {
			return err
		}
		if zatt != nil {
			// A graceful stop leaves the devices to the next process's Recover.
			defer zatt.Abandon()
			cfg.ZonedAttacher = zatt
		}
		cfg.ZonedUnavailable = why
	}
	d, err := driver.New(cfg)
	if err != nil {
		return err
	}
	if o.metricsAddress != "" {
		addr, stopMetrics, err := d.ServeMetrics(o.metricsAddress)
		if err != nil {
			return fmt.Errorf("--metrics-address=%s: %w", o.metricsAddress, err)
		}
		defer stopMetrics()
		klog.InfoS("Serving metrics", "address", addr, "path", "/metrics")
	}
	if cfg.Mode != driver.ModeController { // read by `zq-csi volume` and `kubectl zq`
		if stopDebug, err := d.ServeDebug(filepath.Join(o.stateDir, driver.DebugSocketName)); err != nil {
			klog.ErrorS(err, "No debug API on this node: zq-csi volume and kubectl zq will not reach it")
		} else {
			defer stopDebug()
		}
	}
	if o.kubeletRegDir != "" {
		var stopReg func() error
		if ctx, stopReg, err = registerWithKubelet(ctx, o); err != nil {
			return err
		}
		defer func() { err = errors.Join(err, stopReg()) }()
	}
	if kube == nil || cfg.Mode == driver.ModeController {
		return d.Run(ctx, o.endpoint)
	}
	// Cluster node: the CSI services and the node agent; either ending
	// with an error stops the other.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	agentErr := make(chan error, 1)
	go func() {
		err := d.RunNodeAgent(ctx, kube, driver.NodeAgentConfig{})
		if err != nil {
			cancel()
		}
		agentErr <- err
	}()
	err = d.Run(ctx, o.endpoint)
	cancel()
	if aerr := <-agentErr; aerr != nil {
		return fmt.Errorf("node agent: %w", aerr)
	}
	return err
}

// restConfig is the API server named by kubeconfig, or the one this pod
// runs under.
func restConfig(kubeconfig string, qps float32, burst int) (*rest.Config, error) {
	if qps <= 0 || burst <= 0 {
		return nil, fmt.Errorf("--kube-api-qps=%v --kube-api-burst=%d: both must be positive", qps, burst)
	}
	var rc *rest.Config
	var err error
	if kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("--backend=cluster: API server config (--kubeconfig or in-cluster): %w", err)
	}
	rc.UserAgent = "zq-csi"
	rc.QPS, rc.Burst = qps, burst
	return rc, nil
}

func newAttacher(kind, stateDir string) (nbdattach.Attacher, error) {
	switch kind {
	case "file":
		klog.InfoS("Using the file attacher: staged volumes are stand-in files and data written to them does not reach the images; for conformance tests only")
		return driver.NewFileAttacher(stateDir, 0)
	case "nbd":
		return newNBDAttacher(stateDir)
	case "fuse-loop":
		klog.InfoS("Using the fuse-loop attacher: volumes are FUSE files of this process with loop devices on top; they do not survive a restart of the node plugin without I/O errors")
		return newFuseLoopAttacher(stateDir)
	case "auto":
		chosen, reason := chooseAttacher()
		klog.InfoS("Chose the attacher", "attacher", chosen, "reason", reason)
		// Records live per resolved kind: attach-nbd or attach-fuse-loop.
		return newAttacher(chosen, filepath.Join(filepath.Dir(stateDir), "attach-"+chosen))
	}
	return nil, fmt.Errorf("--attacher=%s: must be nbd, fuse-loop, auto or file", kind)
}

// registerWithKubelet serves the kubelet's plugin registration API beside
// the CSI socket (pkg/driver/registration). The returned context ends with
// parent or when registration fails; stop ends registration and returns
// its error.
func registerWithKubelet(parent context.Context, o options) (ctx context.Context, stop func() error, err error) {
	if driver.Mode(o.mode) == driver.ModeController {
		return nil, nil, errors.New("--kubelet-registration-dir: only the node plugin (--mode node or all) registers with the kubelet")
	}
	local := ""
	if p, ok := strings.CutPrefix(o.endpoint, "unix://"); ok {
		local = p
	} else if !strings.Contains(o.endpoint, "://") {
		local = o.endpoint
	}
	endpoint := o.kubeletRegPath
	if endpoint == "" {
		endpoint = local
	}
	ctx, cancel := context.WithCancel(parent)
	errc := make(chan error, 1)
	go func() {
		err := registration.Serve(ctx, registration.Config{
			DriverName: o.driverName, Endpoint: endpoint, Dir: o.kubeletRegDir, WaitFor: local,
			OnStatus: func(err error) {
				if err != nil {
					klog.ErrorS(err, "Kubelet plugin registration failed; the kubelet retries", "driver", o.driverName)
					return
				}
				klog.InfoS("Registered with the kubelet", "driver", o.driverName, "endpoint", endpoint)
			},
		})
		if err != nil {
			cancel()
		}
		errc <- err
	}()
	klog.InfoS("Serving kubelet plugin registration", "socket", registration.SocketPath(o.kubeletRegDir, o.driverName), "endpoint", endpoint)
	return ctx, func() error {
		cancel()
		if err := <-errc; err != nil {
			return fmt.Errorf("kubelet registration: %w", err)
		}
		return nil
	}, nil
}
