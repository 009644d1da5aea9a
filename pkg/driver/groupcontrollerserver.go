package driver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/klog/v2"
)

// groupControllerServer implements VolumeGroupSnapshots: crash-consistent
// snapshots of several volumes of one node, such as a log store's data and
// metadata volumes. All volumes of the group are frozen together while
// their images are copied (Images.Snapshot).
type groupControllerServer struct {
	csi.UnimplementedGroupControllerServer
	d *Driver
}

func (s *groupControllerServer) be() Backend { return s.d.backend }

func (s *groupControllerServer) GroupControllerGetCapabilities(context.Context, *csi.GroupControllerGetCapabilitiesRequest) (*csi.GroupControllerGetCapabilitiesResponse, error) {
	return &csi.GroupControllerGetCapabilitiesResponse{Capabilities: []*csi.GroupControllerServiceCapability{{
		Type: &csi.GroupControllerServiceCapability_Rpc{Rpc: &csi.GroupControllerServiceCapability_RPC{
			Type: csi.GroupControllerServiceCapability_RPC_CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT}},
	}}}, nil
}

func (s *groupControllerServer) groupResponse(g *GroupSnapshotRecord) (*csi.VolumeGroupSnapshot, error) {
	out := &csi.VolumeGroupSnapshot{GroupSnapshotId: g.ID, CreationTime: timestamppb.New(g.Created), ReadyToUse: g.State == stateReady}
	for _, id := range g.SnapshotIDs {
		snap, err := s.be().GetSnapshot(id)
		if err != nil {
			return nil, fmt.Errorf("group snapshot %s: member %s: %w", g.ID, id, err)
		}
		out.Snapshots = append(out.Snapshots, snap.csiSnapshot())
	}
	return out, nil
}

func (s *groupControllerServer) CreateVolumeGroupSnapshot(ctx context.Context, req *csi.CreateVolumeGroupSnapshotRequest) (*csi.CreateVolumeGroupSnapshotResponse, error) {
	name := req.GetName()
	if name == "" {
		return nil, errorf(ErrInvalidArgument, "name is missing")
	}
	srcs := slices.Clone(req.GetSourceVolumeIds())
	if len(srcs) == 0 {
		return nil, errorf(ErrInvalidArgument, "source_volume_ids are missing")
	}
	slices.Sort(srcs)
	if len(slices.Compact(slices.Clone(srcs))) != len(srcs) {
		return nil, errorf(ErrInvalidArgument, "source_volume_ids name a volume twice")
	}
	if _, err := canonicalParams(req.GetParameters(), []string{}, "group snapshot parameter"); err != nil {
		return nil, err
	}
	keys := []string{"group-name/" + name}
	for _, v := range srcs {
		keys = append(keys, "volume/"+v)
	}
	unlock, err := s.d.ctrlLocks.tryLock(keys...)
	if err != nil {
		return nil, err
	}
	defer unlock()

	g, err := s.be().GroupByName(name)
	switch {
	case err == nil:
		if !slices.Equal(g.SourceVolumeIDs, srcs) {
			return nil, errorf(ErrAlreadyExists, "group snapshot %q exists (%s) of other volumes", name, g.ID)
		}
		if g.State == stateReady {
			resp, err := s.groupResponse(g)
			if err != nil {
				return nil, err
			}
			return &csi.CreateVolumeGroupSnapshotResponse{GroupSnapshot: resp}, nil
		}
	case !errors.Is(err, ErrNotFound):
		return nil, err
	}
	cs := &controllerServer{d: s.d}
	vols := make([]*VolumeRecord, len(srcs))
	for i, id := range srcs {
		if vols[i], err = cs.getVolume(id); err != nil {
			return nil, err
		}
		if vols[i].Node != vols[0].Node {
			return nil, errorf(ErrInvalidArgument, "volumes %s (node %s) and %s (node %s) are on different nodes; a group snapshot is taken on one node", vols[0].ID, vols[0].Node, id, vols[i].Node)
		}
	}
	now := time.Now().UTC()
	if g == nil {
		g = &GroupSnapshotRecord{ID: newID(groupPrefix), Name: name, SourceVolumeIDs: srcs, State: stateCreating, Created: now}
		for range srcs {
			g.SnapshotIDs = append(g.SnapshotIDs, newID(snapshotPrefix))
		}
		if err := s.be().PutGroup(g); err != nil {
			return nil, err
		}
	}
	snaps := make([]*SnapshotRecord, len(srcs))
	for i, v := range vols {
		snaps[i] = &SnapshotRecord{ID: g.SnapshotIDs[i], Name: g.Name + "/" + v.ID, SourceVolumeID: v.ID, Node: v.Node,
			GroupID: g.ID, State: stateCreating, Geometry: v.Geometry, Created: g.Created}
		if err := s.be().PutSnapshot(snaps[i]); err != nil {
			return nil, err
		}
	}
	if err := s.be().SnapshotImages(ctx, vols, snaps); err != nil {
		return nil, err
	}
	for _, sn := range snaps {
		sn.State = stateReady
		if err := s.be().PutSnapshot(sn); err != nil {
			return nil, err
		}
	}
	g.State = stateReady
	if err := s.be().PutGroup(g); err != nil {
		return nil, err
	}
	klog.InfoS("Created group snapshot", "name", name, "groupSnapshotID", g.ID, "volumes", srcs)
	resp, err := s.groupResponse(g)
	if err != nil {
		return nil, err
	}
	return &csi.CreateVolumeGroupSnapshotResponse{GroupSnapshot: resp}, nil
}

