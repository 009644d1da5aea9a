package driver

import (
	"context"
	"errors"
	"maps"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// Prometheus metrics (issue 15). Every Driver has its own registry (tests
// stay isolated); `zq-csi serve --metrics-address` serves it on /metrics
// with the Go and process collectors. Names follow the Prometheus
// conventions: zq_csi_ prefix, base units, _total for counters.
//
// What is observed where:
//   - CSI operations: the gRPC interceptor (every call, by method and code).
//   - Per staged volume: the slotBackend every exporter serves through
//     (bytes, appends, zone management, refusals by kind) and, at scrape
//     time, the zone engine's state (zones by condition, open and active
//     zones against their limits, write-pointer fill). A volume's series
//     exist while it is staged on this node and vanish at unstage.
//   - Export request latency: the time the backend takes to serve one
//     exporter request (read, write, flush, ...), by exporter kind. The
//     transport (socket, io_uring) is not in it: the driver does not see it.
//   - Recovery after a restart: attachments each attacher took back, those
//     lost, and how long Recover took (the part of the guest's I/O stall
//     the driver can measure: the time from the previous process's end to
//     this one's start is not visible to it).
//   - Node: capacity and free bytes of the data directory's file system.

const metricsNamespace = "zq_csi"

// Refusal kinds: the zone rule a request broke (label kind of
// zq_csi_volume_zone_refusals_total).
const (
	RefusalOffWP          = "off_wp"
	RefusalZoneFull       = "zone_full"
	RefusalBeyondCapacity = "beyond_capacity"
	RefusalOpenLimit      = "open_limit"
	RefusalActiveLimit    = "active_limit"
	RefusalUnaligned      = "unaligned"
	RefusalConventional   = "conventional_zone"
	RefusalInvalidZoneOp  = "invalid_zone_op"
	RefusalOutOfRange     = "out_of_range"
	RefusalAppendTooLarge = "append_too_large"
)

// refusalKind names the zone rule err reports, "" when err is not a
// zone-rule refusal (an I/O error, a closed device).
func refusalKind(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, zoned.ErrNotAtWritePointer):
		return RefusalOffWP
	case errors.Is(err, zoned.ErrZoneFull):
		return RefusalZoneFull
	case errors.Is(err, zoned.ErrBoundary):
		return RefusalBeyondCapacity
	case errors.Is(err, zoned.ErrTooManyOpenZones):
		return RefusalOpenLimit
	case errors.Is(err, zoned.ErrTooManyActiveZones):
		return RefusalActiveLimit
	case errors.Is(err, zoned.ErrUnaligned):
		return RefusalUnaligned
	case errors.Is(err, zoned.ErrConventionalZone):
		return RefusalConventional
	case errors.Is(err, zoned.ErrInvalidZoneOp):
		return RefusalInvalidZoneOp
	case errors.Is(err, zoned.ErrOutOfRange):
		return RefusalOutOfRange
	case errors.Is(err, zoned.ErrAppendTooLarge):
		return RefusalAppendTooLarge
	}
	return ""
}

// metrics is one Driver's registry and the metrics it updates as things
// happen; the per-volume and node gauges are read at scrape time
// (volumeCollector).
type metrics struct {
	reg   *prometheus.Registry
	names []string // every metric name this driver defines

	ops         *prometheus.CounterVec
	opDuration  *prometheus.HistogramVec
	exportDur   *prometheus.HistogramVec
	recovered   *prometheus.CounterVec
	lost        *prometheus.CounterVec
	recoveryDur *prometheus.GaugeVec
	events      *prometheus.CounterVec

	mu   sync.Mutex
	vols map[string]*volumeStats
}

