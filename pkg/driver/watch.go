package driver

import (
	"context"
	"fmt"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/klog/v2"
)

// objectCheck decides a wait from one state of the watched object: done,
// failed (err), or neither (keep waiting). u is nil when the object does
// not exist (it was deleted, or never made).
type objectCheck func(u *unstructured.Unstructured) (done bool, err error)

// defaultRecheck is how often a wait re-reads its object regardless of
// the watch, in case a watch stalls without closing (a proxy or load
// balancer that keeps the stream open and passes nothing). A healthy
// watch answers long before it.
const defaultRecheck = 5 * time.Second

// waitObject waits, within ctx (bounded by defaultWait when it has no
// deadline), until check reports done or an error for resource name of
// gvr. It reads the object once and then watches that one object
// (field selector metadata.name) from the resourceVersion of the read, so
// no change between the read and the watch is missed, and evaluates check
// on every state the watch delivers; a deletion is evaluated as a nil
// object.
//
// The watch is resumed when the server ends it (watches are closed after
// a few minutes by design) from the last version seen. When that version
// has left the server's watch window (410 Gone, "too old resource
// version"), the object is read again with a list, whose version is the
// current one, and the watch restarts there. A watch that cannot be
// opened is retried with backoff while the object is re-read, so an API
// server (or RBAC) that refuses watches slows a wait down but does not
// fail it. The object is also re-read every b.recheck.
//
// When ctx ends first the error keeps ctx's error ("waiting for the node
// agent to <what>: context deadline exceeded"), so the CO gets
// DeadlineExceeded and retries (CSI spec: CreateVolume "SHOULD" be
// retried after a timeout, and is idempotent here).
func (b *clusterBackend) waitObject(ctx context.Context, gvr schema.GroupVersionResource, name, what string, check objectCheck) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, b.defaultWait)
		defer cancel()
	}
	w := &objectWaiter{b: b, ctx: ctx, gvr: gvr, name: name, what: what, check: check}
	return w.run()
}

type objectWaiter struct {
	b     *clusterBackend
	ctx   context.Context
	gvr   schema.GroupVersionResource
	name  string
	what  string
	check objectCheck
	rv    string // where the next watch starts
}

// expired is the error of a wait whose context ended.
func (w *objectWaiter) expired() error {
	return fmt.Errorf("waiting for the node agent to %s: %w", w.what, w.ctx.Err())
}

// readErr turns an error of a read into the wait's error.
func (w *objectWaiter) readErr(verb string, err error) error {
	if w.ctx.Err() != nil {
		return w.expired()
	}
	return apiError(verb+" "+w.gvr.Resource+" "+w.name, err)
}

// get reads the object, evaluates check on it and remembers its version.
func (w *objectWaiter) get() (bool, error) {
	u, err := w.b.res(w.gvr).Get(w.ctx, w.name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		// A missing object has no version of its own; a watch from ""
		// starts with the current state, so its creation is not missed.
		w.rv = ""
		return w.check(nil)
	}
	if err != nil {
		return false, w.readErr("get", err)
	}
	w.rv = u.GetResourceVersion()
	return w.check(u)
}

// list reads the object through a list by name, whose resourceVersion is
// the server's current one (an object's own version may be older than
// the watch window, and watching from it would fail with 410 again).
func (w *objectWaiter) list() (bool, error) {
	l, err := w.b.res(w.gvr).List(w.ctx, metav1.ListOptions{FieldSelector: w.selector()})
	if err != nil {
		return false, w.readErr("list", err)
	}
	w.rv = l.GetResourceVersion()
	for i := range l.Items {
		if l.Items[i].GetName() == w.name { // fake clients ignore the selector
			return w.check(&l.Items[i])
		}
	}
	return w.check(nil)
}

func (w *objectWaiter) selector() string {
	return fields.OneTermEqualSelector("metadata.name", w.name).String()
}

