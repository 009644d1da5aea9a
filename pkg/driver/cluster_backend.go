package driver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/util/retry"
	"k8s.io/klog/v2"
)

// clusterBackend is the controller's Backend in a cluster (DESIGN.md point
// 7, the TopoLVM model): records are ZonedVolume, ZonedSnapshot and
// ZonedGroupSnapshot resources, and image work is asked of the node agent
// of the volume's node by writing a resource's spec (or deleting it) and
// waiting, within the request's deadline, for the agent's status. Every
// call is a read or a write of the API server, never of a cache, so a
// retried CreateVolume finds what the previous attempt wrote; the
// controller server's per-name and per-ID locks keep one writer per record.
type clusterBackend struct {
	c dynamic.Interface
	// defaultWait bounds a wait when the request has no deadline.
	defaultWait time.Duration
	// apiTimeout bounds the Store calls, which take no context.
	apiTimeout time.Duration
	staleAfter time.Duration
	// recheck is how often a wait re-reads its object besides watching it
	// (see waitObject).
	recheck time.Duration
}

// ClusterBackendOptions tune NewClusterBackend; zero values take defaults.
type ClusterBackendOptions struct {
	// DefaultWait bounds a wait for a node agent when the request has no
	// deadline (default 2 minutes).
	DefaultWait time.Duration
	// StaleAfter is how old a ZonedNode's heartbeat may be before the
	// node counts as having no free capacity (default 5 minutes, well
	// above the agents' report period and any sane clock skew), so the
	// scheduler stops placing volumes where no agent would make them.
	StaleAfter time.Duration
}

// NewClusterBackend returns the controller's backend over the API server
// that c talks to. The CRDs of deploy/crds must be installed.
func NewClusterBackend(c dynamic.Interface, o ClusterBackendOptions) Backend {
	if o.DefaultWait == 0 {
		o.DefaultWait = 2 * time.Minute
	}
	if o.StaleAfter == 0 {
		o.StaleAfter = 5 * time.Minute
	}
	return &clusterBackend{c: c, defaultWait: o.DefaultWait, apiTimeout: 30 * time.Second, staleAfter: o.StaleAfter,
		recheck: defaultRecheck}
}

func (b *clusterBackend) res(gvr schema.GroupVersionResource) dynamic.ResourceInterface {
	return b.c.Resource(gvr)
}

// apiError wraps an API error: a server that cannot be reached is
// Unavailable (the CO retries), a conflict Aborted.
func apiError(what string, err error) error {
	switch {
	case err == nil:
		return nil
	case apierrors.IsNotFound(err):
		return errorf(ErrNotFound, "%s: %w", what, err)
	case apierrors.IsConflict(err):
		return errorf(ErrBusy, "%s: %w", what, err)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return fmt.Errorf("%s: %w", what, err)
	case apierrors.IsServerTimeout(err), apierrors.IsTimeout(err), apierrors.IsTooManyRequests(err),
		apierrors.IsServiceUnavailable(err), apierrors.IsInternalError(err):
		return errorf(ErrNotReady, "%s: API server: %w", what, err)
	case apierrors.IsForbidden(err), apierrors.IsUnauthorized(err):
		return errorf(ErrFailedPrecondition, "%s: API server refused (check the service account's RBAC): %w", what, err)
	case apierrors.IsInvalid(err), apierrors.IsBadRequest(err):
		return fmt.Errorf("%s: API server rejected the object (are deploy/crds up to date?): %w", what, err)
	}
	var se interface{ Status() metav1.Status }
	if errors.As(err, &se) {
		return fmt.Errorf("%s: %w", what, err)
	}
	return errorf(ErrNotReady, "%s: API server unreachable: %w", what, err)
}

func (b *clusterBackend) storeCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), b.apiTimeout)
}

