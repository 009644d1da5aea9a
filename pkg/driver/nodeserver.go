package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
)

// StagedVolume is the node's record of a staged volume, kept under the
// state directory so that a restarted plugin knows its attachments and
// publish targets.
type StagedVolume struct {
	ID          string          `json:"id"`
	StagingPath string          `json:"stagingPath"`
	ImagePath   string          `json:"imagePath"`
	DevicePath  string          `json:"devicePath"`
	AccessMode  int32           `json:"accessMode"`
	ReadOnly    bool            `json:"readOnly"`
	Targets     map[string]bool `json:"targets"` // publish target path → read-only
	// Lost is set when a restart found no attachment for the volume.
	Lost bool `json:"lost,omitempty"`
	// Attacher is the kind of the attacher that staged the volume ("ublk",
	// "nbd", ...), which unstage, health, expansion and Recover go back
	// to; empty in records from before exporter selection (the ordinary
	// attacher). ExporterReason says why it was chosen.
	Attacher       string `json:"attacher,omitempty"`
	ExporterReason string `json:"exporterReason,omitempty"`
	// PVCNamespace/PVCName: the claim, from the volume context (events).
	PVCNamespace string `json:"pvcNamespace,omitempty"`
	PVCName      string `json:"pvcName,omitempty"`
}

// attacherKind is the kind of the attacher that staged r, given the
// node's ordinary attacher.
func (r *StagedVolume) attacherKind(ordinary nbdattach.Attacher) string {
	if r.Attacher == "" {
		return ordinary.Kind()
	}
	return r.Attacher
}

func (r *StagedVolume) key() (string, string) { return r.ID, r.ID }

type nodeState struct{ d *recordDir[*StagedVolume] }

func openNodeState(dir string) (*nodeState, error) {
	d, err := openRecordDir[*StagedVolume](dir)
	if err != nil {
		return nil, err
	}
	return &nodeState{d: d}, nil
}

func (n *nodeState) get(id string) (*StagedVolume, error) { return n.d.get(id) }
func (n *nodeState) put(r *StagedVolume) error            { return n.d.put(r) }
func (n *nodeState) remove(id string) error               { return n.d.remove(id) }
func (n *nodeState) list() []*StagedVolume                { return n.d.list() }

// attachResizer is implemented by attachers that can change the size of an
// attached device in place (NBD: NBD_CMD_RECONFIGURE with a new size).
type attachResizer interface {
	Resize(ctx context.Context, volumeID string, size int64) error
}

// deviceCounter is implemented by attachers that know how many devices
// they can attach (NBD: the nbds_max of the module).
type deviceCounter interface{ MaxDevices() int }

// nodeServer implements the CSI Node service for Block volumes: stage
// attaches the image through the attacher, publish bind-mounts the device
// node onto the target file.
type nodeServer struct {
	csi.UnimplementedNodeServer
	d *Driver
}

func (s *nodeServer) ready() error {
	if !s.d.ready.Load() {
		return errorf(ErrNotReady, "the node plugin is still recovering the attachments of its last run")
	}
	return nil
}

func (s *nodeServer) lock(id string) (func(), error) {
	if err := s.ready(); err != nil {
		return nil, err
	}
	return s.d.nodeLocks.tryLock(id)
}