func (w *objectWaiter) run() error {
	if done, err := w.get(); done || err != nil {
		return err
	}
	recheck := time.NewTicker(w.b.recheck)
	defer recheck.Stop()
	backoff := newWatchBackoff(w.b.recheck)
	gones := 0
	for {
		wi, err := w.b.res(w.gvr).Watch(w.ctx, metav1.ListOptions{FieldSelector: w.selector(),
			ResourceVersion: w.rv, AllowWatchBookmarks: true})
		var (
			done   bool
			events int
			gone   bool
		)
		switch {
		case w.ctx.Err() != nil:
			if wi != nil {
				wi.Stop()
			}
			return w.expired()
		case apierrors.IsResourceExpired(err) || apierrors.IsGone(err):
			gone = true
		case err != nil:
			klog.V(2).InfoS("Cannot watch; re-reading instead", "resource", w.gvr.Resource, "name", w.name, "err", err)
		default:
			done, events, gone, err = w.consume(wi, recheck.C)
			wi.Stop()
			if done || err != nil {
				return err
			}
		}
		if w.ctx.Err() != nil {
			return w.expired()
		}
		if events > 0 {
			backoff.reset()
		}
		if gone {
			// Restart from a fresh read at once: the server answered, and
			// the list's version is inside its window (unless it keeps
			// saying 410, which is then not hammered).
			if gones++; gones > 1 {
				if err := backoff.wait(w.ctx); err != nil {
					return w.expired()
				}
			}
			if done, err := w.list(); done || err != nil {
				return err
			}
			continue
		}
		gones = 0
		// The watch ended (closed by the server, or an error): pause so a
		// server that keeps ending them is not hammered, then read the
		// object (its state may have changed while no watch ran; and a
		// read that fails says why) and watch again from there.
		if err := backoff.wait(w.ctx); err != nil {
			return w.expired()
		}
		if done, err := w.get(); done || err != nil {
			return err
		}
	}
}

// consume evaluates the events of one watch until the wait is decided,
// the watch ends (gone: with 410, so that its version is too old to
// resume from), or ctx ends. On each tick of recheck the object is
// re-read as well. events counts what the watch delivered.
func (w *objectWaiter) consume(wi watch.Interface, recheck <-chan time.Time) (done bool, events int, gone bool, err error) {
	for {
		select {
		case <-w.ctx.Done():
			return false, events, false, w.expired()
		case <-recheck:
			rv := w.rv
			if done, err := w.get(); done || err != nil {
				return done, events, false, err
			}
			w.rv = rv // the watch goes on; it resumes from what it saw
		case ev, ok := <-wi.ResultChan():
			if !ok {
				return false, events, false, nil
			}
			events++
			switch ev.Type {
			case watch.Added, watch.Modified, watch.Deleted:
				u, ok := ev.Object.(*unstructured.Unstructured)
				if !ok || u.GetName() != w.name {
					continue
				}
				w.rv = u.GetResourceVersion()
				if ev.Type == watch.Deleted {
					u = nil
				}
				if done, err := w.check(u); done || err != nil {
					return done, events, false, err
				}
			case watch.Bookmark:
				if m, err := meta.Accessor(ev.Object); err == nil {
					w.rv = m.GetResourceVersion()
				}
			case watch.Error:
				serr := apierrors.FromObject(ev.Object)
				if apierrors.IsResourceExpired(serr) || apierrors.IsGone(serr) {
					return false, events, true, nil
				}
				klog.V(2).InfoS("Watch reported an error; re-reading", "resource", w.gvr.Resource, "name", w.name, "err", serr)
				return false, 0, false, nil
			}
		}
	}
}

// watchBackoff spaces out watches that keep ending without delivering
// anything: 50 ms, doubling, up to max.
type watchBackoff struct {
	next, max time.Duration
}

func newWatchBackoff(max time.Duration) *watchBackoff {
	return &watchBackoff{next: 50 * time.Millisecond, max: max}
}

func (b *watchBackoff) reset() { b.next = 50 * time.Millisecond }

func (b *watchBackoff) wait(ctx context.Context) error {
	t := time.NewTimer(b.next)
	defer t.Stop()
	b.next = min(2*b.next, b.max)
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
