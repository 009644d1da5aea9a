package driver

import (
	"context"
	"errors"
	"fmt"
	"time"

	"k8s.io/klog/v2"
)

// DefaultOrphanGrace is how long a record may stay "creating" before the
// controller collects it (Config.OrphanGrace). CreateVolume writes its
// record before it makes the image so that a retry after a crash finishes
// the job (store.go); the external-provisioner retries a failed
// CreateVolume with a backoff capped at 5 minutes for as long as the PVC
// exists. A record older than three such intervals belongs to a request
// nobody will retry (the PVC was deleted while the plugin was down), and
// its partial image (<id>.qcow2.tmp) would hold disk space forever. If a
// retry does come later, it finds no record and makes the volume afresh —
// nothing was ever handed out for the collected one.
const DefaultOrphanGrace = 15 * time.Minute

// runOrphanCollector collects orphans now (a restart is when they
// appear) and then every quarter of the grace period (at most every 5
// minutes) until ctx ends.
func (d *Driver) runOrphanCollector(ctx context.Context) {
	grace := d.cfg.OrphanGrace
	if d.backend == nil || grace < 0 {
		return
	}
	every := min(max(grace/4, 50*time.Millisecond), 5*time.Minute)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if _, err := d.CollectOrphans(ctx); err != nil && ctx.Err() == nil {
			klog.ErrorS(err, "Collecting interrupted creations failed; retrying later")
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// CollectOrphans removes the volumes and snapshots whose creation was
// interrupted more than the grace period ago and never finished: their
// partial images first, then their records. A record whose name or ID a
// running call holds is left alone (that call is finishing it), and every
// record is read again under the locks before it goes. It returns how many
// it removed (a group snapshot counts once). Group snapshots are found
// through their members' records: a group interrupted before it wrote
// any member record is not collected.
func (d *Driver) CollectOrphans(ctx context.Context) (int, error) {
	grace := d.cfg.OrphanGrace
	if d.backend == nil || grace < 0 {
		return 0, nil
	}
	old := func(created time.Time) bool {
		// A record without a creation time (unreadable in a resource) is
		// never taken for old.
		return !created.IsZero() && time.Since(created) >= grace
	}
	n := 0
	vols, err := d.backend.ListVolumes()
	if err != nil {
		return 0, err
	}
	for _, v := range vols {
		if v.State != stateCreating || !old(v.Created) {
			continue
		}
		done, err := d.collectVolume(ctx, v.ID, v.Name)
		if err != nil {
			return n, err
		}
		if done {
			n++
		}
	}
	snaps, err := d.backend.ListSnapshots()
	if err != nil {
		return n, err
	}
	groups := map[string]bool{}
	for _, s := range snaps {
		if s.State != stateCreating || !old(s.Created) {
			continue
		}
		if s.GroupID != "" {
			// A member of an interrupted group snapshot: the group goes
			// as a whole, members first.
			if groups[s.GroupID] {
				continue
			}
			groups[s.GroupID] = true
			done, err := d.collectGroup(ctx, s.GroupID, old)
			if err != nil {
				return n, err
			}
			if done {
				n++
			}
			continue
		}
		done, err := d.collectSnapshot(ctx, s.ID, s.Name)
		if err != nil {
			return n, err
		}
		if done {
			n++
		}
	}
	return n, nil
}

func (d *Driver) collectVolume(ctx context.Context, id, name string) (bool, error) {
	unlock, err := d.ctrlLocks.tryLock("volume-name/"+name, "volume/"+id)
	if err != nil {
		return false, nil // a call is at it
	}
	defer unlock()
	rec, err := d.backend.GetVolume(id)
	if err != nil || rec.State != stateCreating {
		return false, nil // finished or removed meanwhile
	}
	if err := d.backend.DeleteImage(ctx, rec); err != nil {
		return false, fmt.Errorf("remove the partial image of volume %s: %w", id, err)
	}
	if err := d.backend.DeleteVolume(id); err != nil {
		return false, fmt.Errorf("remove the record of volume %s: %w", id, err)
	}
	d.event(Event{Type: EventWarning, Reason: ReasonOrphanCollected, VolumeID: id,
		Message: fmt.Sprintf("volume %s (name %q, node %s) was left being created at %s and nobody retried within %s: removed it and its partial image",
			id, rec.Name, rec.Node, rec.Created.Format(time.RFC3339), d.cfg.OrphanGrace)})
	return true, nil
}

func (d *Driver) collectSnapshot(ctx context.Context, id, name string) (bool, error) {
	unlock, err := d.ctrlLocks.tryLock("snapshot-name/"+name, "snapshot/"+id)
	if err != nil {
		return false, nil
	}
	defer unlock()
	snap, err := d.backend.GetSnapshot(id)
	if err != nil || snap.State != stateCreating {
		return false, nil
	}
	if err := d.backend.DeleteSnapshotImage(ctx, snap); err != nil {
		return false, fmt.Errorf("remove the partial image of snapshot %s: %w", id, err)
	}
	if err := d.backend.DeleteSnapshot(id); err != nil {
		return false, fmt.Errorf("remove the record of snapshot %s: %w", id, err)
	}
	d.event(Event{Type: EventWarning, Reason: ReasonOrphanCollected,
		Message: fmt.Sprintf("snapshot %s (name %q of volume %s) was left being created at %s and nobody retried within %s: removed it and its partial image",
			id, snap.Name, snap.SourceVolumeID, snap.Created.Format(time.RFC3339), d.cfg.OrphanGrace)})
	return true, nil
}

func (d *Driver) collectGroup(ctx context.Context, id string, old func(time.Time) bool) (bool, error) {
	g, err := d.backend.GetGroup(id)
	if err != nil || g.State != stateCreating || !old(g.Created) {
		return false, nil
	}
	unlock, err := d.ctrlLocks.tryLock("group-name/"+g.Name, "group/"+id)
	if err != nil {
		return false, nil
	}
	defer unlock()
	if g, err = d.backend.GetGroup(id); err != nil || g.State != stateCreating {
		return false, nil
	}
	for _, sid := range g.SnapshotIDs {
		snap, err := d.backend.GetSnapshot(sid)
		if errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return false, err
		}
		if err := d.backend.DeleteSnapshotImage(ctx, snap); err != nil {
			return false, fmt.Errorf("remove the partial image of snapshot %s of group %s: %w", sid, id, err)
		}
		if err := d.backend.DeleteSnapshot(sid); err != nil {
			return false, fmt.Errorf("remove the record of snapshot %s of group %s: %w", sid, id, err)
		}
	}
	if err := d.backend.DeleteGroup(id); err != nil {
		return false, fmt.Errorf("remove the record of group snapshot %s: %w", id, err)
	}
	d.event(Event{Type: EventWarning, Reason: ReasonOrphanCollected,
		Message: fmt.Sprintf("group snapshot %s (name %q of volumes %v) was left being created at %s and nobody retried within %s: removed it, its %d snapshots and their partial images",
			id, g.Name, g.SourceVolumeIDs, g.Created.Format(time.RFC3339), d.cfg.OrphanGrace, len(g.SnapshotIDs))})
	return true, nil
}
