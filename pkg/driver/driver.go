package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	mount "k8s.io/mount-utils"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
)

// Mode selects the services a process serves.
type Mode string

const (
	ModeController Mode = "controller"
	ModeNode       Mode = "node"
	ModeAll        Mode = "all"
)

// TopologyKey is the topology segment naming the node that holds a volume.
const TopologyKey = "topology.zq-csi/node"

// DefaultDriverName is the CSI driver name unless configured otherwise.
const DefaultDriverName = "zq-csi.zq-csi.io"

// Config configures a Driver.
type Config struct {
	DriverName string // default DefaultDriverName
	Version    string
	NodeID     string
	Mode       Mode
	DataDir    string // images (node, and the local backend)
	StateDir   string // records: controller (local backend) and node attachments

	// Attacher exposes staged volumes (node and all modes): the node's
	// ordinary attacher (nbd, fuse-loop or file), used for exporter=nbd,
	// and for exporter=auto where ZonedAttacher is nil.
	Attacher nbdattach.Attacher
	// ZonedAttacher, when set, exposes volumes as true host-managed zoned
	// block devices (the ublk attacher): exporter=ublk, and exporter=auto.
	// Nil where the node has no zoned ublk; ZonedUnavailable then says
	// what the node lacks, for the FailedPrecondition of exporter=ublk.
	// Its records must not be the ordinary attacher's (distinct kinds and
	// state directories): each Recovers its own.
	ZonedAttacher    nbdattach.Attacher
	ZonedUnavailable string
	// MaxVolumesPerNode overrides what NodeGetInfo reports; 0 asks the
	// attacher (MaxDevices) and reports no limit if it cannot say.
	MaxVolumesPerNode int64
	// Mounter bind-mounts devices onto publish targets; nil uses the
	// system's mount(8).
	Mounter mount.Interface
	// Backend overrides the controller's backend; nil uses the local one.
	Backend Backend
	// OnEvent, when set, hears of the events the driver logs (quarantined
	// records, clamped zone limits, collected orphans): the hook for a
	// Kubernetes event recorder.
	OnEvent func(Event)
	// OrphanGrace is how long a volume or snapshot may stay "creating"
	// (an interrupted CreateVolume or CreateSnapshot) before the
	// controller removes it and its partial image; 0 takes
	// DefaultOrphanGrace, a negative value turns the collection off.
	OrphanGrace time.Duration
}

// Driver is one zq-csi plugin process.
type Driver struct {
	cfg     Config
	images  *Images
	backend Backend // nil in node mode
	node    *nodeState
	ready   atomic.Bool

	ctrlLocks *keyLocks
	nodeLocks *keyLocks

	metrics  *metrics        // metrics.go
	refusals *refusalLimiter // eventlimit.go
}

var driverNamePattern = regexp.MustCompile(`^[a-zA-Z][A-Za-z0-9-._]{0,61}[a-zA-Z]$`)

// Check validates cfg without touching anything (New checks it again):
// a command can refuse a bad invocation before it creates a directory.
func (cfg Config) Check() error {
	_, err := cfg.withDefaults()
	return err
}

func (cfg Config) withDefaults() (Config, error) {
	if cfg.DriverName == "" {
		cfg.DriverName = DefaultDriverName
	}
	if !driverNamePattern.MatchString(cfg.DriverName) {
		return cfg, fmt.Errorf("driver name %q: must be 2-63 characters, start and end with a letter, and hold only letters, digits, '-', '.' and '_'", cfg.DriverName)
	}
	if cfg.Version == "" {
		cfg.Version = "dev"
	}
	switch cfg.Mode {
	case ModeController, ModeNode, ModeAll:
	case "":
		cfg.Mode = ModeAll
	default:
		return cfg, fmt.Errorf("mode %q: must be controller, node or all", cfg.Mode)
	}
	if cfg.NodeID == "" {
		return cfg, errors.New("node id is required (the node name, used as the topology segment)")
	}
	if cfg.DataDir == "" || cfg.StateDir == "" {
		return cfg, errors.New("data dir and state dir are required")
	}
	if cfg.MaxVolumesPerNode < 0 {
		return cfg, fmt.Errorf("max volumes per node %d: must be 0 (ask the attacher) or more", cfg.MaxVolumesPerNode)
	}
	if cfg.OrphanGrace == 0 {
		cfg.OrphanGrace = DefaultOrphanGrace
	}
	return cfg, nil
}

