package kubectlcmd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// describe prints what the API server knows of the PVC's volume, then the
// node plugin's view (`zq-csi volume describe` in its container). A volume
// that is not staged is reported, not an error: describe is for finding
// out why.
func describe(ctx context.Context, c *clients, o options, pvc string, env Env) error {
	t, err := resolveVolume(ctx, c, o.namespace, pvc, o.driverName)
	if err != nil {
		return err
	}
	p, perr := findPlugin(ctx, c, t.Node, o)
	if o.output == "text" {
		if err := writeFacts(env.Stdout, t, p, podsUsing(ctx, c, t.PVC)); err != nil {
			return err
		}
	}
	if perr != nil {
		return perr
	}
	if o.output == "text" {
		fmt.Fprintf(env.Stdout, "\nOn node %s (zq-csi volume describe):\n", t.Node)
	}
	err = runInPlugin(ctx, c, p, t, "describe", o, env.Stdout)
	var ns *notStagedError
	if errors.As(err, &ns) && o.output == "text" {
		users := "no pod uses the PVC"
		if len(ns.users) > 0 {
			users = "pods using the PVC: " + strings.Join(ns.users, ", ")
		}
		_, err = fmt.Fprintf(env.Stdout, "Staged: no; the node plugin serves the volume only while a pod using the PVC runs on node %s (%s)\n", t.Node, users)
	}
	return err
}

// writeFacts prints the PVC, the PV and its zone geometry, the node, the
// ZonedVolume and the node plugin pod (p, nil when none was found).
func writeFacts(w io.Writer, t *target, p *plugin, users []string) error {
	tw := tabwriter.NewWriter(w, 0, 8, 1, ' ', 0)
	line := func(k, f string, a ...any) { fmt.Fprintf(tw, "%s:\t"+f+"\n", append([]any{k}, a...)...) }
	pvc, pv := t.PVC, t.PV
	line("PVC", "%s/%s (%s)", pvc.Namespace, pvc.Name, pvc.Status.Phase)
	line("PV", "%s", pv.Name)
	line("Volume", "%s", t.VolumeID)
	line("Driver", "%s", pv.Spec.CSI.Driver)
	if q, ok := pv.Spec.Capacity[corev1.ResourceStorage]; ok {
		line("Capacity", "%s (%d bytes)", q.String(), q.Value())
	}
	line("Storage class", "%s", orDash(pv.Spec.StorageClassName))
	mode := "Filesystem"
	if pv.Spec.VolumeMode != nil {
		mode = string(*pv.Spec.VolumeMode)
	}
	var modes []string
	for _, m := range pv.Spec.AccessModes {
		modes = append(modes, string(m))
	}
	line("Volume mode", "%s, %s", mode, orDash(strings.Join(modes, ",")))
	line("Reclaim policy", "%s", orDash(string(pv.Spec.PersistentVolumeReclaimPolicy)))
	line("Node", "%s (from %s)", t.Node, t.NodeFrom)
	key := "Zone geometry:"
	attrs := pv.Spec.CSI.VolumeAttributes
	for _, k := range slices.Sorted(maps.Keys(attrs)) {
		if strings.HasPrefix(k, "zone.") {
			fmt.Fprintf(tw, "%s\t%s=%s\n", key, k, attrs[k])
			key = ""
		}
	}
	if key != "" {
		line("Zone geometry", "- (the PV's volume attributes have none)")
	}
	if t.ZV != nil {
		writeZonedVolume(tw, t.ZV)
	}
	key = "Used by:"
	if len(users) == 0 {
		fmt.Fprintf(tw, "%s\tno pod\n", key)
	}
	for _, u := range users {
		fmt.Fprintf(tw, "%s\t%s\n", key, u)
		key = ""
	}
	if p != nil {
		line("Node plugin", "%s/%s (container %s)", p.Pod.Namespace, p.Pod.Name, p.Container)
	} else {
		line("Node plugin", "none found")
	}
	return tw.Flush()
}

// writeZonedVolume prints the node agent's report (status) of a
// ZonedVolume, which exists with the cluster backend.
func writeZonedVolume(tw io.Writer, zv *unstructured.Unstructured) {
	phase := orDash(zvString(zv, "status", "phase"))
	fmt.Fprintf(tw, "ZonedVolume:\t%s (phase %s)\n", zv.GetName(), phase)
	if s := zvString(zv, "status", "imagePath"); s != "" {
		fmt.Fprintf(tw, "  Image:\t%s\n", s)
	}
	if s := zvString(zv, "status", "zones", "summary"); s != "" {
		fmt.Fprintf(tw, "  Zones (last report):\t%s\n", s)
	}
	if s := zvString(zv, "status", "error"); s != "" {
		fmt.Fprintf(tw, "  Error:\t%s\n", s)
	}
}
