package driver

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// NodeAgentConfig configures a NodeAgent.
type NodeAgentConfig struct {
	Node       string
	Attacher   string // the attacher's kind, reported in ZonedNode
	MaxVolumes int64  // reported in ZonedNode
	// Resync re-reconciles every resource of the node (health, zone
	// summary, failed work) this often; default 1 minute.
	Resync time.Duration
	// CapacityEvery is the ZonedNode report period; default 30 seconds.
	// Image work also triggers a report.
	CapacityEvery time.Duration
	// ZonesEvery refreshes the zone summary of the volumes staged here
	// this often (a status write only when the counts changed); default
	// 15 seconds. Staging and unstaging refresh it at once.
	ZonesEvery time.Duration
	Workers    int // default 2
}

// NodeAgent is the node side of the cluster backend (DESIGN.md point 7):
// it watches the ZonedVolumes and ZonedSnapshots labelled with its node,
// makes their images agree with their spec through the node's Images
// (shared with the node service, so work on a staged volume freezes its
// I/O), reports in their status, removes their finalizer once a deleted
// resource's image is gone, and keeps its ZonedNode's free capacity
// current. Every step is idempotent: a reconcile that failed half way is
// retried (rate-limited) and a resync retries the rest.
type NodeAgent struct {
	c      dynamic.Interface
	images *Images
	local  *localBackend // the image work, as --mode all does it
	cfg    NodeAgentConfig

	queue    workqueue.TypedRateLimitingInterface[string]
	vols     cache.SharedIndexInformer
	snaps    cache.SharedIndexInformer
	capacity chan struct{}
	// snapMu serializes snapshot work: the members of a group are
	// reconciled by different workers, and each may take the whole set.
	snapMu sync.Mutex
}

// NewNodeAgent returns an agent for cfg.Node doing image work in images.
func NewNodeAgent(c dynamic.Interface, images *Images, cfg NodeAgentConfig) *NodeAgent {
	if cfg.Resync == 0 {
		cfg.Resync = time.Minute
	}
	if cfg.CapacityEvery == 0 {
		cfg.CapacityEvery = 30 * time.Second
	}
	if cfg.Workers == 0 {
		cfg.Workers = 2
	}
	if cfg.ZonesEvery == 0 {
		cfg.ZonesEvery = 15 * time.Second
	}
	return &NodeAgent{c: c, images: images, cfg: cfg,
		local:    &localBackend{node: cfg.Node, images: images},
		capacity: make(chan struct{}, 1)}
}

// Key prefixes of the work queue.
const (
	keyVolume   = "volume/"
	keySnapshot = "snapshot/"
)

// Start reports the node's capacity, starts the informers and waits for
// their caches, then runs the workers and the capacity reports in the
// background until ctx ends. The returned function waits for them to stop.
func (a *NodeAgent) Start(ctx context.Context) (wait func(), err error) {
	if err := a.reportNode(ctx); err != nil {
		return nil, fmt.Errorf("node agent: report ZonedNode %s: %w", a.cfg.Node, err)
	}
	a.queue = workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](5*time.Millisecond, 30*time.Second),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "zq-csi-node-agent"})
	f := dynamicinformer.NewFilteredDynamicSharedInformerFactory(a.c, a.cfg.Resync, metav1.NamespaceAll,
		func(o *metav1.ListOptions) { o.LabelSelector = labelNode + "=" + a.cfg.Node })
	a.vols = f.ForResource(gvrVolume).Informer()
	a.snaps = f.ForResource(gvrSnapshot).Informer()
	for inf, prefix := range map[cache.SharedIndexInformer]string{a.vols: keyVolume, a.snaps: keySnapshot} {
		enqueue := func(obj any) {
			if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = d.Obj
			}
			if u, ok := obj.(*unstructured.Unstructured); ok {
				a.queue.Add(prefix + u.GetName())
			}
		}
		_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    enqueue,
			UpdateFunc: func(_, n any) { enqueue(n) },
			DeleteFunc: enqueue,
		})
		if err != nil {
			return nil, err
		}
	}
	f.Start(ctx.Done())
	for _, ok := range f.WaitForCacheSync(ctx.Done()) {
		if !ok {
			a.queue.ShutDown()
			return nil, fmt.Errorf("node agent: informer caches did not sync: %w", context.Cause(ctx))
		}
	}
	var wg sync.WaitGroup
	for range a.cfg.Workers {
		wg.Go(func() {
			for a.work(ctx) {
			}
		})
	}
	wg.Go(func() { a.capacityLoop(ctx) })
	a.images.setOnServe(func(id string) { a.queue.Add(keyVolume + id) })
	wg.Go(func() { a.zonesLoop(ctx) })
	wg.Go(func() {
		<-ctx.Done()
		a.images.setOnServe(nil)
		a.queue.ShutDown()
	})
	klog.InfoS("Node agent started", "node", a.cfg.Node)
	return func() { wg.Wait(); f.Shutdown() }, nil
}

