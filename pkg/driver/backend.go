package driver

import (
	"context"
)

// Backend is where the controller's decisions are carried out: it keeps
// the records and does the image work on the node that holds a volume. The
// local backend (this file) does both in-process for --mode all; the
// cluster backend keeps the records in ZonedVolume resources and lets each
// node's agent do the image work (DESIGN.md point 7). The controller server
// holds the per-name/per-ID locks and the idempotency rules; a Backend's
// image methods must still be safe to repeat after a failure.
type Backend interface {
	Store
	// Nodes lists the nodes that can hold volumes.
	Nodes(ctx context.Context) ([]string, error)
	// Capacity returns the bytes free for new images on node.
	Capacity(ctx context.Context, node string) (uint64, error)
	// CreateImage makes rec's image from spec (empty) or from rec.Source.
	CreateImage(ctx context.Context, rec *VolumeRecord, spec *volumeSpec) (Geometry, error)
	// DeleteImage removes rec's image; a missing image is not an error.
	DeleteImage(ctx context.Context, rec *VolumeRecord) error
	// ExpandImage grows rec's image to size bytes (whole zones).
	ExpandImage(ctx context.Context, rec *VolumeRecord, size uint64) (Geometry, error)
	// SetLimits changes rec's open/active zone limits.
	SetLimits(ctx context.Context, rec *VolumeRecord, maxOpen, maxActive uint32) (Geometry, error)
	// SnapshotImages copies the images of vols into snaps (same order) as
	// one crash-consistent set. All vols are on one node.
	SnapshotImages(ctx context.Context, vols []*VolumeRecord, snaps []*SnapshotRecord) error
	// DeleteSnapshotImage removes a snapshot's image.
	DeleteSnapshotImage(ctx context.Context, snap *SnapshotRecord) error
	// Health reports the adverse conditions of rec's image.
	Health(ctx context.Context, rec *VolumeRecord) ([]HealthProblem, error)
}

// localBackend runs everything on this node: records in a fileStore,
// images in the data directory through the Images shared with the node
// service.
type localBackend struct {
	Store
	node   string
	images *Images
}

// NewLocalBackend returns the backend for --mode all.
func NewLocalBackend(store Store, images *Images, node string) Backend {
	return &localBackend{Store: store, node: node, images: images}
}

// Quarantined lists the record files the store moved aside.
func (b *localBackend) Quarantined() []QuarantinedRecord {
	if q, ok := b.Store.(quarantiner); ok {
		return q.Quarantined()
	}
	return nil
}

func (b *localBackend) Nodes(context.Context) ([]string, error) { return []string{b.node}, nil }

func (b *localBackend) Capacity(_ context.Context, node string) (uint64, error) {
	if node != b.node {
		return 0, nil
	}
	avail, _, err := b.images.Capacity()
	return avail, err
}

func (b *localBackend) checkNode(node string) error {
	if node != b.node {
		return errorf(ErrFailedPrecondition, "volume is on node %q, this backend serves node %q", node, b.node)
	}
	return nil
}

func (b *localBackend) CreateImage(_ context.Context, rec *VolumeRecord, spec *volumeSpec) (Geometry, error) {
	if err := b.checkNode(rec.Node); err != nil {
		return Geometry{}, err
	}
	if b.images.Exists(rec.ID) {
		// A retry after the image was made but before the record said so.
		return b.images.Geometry(rec.ID)
	}
	var err error
	switch {
	case rec.Source == nil:
		err = b.images.Create(rec.ID, spec)
	case rec.Source.SnapshotID != "":
		err = b.images.CreateFromSnapshot(rec.ID, rec.Source.SnapshotID, spec.geo.Size)
	default:
		err = b.images.CreateFromVolume(rec.ID, rec.Source.VolumeID, spec.geo.Size)
	}
	if err != nil {
		return Geometry{}, err
	}
	g, err := b.images.Geometry(rec.ID)
	if err != nil {
		return g, err
	}
	if rec.Source != nil && (g.MaxOpen != spec.geo.MaxOpen || g.MaxActive != spec.geo.MaxActive) {
		return b.images.SetLimits(rec.ID, spec.geo.MaxOpen, spec.geo.MaxActive)
	}
	return g, nil
}

func (b *localBackend) DeleteImage(_ context.Context, rec *VolumeRecord) error {
	if err := b.checkNode(rec.Node); err != nil {
		return err
	}
	return b.images.Delete(rec.ID)
}

func (b *localBackend) ExpandImage(_ context.Context, rec *VolumeRecord, size uint64) (Geometry, error) {
	if err := b.checkNode(rec.Node); err != nil {
		return Geometry{}, err
	}
	return b.images.Expand(rec.ID, size)
}

func (b *localBackend) SetLimits(_ context.Context, rec *VolumeRecord, maxOpen, maxActive uint32) (Geometry, error) {
	if err := b.checkNode(rec.Node); err != nil {
		return Geometry{}, err
	}
	return b.images.SetLimits(rec.ID, maxOpen, maxActive)
}

func (b *localBackend) SnapshotImages(_ context.Context, vols []*VolumeRecord, snaps []*SnapshotRecord) error {
	vids := make([]string, len(vols))
	sids := make([]string, len(snaps))
	for i, v := range vols {
		if err := b.checkNode(v.Node); err != nil {
			return err
		}
		vids[i], sids[i] = v.ID, snaps[i].ID
	}
	return b.images.Snapshot(vids, sids)
}

func (b *localBackend) DeleteSnapshotImage(_ context.Context, snap *SnapshotRecord) error {
	return b.images.DeleteSnapshot(snap.ID)
}

func (b *localBackend) Health(_ context.Context, rec *VolumeRecord) ([]HealthProblem, error) {
	if err := b.checkNode(rec.Node); err != nil {
		return nil, err
	}
	return b.images.Health(rec.ID), nil
}