func (s *nodeServer) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var caps []*csi.NodeServiceCapability
	for _, t := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
		csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
		csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
		csi.NodeServiceCapability_RPC_GET_STORAGE_HEALTH,
	} {
		caps = append(caps, &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{
			Rpc: &csi.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

func (s *nodeServer) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	maxVols := s.d.cfg.MaxVolumesPerNode
	// The ordinary attacher's count (nbds_max for nbd) is the limit that
	// binds: ublk device numbers are not scarce, and a volume may always
	// ask for exporter=nbd.
	if maxVols == 0 {
		if dc, ok := s.d.cfg.Attacher.(deviceCounter); ok {
			maxVols = int64(dc.MaxDevices())
		}
	}
	return &csi.NodeGetInfoResponse{NodeId: s.d.cfg.NodeID, MaxVolumesPerNode: maxVols, AccessibleTopology: s.d.topology()}, nil
}

// NodeStageVolume opens the image and attaches it (CSI "NodeStageVolume").
// The device path is recorded in the node state; the staging directory
// itself stays empty for Block volumes.
func (s *nodeServer) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	switch {
	case id == "":
		return nil, errorf(ErrInvalidArgument, "volume_id is missing")
	case staging == "":
		return nil, errorf(ErrInvalidArgument, "staging_target_path is missing")
	}
	if err := checkCapability(req.GetVolumeCapability()); err != nil {
		return nil, err
	}
	if !validID(volumePrefix, id) {
		return nil, errorf(ErrNotFound, "volume %s not found", id)
	}
	unlock, err := s.lock(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	mode := req.GetVolumeCapability().GetAccessMode().GetMode()
	ro := mode == csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
	st, err := s.d.node.get(id)
	if err == nil && !st.Lost {
		if st.StagingPath != staging {
			return nil, errorf(ErrFailedPrecondition, "volume %s is already staged at %s", id, st.StagingPath)
		}
		if st.ReadOnly != ro {
			return nil, errorf(ErrAlreadyExists, "volume %s is already staged with read_only=%v", id, st.ReadOnly)
		}
		return &csi.NodeStageVolumeResponse{}, nil
	}
	if !s.d.images.Exists(id) {
		return nil, errorf(ErrNotFound, "volume %s has no image on node %s", id, s.d.cfg.NodeID)
	}
	attacher, reason, err := s.d.stageAttacher(id, req.GetVolumeContext()[volumeContextExporterKey])
	if err != nil {
		klog.InfoS("Cannot stage volume with the exporter it asks for", "volumeID", id, "err", err)
		return nil, err
	}
	slot, err := s.d.images.acquire(id)
	if err != nil {
		return nil, err
	}
	att, err := attacher.Attach(ctx, nbdattach.AttachRequest{
		VolumeID: id, ImagePath: s.d.images.VolumePath(id), Backend: s.d.newSlotBackend(id, slot, ro, attacher.Kind()), ReadOnly: ro})
	if err != nil {
		s.d.images.release(id)
		s.d.metrics.forget(id)
		return nil, fmt.Errorf("attach volume %s (%s attacher: %s): %w", id, attacher.Kind(), reason, err)
	}
	st = &StagedVolume{ID: id, StagingPath: staging, ImagePath: att.ImagePath, DevicePath: att.DevicePath,
		AccessMode: int32(mode), ReadOnly: ro, Targets: map[string]bool{}, Attacher: attacher.Kind(), ExporterReason: reason}
	st.PVCNamespace, st.PVCName = pvcFromContext(req.GetVolumeContext())
	if err := s.d.node.put(st); err != nil {
		attacher.Detach(ctx, id)
		s.d.images.release(id)
		s.d.metrics.forget(id)
		return nil, err
	}
	klog.InfoS("Staged volume", "volumeID", id, "device", att.DevicePath, "attacher", attacher.Kind(), "reason", reason)
	s.d.event(Event{Type: EventNormal, Reason: ReasonExporterChosen, VolumeID: id, PVCNamespace: st.PVCNamespace, PVCName: st.PVCName,
		Message: fmt.Sprintf("staged on node %s as %s through the %s exporter: %s", s.d.cfg.NodeID, att.DevicePath, attacher.Kind(), reason)})
	return &csi.NodeStageVolumeResponse{}, nil
}

// NodeUnstageVolume detaches. Nothing staged is success (idempotent); a
// volume still published is refused, never answered OK without teardown.
func (s *nodeServer) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	id := req.GetVolumeId()
	switch {
	case id == "":
		return nil, errorf(ErrInvalidArgument, "volume_id is missing")
	case req.GetStagingTargetPath() == "":
		return nil, errorf(ErrInvalidArgument, "staging_target_path is missing")
	}
	if !validID(volumePrefix, id) {
		return &csi.NodeUnstageVolumeResponse{}, nil
	}
	unlock, err := s.lock(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	st, err := s.d.node.get(id)
	if err == nil && len(st.Targets) > 0 {
		return nil, errorf(ErrFailedPrecondition, "volume %s is still published at %v; unpublish it first", id, slices.Sorted(maps.Keys(st.Targets)))
	}
	if err != nil {
		st = nil
	}
	// The attacher that staged it; with no (readable) record, as after a
	// stage that failed past attaching or on a repeat, every attacher
	// makes sure.
	detachers := s.d.attachers()
	if st != nil {
		a := s.d.attacherOf(st)
		switch {
		case a != nil:
			detachers = []nbdattach.Attacher{a}
		case st.Lost:
			detachers = nil // nothing of it is attached in this process
		default:
			return nil, errorf(ErrFailedPrecondition, "volume %s was staged through the %s attacher, which this node plugin does not run (%s)",
				id, st.Attacher, s.d.zonedUnavailable())
		}
	}
	for _, a := range detachers {
		if err := a.Detach(ctx, id); err != nil {
			return nil, fmt.Errorf("detach volume %s (%s attacher): %w", id, a.Kind(), err)
		}
	}
	if err := s.d.images.release(id); err != nil {
		return nil, err
	}
	if err := s.d.node.remove(id); err != nil {
		return nil, err
	}
	s.d.metrics.forget(id)
	s.d.refusals.forget(id)
	if st != nil {
		klog.InfoS("Unstaged volume", "volumeID", id, "attacher", st.attacherKind(s.d.cfg.Attacher))
	}
	return &csi.NodeUnstageVolumeResponse{}, nil
}

// NodePublishVolume bind-mounts the device node onto the target file.
//
// A read-only bind mount keeps writes out through the target's mount, but
// the kernel lets a device node be opened for writing on a read-only mount;
// volumes that must not be written are staged read-only
// (SINGLE_NODE_READER_ONLY), which makes the device itself read-only.
func (s *nodeServer) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	if err := requireVolumeAndTarget(id, target); err != nil {
		return nil, err
	}
	if err := checkCapability(req.GetVolumeCapability()); err != nil {
		return nil, err
	}
	if req.GetStagingTargetPath() == "" {
		return nil, errorf(ErrFailedPrecondition, "staging_target_path is missing: zq-csi volumes are staged before they are published")
	}
	if !validID(volumePrefix, id) {
		return nil, errorf(ErrNotFound, "volume %s not found", id)
	}
	unlock, err := s.lock(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	st, err := s.d.node.get(id)
	if errors.Is(err, ErrNotFound) || (err == nil && st.Lost) {
		return nil, errorf(ErrFailedPrecondition, "volume %s is not staged on this node", id)
	}
	if err != nil {
		return nil, err
	}
	if st.StagingPath != req.GetStagingTargetPath() {
		return nil, errorf(ErrFailedPrecondition, "volume %s is staged at %s, not %s", id, st.StagingPath, req.GetStagingTargetPath())
	}
	ro := req.GetReadonly() || st.ReadOnly
	if prev, ok := st.Targets[target]; ok {
		if prev != ro {
			return nil, errorf(ErrAlreadyExists, "volume %s is published at %s with read_only=%v", id, target, prev)
		}
		if mounted, _ := s.d.cfg.Mounter.IsMountPoint(target); mounted {
			return &csi.NodePublishVolumeResponse{}, nil
		}
	}
	mode := req.GetVolumeCapability().GetAccessMode().GetMode()
	if mode == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER || st.AccessMode == int32(csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER) {
		for t := range st.Targets {
			if t != target {
				return nil, errorf(ErrFailedPrecondition, "volume %s has access mode SINGLE_NODE_SINGLE_WRITER and is already published at %s", id, t)
			}
		}
	}
	if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create target %s: %w", target, err)
	}
	f.Close()
	mounted, err := s.d.cfg.Mounter.IsMountPoint(target)
	if err != nil {
		return nil, fmt.Errorf("check target %s: %w", target, err)
	}
	if !mounted {
		opts := []string{"bind"}
		if ro {
			opts = append(opts, "ro")
		}
		if err := s.d.cfg.Mounter.Mount(st.DevicePath, target, "", opts); err != nil {
			return nil, fmt.Errorf("bind-mount %s on %s: %w", st.DevicePath, target, err)
		}
	}
	st.Targets[target] = ro
	if err := s.d.node.put(st); err != nil {
		return nil, err
	}
	return &csi.NodePublishVolumeResponse{}, nil
}

// NodeUnpublishVolume unmounts and removes the target (CSI: the SP removes
// what it created). A target that is gone already is success.
func (s *nodeServer) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	if err := requireVolumeAndTarget(id, target); err != nil {
		return nil, err
	}
	unlock, err := s.lock(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	for {
		mounted, err := s.d.cfg.Mounter.IsMountPoint(target)
		if errors.Is(err, fs.ErrNotExist) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("check target %s: %w", target, err)
		}
		if !mounted {
			break
		}
		if err := s.d.cfg.Mounter.Unmount(target); err != nil {
			return nil, fmt.Errorf("unmount %s: %w", target, err)
		}
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("remove target %s: %w", target, err)
	}
	if validID(volumePrefix, id) {
		if st, err := s.d.node.get(id); err == nil {
			if _, ok := st.Targets[target]; ok {
				delete(st.Targets, target)
				if err := s.d.node.put(st); err != nil {
					return nil, err
				}
			}
		}
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// stagedAt returns the staged volume id if path is its staging path or one
// of its publish targets.
func (s *nodeServer) stagedAt(id, path string) (*StagedVolume, error) {
	if !validID(volumePrefix, id) {
		return nil, errorf(ErrNotFound, "volume %s not found", id)
	}
	st, err := s.d.node.get(id)
	if err != nil {
		return nil, errorf(ErrNotFound, "volume %s is not staged on this node", id)
	}
	if _, ok := st.Targets[path]; !ok && path != st.StagingPath && !sameBlockDevice(path, st.DevicePath) {
		return nil, errorf(ErrNotFound, "volume %s is not published at %s", id, path)
	}
	return st, nil
}

// sameBlockDevice reports whether path is a node of the block device at
// dev. The kubelet asks for a raw block volume's stats (and expansion) at
// paths of its own, such as the global map path
// <kubelet>/plugins/kubernetes.io/csi/volumeDevices/<pv>/dev/<pod-uid>,
// which it bind-mounts from the published device.
func sameBlockDevice(path, dev string) bool {
	var a, b unix.Stat_t
	if dev == "" || unix.Stat(path, &a) != nil || unix.Stat(dev, &b) != nil {
		return false
	}
	return a.Mode&unix.S_IFMT == unix.S_IFBLK && b.Mode&unix.S_IFMT == unix.S_IFBLK && a.Rdev == b.Rdev
}

func (s *nodeServer) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	switch {
	case id == "":
		return nil, errorf(ErrInvalidArgument, "volume_id is missing")
	case path == "":
		return nil, errorf(ErrInvalidArgument, "volume_path is missing")
	}
	if err := s.ready(); err != nil {
		return nil, err
	}
	if _, err := s.stagedAt(id, path); err != nil {
		return nil, err
	}
	size, _, err := s.d.images.Usage(id)
	if err != nil {
		return nil, err
	}
	return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: int64(size)}}}, nil
}

