package csicmd

import (
	"context"
	"flag"
	"fmt"
	"sort"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
)

func infoCmd(c *call, fs *flag.FlagSet) func([]string) error {
	return func(args []string) error {
		if err := noArgs(args); err != nil {
			return err
		}
		conn, err := c.dial()
		if err != nil {
			return err
		}
		ctx, cancel := c.ctx()
		defer cancel()
		id := csi.NewIdentityClient(conn)
		pi, err := id.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
		if err != nil {
			return err
		}
		pc, err := id.GetPluginCapabilities(ctx, &csi.GetPluginCapabilitiesRequest{})
		if err != nil {
			return err
		}
		pr, err := id.Probe(ctx, &csi.ProbeRequest{})
		if err != nil {
			return err
		}
		if c.g.output == "json" {
			if err := c.out(pi); err != nil {
				return err
			}
			if err := c.out(pc); err != nil {
				return err
			}
			if err := c.out(pr); err != nil {
				return err
			}
		} else {
			var caps []string
			for _, cp := range pc.GetCapabilities() {
				switch {
				case cp.GetService() != nil:
					caps = append(caps, cp.GetService().GetType().String())
				case cp.GetVolumeExpansion() != nil:
					caps = append(caps, "EXPANSION_"+cp.GetVolumeExpansion().GetType().String())
				}
			}
			ready := "ready"
			if pr.GetReady() != nil && !pr.GetReady().GetValue() {
				ready = "not ready"
			}
			fmt.Fprintf(c.stdout, "plugin %s %s: %s; capabilities %s\n", pi.GetName(), pi.GetVendorVersion(), ready, strings.Join(caps, " "))
		}
		// The controller when the plugin runs it; the node when it answers.
		hasCtrl := false
		for _, cp := range pc.GetCapabilities() {
			if cp.GetService().GetType() == csi.PluginCapability_Service_CONTROLLER_SERVICE {
				hasCtrl = true
			}
		}
		if hasCtrl {
			cc, err := csi.NewControllerClient(conn).ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{})
			if err != nil {
				return err
			}
			var names []string
			for _, cp := range cc.GetCapabilities() {
				names = append(names, cp.GetRpc().GetType().String())
			}
			if err := c.out(cc, "controller: "+strings.Join(names, " ")); err != nil {
				return err
			}
		}
		if ni, err := csi.NewNodeClient(conn).NodeGetInfo(ctx, &csi.NodeGetInfoRequest{}); err == nil {
			var topo []string
			for k, v := range ni.GetAccessibleTopology().GetSegments() {
				topo = append(topo, k+"="+v)
			}
			sort.Strings(topo)
			if err := c.out(ni, fmt.Sprintf("node %s: max volumes %d, topology %s", ni.GetNodeId(), ni.GetMaxVolumesPerNode(), strings.Join(topo, " "))); err != nil {
				return err
			}
		}
		return nil
	}
}

func createCmd(c *call, fs *flag.FlagSet) func([]string) error {
	size := fs.String("size", "", "")
	params := &kv{name: "param"}
	fs.Var(params, "param", "")
	fromSnap := fs.String("from-snapshot", "", "")
	fromVol := fs.String("from-volume", "", "")
	return func(args []string) error {
		name, err := oneArg(args, "volume NAME")
		if err != nil {
			return err
		}
		if *size == "" {
			return usagef("--size is required (e.g. --size 512Mi)")
		}
		n, err := parseSize("size", *size)
		if err != nil {
			return err
		}
		req := &csi.CreateVolumeRequest{Name: name, Parameters: params.m,
			CapacityRange:      &csi.CapacityRange{RequiredBytes: n},
			VolumeCapabilities: []*csi.VolumeCapability{blockCap(false)}}
		switch {
		case *fromSnap != "" && *fromVol != "":
			return usagef("--from-snapshot and --from-volume exclude each other")
		case *fromSnap != "":
			req.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: *fromSnap}}}
		case *fromVol != "":
			req.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
				Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: *fromVol}}}
		}
		resp, err := invoke(c, func(ctx context.Context, conn grpc.ClientConnInterface) (*csi.CreateVolumeResponse, error) {
			return csi.NewControllerClient(conn).CreateVolume(ctx, req)
		})
		if err != nil {
			return err
		}
		v := resp.GetVolume()
		if c.g.output == "id" {
			fmt.Fprintln(c.stdout, v.GetVolumeId())
			return nil
		}
		lines := []string{fmt.Sprintf("volume %s: %s", v.GetVolumeId(), bytesText(v.GetCapacityBytes()))}
		if src := v.GetContentSource(); src != nil {
			if s := src.GetSnapshot(); s != nil {
				lines = append(lines, "  from snapshot "+s.GetSnapshotId())
			}
			if s := src.GetVolume(); s != nil {
				lines = append(lines, "  from volume "+s.GetVolumeId())
			}
		}
		for _, t := range v.GetAccessibleTopology() {
			lines = append(lines, "  topology "+strings.Join(sortedKV("", t.GetSegments()), " "))
		}
		lines = append(lines, "  volume context (give it to stage with --context):")
		lines = append(lines, sortedKV("    ", v.GetVolumeContext())...)
		return c.out(resp, lines...)
	}
}

