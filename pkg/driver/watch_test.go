package driver

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic/fake"
	ktesting "k8s.io/client-go/testing"
)

// watchFixture is a cluster backend over client-go's fake dynamic client,
// with what the fake lacks for testing waits: resourceVersions (a counter
// the test assigns as it writes), list versions, and a handle on each
// watch the backend opens (with the options it opened it with). The
// backend's periodic re-read is off (an hour), so a wait that ends ended
// through its watch.
type watchFixture struct {
	t      *testing.T
	c      *fake.FakeDynamicClient
	tr     ktesting.ObjectTracker
	b      *clusterBackend
	opened chan openedWatch

	mu     sync.Mutex
	rv     int
	listRV string // the version of the last list answered
}

type openedWatch struct {
	opts ktesting.WatchRestrictions
	w    *watch.RaceFreeFakeWatcher
}

func newWatchFixture(t *testing.T) *watchFixture {
	t.Helper()
	c := fake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), ClusterGVRs())
	f := &watchFixture{t: t, c: c, tr: c.Tracker(), opened: make(chan openedWatch, 16)}
	c.PrependWatchReactor("*", func(a ktesting.Action) (bool, watch.Interface, error) {
		w, err := f.tr.Watch(a.GetResource(), a.GetNamespace())
		if err != nil {
			return true, nil, err
		}
		f.opened <- openedWatch{a.(ktesting.WatchAction).GetWatchRestrictions(), w.(*watch.RaceFreeFakeWatcher)}
		return true, w, nil
	})
	c.PrependReactor("list", "*", func(a ktesting.Action) (bool, runtime.Object, error) {
		l, err := f.tr.List(a.GetResource(), a.(ktesting.ListActionImpl).GetKind(), "")
		if err != nil {
			return true, nil, err
		}
		la, err := meta.ListAccessor(l)
		if err != nil {
			return true, nil, err
		}
		rv := f.nextRV()
		la.SetResourceVersion(rv)
		f.mu.Lock()
		f.listRV = rv
		f.mu.Unlock()
		return true, l, nil
	})
	f.b = &clusterBackend{c: c, defaultWait: time.Minute, apiTimeout: time.Minute, recheck: time.Hour}
	return f
}

func (f *watchFixture) nextRV() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rv++
	return strconv.Itoa(f.rv)
}

// volume is a ZonedVolume of 4 MiB (4 zones of 1 MiB) at generation 1.
func (f *watchFixture) volume(id string) *zonedVolume {
	g := Geometry{Size: 4 * mib, ZoneSize: mib, ZoneCapacity: mib, NrZones: 4, MaxOpen: 2, MaxActive: 2}
	zv := volumeObject(&VolumeRecord{ID: id, Name: "pvc-" + id, Node: "n1", State: stateCreating, Geometry: g, Created: time.Now()})
	zv.Generation = 1
	return zv
}

// write stores zv (creating it when new) with the next resourceVersion,
// as an API server would; the fake tracker tells its watchers.
func (f *watchFixture) write(zv *zonedVolume) {
	f.t.Helper()
	zv.ResourceVersion = f.nextRV()
	u, err := toUnstructured(zv, "ZonedVolume")
	if err != nil {
		f.t.Fatal(err)
	}
	if _, gerr := f.tr.Get(gvrVolume, "", zv.Name); apierrors.IsNotFound(gerr) {
		err = f.tr.Create(gvrVolume, u, "")
	} else {
		err = f.tr.Update(gvrVolume, u, "")
	}
	if err != nil {
		f.t.Fatal(err)
	}
}

// nextWatch returns the next watch the backend opens.
func (f *watchFixture) nextWatch() openedWatch {
	f.t.Helper()
	select {
	case ow := <-f.opened:
		return ow
	case <-time.After(10 * time.Second):
		f.t.Fatal("the backend opened no watch")
		return openedWatch{}
	}
}

type waitResult struct {
	geo Geometry
	err error
}

// waitVolume runs b.waitVolume in the background with a 10 s deadline.
func (f *watchFixture) waitVolume(id string) <-chan waitResult {
	ch := make(chan waitResult, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		g, err := f.b.waitVolume(ctx, id, "create the image of volume "+id)
		ch <- waitResult{g, err}
	}()
	return ch
}

