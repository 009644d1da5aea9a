package driver

// The node plugin's debug API. Only the node plugin holds a staged
// volume's live zone state (the write pointers live in its memory and in a
// sidecar file), so it answers questions about it itself: a read-only
// HTTP/JSON API on a unix socket in the state directory, which
// `zq-csi volume` reads inside the plugin container and `kubectl zq` reaches
// through the exec subresource. Nothing here changes a volume, takes a
// volume's CSI lock or blocks guest I/O for longer than a zone report takes
// to copy.
//
//	GET /v1/volumes                          DebugVolumeList
//	GET /v1/volumes/{id}                     DebugVolume
//	GET /v1/volumes/{id}/zones?start=&count= DebugZoneReport (zone indexes)
//	GET /v1/health                           DebugHealth
//
// Errors are a DebugError with the HTTP status of its kind: 404 not
// staged, 409 staged but without a device (lost), 400 bad query, 503 still
// recovering or busy.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// DebugSocketName is the debug socket's file name in the state directory.
const DebugSocketName = "debug.sock"

// DebugVolumeList answers GET /v1/volumes.
type DebugVolumeList struct {
	Node      string        `json:"node"`
	Driver    string        `json:"driver"`
	Attachers []string      `json:"attachers"` // the node's attacher kinds, the ordinary one first
	Volumes   []DebugVolume `json:"volumes"`
	// Quarantined are the state record files the plugin could not load
	// and moved aside (see QuarantinedRecord).
	Quarantined []QuarantinedRecord `json:"quarantined,omitempty"`
}

// DebugHealth answers GET /v1/health: whether the plugin has recovered its
// attachments, and what it had to set aside to start. Healthy is false
// while any record is quarantined: the plugin runs, but an operator has a
// file to look at. It answers while recovering too (Ready false).
type DebugHealth struct {
	Node        string              `json:"node"`
	Ready       bool                `json:"ready"`
	Healthy     bool                `json:"healthy"`
	Quarantined []QuarantinedRecord `json:"quarantined"`
}

// DebugVolume is one staged volume as the node plugin sees it.
type DebugVolume struct {
	ID          string          `json:"id"`
	Node        string          `json:"node"`
	ImagePath   string          `json:"imagePath"`
	DevicePath  string          `json:"devicePath"`
	StagingPath string          `json:"stagingPath"`
	Targets     map[string]bool `json:"targets"` // publish target → read-only
	AccessMode  string          `json:"accessMode"`
	ReadOnly    bool            `json:"readOnly"`
	// Attacher is the kind of the attacher that staged the volume, and
	// ExporterReason why it was chosen. Attached: that attacher lists the
	// volume now; Generation is its attachment's (bumped on every
	// reattach, e.g. after a plugin restart).
	Attacher       string `json:"attacher"`
	ExporterReason string `json:"exporterReason,omitempty"`
	Attached       bool   `json:"attached"`
	Generation     uint64 `json:"generation,omitempty"`
	// Lost: a restart found no attachment for the staged volume.
	Lost bool `json:"lost,omitempty"`
	// Open: the zoned device is open in this process; Geometry and Zones
	// come from it, and Problem says why they are missing.
	Open     bool             `json:"open"`
	Geometry *Geometry        `json:"geometry,omitempty"`
	Zones    *DebugZoneCounts `json:"zones,omitempty"`
	Problem  string           `json:"problem,omitempty"`
}

// DebugZoneCounts counts a volume's zones per condition.
type DebugZoneCounts struct {
	Conventional uint32 `json:"conventional"`
	Empty        uint32 `json:"empty"`
	ImplicitOpen uint32 `json:"implicitOpen"`
	ExplicitOpen uint32 `json:"explicitOpen"`
	Closed       uint32 `json:"closed"`
	Full         uint32 `json:"full"`
	ReadOnly     uint32 `json:"readOnly,omitempty"`
	Offline      uint32 `json:"offline,omitempty"`
}