// put creates obj, or replaces the spec, labels, record-state annotation
// and finalizers of the existing resource of that name (keeping status
// and whatever else others wrote).
func (b *clusterBackend) put(ctx context.Context, gvr schema.GroupVersionResource, obj *unstructured.Unstructured) error {
	r := b.res(gvr)
	what := fmt.Sprintf("write %s %s", gvr.Resource, obj.GetName())
	unstructured.RemoveNestedField(obj.Object, "status")
	unstructured.RemoveNestedField(obj.Object, "metadata", "creationTimestamp")
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := r.Get(ctx, obj.GetName(), metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			_, err = r.Create(ctx, obj, metav1.CreateOptions{})
			return err
		}
		if err != nil {
			return err
		}
		if cur.GetDeletionTimestamp() != nil {
			return errorf(ErrFailedPrecondition, "%s is being deleted", obj.GetName())
		}
		if spec, ok := obj.Object["spec"]; ok {
			cur.Object["spec"] = spec
		}
		labels := cur.GetLabels()
		if labels == nil {
			labels = map[string]string{}
		}
		for k, v := range obj.GetLabels() {
			labels[k] = v
		}
		cur.SetLabels(labels)
		ann := cur.GetAnnotations()
		if ann == nil {
			ann = map[string]string{}
		}
		for k, v := range obj.GetAnnotations() {
			ann[k] = v
		}
		cur.SetAnnotations(ann)
		fin := cur.GetFinalizers()
		for _, f := range obj.GetFinalizers() {
			if !slices.Contains(fin, f) {
				fin = append(fin, f)
			}
		}
		cur.SetFinalizers(fin)
		_, err = r.Update(ctx, cur, metav1.UpdateOptions{})
		return err
	})
	var ce *codedError
	if errors.As(err, &ce) {
		return err
	}
	return apiError(what, err)
}

func (b *clusterBackend) get(ctx context.Context, gvr schema.GroupVersionResource, name string) (*unstructured.Unstructured, error) {
	u, err := b.res(gvr).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, apiError(fmt.Sprintf("get %s %s", gvr.Resource, name), err)
	}
	return u, nil
}

// list returns the live (not terminating) resources matching selector,
// sorted by name (the records' ID order).
func (b *clusterBackend) list(ctx context.Context, gvr schema.GroupVersionResource, selector string) ([]unstructured.Unstructured, error) {
	var out []unstructured.Unstructured
	opts := metav1.ListOptions{LabelSelector: selector, Limit: 500}
	for {
		l, err := b.res(gvr).List(ctx, opts)
		if err != nil {
			return nil, apiError("list "+gvr.Resource, err)
		}
		for _, u := range l.Items {
			if u.GetDeletionTimestamp() == nil {
				out = append(out, u)
			}
		}
		if opts.Continue = l.GetContinue(); opts.Continue == "" {
			break
		}
	}
	slices.SortFunc(out, func(a, b unstructured.Unstructured) int { return strings.Compare(a.GetName(), b.GetName()) })
	return out, nil
}

