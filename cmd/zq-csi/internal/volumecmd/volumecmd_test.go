package volumecmd

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	mount "k8s.io/mount-utils"

	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/imgcmd"
	"github.com/zq-csi/zq-csi/pkg/driver"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

const mib = 1 << 20

// plugin is a real node plugin (--mode all, file attacher) serving CSI and
// its debug API on unix sockets in a temporary directory.
type plugin struct {
	dir, socket string
	ctrl        csi.ControllerClient
	node        csi.NodeClient
}

func startPlugin(t *testing.T) *plugin {
	t.Helper()
	return startPluginAt(t, t.TempDir())
}

func startPluginAt(t *testing.T, dir string) *plugin {
	t.Helper()
	att, err := driver.NewFileAttacher(filepath.Join(dir, "state", "attach-file"), 0)
	if err != nil {
		t.Fatal(err)
	}
	d, err := driver.New(driver.Config{NodeID: "node-a", Mode: driver.ModeAll, DataDir: filepath.Join(dir, "data"),
		StateDir: filepath.Join(dir, "state"), Attacher: att, Mounter: mount.NewFakeMounter(nil)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	endpoint := filepath.Join(dir, "csi.sock")
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx, "unix://"+endpoint) }()
	p := &plugin{dir: dir, socket: filepath.Join(dir, "state", driver.DebugSocketName)}
	stop, err := d.ServeDebug(p.socket)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("unix://"+endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		stop()
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	p.ctrl, p.node = csi.NewControllerClient(conn), csi.NewNodeClient(conn)
	// Run recovers before the node service (and the debug API) answers.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := NewClient(p.socket).List(context.Background())
		if err == nil {
			break
		}
		if de, ok := err.(*driver.DebugError); !ok || de.Reason != "NotReady" || time.Now().After(deadline) {
			t.Fatalf("plugin not ready: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return p
}

var blockCap = &csi.VolumeCapability{
	AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
	AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
}

// volume creates an 8-zone volume (1 MiB zones, the first conventional),
// writes to it through the zone engine while it is not staged — zone 1
// 8 KiB, zone 2 to its end — and stages it. It returns the id and image.
func (p *plugin) volume(t *testing.T, name string) (string, string) {
	t.Helper()
	ctx := context.Background()
	resp, err := p.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 8 * mib},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap}, Parameters: map[string]string{"zone.size": "1M", "zone.conventional_zones": "1"}})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.GetVolume().GetVolumeId()
	images, err := driver.NewImages(filepath.Join(p.dir, "data"))
	if err != nil {
		t.Fatal(err)
	}
	image := images.VolumePath(id)
	dev, err := zoned.Open(image, zoned.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []struct{ off, n int64 }{{1 * mib, 8192}, {2 * mib, mib}} {
		if _, err := dev.WriteAt(bytes.Repeat([]byte{0xa5}, int(w.n)), w.off, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := p.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(p.dir, "staging", id),
		VolumeCapability: blockCap}); err != nil {
		t.Fatal(err)
	}
	return id, image
}

func runMain(args ...string) (code int, stdout, stderr string) {
	var o, e bytes.Buffer
	code = Main(args, Env{Stdout: &o, Stderr: &e, Getenv: func(string) string { return "" }})
	return code, o.String(), e.String()
}