// volumeStats are the counters of one staged volume, shared by every
// backend that serves it (a retried stage, a recovery).
type volumeStats struct {
	exporter                          atomic.Value // string
	written, read                     atomic.Uint64
	appends, resets, finishes, others atomic.Uint64
	mu                                sync.Mutex
	refusals                          map[string]uint64
	// last zone state seen, reported while the volume is frozen (a
	// snapshot or expansion holds its gate).
	last *zoneState
}

func (v *volumeStats) refused(kind string) {
	v.mu.Lock()
	v.refusals[kind]++
	v.mu.Unlock()
}

func newMetrics(d *Driver) *metrics {
	m := &metrics{reg: prometheus.NewRegistry(), vols: map[string]*volumeStats{}}
	name := func(n string) string {
		full := metricsNamespace + "_" + n
		m.names = append(m.names, full)
		return full
	}
	m.ops = prometheus.NewCounterVec(prometheus.CounterOpts{Name: name("operations_total"),
		Help: "CSI calls answered, by gRPC method and status code."}, []string{"method", "grpc_code"})
	m.opDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: name("operation_duration_seconds"),
		Help:    "Time to answer a CSI call, by gRPC method and status code.",
		Buckets: []float64{0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}}, []string{"method", "grpc_code"})
	m.exportDur = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: name("export_request_duration_seconds"),
		Help:    "Time the driver's backend takes to serve one exporter request (the zone engine and the image; not the kernel transport), by exporter kind and request type.",
		Buckets: []float64{25e-6, 100e-6, 250e-6, 500e-6, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1}}, []string{"exporter", "op"})
	m.recovered = prometheus.NewCounterVec(prometheus.CounterOpts{Name: name("recovered_attachments_total"),
		Help: "Attachments of an earlier run that an attacher took back at start (reconnected NBD devices, recovered ublk devices), by exporter kind."}, []string{"exporter"})
	m.lost = prometheus.NewCounterVec(prometheus.CounterOpts{Name: name("lost_attachments_total"),
		Help: "Volumes staged before a restart whose attachment did not come back at start, by the exporter that staged them."}, []string{"exporter"})
	m.recoveryDur = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name("recovery_duration_seconds"),
		Help: "How long the last start's recovery of earlier attachments took, by exporter kind: guest I/O to those volumes stalls at least this long (the time before the process started is not seen)."}, []string{"exporter"})
	m.events = prometheus.NewCounterVec(prometheus.CounterOpts{Name: name("events_total"),
		Help: "Events the driver recorded (logged, and handed to the Kubernetes recorder when one is wired), by type and reason."}, []string{"type", "reason"})
	vc := newVolumeCollector(d, name)
	m.reg.MustRegister(m.ops, m.opDuration, m.exportDur, m.recovered, m.lost, m.recoveryDur, m.events, vc,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// stats returns the counters of volume id, creating them, and records the
// exporter serving it.
func (m *metrics) stats(id, exporter string) *volumeStats {
	m.mu.Lock()
	defer m.mu.Unlock()
	v := m.vols[id]
	if v == nil {
		v = &volumeStats{refusals: map[string]uint64{}}
		m.vols[id] = v
	}
	v.exporter.Store(exporter)
	return v
}

// forget drops volume id's series (at unstage).
func (m *metrics) forget(id string) {
	m.mu.Lock()
	delete(m.vols, id)
	m.mu.Unlock()
}

func (m *metrics) volumes() map[string]*volumeStats {
	m.mu.Lock()
	defer m.mu.Unlock()
	return maps.Clone(m.vols)
}

// observeOp counts one CSI call.
func (m *metrics) observeOp(fullMethod string, err error, d time.Duration) {
	method := fullMethod[strings.LastIndex(fullMethod, "/")+1:]
	code := status.Code(err).String()
	m.ops.WithLabelValues(method, code).Inc()
	m.opDuration.WithLabelValues(method, code).Observe(d.Seconds())
}

// Names lists the names of every metric the driver's registry serves:
// the driver's own and those of the Go and process collectors.
func (d *Driver) MetricNames() ([]string, error) {
	names := slices.Clone(d.metrics.names)
	mfs, err := d.metrics.reg.Gather()
	if err != nil {
		return nil, err
	}
	for _, mf := range mfs {
		names = append(names, mf.GetName())
	}
	slices.Sort(names)
	return slices.Compact(names), nil
}

// MetricsHandler serves the driver's registry in the Prometheus text (or
// OpenMetrics) format.
func (d *Driver) MetricsHandler() http.Handler {
	return promhttp.HandlerFor(d.metrics.reg, promhttp.HandlerOpts{Registry: d.metrics.reg, EnableOpenMetrics: true})
}

// ServeMetrics serves /metrics on addr (host:port; port 0 picks one) until
// stop is called. It returns the address listened on.
func (d *Driver) ServeMetrics(addr string) (bound string, stop func(), err error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return "", nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", d.MetricsHandler())
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		w.Write([]byte("zq-csi: metrics at /metrics\n"))
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(l)
	return l.Addr().String(), func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}, nil
}

