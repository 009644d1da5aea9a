package driver

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utiljson "k8s.io/apimachinery/pkg/util/json"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

// The custom resources of the cluster backend (DESIGN.md point 7). Their
// definitions are deploy/crds/*.yaml (also shipped by the chart); the Go
// types below mirror those schemas and are converted to and from the
// dynamic client's unstructured objects, so no code is generated.
//
// All are cluster-scoped and named by the object's CSI ID (a volume's
// ZonedVolume is called zqv-..., like its PV's volumeHandle), or, for a
// ZonedNode, by the node name. The controller owns spec, annotations and
// finalizers; the node agent owns status, through the status subresource.
const (
	CRDGroup   = "zq-csi.io"
	CRDVersion = "v1alpha1"

	// labelNode selects the resources of one node (the agent's informer).
	labelNode = CRDGroup + "/node"
	// labelNameHash finds a record by its CSI name, which may be longer
	// than a label value or hold characters labels forbid.
	labelNameHash = CRDGroup + "/name-hash"
	// labelGroup marks the members of a group snapshot.
	labelGroup = CRDGroup + "/group"
	// annotationState is the controller's record state (creating, ready):
	// the controller's, not the agent's, and kept out of spec so that
	// writing it does not bump the generation the agent reconciles.
	annotationState = CRDGroup + "/record-state"
	// finalizerImage makes deleting a ZonedVolume or ZonedSnapshot delete
	// its image: the node agent removes it once the image is gone.
	finalizerImage = CRDGroup + "/image"
)

// Phases of status.phase.
const (
	phasePending  = "Pending"
	phaseReady    = "Ready"
	phaseFailed   = "Failed"
	phaseDeleting = "Deleting"
)

var (
	gvrVolume   = schema.GroupVersionResource{Group: CRDGroup, Version: CRDVersion, Resource: "zonedvolumes"}
	gvrSnapshot = schema.GroupVersionResource{Group: CRDGroup, Version: CRDVersion, Resource: "zonedsnapshots"}
	gvrGroup    = schema.GroupVersionResource{Group: CRDGroup, Version: CRDVersion, Resource: "zonedgroupsnapshots"}
	gvrNode     = schema.GroupVersionResource{Group: CRDGroup, Version: CRDVersion, Resource: "zonednodes"}
)

// ClusterGVRs lists the resources of the cluster backend with their kinds
// (for fake clients and RBAC checks).
func ClusterGVRs() map[schema.GroupVersionResource]string {
	return map[schema.GroupVersionResource]string{
		gvrVolume: "ZonedVolumeList", gvrSnapshot: "ZonedSnapshotList",
		gvrGroup: "ZonedGroupSnapshotList", gvrNode: "ZonedNodeList",
	}
}

// zonedVolume is a ZonedVolume: a volume's record (spec) and the node
// agent's report on its image (status).
type zonedVolume struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              zonedVolumeSpec   `json:"spec"`
	Status            zonedVolumeStatus `json:"status,omitempty"`
}

type zonedVolumeSpec struct {
	VolumeName string `json:"volumeName"` // the CSI name (the PV's name)
	Node       string `json:"node"`
	Size       int64  `json:"size"`
	Zone       struct {
		Size           int64 `json:"size"`
		Capacity       int64 `json:"capacity"`
		Count          int64 `json:"count"`
		Conventional   int64 `json:"conventional"`
		MaxAppendBytes int64 `json:"maxAppendBytes,omitempty"`
	} `json:"zone"`
	ClusterSize int64 `json:"clusterSize,omitempty"`
	Limits      struct {
		MaxOpenZones   int64 `json:"maxOpenZones"`
		MaxActiveZones int64 `json:"maxActiveZones"`
	} `json:"limits"`
	Source *struct {
		Snapshot string `json:"snapshot,omitempty"`
		Volume   string `json:"volume,omitempty"`
	} `json:"source,omitempty"`
	// Parameters are the canonical creation parameters (mutable ones
	// merged): the agent rebuilds the image options from them.
	Parameters        map[string]string `json:"parameters,omitempty"`
	MutableParameters map[string]string `json:"mutableParameters,omitempty"`
	CreatedAt         string            `json:"createdAt"` // RFC 3339, nanoseconds
}