func (b *clusterBackend) remove(ctx context.Context, gvr schema.GroupVersionResource, name string) error {
	err := b.res(gvr).Delete(ctx, name, metav1.DeleteOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return apiError(fmt.Sprintf("delete %s %s", gvr.Resource, name), err)
}

// Store: volumes.

func (b *clusterBackend) GetVolume(id string) (*VolumeRecord, error) {
	ctx, cancel := b.storeCtx()
	defer cancel()
	u, err := b.get(ctx, gvrVolume, id)
	if err != nil {
		return nil, err
	}
	zv, err := fromUnstructured[zonedVolume](u)
	if err != nil {
		return nil, err
	}
	return zv.record(), nil
}

func (b *clusterBackend) VolumeByName(name string) (*VolumeRecord, error) {
	ctx, cancel := b.storeCtx()
	defer cancel()
	items, err := b.list(ctx, gvrVolume, labelNameHash+"="+nameHash(name))
	if err != nil {
		return nil, err
	}
	for i := range items {
		zv, err := fromUnstructured[zonedVolume](&items[i])
		if err != nil {
			return nil, err
		}
		if zv.Spec.VolumeName == name {
			return zv.record(), nil
		}
	}
	return nil, errorf(ErrNotFound, "name %q not found", name)
}

func (b *clusterBackend) PutVolume(r *VolumeRecord) error {
	u, err := toUnstructured(volumeObject(r), "ZonedVolume")
	if err != nil {
		return err
	}
	ctx, cancel := b.storeCtx()
	defer cancel()
	return b.put(ctx, gvrVolume, u)
}

// DeleteVolume removes the record. The controller calls it after
// DeleteImage, which already waited for the resource to go.
func (b *clusterBackend) DeleteVolume(id string) error {
	ctx, cancel := b.storeCtx()
	defer cancel()
	return b.remove(ctx, gvrVolume, id)
}

func (b *clusterBackend) ListVolumes() ([]*VolumeRecord, error) {
	ctx, cancel := b.storeCtx()
	defer cancel()
	items, err := b.list(ctx, gvrVolume, "")
	if err != nil {
		return nil, err
	}
	out := make([]*VolumeRecord, 0, len(items))
	for i := range items {
		zv, err := fromUnstructured[zonedVolume](&items[i])
		if err != nil {
			return nil, err
		}
		out = append(out, zv.record())
	}
	return out, nil
}

// Store: snapshots.

func (b *clusterBackend) GetSnapshot(id string) (*SnapshotRecord, error) {
	ctx, cancel := b.storeCtx()
	defer cancel()
	u, err := b.get(ctx, gvrSnapshot, id)
	if err != nil {
		return nil, err
	}
	zs, err := fromUnstructured[zonedSnapshot](u)
	if err != nil {
		return nil, err
	}
	return zs.record(), nil
}

func (b *clusterBackend) SnapshotByName(name string) (*SnapshotRecord, error) {
	ctx, cancel := b.storeCtx()
	defer cancel()
	items, err := b.list(ctx, gvrSnapshot, labelNameHash+"="+nameHash(name))
	if err != nil {
		return nil, err
	}
	for i := range items {
		zs, err := fromUnstructured[zonedSnapshot](&items[i])
		if err != nil {
			return nil, err
		}
		if zs.Spec.SnapshotName == name {
			return zs.record(), nil
		}
	}
	return nil, errorf(ErrNotFound, "name %q not found", name)
}

func (b *clusterBackend) PutSnapshot(r *SnapshotRecord) error {
	u, err := toUnstructured(snapshotObject(r), "ZonedSnapshot")
	if err != nil {
		return err
	}
	ctx, cancel := b.storeCtx()
	defer cancel()
	return b.put(ctx, gvrSnapshot, u)
}

func (b *clusterBackend) DeleteSnapshot(id string) error {
	ctx, cancel := b.storeCtx()
	defer cancel()
	return b.remove(ctx, gvrSnapshot, id)
}

func (b *clusterBackend) ListSnapshots() ([]*SnapshotRecord, error) {
	ctx, cancel := b.storeCtx()
	defer cancel()
	items, err := b.list(ctx, gvrSnapshot, "")
	if err != nil {
		return nil, err
	}
	out := make([]*SnapshotRecord, 0, len(items))
	for i := range items {
		zs, err := fromUnstructured[zonedSnapshot](&items[i])
		if err != nil {
			return nil, err
		}
		out = append(out, zs.record())
	}
	return out, nil
}

// Store: group snapshots.

func (b *clusterBackend) GetGroup(id string) (*GroupSnapshotRecord, error) {
	ctx, cancel := b.storeCtx()
	defer cancel()
	u, err := b.get(ctx, gvrGroup, id)
	if err != nil {
		return nil, err
	}
	g, err := fromUnstructured[zonedGroupSnapshot](u)
	if err != nil {
		return nil, err
	}
	return g.record(), nil
}

func (b *clusterBackend) GroupByName(name string) (*GroupSnapshotRecord, error) {
	ctx, cancel := b.storeCtx()
	defer cancel()
	items, err := b.list(ctx, gvrGroup, labelNameHash+"="+nameHash(name))
	if err != nil {
		return nil, err
	}
	for i := range items {
		g, err := fromUnstructured[zonedGroupSnapshot](&items[i])
		if err != nil {
			return nil, err
		}
		if g.Spec.GroupName == name {
			return g.record(), nil
		}
	}
	return nil, errorf(ErrNotFound, "name %q not found", name)
}

func (b *clusterBackend) PutGroup(r *GroupSnapshotRecord) error {
	u, err := toUnstructured(groupObject(r), "ZonedGroupSnapshot")
	if err != nil {
		return err
	}
	ctx, cancel := b.storeCtx()
	defer cancel()
	return b.put(ctx, gvrGroup, u)
}

func (b *clusterBackend) DeleteGroup(id string) error {
	ctx, cancel := b.storeCtx()
	defer cancel()
	return b.remove(ctx, gvrGroup, id)
}

// Nodes and capacity: the ZonedNodes the agents keep.

func (b *clusterBackend) Nodes(ctx context.Context) ([]string, error) {
	items, err := b.list(ctx, gvrNode, "")
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(items))
	for _, u := range items {
		out = append(out, u.GetName())
	}
	return out, nil
}

