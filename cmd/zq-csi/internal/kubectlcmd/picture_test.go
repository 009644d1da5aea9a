package kubectlcmd

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/zq-csi/zq-csi/pkg/driver"
)

// The plugin's JSON report of 3 zones: zone 0 written 16 sectors (implicitly
// open), zone 1 full, zone 2 empty.
func pictureReport(t *testing.T) string {
	const z = 64 << 20
	rep := driver.DebugZoneReport{VolumeID: volID, Node: "node-a", Start: 0, Zones: []driver.DebugZone{
		{Start: 0, Len: z, Cap: z, WP: 8192, Cond: 2, CondName: "IMP_OPEN", Type: 2},
		{Start: z, Len: z, Cap: z, WP: 2 * z, Cond: 0xE, CondName: "FULL", Type: 2},
		{Start: 2 * z, Len: z, Cap: z, WP: 2 * z, Cond: 1, CondName: "EMPTY", Type: 2},
	}}
	b, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestZonesPicture(t *testing.T) {
	fe := &fakeExec{stdout: pictureReport(t)}
	code, out, errOut := runWith(fe, cluster(), nil, "zones", "data", "-o", "wide", "--count", "3")
	if code != 0 {
		t.Fatalf("exit %d, stderr %q", code, errOut)
	}
	// The plugin is asked for JSON; the picture is drawn here, without
	// colours (stdout is not a terminal), with the condition letters.
	want := []string{"/zq-csi", "volume", "zones", "--socket", "/var/lib/zq-csi/state/debug.sock", "-o", "json", "--count", "3", "--", volID}
	if len(fe.calls) != 1 || !slices.Equal(fe.calls[0].cmd, want) {
		t.Errorf("exec %+v, want %q", fe.calls, want)
	}
	wantOut := "volume " + volID + " (PVC apps/data) on node node-a\n" +
		"3 zones of 64 MiB: empty 1, implicitly open 1, full 1\n" +
		"0 ▁█·\n" +
		"  oF.\n"
	if !strings.HasPrefix(out, wantOut) || !strings.Contains(out, "legend: ") {
		t.Errorf("-o wide:\n%s\nwant it to start with:\n%s", out, wantOut)
	}

	fe = &fakeExec{stdout: pictureReport(t)}
	code, out, errOut = runWith(fe, cluster(), nil, "zones", "data", "-o", "svg")
	if code != 0 || !strings.HasPrefix(out, "<?xml") || !strings.Contains(out, "<svg") || strings.Count(out, "<title>") != 3 {
		t.Errorf("-o svg: exit %d, stderr %q, stdout %.200q", code, errOut, out)
	}

	// Not JSON from the plugin: said so, with the pod.
	fe = &fakeExec{stdout: "start: 0x0, ..."}
	if code, _, errOut = runWith(fe, cluster(), nil, "zones", "data", "-o", "wide"); code != 1 || !strings.Contains(errOut, "the zone report of node plugin pod zq-system/zq-csi-node-a1") {
		t.Errorf("bad JSON: exit %d, stderr %q", code, errOut)
	}
}

func TestPictureOutputsAreForZones(t *testing.T) {
	for _, args := range [][]string{{"describe", "data", "-o", "wide"}, {"describe", "data", "-o", "svg"}} {
		code, _, errOut := runWith(&fakeExec{}, cluster(), nil, args...)
		if code != 2 || !strings.Contains(errOut, "-o "+args[3]+": a picture of the zones, for zones only") {
			t.Errorf("%q: exit %d, stderr %q", args, code, errOut)
		}
	}
	code, _, errOut := runWith(&fakeExec{}, cluster(), nil, "zones", "data", "-o", "yaml")
	if code != 2 || !strings.Contains(errOut, "-o yaml: must be text, json, or for zones wide or svg") {
		t.Errorf("-o yaml: exit %d, stderr %q", code, errOut)
	}
}