type zonedVolumeStatus struct {
	Phase              string          `json:"phase,omitempty"`
	ObservedGeneration int64           `json:"observedGeneration,omitempty"`
	ImagePath          string          `json:"imagePath,omitempty"`
	Geometry           *Geometry       `json:"geometry,omitempty"`
	Zones              *zoneSummary    `json:"zones,omitempty"`
	Health             []healthProblem `json:"health,omitempty"`
	// Reason names the error's kind (errorReason), so the controller
	// answers with the gRPC code the node's error would have had.
	Reason string `json:"reason,omitempty"`
	Error  string `json:"error,omitempty"`
}

// zoneSummary counts the zones per condition; Summary is the same as one
// string for kubectl's column.
type zoneSummary struct {
	Conventional int64  `json:"conventional"`
	Empty        int64  `json:"empty"`
	ImplicitOpen int64  `json:"implicitOpen"`
	ExplicitOpen int64  `json:"explicitOpen"`
	Closed       int64  `json:"closed"`
	Full         int64  `json:"full"`
	ReadOnly     int64  `json:"readOnly,omitempty"`
	Offline      int64  `json:"offline,omitempty"`
	Summary      string `json:"summary"`
}

type healthProblem struct {
	Kind    string `json:"kind"`
	Reason  string `json:"reason"`
	Message string `json:"message"`
}

// zonedSnapshot is a ZonedSnapshot: a snapshot image on the source
// volume's node.
type zonedSnapshot struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              zonedSnapshotSpec   `json:"spec"`
	Status            zonedSnapshotStatus `json:"status,omitempty"`
}

type zonedSnapshotSpec struct {
	SnapshotName string   `json:"snapshotName"`
	SourceVolume string   `json:"sourceVolume"`
	Node         string   `json:"node"`
	Group        string   `json:"group,omitempty"`
	Geometry     Geometry `json:"geometry"`
	CreatedAt    string   `json:"createdAt"`
}

type zonedSnapshotStatus struct {
	Phase              string `json:"phase,omitempty"`
	ObservedGeneration int64  `json:"observedGeneration,omitempty"`
	ImagePath          string `json:"imagePath,omitempty"`
	Reason             string `json:"reason,omitempty"`
	Error              string `json:"error,omitempty"`
}

// zonedGroupSnapshot is a ZonedGroupSnapshot: only a record; its members'
// ZonedSnapshots carry the work.
type zonedGroupSnapshot struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              struct {
		GroupName     string   `json:"groupName"`
		SourceVolumes []string `json:"sourceVolumes"`
		Snapshots     []string `json:"snapshots"`
		CreatedAt     string   `json:"createdAt"`
	} `json:"spec"`
}

// zonedNode is a ZonedNode: what a node agent reports about its node.
type zonedNode struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Status            zonedNodeStatus `json:"status,omitempty"`
}

type zonedNodeStatus struct {
	CapacityBytes int64  `json:"capacityBytes"`
	TotalBytes    int64  `json:"totalBytes"`
	Attacher      string `json:"attacher,omitempty"`
	MaxVolumes    int64  `json:"maxVolumes"`
	DataDir       string `json:"dataDir,omitempty"`
	Heartbeat     string `json:"heartbeat,omitempty"` // RFC 3339
}

// jsonMap renders v as the JSON object an unstructured object holds
// (integers as int64: runtime's converter would keep uint64 fields, which
// unstructured objects cannot deep-copy).
func jsonMap(v any) (map[string]any, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	var m map[string]any
	if err := utiljson.Unmarshal(b, &m); err != nil {
		return nil, err
	}
	return m, nil
}