func (b *clusterBackend) Capacity(ctx context.Context, node string) (uint64, error) {
	u, err := b.res(gvrNode).Get(ctx, node, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return 0, nil
	}
	if err != nil {
		return 0, apiError("get zonednode "+node, err)
	}
	zn, err := fromUnstructured[zonedNode](u)
	if err != nil {
		return 0, err
	}
	if hb, err := time.Parse(time.RFC3339, zn.Status.Heartbeat); err != nil || time.Since(hb) > b.staleAfter {
		klog.V(2).InfoS("Node agent has not reported lately; no capacity", "node", node, "heartbeat", zn.Status.Heartbeat)
		return 0, nil
	}
	return uint64(max(zn.Status.CapacityBytes, 0)), nil
}

// Image work: write the request, wait for the agent.

// waitVolume waits until volume id's status answers its current spec.
func (b *clusterBackend) waitVolume(ctx context.Context, id, what string) (Geometry, error) {
	var geo Geometry
	err := b.waitObject(ctx, gvrVolume, id, what, func(u *unstructured.Unstructured) (bool, error) {
		if u == nil {
			return false, apiError("get zonedvolume "+id, apierrors.NewNotFound(gvrVolume.GroupResource(), id))
		}
		zv, err := fromUnstructured[zonedVolume](u)
		if err != nil {
			return false, err
		}
		if zv.done() {
			geo = *zv.Status.Geometry
			return true, nil
		}
		if st := zv.Status; st.Phase == phaseFailed && st.ObservedGeneration == zv.Generation {
			return false, nodeError(fmt.Sprintf("volume %s on node %s", id, zv.Spec.Node), st.Reason, st.Error)
		}
		return false, nil
	})
	return geo, err
}

// updateVolumeSpec changes volume id's spec with fn (retrying conflicts).
func (b *clusterBackend) updateVolumeSpec(ctx context.Context, id string, fn func(zv *zonedVolume)) error {
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		u, err := b.res(gvrVolume).Get(ctx, id, metav1.GetOptions{})
		if err != nil {
			return err
		}
		zv, err := fromUnstructured[zonedVolume](u)
		if err != nil {
			return err
		}
		fn(zv)
		nu, err := toUnstructured(zv, "ZonedVolume")
		if err != nil {
			return err
		}
		u.Object["spec"] = nu.Object["spec"]
		_, err = b.res(gvrVolume).Update(ctx, u, metav1.UpdateOptions{})
		return err
	})
	return apiError("update zonedvolume "+id, err)
}

// CreateImage makes sure rec's resource exists (the controller wrote it in
// state creating; a retry finds it) and waits for the agent to report the
// image.
func (b *clusterBackend) CreateImage(ctx context.Context, rec *VolumeRecord, spec *volumeSpec) (Geometry, error) {
	if _, err := b.res(gvrVolume).Get(ctx, rec.ID, metav1.GetOptions{}); apierrors.IsNotFound(err) {
		r := *rec
		r.Geometry = spec.geo
		if err := b.PutVolume(&r); err != nil {
			return Geometry{}, err
		}
	} else if err != nil {
		return Geometry{}, apiError("get zonedvolume "+rec.ID, err)
	}
	return b.waitVolume(ctx, rec.ID, "create the image of volume "+rec.ID)
}

func (b *clusterBackend) ExpandImage(ctx context.Context, rec *VolumeRecord, size uint64) (Geometry, error) {
	err := b.updateVolumeSpec(ctx, rec.ID, func(zv *zonedVolume) {
		if uint64(zv.Spec.Size) < size {
			zv.Spec.Size = int64(size)
			if zv.Spec.Zone.Size > 0 {
				zv.Spec.Zone.Count = int64(size) / zv.Spec.Zone.Size
			}
		}
	})
	if err != nil {
		return Geometry{}, err
	}
	return b.waitVolume(ctx, rec.ID, fmt.Sprintf("expand volume %s to %d bytes", rec.ID, size))
}