func (c DebugZoneCounts) String() string {
	s := fmt.Sprintf("conv=%d empty=%d open=%d closed=%d full=%d", c.Conventional, c.Empty,
		c.ImplicitOpen+c.ExplicitOpen, c.Closed, c.Full)
	if c.ReadOnly+c.Offline > 0 {
		s += fmt.Sprintf(" ro=%d offline=%d", c.ReadOnly, c.Offline)
	}
	return s
}

func (c *DebugZoneCounts) add(z zoned.Cond) {
	switch z {
	case zoned.CondNotWP:
		c.Conventional++
	case zoned.CondEmpty:
		c.Empty++
	case zoned.CondImpOpen:
		c.ImplicitOpen++
	case zoned.CondExpOpen:
		c.ExplicitOpen++
	case zoned.CondClosed:
		c.Closed++
	case zoned.CondFull:
		c.Full++
	case zoned.CondReadOnly:
		c.ReadOnly++
	case zoned.CondOffline:
		c.Offline++
	}
}

// DebugZone is one zone of a report, in bytes (struct blk_zone's fields).
type DebugZone struct {
	Start    uint64 `json:"start"`
	Len      uint64 `json:"len"`
	Cap      uint64 `json:"cap"`
	WP       uint64 `json:"wptr"`
	Cond     uint8  `json:"cond"`
	CondName string `json:"condName"`
	Type     uint8  `json:"type"`
	TypeName string `json:"typeName"`
}

// Report converts z back to the zone engine's report.
func (z DebugZone) Report() zoned.ZoneReport {
	return zoned.ZoneReport{Start: z.Start, Len: z.Len, Cap: z.Cap, WP: z.WP,
		Cond: zoned.Cond(z.Cond), Type: zoned.ZoneType(z.Type)}
}

// DebugZoneReport answers GET /v1/volumes/{id}/zones: Zones are the zones
// from index Start on.
type DebugZoneReport struct {
	VolumeID string      `json:"volumeID"`
	Node     string      `json:"node"`
	Geometry Geometry    `json:"geometry"`
	Start    int         `json:"start"`
	Zones    []DebugZone `json:"zones"`
}

// DebugError is the body of every error answer.
type DebugError struct {
	Reason  string `json:"reason"` // NotFound, FailedPrecondition, NotReady, InvalidArgument, Busy, Internal
	Message string `json:"error"`
}

func (e *DebugError) Error() string { return e.Message }

// DebugHandler returns the debug API of d's node service. It serves only
// GET and never changes state.
func (d *Driver) DebugHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/volumes", d.debugList)
	mux.HandleFunc("GET /v1/volumes/{id}", d.debugDescribe)
	mux.HandleFunc("GET /v1/volumes/{id}/zones", d.debugZones)
	mux.HandleFunc("GET /v1/health", d.debugHealth)
	return mux
}

// ServeDebug serves DebugHandler on a unix socket at path (a stale socket
// is replaced), readable and writable by the owner only. The returned
// function stops the server and removes the socket.
func (d *Driver) ServeDebug(path string) (stop func(), err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale debug socket %s: %w", path, err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("debug socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("debug socket: %w", err)
	}
	srv := &http.Server{Handler: d.DebugHandler(), ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			klog.ErrorS(err, "Debug server stopped", "socket", path)
		}
	}()
	klog.InfoS("Serving the debug API", "socket", path)
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		<-done
		os.Remove(path)
	}, nil
}

func (d *Driver) debugList(w http.ResponseWriter, r *http.Request) {
	if err := d.debugReady(); err != nil {
		writeDebugError(w, err)
		return
	}
	atts, err := d.debugAttachments(r.Context())
	if err != nil {
		writeDebugError(w, err)
		return
	}
	out := DebugVolumeList{Node: d.cfg.NodeID, Driver: d.cfg.DriverName, Volumes: []DebugVolume{}, Quarantined: d.Quarantined()}
	for _, a := range d.attachers() {
		out.Attachers = append(out.Attachers, a.Kind())
	}
	for _, st := range d.node.list() {
		out.Volumes = append(out.Volumes, d.debugVolume(r.Context(), st, atts))
	}
	writeDebugJSON(w, out)
}