// UnaryInterceptor is the interceptor NewServer installs: logging, error
// mapping (logInterceptor) and the CSI operation metrics.
func (d *Driver) UnaryInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		start := time.Now()
		resp, err := logInterceptor(ctx, req, info, handler)
		d.metrics.observeOp(info.FullMethod, err, time.Since(start))
		return resp, err
	}
}

// zoneState is what a scrape reads from a staged volume's zone engine.
type zoneState struct {
	conds                    map[zoned.Cond]int
	open, active             uint32
	maxOpen, maxActive       uint32
	wpBytes, capacityBytes   uint64
	conventional, sequential int
}

func readZoneState(dev *zoned.Device) *zoneState {
	g := dev.Geometry()
	m := dev.Machine()
	c := m.Counts()
	zs := &zoneState{conds: map[zoned.Cond]int{}, open: c.Open(), active: c.Active(),
		maxOpen: g.MaxOpen, maxActive: g.MaxActive}
	for _, z := range dev.Report(0, int(g.NrZones)) {
		zs.conds[z.Cond]++
		if z.Type == zoned.TypeConventional {
			zs.conventional++
			continue
		}
		zs.sequential++
		zs.capacityBytes += z.Cap
		if z.Cond == zoned.CondFull {
			zs.wpBytes += z.Cap
		} else {
			zs.wpBytes += z.WP - z.Start
		}
	}
	return zs
}

// condLabels are the condition label values of zq_csi_volume_zones, in
// the words of blkzone report.
var condLabels = []struct {
	c     zoned.Cond
	label string
}{
	{zoned.CondNotWP, "not_write_pointer"}, {zoned.CondEmpty, "empty"}, {zoned.CondImpOpen, "implicit_open"},
	{zoned.CondExpOpen, "explicit_open"}, {zoned.CondClosed, "closed"}, {zoned.CondFull, "full"},
	{zoned.CondReadOnly, "read_only"}, {zoned.CondOffline, "offline"},
}

// volumeCollector reports, at scrape time, the per-volume series of every
// volume staged here and the node's data-directory space.
type volumeCollector struct {
	d *Driver

	info, zones, open, maxOpen, active, maxActive, wp, capacity *prometheus.Desc
	written, read, appends, resets, finishes, mgmt, refusals    *prometheus.Desc
	staged, fsTotal, fsFree                                     *prometheus.Desc
}