// NodeGetVolumeHealth reports a volume whose attachment is gone (the NBD
// link died, or a restart could not re-establish it) as INACCESSIBLE, and
// an unhealthy image as the image check says.
func (s *nodeServer) NodeGetVolumeHealth(ctx context.Context, req *csi.NodeGetVolumeHealthRequest) (*csi.NodeGetVolumeHealthResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, errorf(ErrInvalidArgument, "volume_id is missing")
	}
	if err := s.ready(); err != nil {
		return nil, err
	}
	if !validID(volumePrefix, id) {
		return nil, errorf(ErrNotFound, "volume %s not found", id)
	}
	st, err := s.d.node.get(id)
	if err != nil {
		return nil, errorf(ErrNotFound, "volume %s is not staged on this node", id)
	}
	var probs []HealthProblem
	attached := false
	if a := s.d.attacherOf(st); a != nil {
		atts, err := a.List(ctx)
		if err != nil {
			return nil, err
		}
		attached = slices.ContainsFunc(atts, func(a nbdattach.Attachment) bool { return a.VolumeID == id })
	}
	if !attached || st.Lost {
		probs = append(probs, HealthProblem{"inaccessible", "DeviceDetached", fmt.Sprintf("the %s attachment of the volume is gone", st.attacherKind(s.d.cfg.Attacher))})
	}
	probs = append(probs, s.d.images.Health(id)...)
	return &csi.NodeGetVolumeHealthResponse{VolumeHealth: healthOf(id, probs)}, nil
}