// New validates cfg and opens the state it names. Call Recover before
// serving the node service.
func New(cfg Config) (*Driver, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	d := &Driver{cfg: cfg, ctrlLocks: newKeyLocks(), nodeLocks: newKeyLocks(), refusals: newRefusalLimiter()}
	d.metrics = newMetrics(d)
	if d.images, err = NewImages(cfg.DataDir); err != nil {
		return nil, err
	}
	if cfg.Mode != ModeNode {
		d.backend = cfg.Backend
		if d.backend == nil {
			store, err := NewFileStore(filepath.Join(cfg.StateDir, "controller"))
			if err != nil {
				return nil, err
			}
			d.backend = NewLocalBackend(store, d.images, cfg.NodeID)
		}
	}
	if cfg.Mode != ModeController {
		if cfg.Attacher == nil {
			return nil, errors.New("node mode needs an attacher")
		}
		if cfg.ZonedAttacher != nil && cfg.ZonedAttacher.Kind() == cfg.Attacher.Kind() {
			return nil, fmt.Errorf("the zoned attacher and the ordinary attacher are both of kind %q: staged volumes name their attacher by kind", cfg.Attacher.Kind())
		}
		if d.cfg.Mounter == nil {
			d.cfg.Mounter = mount.NewWithoutSystemd("")
		}
		if d.node, err = openNodeState(filepath.Join(cfg.StateDir, "node")); err != nil {
			return nil, err
		}
	} else {
		d.ready.Store(true)
	}
	d.reportQuarantined(d.storeQuarantined())
	return d, nil
}

// Recover re-establishes the attachments of an earlier run (DESIGN.md
// point 5) before the node service answers: each attacher (the ordinary
// one and the zoned one) takes back its recorded devices, reopening each
// volume's image. Probe reports not ready until both have run.
func (d *Driver) Recover(ctx context.Context) error {
	if d.node == nil {
		d.ready.Store(true)
		return nil
	}
	auto, why := d.autoExporter()
	klog.InfoS("Exporters of this node", "attacher", d.cfg.Attacher.Kind(), "zonedAttacher", kindOrNone(d.cfg.ZonedAttacher),
		"auto", auto.Kind(), "reason", why, ExporterTopologyKey, d.exporterSegment())
	live := map[string]string{} // volume id → kind of the attacher serving it
	var errs []error
	for _, att := range d.attachers() {
		open := func(a nbdattach.Attachment) (nbdattach.Backend, error) {
			s, err := d.images.acquire(a.VolumeID)
			if err != nil {
				return nil, err
			}
			return d.newSlotBackend(a.VolumeID, s, a.ReadOnly, att.Kind()), nil
		}
		start := time.Now()
		atts, err := att.Recover(ctx, open)
		d.metrics.recoveryDur.WithLabelValues(att.Kind()).Set(time.Since(start).Seconds())
		d.metrics.recovered.WithLabelValues(att.Kind()).Add(float64(len(atts)))
		klog.InfoS("Recovered attachments", "count", len(atts), "attacher", att.Kind())
		if err != nil {
			errs = append(errs, fmt.Errorf("recover %s attachments: %w", att.Kind(), err))
		}
		for _, a := range atts {
			live[a.VolumeID] = att.Kind()
			d.event(Event{Type: EventNormal, Reason: ReasonVolumeRecovered, VolumeID: a.VolumeID,
				Message: fmt.Sprintf("attachment %s taken back by the %s exporter after the node plugin restarted (recovery took %s)",
					a.DevicePath, att.Kind(), time.Since(start).Round(time.Millisecond))})
		}
	}
	d.reportQuarantined(d.attacherQuarantined())
	if err := errors.Join(errs...); err != nil {
		return err
	}
	// Node records whose attachment did not come back (in the attacher
	// that staged them) are stale.
	for _, st := range d.node.list() {
		if a := d.attacherOf(st); a == nil || live[st.ID] != a.Kind() {
			klog.InfoS("Volume staged before the restart has no attachment any more", "volumeID", st.ID, "attacher", st.attacherKind(d.cfg.Attacher))
			st.Lost = true
			if err := d.node.put(st); err != nil {
				return err
			}
			d.metrics.lost.WithLabelValues(st.attacherKind(d.cfg.Attacher)).Inc()
			d.metrics.forget(st.ID)
			d.event(Event{Type: EventWarning, Reason: ReasonVolumeLost, VolumeID: st.ID,
				Message: fmt.Sprintf("volume was staged through the %s exporter before the node plugin restarted and its attachment did not come back; it must be staged again", st.attacherKind(d.cfg.Attacher))})
		}
	}
	d.ready.Store(true)
	return nil
}