func newVolumeCollector(d *Driver, name func(string) string) *volumeCollector {
	v := []string{"volume_id"}
	desc := func(n, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(name(n), help, labels, nil)
	}
	return &volumeCollector{d: d,
		info:      desc("volume_info", "A volume staged on this node (value 1), with the exporter serving it.", "volume_id", "exporter"),
		zones:     desc("volume_zones", "Zones of a staged volume by condition (not_write_pointer: conventional zones).", "volume_id", "condition"),
		open:      desc("volume_open_zones", "Open zones (implicitly and explicitly) of a staged volume, counted against max_open_zones.", v...),
		maxOpen:   desc("volume_max_open_zones", "The volume's max_open_zones limit (0: no limit).", v...),
		active:    desc("volume_active_zones", "Active zones (open and closed) of a staged volume, counted against max_active_zones.", v...),
		maxActive: desc("volume_max_active_zones", "The volume's max_active_zones limit (0: no limit).", v...),
		wp:        desc("volume_write_pointer_bytes", "Bytes below the write pointers of the volume's sequential zones (a FULL zone counts its whole capacity).", v...),
		capacity:  desc("volume_zone_capacity_bytes", "Sum of the zone capacities of the volume's sequential zones: the write-pointer fill's 100%.", v...),
		written:   desc("volume_written_bytes_total", "Bytes written to a staged volume (writes, write-zeroes and zone appends accepted) since it was staged here.", v...),
		read:      desc("volume_read_bytes_total", "Bytes read from a staged volume since it was staged here.", v...),
		appends:   desc("volume_zone_appends_total", "Zone appends accepted (ublk) since the volume was staged here.", v...),
		resets:    desc("volume_zone_resets_total", "Zone reset commands accepted (one command may reset several zones, or the whole device) since the volume was staged here.", v...),
		finishes:  desc("volume_zone_finishes_total", "Zone finish commands accepted since the volume was staged here.", v...),
		mgmt:      desc("volume_zone_open_close_total", "Explicit zone open and close commands accepted since the volume was staged here.", v...),
		refusals: desc("volume_zone_refusals_total", "Requests the zone engine refused, by the rule broken: off_wp (not at the write pointer), zone_full, beyond_capacity (past the zone's capacity or boundary), "+
			"open_limit, active_limit, unaligned, conventional_zone, invalid_zone_op, out_of_range, append_too_large. Each refused request counts once, except on ublk, "+
			"where a write refused for lack of open or active zones is kept by the exporter and tried again while other writes drain: there open_limit and active_limit count attempts.", "volume_id", "kind"),
		staged:  desc("staged_volumes", "Volumes staged on this node, by exporter.", "exporter"),
		fsTotal: desc("node_data_dir_capacity_bytes", "Size of the file system holding the node's data directory (the images).", nil...),
		fsFree:  desc("node_data_dir_free_bytes", "Bytes of the data directory's file system available to new images.", nil...),
	}
}

func (c *volumeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.info, c.zones, c.open, c.maxOpen, c.active, c.maxActive, c.wp, c.capacity,
		c.written, c.read, c.appends, c.resets, c.finishes, c.mgmt, c.refusals, c.staged, c.fsTotal, c.fsFree} {
		ch <- d
	}
}

func (c *volumeCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	// The data directory holds images on a node, and on a controller of
	// the local backend; a cluster controller's is unused.
	if c.d.node != nil || c.d.cfg.Backend == nil {
		if avail, total, err := c.d.images.Capacity(); err == nil {
			gauge(c.fsTotal, float64(total))
			gauge(c.fsFree, float64(avail))
		}
	}
	perExporter := map[string]int{}
	for id, st := range c.d.metrics.volumes() {
		exp, _ := st.exporter.Load().(string)
		perExporter[exp]++
		gauge(c.info, 1, id, exp)
		counter(c.written, st.written.Load(), id)
		counter(c.read, st.read.Load(), id)
		counter(c.appends, st.appends.Load(), id)
		counter(c.resets, st.resets.Load(), id)
		counter(c.finishes, st.finishes.Load(), id)
		counter(c.mgmt, st.others.Load(), id)
		st.mu.Lock()
		refusals := maps.Clone(st.refusals)
		st.mu.Unlock()
		for kind, n := range refusals {
			counter(c.refusals, n, id, kind)
		}
		zs := c.zoneState(id, st)
		if zs == nil {
			continue
		}
		for _, cl := range condLabels {
			gauge(c.zones, float64(zs.conds[cl.c]), id, cl.label)
		}
		gauge(c.open, float64(zs.open), id)
		gauge(c.maxOpen, float64(zs.maxOpen), id)
		gauge(c.active, float64(zs.active), id)
		gauge(c.maxActive, float64(zs.maxActive), id)
		gauge(c.wp, float64(zs.wpBytes), id)
		gauge(c.capacity, float64(zs.capacityBytes), id)
	}
	for exp, n := range perExporter {
		gauge(c.staged, float64(n), exp)
	}
}