// NodeGetStorageHealth reports the data directory's file system.
func (s *nodeServer) NodeGetStorageHealth(ctx context.Context, req *csi.NodeGetStorageHealthRequest) (*csi.NodeGetStorageHealthResponse, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(s.d.cfg.DataDir, &st); err != nil {
		return &csi.NodeGetStorageHealthResponse{BackendHealth: []*csi.NodeGetStorageHealthResponse_StorageBackendHealth{{
			Status: csi.StorageHealthErrorType_STORAGE_UNREACHABLE, Reason: "DataDirUnreachable",
			Message: fmt.Sprintf("statfs %s: %v", s.d.cfg.DataDir, err)}}}, nil
	}
	resp := &csi.NodeGetStorageHealthResponse{}
	if st.Flags&unix.ST_RDONLY != 0 {
		resp.BackendHealth = append(resp.BackendHealth, &csi.NodeGetStorageHealthResponse_StorageBackendHealth{
			Status: csi.StorageHealthErrorType_STORAGE_DEGRADED, Reason: "DataDirReadOnly",
			Message: fmt.Sprintf("%s is on a read-only file system", s.d.cfg.DataDir)})
	}
	if q := s.d.Quarantined(); len(q) > 0 {
		resp.BackendHealth = append(resp.BackendHealth, &csi.NodeGetStorageHealthResponse_StorageBackendHealth{
			Status: csi.StorageHealthErrorType_STORAGE_DEGRADED, Reason: ReasonRecordQuarantined,
			Message: fmt.Sprintf("%d state record file(s) could not be loaded and were moved aside, the first %s (%s); `zq-csi volume list` lists them",
				len(q), q[0].Path, q[0].Reason)})
	}
	return resp, nil
}