func (f *watchFixture) result(ch <-chan waitResult) waitResult {
	f.t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(15 * time.Second):
		f.t.Fatal("the wait did not end")
		return waitResult{}
	}
}

func ready(zv *zonedVolume) {
	g := zv.specGeometry()
	zv.Status = zonedVolumeStatus{Phase: phaseReady, ObservedGeneration: zv.Generation, Geometry: &g}
}

// TestWaitVolumeDoneOnLaterUpdate: the wait reads the volume, watches it
// by name from the version it read, ignores other objects and states that
// are not the answer, and ends on the status update that is.
func TestWaitVolumeDoneOnLaterUpdate(t *testing.T) {
	f := newWatchFixture(t)
	zv := f.volume("zqv-a")
	f.write(zv)
	readRV := zv.ResourceVersion
	ch := f.waitVolume("zqv-a")
	ow := f.nextWatch()
	if got := ow.opts.ResourceVersion; got != readRV {
		t.Errorf("watch started at resourceVersion %q; want %q, the version of the initial Get", got, readRV)
	}
	if sel := ow.opts.Fields.String(); sel != "metadata.name=zqv-a" {
		t.Errorf("watch field selector %q; want metadata.name=zqv-a", sel)
	}
	// Another volume becoming ready is not this one (the fake does not
	// filter by the selector, so the backend must).
	other := f.volume("zqv-other")
	ready(other)
	f.write(other)
	// An answer to an older generation is not the answer.
	stale := *zv
	stale.Generation = 2
	stale.Status = zonedVolumeStatus{Phase: phaseReady, ObservedGeneration: 1, Geometry: &Geometry{Size: 4 * mib}}
	f.write(&stale)
	select {
	case r := <-ch:
		t.Fatalf("the wait ended before the answer: %+v", r)
	case <-time.After(100 * time.Millisecond):
	}
	done := stale
	ready(&done)
	f.write(&done)
	r := f.result(ch)
	if r.err != nil || r.geo.Size != 4*mib || r.geo.NrZones != 4 {
		t.Fatalf("wait = %+v, %v; want the reported geometry", r.geo, r.err)
	}
}

// TestWaitVolumeAlreadyDone: an answer already there needs no watch.
func TestWaitVolumeAlreadyDone(t *testing.T) {
	f := newWatchFixture(t)
	zv := f.volume("zqv-a")
	ready(zv)
	f.write(zv)
	if r := f.result(f.waitVolume("zqv-a")); r.err != nil || r.geo.Size != 4*mib {
		t.Fatalf("wait = %+v", r)
	}
	select {
	case <-f.opened:
		t.Fatal("a watch was opened for a volume whose answer was already there")
	default:
	}
}

// TestWaitVolumeErrorStatus: a Failed status for the current generation
// ends the wait with the node's error and its gRPC code.
func TestWaitVolumeErrorStatus(t *testing.T) {
	f := newWatchFixture(t)
	zv := f.volume("zqv-a")
	f.write(zv)
	ch := f.waitVolume("zqv-a")
	f.nextWatch()
	zv.Status = zonedVolumeStatus{Phase: phaseFailed, ObservedGeneration: 1, Reason: errorReason(errorf(ErrResourceExhausted, "x")),
		Error: "no space left on the data directory"}
	f.write(zv)
	r := f.result(ch)
	if code(r.err) != codes.ResourceExhausted || !strings.Contains(r.err.Error(), "no space left") {
		t.Fatalf("wait = %v (%v); want ResourceExhausted with the node's message", r.err, code(r.err))
	}
}

// TestWaitVolumeDeleted: a volume deleted while waited for is NotFound,
// as a Get of it would be.
func TestWaitVolumeDeleted(t *testing.T) {
	f := newWatchFixture(t)
	f.write(f.volume("zqv-a"))
	ch := f.waitVolume("zqv-a")
	f.nextWatch()
	if err := f.tr.Delete(gvrVolume, "", "zqv-a"); err != nil {
		t.Fatal(err)
	}
	if r := f.result(ch); code(r.err) != codes.NotFound {
		t.Fatalf("wait = %v; want NotFound", r.err)
	}
}