func kindOrNone(a nbdattach.Attacher) string {
	if a == nil {
		return "none"
	}
	return a.Kind()
}

// Register adds the services of mode to s (identity always).
func (d *Driver) Register(s *grpc.Server, mode Mode) {
	csi.RegisterIdentityServer(s, &identityServer{d: d})
	if mode != ModeNode && d.backend != nil {
		csi.RegisterControllerServer(s, &controllerServer{d: d})
		csi.RegisterGroupControllerServer(s, &groupControllerServer{d: d})
	}
	if mode != ModeController && d.node != nil {
		csi.RegisterNodeServer(s, &nodeServer{d: d})
	}
}

// NewServer returns a gRPC server with the services of mode and the
// logging interceptor.
func (d *Driver) NewServer(mode Mode) *grpc.Server {
	s := grpc.NewServer(grpc.UnaryInterceptor(d.UnaryInterceptor()))
	d.Register(s, mode)
	return s
}

// ParseEndpoint splits a CSI endpoint, unix:///path (or a bare path) or
// tcp://host:port, into a network and an address for net.Listen.
func ParseEndpoint(endpoint string) (network, addr string, err error) {
	network, addr = "unix", endpoint
	if strings.Contains(endpoint, "://") {
		u, err := url.Parse(endpoint)
		if err != nil {
			return "", "", fmt.Errorf("endpoint %q: %w", endpoint, err)
		}
		network = u.Scheme
		switch network {
		case "unix":
			addr = u.Path
			if addr == "" {
				addr = u.Host + u.Opaque
			}
		case "tcp":
			addr = u.Host
		default:
			return "", "", fmt.Errorf("endpoint %q: scheme must be unix or tcp", endpoint)
		}
	}
	if addr == "" {
		return "", "", fmt.Errorf("endpoint %q: no socket path or address", endpoint)
	}
	return network, addr, nil
}

// Listen opens a CSI endpoint (see ParseEndpoint). A stale unix socket
// file is removed first; one that a process still answers on is not.
func Listen(endpoint string) (net.Listener, error) {
	network, addr, err := ParseEndpoint(endpoint)
	if err != nil {
		return nil, err
	}
	if network == "unix" {
		if err := os.MkdirAll(filepath.Dir(addr), 0o750); err != nil {
			return nil, err
		}
		// A socket someone still answers on is not stale: removing it would
		// silently take the endpoint over from a running plugin.
		if c, err := net.DialTimeout("unix", addr, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("endpoint %q: %s is in use: another process serves on it (a second zq-csi serve?)", endpoint, addr)
		}
		if err := os.Remove(addr); err != nil && !os.IsNotExist(err) {
			return nil, fmt.Errorf("remove stale socket %s: %w", addr, err)
		}
	}
	return net.Listen(network, addr)
}

// Run recovers, serves mode's services on endpoint until ctx ends, then
// stops gracefully.
func (d *Driver) Run(ctx context.Context, endpoint string) error {
	l, err := Listen(endpoint)
	if err != nil {
		return err
	}
	s := d.NewServer(d.cfg.Mode)
	errc := make(chan error, 1)
	go func() { errc <- s.Serve(l) }()
	klog.InfoS("Serving CSI", "endpoint", endpoint, "mode", d.cfg.Mode, "driver", d.cfg.DriverName, "node", d.cfg.NodeID)
	// Probe answers not-ready while attachments are recovered.
	if err := d.Recover(ctx); err != nil {
		s.Stop()
		return err
	}
	gcDone := make(chan struct{})
	gcCtx, stopGC := context.WithCancel(ctx)
	go func() { defer close(gcDone); d.runOrphanCollector(gcCtx) }()
	defer func() { stopGC(); <-gcDone }()
	select {
	case <-ctx.Done():
		s.GracefulStop()
		return nil
	case err := <-errc:
		return err
	}
}

// topology is the node's: its name, and the exporter exporter=auto gives
// here (see ExporterTopologyKey).
func (d *Driver) topology() *csi.Topology {
	return &csi.Topology{Segments: map[string]string{TopologyKey: d.cfg.NodeID, ExporterTopologyKey: d.exporterSegment()}}
}
