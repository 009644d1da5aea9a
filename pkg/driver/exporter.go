package driver

import (
	"github.com/zq-csi/zq-csi/pkg/nbdattach"
	"github.com/zq-csi/zq-csi/pkg/nbdattach/ublk"
)

// Exporter selection. A node has its ordinary attacher (Config.Attacher:
// nbd, fuse-loop or file; zones enforced, the device is not zoned) and,
// where the kernel has zoned ublk, a zoned one (Config.ZonedAttacher:
// /dev/ublkbN, a true host-managed zoned block device). The volume's
// exporter parameter, carried in the volume context, picks one at
// NodeStageVolume; the staged volume's record names the attacher that
// staged it, so unstage, health, expansion and Recover go back to it.

// ExporterTopologyKey is the topology segment in which every node plugin
// reports, in the StorageClass's words, what exporter=auto gives on it:
// "ublk" where the node has zoned ublk, else "nbd" (its ordinary
// attacher, whichever kind that is: the kind is logged, not reported, so
// that the label changes only when ublk comes or goes).
//
// Why a topology segment and not only a log line: it is the one per-node
// fact that reaches the scheduler and the provisioner. Kubelet copies the
// segments to node labels (kubectl get nodes -L topology.zq-csi/exporter
// shows which nodes present true zoned devices); a StorageClass with
// exporter=ublk can list it in allowedTopologies; GetCapacity reports no
// capacity for exporter=ublk on other nodes (so with storageCapacity
// tracking the scheduler avoids them) and CreateVolume refuses them with
// ResourceExhausted (the provisioner then reschedules) instead of leaving
// a node-local volume on a node where it can never be staged. Every node
// reports the key, so all nodes keep one set of topology keys, which the
// provisioner needs to build requisite topologies. Volumes' own
// accessible topology stays the node segment alone: the exporter is
// chosen per staging, it is not where the data lives.
//
// The cost: kubelet refuses to re-register a driver whose segment value
// differs from an existing node label ("topology value collision"), so a
// node whose exporter changes (ublk_drv loaded later, serve --exporter
// changed) needs the label removed once:
// kubectl label node NODE topology.zq-csi/exporter-
const ExporterTopologyKey = "topology.zq-csi/exporter"

// The driver's per-volume backend serves the ublk exporter too.
var _ ublk.Backend = (*slotBackend)(nil)

// attachers are the node's attachers, the ordinary one first.
func (d *Driver) attachers() []nbdattach.Attacher {
	if d.cfg.ZonedAttacher == nil {
		return []nbdattach.Attacher{d.cfg.Attacher}
	}
	return []nbdattach.Attacher{d.cfg.Attacher, d.cfg.ZonedAttacher}
}

// exporterSegment is this node's ExporterTopologyKey value.
func (d *Driver) exporterSegment() string {
	if d.cfg.ZonedAttacher != nil {
		return ExporterUblk
	}
	return ExporterNBD
}

// autoExporter is what exporter=auto picks on this node, with the reason.
func (d *Driver) autoExporter() (nbdattach.Attacher, string) {
	if d.cfg.ZonedAttacher != nil {
		return d.cfg.ZonedAttacher, "the node has zoned ublk"
	}
	return d.cfg.Attacher, "the node has no zoned ublk: " + d.zonedUnavailable()
}

func (d *Driver) zonedUnavailable() string {
	if d.cfg.ZonedUnavailable != "" {
		return d.cfg.ZonedUnavailable
	}
	return "no zoned attacher configured"
}

// stageAttacher picks the attacher for a volume whose volume context asks
// for exporter (empty: auto), and says why.
func (d *Driver) stageAttacher(id, exporter string) (nbdattach.Attacher, string, error) {
	switch exporter {
	case "", ExporterAuto:
		a, why := d.autoExporter()
		return a, "exporter=auto and " + why, nil
	case ExporterUblk:
		if d.cfg.ZonedAttacher == nil {
			return nil, "", errorf(ErrFailedPrecondition, "volume %s has exporter=ublk, but node %s has no zoned ublk: %s",
				id, d.cfg.NodeID, d.zonedUnavailable())
		}
		return d.cfg.ZonedAttacher, "exporter=ublk", nil
	case ExporterNBD:
		return d.cfg.Attacher, "exporter=nbd: the node's ordinary attacher", nil
	}
	return nil, "", errorf(ErrInvalidArgument, "volume context %s=%s: %w", volumeContextExporterKey, exporter, errExporterRule)
}

// attacherOf returns the attacher that staged st, or nil when this process
// does not have it (a volume staged through ublk by a plugin that ran
// with ublk, now running without).
func (d *Driver) attacherOf(st *StagedVolume) nbdattach.Attacher {
	switch {
	case st.Attacher == "" || st.Attacher == d.cfg.Attacher.Kind():
		// Records from before exporter selection name no attacher: the
		// ordinary one staged them.
		return d.cfg.Attacher
	case d.cfg.ZonedAttacher != nil && st.Attacher == d.cfg.ZonedAttacher.Kind():
		return d.cfg.ZonedAttacher
	}
	return nil
}