// TestZonesMatchesImageTool: `zq-csi volume zones` of a staged volume
// prints what `zq-csi img io -r -U -c "zrp 0 8"` prints for its image (no
// write since staging, so the image holds the live state), and the
// expected write pointers in sectors.
func TestZonesMatchesImageTool(t *testing.T) {
	p := startPlugin(t)
	id, image := p.volume(t, "pvc-zones")

	code, out, errOut := runMain("zones", "--socket", p.socket, id)
	if code != ExitOK {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	var ref bytes.Buffer
	if c := imgcmd.Main([]string{"io", "-r", "-U", "-c", "zrp 0 8", image}, imgcmd.Env{Stdout: &ref, Stderr: &ref}); c != 0 {
		t.Fatalf("img io: %d %s", c, ref.String())
	}
	if out != ref.String() {
		t.Errorf("volume zones:\n%s\nimg io zrp:\n%s", out, ref.String())
	}
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	want := map[int]string{ // sectors: a zone is 0x800
		0: "start: 0x0, len 0x800, cap 0x800, wptr 0x0, zcond:0, [type: 1]",
		1: "start: 0x800, len 0x800, cap 0x800, wptr 0x810, zcond:4, [type: 2]",
		2: "start: 0x1000, len 0x800, cap 0x800, wptr 0x1800, zcond:14, [type: 2]",
		7: "start: 0x3800, len 0x800, cap 0x800, wptr 0x3800, zcond:1, [type: 2]",
	}
	if len(lines) != 8 {
		t.Fatalf("%d lines:\n%s", len(lines), out)
	}
	for i, w := range want {
		if lines[i] != w {
			t.Errorf("line %d: %q, want %q", i, lines[i], w)
		}
	}

	// A range, flags after the id, and JSON.
	code, out, errOut = runMain("zones", id, "--socket", p.socket, "--start", "1", "--count", "2")
	if code != ExitOK || out != strings.Join(lines[1:3], "\n")+"\n" {
		t.Errorf("zones --start 1 --count 2: exit %d %s\n%s", code, errOut, out)
	}
	code, out, _ = runMain("zones", "-o", "json", "--socket", p.socket, id)
	var rep driver.DebugZoneReport
	if err := json.Unmarshal([]byte(out), &rep); code != ExitOK || err != nil {
		t.Fatalf("zones -o json: exit %d %v\n%s", code, err, out)
	}
	if len(rep.Zones) != 8 || rep.Zones[1].WP != mib+8192 || rep.Zones[1].CondName != "CLOSED" || rep.Node != "node-a" {
		t.Errorf("json report: %+v", rep)
	}
}

func TestListAndDescribe(t *testing.T) {
	p := startPlugin(t)
	code, out, errOut := runMain("list", "--socket", p.socket)
	if code != ExitOK || out != "No volumes are staged on node node-a.\n" {
		t.Errorf("empty list: exit %d %q %s", code, out, errOut)
	}
	id, image := p.volume(t, "pvc-list")

	code, out, errOut = runMain("list", "--socket", p.socket)
	if code != ExitOK {
		t.Fatalf("list: exit %d %s", code, errOut)
	}
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(lines) != 2 {
		t.Fatalf("list:\n%s", out)
	}
	for _, f := range []string{"VOLUME", "ATTACHER", "GEN", "DEVICE", "SIZE", "ZONES", "ZONE STATES", "PUBLISHED"} {
		if !strings.Contains(lines[0], f) {
			t.Errorf("header %q lacks %s", lines[0], f)
		}
	}
	for _, f := range []string{id, " file ", " 1 ", "8MiB", "8 x 1MiB", "conv=1 empty=5 open=0 closed=1 full=1"} {
		if !strings.Contains(lines[1], f) {
			t.Errorf("row %q lacks %q", lines[1], f)
		}
	}

	code, out, errOut = runMain("describe", id, "--socket", p.socket)
	if code != ExitOK {
		t.Fatalf("describe: exit %d %s", code, errOut)
	}
	got := map[string]bool{} // lines with their alignment spaces squeezed
	for _, l := range strings.Split(out, "\n") {
		got[strings.Join(strings.Fields(l), " ")] = true
	}
	for _, f := range []string{
		"Volume: " + id, "Node: node-a", "Image: " + image,
		"Attachment: file, generation 1", "Access mode: SINGLE_NODE_WRITER (read-write)",
		"Published at: nowhere", "Device open: yes", "Size: 8MiB (8388608 bytes)",
		"Zones: 8 x 1MiB (capacity 1MiB), 1 conventional",
		"Zone limits: max open unlimited, max active unlimited, max append 64KiB",
		"Zone states: conv=1 empty=5 open=0 closed=1 full=1",
	} {
		if !got[f] {
			t.Errorf("describe lacks %q:\n%s", f, out)
		}
	}
	code, out, _ = runMain("describe", "-o", "json", "--socket", p.socket, id)
	var v driver.DebugVolume
	if err := json.Unmarshal([]byte(out), &v); code != ExitOK || err != nil || v.ID != id || !v.Attached || v.Geometry == nil || v.Geometry.NrZones != 8 {
		t.Errorf("describe -o json: exit %d %v %+v", code, err, v)
	}
	code, out, _ = runMain("list", "-o", "json", "--socket", p.socket)
	var l driver.DebugVolumeList
	if err := json.Unmarshal([]byte(out), &l); code != ExitOK || err != nil || len(l.Volumes) != 1 || l.Volumes[0].ID != id {
		t.Errorf("list -o json: exit %d %v %+v", code, err, l)
	}
}

func TestErrors(t *testing.T) {
	p := startPlugin(t)
	for _, tc := range []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"not staged", []string{"zones", "--socket", p.socket, "zqv-00000000000000000000"}, ExitNotStaged,
			"volume zqv-00000000000000000000 is not staged on node node-a"},
		{"describe not staged", []string{"describe", "--socket", p.socket, "zqv-00000000000000000000"}, ExitNotStaged, "is not staged on node node-a"},
		{"no socket", []string{"list", "--socket", filepath.Join(p.dir, "nope.sock")}, ExitError,
			"cannot reach the node plugin's debug socket " + filepath.Join(p.dir, "nope.sock")},
		{"missing id", []string{"zones", "--socket", p.socket}, ExitUsage, "missing VOLUME-ID"},
		{"extra argument", []string{"list", "x"}, ExitUsage, `unexpected argument "x"`},
		{"bad output", []string{"zones", "-o", "yaml", "zqv-00000000000000000000"}, ExitUsage, "-o yaml"},
		{"range on describe", []string{"describe", "--start", "2", "zqv-00000000000000000000"}, ExitUsage, "--start and --count apply to zones only"},
		{"unknown command", []string{"frob"}, ExitUsage, `unknown command "frob"`},
		{"unknown flag", []string{"list", "--frob"}, ExitUsage, "flag provided but not defined: -frob"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errOut := runMain(tc.args...)
			if code != tc.code || !strings.Contains(errOut, tc.msg) {
				t.Errorf("exit %d, stderr %q; want %d and %q", code, errOut, tc.code, tc.msg)
			}
		})
	}
}