func (d *Driver) debugHealth(w http.ResponseWriter, r *http.Request) {
	q := d.Quarantined()
	if q == nil {
		q = []QuarantinedRecord{}
	}
	writeDebugJSON(w, DebugHealth{Node: d.cfg.NodeID, Ready: d.ready.Load(), Healthy: len(q) == 0, Quarantined: q})
}

func (d *Driver) debugDescribe(w http.ResponseWriter, r *http.Request) {
	st, err := d.debugStaged(r.PathValue("id"))
	if err != nil {
		writeDebugError(w, err)
		return
	}
	atts, err := d.debugAttachments(r.Context())
	if err != nil {
		writeDebugError(w, err)
		return
	}
	writeDebugJSON(w, d.debugVolume(r.Context(), st, atts))
}

func (d *Driver) debugZones(w http.ResponseWriter, r *http.Request) {
	st, err := d.debugStaged(r.PathValue("id"))
	if err != nil {
		writeDebugError(w, err)
		return
	}
	q := r.URL.Query()
	start, err := queryInt(q.Get("start"), "start", 0)
	if err != nil {
		writeDebugError(w, err)
		return
	}
	count, err := queryInt(q.Get("count"), "count", -1) // -1: to the last zone
	if err != nil {
		writeDebugError(w, err)
		return
	}
	out := DebugZoneReport{VolumeID: st.ID, Node: d.cfg.NodeID, Start: start, Zones: []DebugZone{}}
	err = d.images.withLiveDevice(r.Context(), st.ID, func(dev *zoned.Device) error {
		g := dev.Geometry()
		out.Geometry = debugGeometry(dev)
		if start >= int(g.NrZones) {
			return errorf(ErrInvalidArgument, "start=%d: the volume has %d zones", start, g.NrZones)
		}
		n := int(g.NrZones) - start
		if count >= 0 {
			n = min(n, count)
		}
		for _, z := range dev.Report(start, n) {
			out.Zones = append(out.Zones, DebugZone{Start: z.Start, Len: z.Len, Cap: z.Cap, WP: z.WP,
				Cond: uint8(z.Cond), CondName: z.Cond.String(), Type: uint8(z.Type), TypeName: z.Type.String()})
		}
		return nil
	})
	if err != nil {
		writeDebugError(w, err)
		return
	}
	writeDebugJSON(w, out)
}

func (d *Driver) debugReady() error {
	if d.node == nil {
		return errorf(ErrNotFound, "this process (--mode %s) runs no node service and stages no volumes", d.cfg.Mode)
	}
	if !d.ready.Load() {
		return errorf(ErrNotReady, "the node plugin is still recovering the attachments of its last run")
	}
	return nil
}

// debugStaged returns the node record of volume id.
func (d *Driver) debugStaged(id string) (*StagedVolume, error) {
	if err := d.debugReady(); err != nil {
		return nil, err
	}
	if !validID(volumePrefix, id) {
		return nil, errorf(ErrNotFound, "%q is not a zq-csi volume id", id)
	}
	st, err := d.node.get(id)
	if err != nil {
		return nil, errorf(ErrNotFound, "volume %s is not staged on node %s", id, d.cfg.NodeID)
	}
	return st, nil
}

// debugAttachments lists the attachments of every attacher of the node,
// by attacher kind and volume id.
func (d *Driver) debugAttachments(ctx context.Context) (map[string]map[string]nbdattach.Attachment, error) {
	out := map[string]map[string]nbdattach.Attachment{}
	for _, att := range d.attachers() {
		list, err := att.List(ctx)
		if err != nil {
			return nil, fmt.Errorf("list %s attachments: %w", att.Kind(), err)
		}
		m := make(map[string]nbdattach.Attachment, len(list))
		for _, a := range list {
			m[a.VolumeID] = a
		}
		out[att.Kind()] = m
	}
	return out, nil
}