func deleteCmd(c *call, fs *flag.FlagSet) func([]string) error {
	return func(args []string) error {
		id, err := oneArg(args, "VOLUME-ID")
		if err != nil {
			return err
		}
		resp, err := invoke(c, func(ctx context.Context, conn grpc.ClientConnInterface) (*csi.DeleteVolumeResponse, error) {
			return csi.NewControllerClient(conn).DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
		})
		if err != nil {
			return err
		}
		return c.out(resp, "deleted volume "+id)
	}
}

func snapshotCmd(c *call, fs *flag.FlagSet) func([]string) error {
	source := fs.String("source", "", "")
	return func(args []string) error {
		name, err := oneArg(args, "snapshot NAME")
		if err != nil {
			return err
		}
		if *source == "" {
			return usagef("--source VOLUME-ID is required")
		}
		resp, err := invoke(c, func(ctx context.Context, conn grpc.ClientConnInterface) (*csi.CreateSnapshotResponse, error) {
			return csi.NewControllerClient(conn).CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: *source})
		})
		if err != nil {
			return err
		}
		s := resp.GetSnapshot()
		if c.g.output == "id" {
			fmt.Fprintln(c.stdout, s.GetSnapshotId())
			return nil
		}
		ready := "ready"
		if !s.GetReadyToUse() {
			ready = "not ready yet"
		}
		return c.out(resp, fmt.Sprintf("snapshot %s of volume %s: %s, %s", s.GetSnapshotId(), s.GetSourceVolumeId(), bytesText(s.GetSizeBytes()), ready))
	}
}

func deleteSnapshotCmd(c *call, fs *flag.FlagSet) func([]string) error {
	return func(args []string) error {
		id, err := oneArg(args, "SNAPSHOT-ID")
		if err != nil {
			return err
		}
		resp, err := invoke(c, func(ctx context.Context, conn grpc.ClientConnInterface) (*csi.DeleteSnapshotResponse, error) {
			return csi.NewControllerClient(conn).DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id})
		})
		if err != nil {
			return err
		}
		return c.out(resp, "deleted snapshot "+id)
	}
}

func listCmd(c *call, fs *flag.FlagSet) func([]string) error {
	return func(args []string) error {
		if err := noArgs(args); err != nil {
			return err
		}
		conn, err := c.dial()
		if err != nil {
			return err
		}
		ctx, cancel := c.ctx()
		defer cancel()
		cc := csi.NewControllerClient(conn)
		var lines []string
		vols := &csi.ListVolumesResponse{}
		for tok := ""; ; {
			r, err := cc.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: tok})
			if err != nil {
				return err
			}
			vols.Entries = append(vols.Entries, r.GetEntries()...)
			for _, e := range r.GetEntries() {
				lines = append(lines, fmt.Sprintf("volume   %s  %s", e.GetVolume().GetVolumeId(), bytesText(e.GetVolume().GetCapacityBytes())))
			}
			if tok = r.GetNextToken(); tok == "" {
				break
			}
		}
		if err := c.out(vols, lines...); err != nil {
			return err
		}
		lines = nil
		snaps := &csi.ListSnapshotsResponse{}
		for tok := ""; ; {
			r, err := cc.ListSnapshots(ctx, &csi.ListSnapshotsRequest{StartingToken: tok})
			if err != nil {
				return err
			}
			snaps.Entries = append(snaps.Entries, r.GetEntries()...)
			for _, e := range r.GetEntries() {
				lines = append(lines, fmt.Sprintf("snapshot %s  of %s, %s", e.GetSnapshot().GetSnapshotId(), e.GetSnapshot().GetSourceVolumeId(), bytesText(e.GetSnapshot().GetSizeBytes())))
			}
			if tok = r.GetNextToken(); tok == "" {
				break
			}
		}
		if len(vols.Entries)+len(snaps.Entries) == 0 && c.g.output == "text" {
			lines = append(lines, "no volumes, no snapshots")
		}
		return c.out(snaps, lines...)
	}
}