// NodeExpandVolume gives the attached device the image's new size (the
// controller added the zones).
func (s *nodeServer) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	switch {
	case id == "":
		return nil, errorf(ErrInvalidArgument, "volume_id is missing")
	case path == "":
		return nil, errorf(ErrInvalidArgument, "volume_path is missing")
	}
	if c := req.GetVolumeCapability(); c != nil {
		if err := checkCapability(c); err != nil {
			return nil, err
		}
	}
	unlock, err := s.lock(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	st, err := s.stagedAt(id, path)
	if err != nil {
		return nil, err
	}
	size, _, err := s.d.images.Usage(id)
	if err != nil {
		return nil, err
	}
	if req := req.GetCapacityRange().GetRequiredBytes(); req > int64(size) {
		return nil, errorf(ErrFailedPrecondition, "the image is %d bytes, less than required_bytes=%d: ControllerExpandVolume has not grown it yet", size, req)
	}
	// The ublk attacher has no resize: the kernel fixes a zoned device's
	// zone count at START_DEV.
	if r, ok := s.d.attacherOf(st).(attachResizer); ok {
		if err := r.Resize(ctx, id, int64(size)); err != nil {
			return nil, fmt.Errorf("resize the device of %s: %w", id, err)
		}
	} else {
		return nil, errorf(ErrFailedPrecondition, "the %s attacher cannot resize an attached device; restage the volume", st.attacherKind(s.d.cfg.Attacher))
	}
	return &csi.NodeExpandVolumeResponse{CapacityBytes: int64(size)}, nil
}

// requireVolumeAndTarget checks the two fields every publish/unpublish
// request must carry (CSI spec: InvalidArgument when missing).
func requireVolumeAndTarget(id, target string) error {
	switch {
	case id == "":
		return errorf(ErrInvalidArgument, "volume_id is missing")
	case target == "":
		return errorf(ErrInvalidArgument, "target_path is missing")
	}
	return nil
}