func (b *clusterBackend) SetLimits(ctx context.Context, rec *VolumeRecord, maxOpen, maxActive uint32) (Geometry, error) {
	err := b.updateVolumeSpec(ctx, rec.ID, func(zv *zonedVolume) {
		zv.Spec.Limits.MaxOpenZones, zv.Spec.Limits.MaxActiveZones = int64(maxOpen), int64(maxActive)
	})
	if err != nil {
		return Geometry{}, err
	}
	return b.waitVolume(ctx, rec.ID, "change the zone limits of volume "+rec.ID)
}

// deleteAndWait deletes a resource whose finalizer the node agent removes
// once the image is gone, and waits for it to go. An agent that failed to
// delete the image says so in status (phase Deleting with an error).
func (b *clusterBackend) deleteAndWait(ctx context.Context, gvr schema.GroupVersionResource, id string) error {
	if err := b.remove(ctx, gvr, id); err != nil {
		return err
	}
	return b.waitObject(ctx, gvr, id, fmt.Sprintf("delete the image of %s", id), func(u *unstructured.Unstructured) (bool, error) {
		if u == nil {
			return true, nil
		}
		phase, _, _ := unstructured.NestedString(u.Object, "status", "phase")
		msg, _, _ := unstructured.NestedString(u.Object, "status", "error")
		reason, _, _ := unstructured.NestedString(u.Object, "status", "reason")
		if phase == phaseDeleting && msg != "" {
			return false, nodeError("delete "+id, reason, msg)
		}
		return false, nil
	})
}

func (b *clusterBackend) DeleteImage(ctx context.Context, rec *VolumeRecord) error {
	return b.deleteAndWait(ctx, gvrVolume, rec.ID)
}

// SnapshotImages waits for the agent to report every snapshot of the set.
// The controller wrote their resources (and, for a group, the
// ZonedGroupSnapshot naming all members) before calling; the agent takes
// a group's members together once it sees them all.
func (b *clusterBackend) SnapshotImages(ctx context.Context, vols []*VolumeRecord, snaps []*SnapshotRecord) error {
	for _, s := range snaps {
		if _, err := b.res(gvrSnapshot).Get(ctx, s.ID, metav1.GetOptions{}); apierrors.IsNotFound(err) {
			if err := b.PutSnapshot(s); err != nil {
				return err
			}
		} else if err != nil {
			return apiError("get zonedsnapshot "+s.ID, err)
		}
	}
	for _, s := range snaps {
		err := b.waitObject(ctx, gvrSnapshot, s.ID, "snapshot "+s.SourceVolumeID+" to "+s.ID, func(u *unstructured.Unstructured) (bool, error) {
			if u == nil {
				return false, apiError("get zonedsnapshot "+s.ID, apierrors.NewNotFound(gvrSnapshot.GroupResource(), s.ID))
			}
			zs, err := fromUnstructured[zonedSnapshot](u)
			if err != nil {
				return false, err
			}
			switch st := zs.Status; {
			case st.ObservedGeneration != zs.Generation:
				return false, nil
			case st.Phase == phaseReady:
				return true, nil
			case st.Phase == phaseFailed:
				return false, nodeError(fmt.Sprintf("snapshot %s on node %s", s.ID, zs.Spec.Node), st.Reason, st.Error)
			}
			return false, nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

func (b *clusterBackend) DeleteSnapshotImage(ctx context.Context, snap *SnapshotRecord) error {
	return b.deleteAndWait(ctx, gvrSnapshot, snap.ID)
}

// Health reports what the agent last found (it checks on every reconcile
// and resync).
func (b *clusterBackend) Health(ctx context.Context, rec *VolumeRecord) ([]HealthProblem, error) {
	u, err := b.res(gvrVolume).Get(ctx, rec.ID, metav1.GetOptions{})
	if err != nil {
		return nil, apiError("get zonedvolume "+rec.ID, err)
	}
	zv, err := fromUnstructured[zonedVolume](u)
	if err != nil {
		return nil, err
	}
	var out []HealthProblem
	for _, p := range zv.Status.Health {
		out = append(out, HealthProblem{Kind: p.Kind, Reason: p.Reason, Message: p.Message})
	}
	return out, nil
}