func checkMembers(g *GroupSnapshotRecord, ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	a, b := slices.Sorted(slices.Values(ids)), slices.Sorted(slices.Values(g.SnapshotIDs))
	if !slices.Equal(a, b) {
		return errorf(ErrInvalidArgument, "snapshot_ids %v are not the snapshots of group snapshot %s (%v)", ids, g.ID, g.SnapshotIDs)
	}
	return nil
}

func (s *groupControllerServer) DeleteVolumeGroupSnapshot(ctx context.Context, req *csi.DeleteVolumeGroupSnapshotRequest) (*csi.DeleteVolumeGroupSnapshotResponse, error) {
	id := req.GetGroupSnapshotId()
	if id == "" {
		return nil, errorf(ErrInvalidArgument, "group_snapshot_id is missing")
	}
	if !validID(groupPrefix, id) {
		return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
	}
	unlock, err := s.d.ctrlLocks.tryLock("group/" + id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	g, err := s.be().GetGroup(id)
	if errors.Is(err, ErrNotFound) {
		return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
	}
	if err != nil {
		return nil, err
	}
	if err := checkMembers(g, req.GetSnapshotIds()); err != nil {
		return nil, err
	}
	for _, sid := range g.SnapshotIDs {
		snap, err := s.be().GetSnapshot(sid)
		if errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if err := s.be().DeleteSnapshotImage(ctx, snap); err != nil {
			return nil, err
		}
		if err := s.be().DeleteSnapshot(sid); err != nil {
			return nil, err
		}
	}
	if err := s.be().DeleteGroup(id); err != nil {
		return nil, err
	}
	return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
}

func (s *groupControllerServer) GetVolumeGroupSnapshot(ctx context.Context, req *csi.GetVolumeGroupSnapshotRequest) (*csi.GetVolumeGroupSnapshotResponse, error) {
	id := req.GetGroupSnapshotId()
	if id == "" {
		return nil, errorf(ErrInvalidArgument, "group_snapshot_id is missing")
	}
	if !validID(groupPrefix, id) {
		return nil, errorf(ErrNotFound, "group snapshot %s not found", id)
	}
	g, err := s.be().GetGroup(id)
	if err != nil {
		return nil, err
	}
	if g.State != stateReady {
		return nil, errorf(ErrNotFound, "group snapshot %s is still being created", id)
	}
	if err := checkMembers(g, req.GetSnapshotIds()); err != nil {
		return nil, err
	}
	resp, err := s.groupResponse(g)
	if err != nil {
		return nil, err
	}
	return &csi.GetVolumeGroupSnapshotResponse{GroupSnapshot: resp}, nil
}