// TestDeleteAndWait: the delete wait ends when the resource is gone (the
// agent removed its finalizer), and reports the agent's error while it
// cannot delete the image.
func TestDeleteAndWait(t *testing.T) {
	for _, tc := range []struct {
		name    string
		agent   func(f *watchFixture, zv *zonedVolume)
		wantErr codes.Code
	}{
		{"finalizer removed", func(f *watchFixture, zv *zonedVolume) {
			if err := f.tr.Delete(gvrVolume, "", zv.Name); err != nil {
				t.Fatal(err)
			}
		}, codes.OK},
		{"agent cannot delete", func(f *watchFixture, zv *zonedVolume) {
			zv.Status.Phase, zv.Status.Reason, zv.Status.Error = phaseDeleting, errorReason(errorf(ErrFailedPrecondition, "x")),
				"volume zqv-a is still staged on this node; unstage it first"
			f.write(zv)
		}, codes.FailedPrecondition},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newWatchFixture(t)
			zv := f.volume("zqv-a")
			f.write(zv)
			// The API server only marks an object with finalizers.
			f.c.PrependReactor("delete", "zonedvolumes", func(ktesting.Action) (bool, runtime.Object, error) {
				now := metav1.Now()
				zv.DeletionTimestamp = &now
				f.write(zv)
				return true, nil, nil
			})
			ch := make(chan error, 1)
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				ch <- f.b.DeleteImage(ctx, &VolumeRecord{ID: "zqv-a"})
			}()
			f.nextWatch()
			tc.agent(f, zv)
			select {
			case err := <-ch:
				if code(err) != tc.wantErr {
					t.Fatalf("DeleteImage = %v (%v); want %v", err, code(err), tc.wantErr)
				}
			case <-time.After(15 * time.Second):
				t.Fatal("DeleteImage did not return")
			}
		})
	}
}

// TestWaitVolumeWatchClosed: a watch the server ends is resumed after
// re-reading the object, and a change made while no watch ran is seen by
// that read.
func TestWaitVolumeWatchClosed(t *testing.T) {
	f := newWatchFixture(t)
	zv := f.volume("zqv-a")
	f.write(zv)
	ch := f.waitVolume("zqv-a")
	first := f.nextWatch()
	// An unrelated update moves the watch on, then the server closes it.
	zv.Labels["x"] = "y"
	f.write(zv)
	seen := zv.ResourceVersion
	first.w.Stop()
	second := f.nextWatch()
	if second.opts.ResourceVersion != seen {
		t.Errorf("the watch resumed at %q; want %q, the last version seen", second.opts.ResourceVersion, seen)
	}
	// Closed again; this time the answer lands while no watch runs (the
	// fake tracker does not replay it to the next watch, so only the
	// re-read can see it).
	second.w.Stop()
	ready(zv)
	f.write(zv)
	r := f.result(ch)
	if r.err != nil || r.geo.Size != 4*mib {
		t.Fatalf("wait = %+v, %v", r.geo, r.err)
	}
}

// TestWaitVolumeWatchExpired: a 410 Gone (the resumption point left the
// server's window) makes the wait list the object, whose list version is
// current, and watch again from there.
func TestWaitVolumeWatchExpired(t *testing.T) {
	for _, how := range []string{"error event", "watch refused"} {
		t.Run(how, func(t *testing.T) {
			f := newWatchFixture(t)
			zv := f.volume("zqv-a")
			f.write(zv)
			if how == "watch refused" {
				refused := false
				f.c.PrependWatchReactor("*", func(ktesting.Action) (bool, watch.Interface, error) {
					if refused {
						return false, nil, nil
					}
					refused = true
					return true, nil, apierrors.NewResourceExpired("too old resource version: 1 (5)")
				})
			}
			ch := f.waitVolume("zqv-a")
			if how == "error event" {
				first := f.nextWatch()
				gone := apierrors.NewResourceExpired("too old resource version: 1 (5)").ErrStatus
				first.w.Error(&gone)
			}
			again := f.nextWatch()
			for _, a := range f.c.Actions() {
				if l, ok := a.(ktesting.ListAction); ok && a.GetVerb() == "list" {
					if sel := l.GetListRestrictions().Fields.String(); sel != "metadata.name=zqv-a" {
						t.Errorf("re-read listed with selector %q", sel)
					}
				}
			}
			f.mu.Lock()
			listRV := f.listRV
			f.mu.Unlock()
			if listRV == "" || again.opts.ResourceVersion != listRV {
				t.Fatalf("after 410 the watch restarted at %q; want the list's version %q", again.opts.ResourceVersion, listRV)
			}
			ready(zv)
			f.write(zv)
			if r := f.result(ch); r.err != nil {
				t.Fatalf("wait = %v", r.err)
			}
		})
	}
}