func toUnstructured(obj any, kind string) (*unstructured.Unstructured, error) {
	m, err := jsonMap(obj)
	if err != nil {
		return nil, err
	}
	u := &unstructured.Unstructured{Object: m}
	u.SetAPIVersion(CRDGroup + "/" + CRDVersion)
	u.SetKind(kind)
	return u, nil
}

func fromUnstructured[T any](u *unstructured.Unstructured) (*T, error) {
	var out T
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.UnstructuredContent(), &out); err != nil {
		return nil, fmt.Errorf("%s %s: %w", u.GetKind(), u.GetName(), err)
	}
	return &out, nil
}

// nameHash is the label value that finds a record by CSI name.
func nameHash(name string) string {
	h := sha256.Sum256([]byte(name))
	return hex.EncodeToString(h[:20])
}

func fmtTime(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

func parseTime(s string) time.Time {
	t, _ := time.Parse(time.RFC3339Nano, s)
	return t
}

func i64(v uint64) int64 { return int64(v) }

// volumeObject renders a volume record as a ZonedVolume (spec, labels,
// annotations and finalizer; not status, which is the agent's).
func volumeObject(r *VolumeRecord) *zonedVolume {
	zv := &zonedVolume{}
	zv.Name = r.ID
	zv.Labels = map[string]string{labelNode: r.Node, labelNameHash: nameHash(r.Name)}
	zv.Annotations = map[string]string{annotationState: r.State}
	zv.Finalizers = []string{finalizerImage}
	s := &zv.Spec
	g := r.Geometry
	s.VolumeName, s.Node, s.Size = r.Name, r.Node, i64(g.Size)
	s.Zone.Size, s.Zone.Capacity, s.Zone.Count = i64(g.ZoneSize), i64(g.ZoneCapacity), int64(g.NrZones)
	s.Zone.Conventional, s.Zone.MaxAppendBytes = int64(g.Conventional), i64(g.MaxAppend)
	s.ClusterSize = int64(g.ClusterSize)
	s.Limits.MaxOpenZones, s.Limits.MaxActiveZones = int64(g.MaxOpen), int64(g.MaxActive)
	if r.Source != nil {
		s.Source = &struct {
			Snapshot string `json:"snapshot,omitempty"`
			Volume   string `json:"volume,omitempty"`
		}{r.Source.SnapshotID, r.Source.VolumeID}
	}
	s.Parameters, s.MutableParameters = r.Params, r.Mutable
	s.CreatedAt = fmtTime(r.Created)
	return zv
}

// specGeometry is the geometry a ZonedVolume's spec asks for.
func (zv *zonedVolume) specGeometry() Geometry {
	s := &zv.Spec
	return Geometry{Size: uint64(s.Size), ZoneSize: uint64(s.Zone.Size), ZoneCapacity: uint64(s.Zone.Capacity),
		NrZones: uint32(s.Zone.Count), Conventional: uint32(s.Zone.Conventional),
		MaxOpen: uint32(s.Limits.MaxOpenZones), MaxActive: uint32(s.Limits.MaxActiveZones),
		MaxAppend: uint64(s.Zone.MaxAppendBytes), ClusterSize: uint32(s.ClusterSize)}
}

// record returns the controller's record of a ZonedVolume. Its geometry is
// the agent's report once that answers the current spec, else the spec's.
func (zv *zonedVolume) record() *VolumeRecord {
	r := &VolumeRecord{ID: zv.Name, Name: zv.Spec.VolumeName, Node: zv.Spec.Node, State: zv.Annotations[annotationState],
		Geometry: zv.specGeometry(), Params: zv.Spec.Parameters, Mutable: zv.Spec.MutableParameters,
		Created: parseTime(zv.Spec.CreatedAt)}
	if r.Params == nil {
		r.Params = map[string]string{}
	}
	if src := zv.Spec.Source; src != nil {
		r.Source = &ContentSource{SnapshotID: src.Snapshot, VolumeID: src.Volume}
	}
	if zv.done() {
		r.Geometry = *zv.Status.Geometry
	}
	return r
}

// done reports whether the agent's status answers the current spec: Ready,
// for this generation, with the size and limits asked for. (Comparing the
// geometry too keeps this right where generations are not maintained, as
// in client-go's fake clients.)
func (zv *zonedVolume) done() bool {
	st := &zv.Status
	if st.Phase != phaseReady || st.ObservedGeneration != zv.Generation || st.Geometry == nil {
		return false
	}
	want := zv.specGeometry()
	return st.Geometry.Size == want.Size && st.Geometry.MaxOpen == want.MaxOpen && st.Geometry.MaxActive == want.MaxActive
}

func snapshotObject(r *SnapshotRecord) *zonedSnapshot {
	zs := &zonedSnapshot{}
	zs.Name = r.ID
	zs.Labels = map[string]string{labelNode: r.Node, labelNameHash: nameHash(r.Name)}
	if r.GroupID != "" {
		zs.Labels[labelGroup] = r.GroupID
	}
	zs.Annotations = map[string]string{annotationState: r.State}
	zs.Finalizers = []string{finalizerImage}
	zs.Spec = zonedSnapshotSpec{SnapshotName: r.Name, SourceVolume: r.SourceVolumeID, Node: r.Node, Group: r.GroupID,
		Geometry: r.Geometry, CreatedAt: fmtTime(r.Created)}
	return zs
}

func (zs *zonedSnapshot) record() *SnapshotRecord {
	return &SnapshotRecord{ID: zs.Name, Name: zs.Spec.SnapshotName, SourceVolumeID: zs.Spec.SourceVolume, Node: zs.Spec.Node,
		GroupID: zs.Spec.Group, State: zs.Annotations[annotationState], Geometry: zs.Spec.Geometry,
		Created: parseTime(zs.Spec.CreatedAt)}
}

func groupObject(r *GroupSnapshotRecord) *zonedGroupSnapshot {
	g := &zonedGroupSnapshot{}
	g.Name = r.ID
	g.Labels = map[string]string{labelNameHash: nameHash(r.Name)}
	g.Annotations = map[string]string{annotationState: r.State}
	g.Spec.GroupName, g.Spec.SourceVolumes, g.Spec.Snapshots = r.Name, r.SourceVolumeIDs, r.SnapshotIDs
	g.Spec.CreatedAt = fmtTime(r.Created)
	return g
}

func (g *zonedGroupSnapshot) record() *GroupSnapshotRecord {
	return &GroupSnapshotRecord{ID: g.Name, Name: g.Spec.GroupName, SourceVolumeIDs: g.Spec.SourceVolumes,
		SnapshotIDs: g.Spec.Snapshots, State: g.Annotations[annotationState], Created: parseTime(g.Spec.CreatedAt)}
}

// reasonKinds turns status.reason (the gRPC code the agent's error maps
// to, by toStatus) back into the driver's sentinel, so a node's
// ResourceExhausted or NotFound reaches the CO as such.
var reasonKinds = map[codes.Code]error{
	codes.InvalidArgument:    ErrInvalidArgument,
	codes.NotFound:           ErrNotFound,
	codes.AlreadyExists:      ErrAlreadyExists,
	codes.Aborted:            ErrBusy,
	codes.OutOfRange:         ErrOutOfRange,
	codes.ResourceExhausted:  ErrResourceExhausted,
	codes.FailedPrecondition: ErrFailedPrecondition,
	codes.Unavailable:        ErrNotReady,
	codes.Unimplemented:      ErrUnimplemented,
	codes.DataLoss:           qcow2.ErrCorrupt,
}

// errorReason names err's kind by the gRPC code toStatus gives it.
func errorReason(err error) string { return status.Code(toStatus(err)).String() }

// nodeError rebuilds the error a node agent reported.
func nodeError(what, reason, msg string) error {
	for c, kind := range reasonKinds {
		if c.String() == reason {
			return errorf(kind, "%s: node agent: %s", what, msg)
		}
	}
	return fmt.Errorf("%s: node agent: %s", what, msg)
}