func capacityCmd(c *call, fs *flag.FlagSet) func([]string) error {
	params := &kv{name: "param"}
	fs.Var(params, "param", "")
	return func(args []string) error {
		if err := noArgs(args); err != nil {
			return err
		}
		resp, err := invoke(c, func(ctx context.Context, conn grpc.ClientConnInterface) (*csi.GetCapacityResponse, error) {
			return csi.NewControllerClient(conn).GetCapacity(ctx, &csi.GetCapacityRequest{
				Parameters: params.m, VolumeCapabilities: []*csi.VolumeCapability{blockCap(false)}})
		})
		if err != nil {
			return err
		}
		line := "available " + bytesText(resp.GetAvailableCapacity())
		if m := resp.GetMaximumVolumeSize(); m != nil {
			line += ", largest volume " + bytesText(m.GetValue())
		}
		return c.out(resp, line)
	}
}

func stageCmd(c *call, fs *flag.FlagSet) func([]string) error {
	staging := fs.String("staging-path", "", "")
	vctx := &kv{name: "context"}
	fs.Var(vctx, "context", "")
	ro := fs.Bool("read-only", false, "")
	return func(args []string) error {
		id, err := oneArg(args, "VOLUME-ID")
		if err != nil {
			return err
		}
		if *staging == "" {
			return usagef("--staging-path DIR is required")
		}
		resp, err := invoke(c, func(ctx context.Context, conn grpc.ClientConnInterface) (*csi.NodeStageVolumeResponse, error) {
			return csi.NewNodeClient(conn).NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{
				VolumeId: id, StagingTargetPath: *staging, VolumeCapability: blockCap(*ro), VolumeContext: vctx.m})
		})
		if err != nil {
			return err
		}
		return c.out(resp, fmt.Sprintf("staged volume %s at %s", id, *staging))
	}
}

func publishCmd(c *call, fs *flag.FlagSet) func([]string) error {
	staging := fs.String("staging-path", "", "")
	target := fs.String("target-path", "", "")
	ro := fs.Bool("read-only", false, "")
	return func(args []string) error {
		id, err := oneArg(args, "VOLUME-ID")
		if err != nil {
			return err
		}
		if *staging == "" || *target == "" {
			return usagef("--staging-path DIR and --target-path FILE are required")
		}
		resp, err := invoke(c, func(ctx context.Context, conn grpc.ClientConnInterface) (*csi.NodePublishVolumeResponse, error) {
			return csi.NewNodeClient(conn).NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
				VolumeId: id, StagingTargetPath: *staging, TargetPath: *target, VolumeCapability: blockCap(*ro), Readonly: *ro})
		})
		if err != nil {
			return err
		}
		return c.out(resp, fmt.Sprintf("published volume %s at %s", id, *target))
	}
}

func unpublishCmd(c *call, fs *flag.FlagSet) func([]string) error {
	target := fs.String("target-path", "", "")
	return func(args []string) error {
		id, err := oneArg(args, "VOLUME-ID")
		if err != nil {
			return err
		}
		if *target == "" {
			return usagef("--target-path FILE is required")
		}
		resp, err := invoke(c, func(ctx context.Context, conn grpc.ClientConnInterface) (*csi.NodeUnpublishVolumeResponse, error) {
			return csi.NewNodeClient(conn).NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: *target})
		})
		if err != nil {
			return err
		}
		return c.out(resp, fmt.Sprintf("unpublished volume %s from %s", id, *target))
	}
}

func unstageCmd(c *call, fs *flag.FlagSet) func([]string) error {
	staging := fs.String("staging-path", "", "")
	return func(args []string) error {
		id, err := oneArg(args, "VOLUME-ID")
		if err != nil {
			return err
		}
		if *staging == "" {
			return usagef("--staging-path DIR is required")
		}
		resp, err := invoke(c, func(ctx context.Context, conn grpc.ClientConnInterface) (*csi.NodeUnstageVolumeResponse, error) {
			return csi.NewNodeClient(conn).NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: *staging})
		})
		if err != nil {
			return err
		}
		return c.out(resp, fmt.Sprintf("unstaged volume %s", id))
	}
}

// invoke dials the plugin (once per command) and makes one call with a
// context that ends at --timeout.
func invoke[Resp any](c *call, rpc func(ctx context.Context, conn grpc.ClientConnInterface) (Resp, error)) (Resp, error) {
	conn, err := c.dial()
	if err != nil {
		var zero Resp
		return zero, err
	}
	ctx, cancel := c.ctx()
	defer cancel()
	return rpc(ctx, conn)
}