func TestDefaultSocket(t *testing.T) {
	if got := DefaultSocket(func(string) string { return "" }); got != "/var/lib/zq-csi/state/debug.sock" {
		t.Errorf("default: %s", got)
	}
	env := func(k string) string {
		if k == "ZQ_CSI_STATE_DIR" {
			return "/srv/zq/state"
		}
		return ""
	}
	if got := DefaultSocket(env); got != "/srv/zq/state/debug.sock" {
		t.Errorf("from ZQ_CSI_STATE_DIR: %s", got)
	}
}

func TestBytes(t *testing.T) {
	for n, want := range map[uint64]string{0: "0B", 512: "512B", 1536: "1536B", 4096: "4KiB", 64 << 20: "64MiB", 3 << 30: "3GiB", 1 << 40: "1TiB", 1<<30 + 1<<20: "1025MiB"} {
		if got := Bytes(n); got != want {
			t.Errorf("Bytes(%d) = %s, want %s", n, got, want)
		}
	}
}

func TestParseInterspersed(t *testing.T) {
	for _, tc := range []struct {
		args []string
		pos  []string
		o    string
	}{
		{[]string{"a", "-o", "json", "b"}, []string{"a", "b"}, "json"},
		{[]string{"-o", "json", "a"}, []string{"a"}, "json"},
		{[]string{"a", "--", "-o", "b"}, []string{"a", "-o", "b"}, ""},
		{nil, nil, ""},
	} {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		var o string
		fs.StringVar(&o, "o", "", "")
		pos, err := ParseInterspersed(fs, tc.args)
		if err != nil || strings.Join(pos, ",") != strings.Join(tc.pos, ",") || o != tc.o {
			t.Errorf("%q: %q o=%q %v; want %q o=%q", tc.args, pos, o, err, tc.pos, tc.o)
		}
	}
}

// Issue 14: a bad state record is moved aside at start; `volume list`
// says so above the volumes, and -o json carries it.
func TestListShowsQuarantinedRecords(t *testing.T) {
	dir := t.TempDir()
	nodeDir := filepath.Join(dir, "state", "node")
	if err := os.MkdirAll(nodeDir, 0o750); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(nodeDir, "zqv-00000000000000000001.json")
	if err := os.WriteFile(bad, nil, 0o640); err != nil {
		t.Fatal(err)
	}
	p := startPluginAt(t, dir)
	code, out, errOut := runMain("list", "--socket", p.socket)
	if code != ExitOK {
		t.Fatalf("list: exit %d %s", code, errOut)
	}
	for _, want := range []string{"WARNING: 1 state record file(s) could not be loaded and were moved aside",
		bad + ".quarantined-", ": empty file", "No volumes are staged on node node-a."} {
		if !strings.Contains(out, want) {
			t.Errorf("list lacks %q:\n%s", want, out)
		}
	}
	code, out, _ = runMain("list", "-o", "json", "--socket", p.socket)
	var l driver.DebugVolumeList
	if err := json.Unmarshal([]byte(out), &l); code != ExitOK || err != nil || len(l.Quarantined) != 1 || l.Quarantined[0].Original != bad {
		t.Errorf("list -o json: exit %d %v %+v", code, err, l)
	}
}