// TestWaitVolumeDeadline: with no answer the wait ends at the deadline
// with the context's error (the CO gets DeadlineExceeded and retries) in
// the error text it always had; without a deadline, defaultWait bounds it.
func TestWaitVolumeDeadline(t *testing.T) {
	f := newWatchFixture(t)
	f.write(f.volume("zqv-a"))
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := f.b.waitVolume(ctx, "zqv-a", "create the image of volume zqv-a")
	if !errors.Is(err, context.DeadlineExceeded) || code(err) != codes.DeadlineExceeded ||
		err.Error() != "waiting for the node agent to create the image of volume zqv-a: context deadline exceeded" {
		t.Fatalf("wait = %v (%v); want DeadlineExceeded", err, code(err))
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("the wait took %v past a 200 ms deadline", d)
	}
	f.b.defaultWait = 200 * time.Millisecond
	if _, err := f.b.waitVolume(context.Background(), "zqv-a", "x"); code(err) != codes.DeadlineExceeded {
		t.Fatalf("wait without a deadline = %v; want DeadlineExceeded after defaultWait", err)
	}
}

// TestWaitVolumeRecheck: a watch that stalls (open, silent) does not
// stall the wait: the periodic re-read finds the answer.
func TestWaitVolumeRecheck(t *testing.T) {
	f := newWatchFixture(t)
	f.b.recheck = 50 * time.Millisecond
	silent := watch.NewFake() // never delivers anything
	f.c.PrependWatchReactor("*", func(ktesting.Action) (bool, watch.Interface, error) { return true, silent, nil })
	zv := f.volume("zqv-a")
	f.write(zv)
	ch := f.waitVolume("zqv-a")
	ready(zv)
	if err := f.tr.Update(gvrVolume, mustUnstructured(t, zv), ""); err != nil {
		t.Fatal(err)
	}
	if r := f.result(ch); r.err != nil {
		t.Fatalf("wait = %v", r.err)
	}
}

// TestWaitSnapshot: the snapshot wait goes through the same helper.
func TestWaitSnapshot(t *testing.T) {
	f := newWatchFixture(t)
	zs := snapshotObject(&SnapshotRecord{ID: "zqs-a", Name: "snap", SourceVolumeID: "zqv-a", Node: "n1", Created: time.Now()})
	zs.Generation = 1
	u := mustUnstructuredKind(t, zs, "ZonedSnapshot")
	if err := f.tr.Create(gvrSnapshot, u, ""); err != nil {
		t.Fatal(err)
	}
	ch := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		ch <- f.b.SnapshotImages(ctx, nil, []*SnapshotRecord{{ID: "zqs-a", SourceVolumeID: "zqv-a"}})
	}()
	f.nextWatch()
	zs.Status = zonedSnapshotStatus{Phase: phaseReady, ObservedGeneration: 1}
	if err := f.tr.Update(gvrSnapshot, mustUnstructuredKind(t, zs, "ZonedSnapshot"), ""); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-ch:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("SnapshotImages did not return")
	}
}

func mustUnstructured(t *testing.T, zv *zonedVolume) *unstructured.Unstructured {
	return mustUnstructuredKind(t, zv, "ZonedVolume")
}

func mustUnstructuredKind(t *testing.T, obj any, kind string) *unstructured.Unstructured {
	t.Helper()
	u, err := toUnstructured(obj, kind)
	if err != nil {
		t.Fatal(err)
	}
	return u
}