func (a *NodeAgent) work(ctx context.Context) bool {
	key, quit := a.queue.Get()
	if quit {
		return false
	}
	defer a.queue.Done(key)
	var err error
	if name, ok := strings.CutPrefix(key, keyVolume); ok {
		err = a.reconcileVolume(ctx, name)
	} else if name, ok := strings.CutPrefix(key, keySnapshot); ok {
		err = a.reconcileSnapshot(ctx, name)
	}
	if err != nil {
		klog.V(2).InfoS("Node agent will retry", "key", key, "err", err)
		a.queue.AddRateLimited(key)
		return true
	}
	a.queue.Forget(key)
	return true
}

func (a *NodeAgent) kick() {
	select {
	case a.capacity <- struct{}{}:
	default:
	}
}

func (a *NodeAgent) capacityLoop(ctx context.Context) {
	t := time.NewTicker(a.cfg.CapacityEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-a.capacity:
		}
		if err := a.reportNode(ctx); err != nil && ctx.Err() == nil {
			klog.ErrorS(err, "Reporting node capacity", "node", a.cfg.Node)
		}
	}
}

// zonesLoop re-reconciles the volumes staged here every ZonesEvery, so
// their zone summary (kubectl get zonedvolumes) follows the writes; the
// status is written only when it changed.
func (a *NodeAgent) zonesLoop(ctx context.Context) {
	t := time.NewTicker(a.cfg.ZonesEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, id := range a.images.Served() {
			a.queue.Add(keyVolume + id)
		}
	}
}

// reportNode creates this node's ZonedNode if missing and writes its
// status: free and total bytes of the data directory, the attacher and
// the volume limit.
func (a *NodeAgent) reportNode(ctx context.Context) error {
	avail, total, err := a.images.Capacity()
	if err != nil {
		return err
	}
	r := a.c.Resource(gvrNode)
	u, err := r.Get(ctx, a.cfg.Node, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		zn := &zonedNode{}
		zn.Name = a.cfg.Node
		nu, cerr := toUnstructured(zn, "ZonedNode")
		if cerr != nil {
			return cerr
		}
		unstructured.RemoveNestedField(nu.Object, "status")
		unstructured.RemoveNestedField(nu.Object, "metadata", "creationTimestamp")
		u, err = r.Create(ctx, nu, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			u, err = r.Get(ctx, a.cfg.Node, metav1.GetOptions{})
		}
	}
	if err != nil {
		return err
	}
	st := zonedNodeStatus{CapacityBytes: int64(avail), TotalBytes: int64(total), Attacher: a.cfg.Attacher,
		MaxVolumes: a.cfg.MaxVolumes, DataDir: a.images.dataDir, Heartbeat: time.Now().UTC().Format(time.RFC3339)}
	m, err := toUnstructured(&zonedNode{Status: st}, "ZonedNode")
	if err != nil {
		return err
	}
	u.Object["status"] = m.Object["status"]
	_, err = r.UpdateStatus(ctx, u, metav1.UpdateOptions{})
	return err
}

func (a *NodeAgent) cached(inf cache.SharedIndexInformer, name string) (*unstructured.Unstructured, error) {
	obj, ok, err := inf.GetStore().GetByKey(name)
	if err != nil || !ok {
		return nil, err
	}
	return obj.(*unstructured.Unstructured).DeepCopy(), nil
}