// zoneState reads volume id's zones without waiting: a volume frozen for
// a snapshot or an expansion (or being staged) reports what the last
// scrape saw.
func (c *volumeCollector) zoneState(id string, st *volumeStats) *zoneState {
	// Every change of s.dev holds s.mu; the engine's report and counts
	// are safe beside guest I/O.
	s := c.d.images.slot(id)
	if s.mu.TryLock() {
		var zs *zoneState
		if s.dev != nil {
			zs = readZoneState(s.dev)
		}
		s.mu.Unlock()
		if zs != nil {
			st.mu.Lock()
			st.last = zs
			st.mu.Unlock()
			return zs
		}
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.last
}

// Export request types (label op of zq_csi_export_request_duration_seconds).
const (
	opRead        = "read"
	opWrite       = "write"
	opWriteZeroes = "write_zeroes"
	opFlush       = "flush"
	opTrim        = "trim"
	opAppend      = "zone_append"
	opZoneMgmt    = "zone_management"
)

// volumeObserver is what a slotBackend reports to: the volume's counters,
// the export latency histogram of its exporter, and the refusal events.
type volumeObserver struct {
	d    *Driver
	id   string
	kind string
	st   *volumeStats
}

// newSlotBackend is the backend the driver hands attacher kind for volume
// id (stage and recovery), counted in the volume's metrics.
func (d *Driver) newSlotBackend(id string, s *imageSlot, ro bool, kind string) *slotBackend {
	return &slotBackend{s: s, ro: ro, obs: &volumeObserver{d: d, id: id, kind: kind, st: d.metrics.stats(id, kind)}}
}

// done ends one request of type op begun at start: its latency, then
// either ok (success) or the refusal its error is.
func (o *volumeObserver) done(op string, start time.Time, err *error, ok func()) {
	if o == nil {
		return
	}
	o.d.metrics.exportDur.WithLabelValues(o.kind, op).Observe(time.Since(start).Seconds())
	if *err == nil {
		if ok != nil {
			ok()
		}
		return
	}
	if kind := refusalKind(*err); kind != "" {
		o.st.refused(kind)
		o.d.refusalEvent(o.id, kind, *err)
	}
}

// mgmt counts an accepted zone management command.
func (o *volumeObserver) mgmt(op zoned.Op) {
	switch op {
	case zoned.OpReset, zoned.OpResetAll:
		o.st.resets.Add(1)
	case zoned.OpFinish:
		o.st.finishes.Add(1)
	default:
		o.st.others.Add(1)
	}
}

// wholeSequentialZones tells whether [off, off+length) covers at least one
// whole sequential zone (1) or not (0): a TRIM that resets zones counts as
// one reset command, as a multi-zone BLKRESETZONE does.
func wholeSequentialZones(g zoned.Geometry, off, length int64) uint64 {
	if off < 0 || length <= 0 || g.ZoneSize == 0 {
		return 0
	}
	end := uint64(off + length)
	for i := g.ZoneIndex(uint64(off)); i >= 0 && i < int(g.NrZones) && g.ZoneStart(i) < end; i++ {
		if !g.IsConventional(i) && g.ZoneStart(i) >= uint64(off) && g.ZoneEnd(i) <= end {
			return 1
		}
	}
	return 0
}