func (d *Driver) debugVolume(ctx context.Context, st *StagedVolume, atts map[string]map[string]nbdattach.Attachment) DebugVolume {
	v := DebugVolume{ID: st.ID, Node: d.cfg.NodeID, ImagePath: st.ImagePath, DevicePath: st.DevicePath, StagingPath: st.StagingPath,
		Targets: map[string]bool{}, AccessMode: csi.VolumeCapability_AccessMode_Mode(st.AccessMode).String(),
		ReadOnly: st.ReadOnly, Lost: st.Lost, Attacher: st.attacherKind(d.cfg.Attacher), ExporterReason: st.ExporterReason}
	for t, ro := range st.Targets {
		v.Targets[t] = ro
	}
	if a, ok := atts[v.Attacher][st.ID]; ok {
		v.Attached, v.Generation = true, a.Generation
	}
	err := d.images.withLiveDevice(ctx, st.ID, func(dev *zoned.Device) error {
		v.Open = true
		g := debugGeometry(dev)
		v.Geometry = &g
		var c DebugZoneCounts
		for _, z := range dev.Report(0, int(g.NrZones)) {
			c.add(z.Cond)
		}
		v.Zones = &c
		return nil
	})
	if err != nil {
		v.Problem = err.Error()
	}
	return v
}

// debugGeometry is the live device's geometry in the driver's terms.
func debugGeometry(dev *zoned.Device) Geometry {
	g := dev.Geometry()
	return Geometry{Size: g.Size, ZoneSize: g.ZoneSize, ZoneCapacity: g.ZoneCapacity, NrZones: g.NrZones,
		Conventional: g.Conventional, MaxOpen: g.MaxOpen, MaxActive: g.MaxActive,
		MaxAppend: uint64(g.MaxAppendBytes), ClusterSize: dev.Image().Info().ClusterSize}
}

// withLiveDevice runs fn on volume id's open zoned device, if this process
// has one, without creating a slot or opening anything. The slot's mutex
// guards the device pointer (acquire sets it under the mutex alone); it is
// also held across snapshots and expansions, so it is polled rather than
// waited for, and a debug request gives up with ErrBusy when ctx ends.
func (m *Images) withLiveDevice(ctx context.Context, id string, fn func(*zoned.Device) error) error {
	m.mu.Lock()
	s := m.slots[id]
	m.mu.Unlock()
	if s == nil {
		return errNotOpen(id)
	}
	for !s.mu.TryLock() {
		select {
		case <-ctx.Done():
			return errorf(ErrBusy, "volume %s is busy (a snapshot, expansion or stage holds it): %w", id, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	defer s.mu.Unlock()
	s.gate.RLock()
	defer s.gate.RUnlock()
	if s.dev == nil {
		return errNotOpen(id)
	}
	return fn(s.dev)
}

// errNotOpen: the volume has a node record but no device here, as when its
// attachment did not survive a restart (StagedVolume.Lost).
func errNotOpen(id string) error {
	return errorf(ErrFailedPrecondition, "volume %s is staged but the node plugin has no open device for it (its attachment was lost; restage it)", id)
}

func queryInt(s, name string, def int) (int, error) {
	if s == "" {
		return def, nil
	}
	v, err := strconv.Atoi(s)
	if err != nil || v < 0 {
		return 0, errorf(ErrInvalidArgument, "%s=%s: want a zone index or count (0 or more)", name, s)
	}
	return v, nil
}

func writeDebugJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func writeDebugError(w http.ResponseWriter, err error) {
	e := &DebugError{Reason: "Internal", Message: err.Error()}
	code := http.StatusInternalServerError
	switch {
	case errors.Is(err, ErrNotFound):
		e.Reason, code = "NotFound", http.StatusNotFound
	case errors.Is(err, ErrNotReady):
		e.Reason, code = "NotReady", http.StatusServiceUnavailable
	case errors.Is(err, ErrInvalidArgument):
		e.Reason, code = "InvalidArgument", http.StatusBadRequest
	case errors.Is(err, ErrFailedPrecondition):
		e.Reason, code = "FailedPrecondition", http.StatusConflict
	case errors.Is(err, ErrBusy):
		e.Reason, code = "Busy", http.StatusServiceUnavailable
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(e)
}