// removeFinalizer lets a deleted resource go once its image is gone.
func (a *NodeAgent) removeFinalizer(ctx context.Context, gvr schema.GroupVersionResource, u *unstructured.Unstructured) error {
	fin := slices.DeleteFunc(u.GetFinalizers(), func(f string) bool { return f == finalizerImage })
	u.SetFinalizers(fin)
	_, err := a.c.Resource(gvr).Update(ctx, u, metav1.UpdateOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// writeStatus stores st as u's status unless it is unchanged.
func (a *NodeAgent) writeStatus(ctx context.Context, gvr schema.GroupVersionResource, u *unstructured.Unstructured, st any) error {
	m, err := jsonMap(st)
	if err != nil {
		return err
	}
	if reflect.DeepEqual(u.Object["status"], m) {
		return nil
	}
	u.Object["status"] = m
	_, err = a.c.Resource(gvr).UpdateStatus(ctx, u, metav1.UpdateOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// finishDeletion ends the deletion of a resource of this node: del
// removes its image, then the finalizer goes (and capacity is reported
// again); while del fails, failed(err) is written as its status (phase
// Deleting) and the work is retried.
func (a *NodeAgent) finishDeletion(ctx context.Context, gvr schema.GroupVersionResource, u *unstructured.Unstructured,
	finalizers []string, del func() error, failed func(error) any) error {
	if !slices.Contains(finalizers, finalizerImage) {
		return nil
	}
	if err := del(); err != nil {
		return errors.Join(err, a.writeStatus(ctx, gvr, u, failed(err)))
	}
	a.kick()
	return a.removeFinalizer(ctx, gvr, u)
}

func (a *NodeAgent) reconcileVolume(ctx context.Context, name string) error {
	u, err := a.cached(a.vols, name)
	if err != nil || u == nil {
		return err
	}
	zv, err := fromUnstructured[zonedVolume](u)
	if err != nil {
		return err
	}
	if zv.Spec.Node != a.cfg.Node {
		return nil
	}
	if zv.DeletionTimestamp != nil {
		return a.finishDeletion(ctx, gvrVolume, u, zv.Finalizers, func() error {
			if err := a.images.Delete(name); err != nil {
				return err
			}
			klog.InfoS("Node agent deleted volume image", "volumeID", name)
			return nil
		}, func(err error) any {
			st := zv.Status
			st.Phase, st.Reason, st.Error = phaseDeleting, errorReason(err), err.Error()
			return &st
		})
	}
	st := zonedVolumeStatus{ObservedGeneration: zv.Generation, ImagePath: a.images.VolumePath(name)}
	geo, werr := a.ensureVolume(zv)
	if werr == nil {
		st.Phase, st.Geometry = phaseReady, &geo
		if zs, err := a.images.zoneSummary(name); err == nil {
			st.Zones = zs
		}
	} else {
		st.Phase, st.Reason, st.Error = phaseFailed, errorReason(werr), werr.Error()
		st.Geometry = zv.Status.Geometry // keeps the mark that the image was made
		klog.ErrorS(werr, "Node agent: volume image work failed", "volumeID", name)
	}
	if st.Geometry != nil {
		// Health of an image that exists or should (ControllerGetVolumeHealth).
		for _, p := range a.images.Health(name) {
			st.Health = append(st.Health, healthProblem{Kind: p.Kind, Reason: p.Reason, Message: p.Message})
		}
	}
	return errors.Join(werr, a.writeStatus(ctx, gvrVolume, u, &st))
}

// ensureVolume makes volume zv's image agree with its spec: created (empty
// or from its source), grown to spec.size, with spec's limits.
func (a *NodeAgent) ensureVolume(zv *zonedVolume) (Geometry, error) {
	rec := zv.record()
	want := zv.specGeometry()
	if !a.images.Exists(rec.ID) {
		if zv.Status.Geometry != nil || rec.State == stateReady {
			// Made before and gone since: never paper over lost data with
			// a new empty image.
			return Geometry{}, errorf(ErrNotFound, "the image of volume %s (%s) is missing on node %s", rec.ID, a.images.VolumePath(rec.ID), a.cfg.Node)
		}
		spec, err := buildSpec(rec.Params, want.Size)
		if err != nil {
			return Geometry{}, err
		}
		spec.geo.MaxOpen, spec.geo.MaxActive = want.MaxOpen, want.MaxActive
		if _, err := a.local.CreateImage(context.Background(), rec, spec); err != nil {
			return Geometry{}, err
		}
		a.kick()
		klog.InfoS("Node agent created volume image", "volumeID", rec.ID, "size", want.Size)
	}
	g, err := a.images.Geometry(rec.ID)
	if err != nil {
		return g, err
	}
	if g.Size < want.Size {
		if g, err = a.images.Expand(rec.ID, want.Size); err != nil {
			return g, err
		}
		a.kick()
	}
	if g.MaxOpen != want.MaxOpen || g.MaxActive != want.MaxActive {
		if g, err = a.images.SetLimits(rec.ID, want.MaxOpen, want.MaxActive); err != nil {
			return g, err
		}
	}
	return g, nil
}

func (a *NodeAgent) reconcileSnapshot(ctx context.Context, name string) error {
	u, err := a.cached(a.snaps, name)
	if err != nil || u == nil {
		return err
	}
	zs, err := fromUnstructured[zonedSnapshot](u)
	if err != nil {
		return err
	}
	if zs.Spec.Node != a.cfg.Node {
		return nil
	}
	if zs.DeletionTimestamp != nil {
		return a.finishDeletion(ctx, gvrSnapshot, u, zs.Finalizers, func() error { return a.images.DeleteSnapshot(name) },
			func(err error) any {
				st := zs.Status
				st.Phase, st.Reason, st.Error = phaseDeleting, errorReason(err), err.Error()
				return &st
			})
	}
	ready := func(id string, obj *unstructured.Unstructured, gen int64) error {
		return a.writeStatus(ctx, gvrSnapshot, obj, &zonedSnapshotStatus{Phase: phaseReady, ObservedGeneration: gen,
			ImagePath: a.images.snapshotPath(id)})
	}
	a.snapMu.Lock()
	defer a.snapMu.Unlock()
	if a.images.SnapshotExists(name) {
		// Made by this or an earlier reconcile (the image is renamed into
		// place only when complete).
		return ready(name, u, zs.Generation)
	}
	if zs.Status.Phase == phaseReady || zs.Status.Phase == phaseFailed && zs.Status.ImagePath != "" ||
		zs.Annotations[annotationState] == stateReady {
		// Taken before and gone since: a snapshot taken now would hold
		// other data.
		err := errorf(ErrNotFound, "the image of snapshot %s (%s) is missing on node %s", name, a.images.snapshotPath(name), a.cfg.Node)
		st := zonedSnapshotStatus{Phase: phaseFailed, ObservedGeneration: zs.Generation, ImagePath: a.images.snapshotPath(name),
			Reason: errorReason(err), Error: err.Error()}
		return a.writeStatus(ctx, gvrSnapshot, u, &st)
	}
	vols, snaps := []string{zs.Spec.SourceVolume}, []string{name}
	members := map[string]*unstructured.Unstructured{name: u}
	if zs.Spec.Group != "" {
		// A group's members are taken together (one crash-consistent
		// set), once the agent sees all that the group record names.
		gu, err := a.c.Resource(gvrGroup).Get(ctx, zs.Spec.Group, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("group snapshot %s of snapshot %s: %w", zs.Spec.Group, name, err)
		}
		g, err := fromUnstructured[zonedGroupSnapshot](gu)
		if err != nil {
			return err
		}
		vols, snaps = nil, nil
		for _, sid := range g.Spec.Snapshots {
			mu, err := a.cached(a.snaps, sid)
			if err != nil {
				return err
			}
			if mu == nil {
				return fmt.Errorf("group snapshot %s: member %s not seen yet", g.Name, sid)
			}
			m, err := fromUnstructured[zonedSnapshot](mu)
			if err != nil {
				return err
			}
			members[sid] = mu
			if !a.images.SnapshotExists(sid) {
				vols, snaps = append(vols, m.Spec.SourceVolume), append(snaps, sid)
			}
		}
	}
	if err := a.images.Snapshot(vols, snaps); err != nil {
		st := zonedSnapshotStatus{Phase: phaseFailed, ObservedGeneration: zs.Generation, Reason: errorReason(err), Error: err.Error()}
		klog.ErrorS(err, "Node agent: snapshot failed", "snapshotID", name, "sourceVolumeIDs", vols)
		return errors.Join(err, a.writeStatus(ctx, gvrSnapshot, u, &st))
	}
	klog.InfoS("Node agent took snapshot", "snapshotIDs", snaps, "sourceVolumeIDs", vols)
	a.kick()
	for _, sid := range snaps {
		mu := members[sid]
		if err := ready(sid, mu, mu.GetGeneration()); err != nil {
			return err
		}
	}
	return nil
}

// zoneSummary counts volume id's zones per condition, from the staged
// device when there is one, else from the image opened read-only.
func (m *Images) zoneSummary(id string) (*zoneSummary, error) {
	s := m.slot(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	var reps []zoned.ZoneReport
	if s.dev != nil {
		s.gate.RLock()
		reps = s.dev.Report(0, int(s.dev.Geometry().NrZones))
		s.gate.RUnlock()
	} else {
		// A summary is inspection: it must not fail (nor keep a writer
		// out) while another process, e.g. `zq-csi img io`, has the image.
		dev, err := zoned.Open(s.path, zoned.OpenOptions{ReadOnly: true, ForceShare: true})
		if err != nil {
			return nil, err
		}
		reps = dev.Report(0, int(dev.Geometry().NrZones))
		if err := dev.Close(); err != nil {
			return nil, err
		}
	}
	z := &zoneSummary{}
	for _, r := range reps {
		switch r.Cond {
		case zoned.CondNotWP:
			z.Conventional++
		case zoned.CondEmpty:
			z.Empty++
		case zoned.CondImpOpen:
			z.ImplicitOpen++
		case zoned.CondExpOpen:
			z.ExplicitOpen++
		case zoned.CondClosed:
			z.Closed++
		case zoned.CondFull:
			z.Full++
		case zoned.CondReadOnly:
			z.ReadOnly++
		case zoned.CondOffline:
			z.Offline++
		}
	}
	z.Summary = fmt.Sprintf("conv=%d empty=%d open=%d closed=%d full=%d", z.Conventional, z.Empty,
		z.ImplicitOpen+z.ExplicitOpen, z.Closed, z.Full)
	if z.ReadOnly+z.Offline > 0 {
		z.Summary += fmt.Sprintf(" ro=%d offline=%d", z.ReadOnly, z.Offline)
	}
	return z, nil
}

// StartNodeAgent starts the node agent of cluster mode over d's Images
// (shared with d's node service) once d has recovered its attachments, so
// that image work never races the reopening of a staged volume. o.Node,
// o.Attacher and o.MaxVolumes default to d's. The returned function waits
// for the agent to stop after ctx ends.
func (d *Driver) StartNodeAgent(ctx context.Context, c dynamic.Interface, o NodeAgentConfig) (wait func(), err error) {
	if d.node == nil {
		return nil, errors.New("the node agent runs with the node service (--mode node or all)")
	}
	if !d.ready.Load() {
		return nil, errors.New("the node agent starts after Recover")
	}
	if o.Node == "" {
		o.Node = d.cfg.NodeID
	}
	if o.Attacher == "" {
		o.Attacher = d.cfg.Attacher.Kind()
	}
	if o.MaxVolumes == 0 {
		o.MaxVolumes = d.cfg.MaxVolumesPerNode
		if dc, ok := d.cfg.Attacher.(deviceCounter); ok && o.MaxVolumes == 0 {
			o.MaxVolumes = int64(dc.MaxDevices())
		}
	}
	return NewNodeAgent(c, d.images, o).Start(ctx)
}

// RunNodeAgent waits for d to be ready (Run recovers first), runs the node
// agent until ctx ends, and returns once it has stopped.
func (d *Driver) RunNodeAgent(ctx context.Context, c dynamic.Interface, o NodeAgentConfig) error {
	for !d.ready.Load() {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(50 * time.Millisecond):
		}
	}
	wait, err := d.StartNodeAgent(ctx, c, o)
	if err != nil {
		return err
	}
	wait()
	return nil
}
