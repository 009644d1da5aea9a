package csicmd

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/zq-csi/zq-csi/pkg/driver"
)

// startDriver runs a real zq-csi driver (--mode all, local backend, the
// file attacher: no devices needed) on a unix socket, as `zq-csi serve`
// does, and returns its endpoint.
func startDriver(t *testing.T) (endpoint, dir string) {
	dir, err := os.MkdirTemp("", "zq-csicmd-") // short: a socket path has 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	att, err := driver.NewFileAttacher(filepath.Join(dir, "state", "fileattach"), 8)
	if err != nil {
		t.Fatal(err)
	}
	d, err := driver.New(driver.Config{DriverName: "zq-csi.csicmd.test", NodeID: "n1", Mode: driver.ModeAll,
		DataDir: filepath.Join(dir, "data"), StateDir: filepath.Join(dir, "state"), Attacher: att})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Recover(context.Background()); err != nil {
		t.Fatal(err)
	}
	endpoint = "unix://" + filepath.Join(dir, "csi.sock")
	l, err := driver.Listen(endpoint)
	if err != nil {
		t.Fatal(err)
	}
	s := d.NewServer(driver.ModeAll)
	go s.Serve(l)
	t.Cleanup(func() {
		done := make(chan struct{})
		go func() { s.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			s.Stop()
		}
	})
	return endpoint, dir
}

// runCSI runs `zq-csi csi --endpoint EP ARGS...`.
func runCSI(ep string, args ...string) (code int, stdout, stderr string) {
	var o, e bytes.Buffer
	code = Main(append([]string{"--endpoint", ep}, args...), Env{Stdout: &o, Stderr: &e})
	return code, o.String(), e.String()
}

// The seed's StorageClass (charts/zq-csi values.yaml storageClass.parameters).
var seedParams = []string{"--param", "zone.size=64M", "--param", "zone.capacity=64M", "--param", "zone.max_open_zones=6",
	"--param", "zone.max_active_zones=8", "--param", "zone.max_append_bytes=4096", "--param", "exporter=auto"}

// TestLifecycle drives a volume from CreateVolume to DeleteVolume through
// the real driver's gRPC services, as make demo does.
func TestLifecycle(t *testing.T) {
	ep, dir := startDriver(t)
	must := func(args ...string) string {
		t.Helper()
		code, out, errOut := runCSI(ep, args...)
		if code != 0 {
			t.Fatalf("zq-csi csi %q: exit %d, stderr %q", args, code, errOut)
		}
		return out
	}
	out := must("info")
	for _, w := range []string{"plugin zq-csi.csicmd.test dev: ready; capabilities ", "CONTROLLER_SERVICE", "controller: CREATE_DELETE_VOLUME",
		"CREATE_DELETE_SNAPSHOT", "node n1: max volumes 8, topology ", "topology.zq-csi/node=n1"} {
		if !strings.Contains(out, w) {
			t.Errorf("info: no %q in\n%s", w, out)
		}
	}

	out = must(append([]string{"create", "vol-a", "--size", "512Mi"}, seedParams...)...)
	lines := strings.Split(out, "\n")
	if !strings.HasPrefix(lines[0], "volume zqv-") || !strings.HasSuffix(lines[0], ": 512Mi (536870912 bytes)") {
		t.Fatalf("create: first line %q", lines[0])
	}
	vol := strings.TrimSuffix(strings.TrimPrefix(lines[0], "volume "), ": 512Mi (536870912 bytes)")
	for _, w := range []string{"  topology topology.zq-csi/node=n1", "    zone.nr_zones=8", "    zone.size=67108864", "    zone.max_open_zones=6"} {
		if !strings.Contains(out, w+"\n") {
			t.Errorf("create: no line %q in\n%s", w, out)
		}
	}
	// Idempotent by name: the same volume again, -o id prints only its ID.
	if got := strings.TrimSpace(must(append([]string{"-o", "id", "create", "vol-a", "--size", "512Mi"}, seedParams...)...)); got != vol {
		t.Errorf("create again: %q, want %q", got, vol)
	}

	staging := filepath.Join(dir, "staging", vol)
	if got := must("stage", vol, "--staging-path", staging, "--context", "exporter=auto"); got != "staged volume "+vol+" at "+staging+"\n" {
		t.Errorf("stage: %q", got)
	}
	target := filepath.Join(dir, "pods", vol)
	if os.Geteuid() == 0 {
		must("publish", vol, "--staging-path", staging, "--target-path", target)
		if st, err := os.Stat(target); err != nil || st.Size() != 512<<20 {
			t.Errorf("published target %s: %v, size %v; want the file attacher's 512 MiB stand-in", target, err, st)
		}
		must("unpublish", vol, "--target-path", target)
	} else if os.Getenv("ZQ_SKIP_ROOT_TESTS") != "1" {
		t.Errorf("publish needs root (a bind mount); set ZQ_SKIP_ROOT_TESTS=1 to skip it")
	} else {
		t.Log("SKIP publish/unpublish: not root (ZQ_SKIP_ROOT_TESTS=1)")
	}

	out = must("-o", "id", "snapshot", "snap-a", "--source", vol)
	snap := strings.TrimSpace(out)
	if !strings.HasPrefix(snap, "zqs-") {
		t.Fatalf("snapshot -o id: %q", out)
	}
	out = must(append([]string{"create", "vol-b", "--size", "512Mi", "--from-snapshot", snap}, seedParams...)...)
	if !strings.Contains(out, "  from snapshot "+snap+"\n") {
		t.Errorf("create --from-snapshot: %s", out)
	}
	vol2 := strings.Fields(out)[1]
	vol2 = strings.TrimSuffix(vol2, ":")

	out = must("list")
	for _, w := range []string{"volume   " + vol + "  512Mi", "volume   " + vol2 + "  512Mi", "snapshot " + snap + "  of " + vol} {
		if !strings.Contains(out, w) {
			t.Errorf("list: no %q in\n%s", w, out)
		}
	}
	// JSON: the CSI response as protobuf JSON.
	_, js, _ := runCSI(ep, "-o", "json", "capacity")
	var capResp struct {
		AvailableCapacity string `json:"availableCapacity"`
	}
	if err := json.Unmarshal([]byte(js), &capResp); err != nil || capResp.AvailableCapacity == "" {
		t.Errorf("capacity -o json: %v: %s", err, js)
	}

	// Unstage, then delete everything: nothing is left.
	must("unstage", vol, "--staging-path", staging)
	must("delete", vol)
	must("delete", vol2)
	must("delete-snapshot", snap)
	if out := must("list"); out != "no volumes, no snapshots\n" {
		t.Errorf("list after deleting everything: %q", out)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "data", "*", "*")); len(left) != 0 {
		t.Errorf("images left behind: %v", left)
	}
}

func TestErrors(t *testing.T) {
	ep, _ := startDriver(t)
	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		// The driver's error, with its gRPC code, naming the parameter.
		{[]string{"create", "bad", "--size", "512Mi", "--param", "zone.size=64M", "--param", "zone.capacity=128M"}, 1,
			"zq-csi csi create: InvalidArgument: parameter zone.capacity=128M"},
		{[]string{"delete-snapshot", "zqs-nope"}, 0, ""}, // deleting what is missing succeeds (CSI)
		{[]string{"stage", "zqv-0123456789abcdef0123", "--staging-path", "/tmp/x"}, 1, "zq-csi csi stage: NotFound: volume zqv-0123456789abcdef0123"},
		{[]string{"create", "x"}, 2, "--size is required"},
		{[]string{"create", "x", "--size", "lots"}, 2, `--size "lots": want a positive size such as 512Mi or 1Gi`},
		{[]string{"create", "x", "--size", "1Gi", "--param", "novalue"}, 2, `--param "novalue": want KEY=VALUE`},
		{[]string{"create", "x", "y", "--size", "1Gi"}, 2, "want one volume NAME, got 2 arguments"},
		{[]string{"create", "x", "--size", "1Gi", "--from-snapshot", "a", "--from-volume", "b"}, 2, "exclude each other"},
		{[]string{"snapshot", "s"}, 2, "--source VOLUME-ID is required"},
		{[]string{"frob"}, 2, `unknown command "frob"`},
		{[]string{"-o", "yaml", "list"}, 2, `-o "yaml": want text, json or id`},
	} {
		code, _, errOut := runCSI(ep, tc.args...)
		if code != tc.code || !strings.Contains(errOut, tc.msg) {
			t.Errorf("%q: exit %d, stderr %q; want exit %d and %q", tc.args, code, errOut, tc.code, tc.msg)
		}
	}
	for _, tc := range []struct{ ep, msg string }{
		{"unix://relative", `--endpoint "unix://relative": want unix:///absolute/path`},
		{"http://x", `--endpoint "http://x": want unix:///path or tcp://host:port`},
	} {
		code, _, errOut := runCSI(tc.ep, "info")
		if code != 1 || !strings.Contains(errOut, tc.msg) {
			t.Errorf("--endpoint %s: exit %d, stderr %q", tc.ep, code, errOut)
		}
	}
	// Nothing listening: the gRPC code and the socket.
	code, _, errOut := runCSI("unix:///nonexistent/csi.sock", "--timeout", "2s", "info")
	if code != 1 || !strings.Contains(errOut, "Unavailable") || !strings.Contains(errOut, "/nonexistent/csi.sock") {
		t.Errorf("no driver: exit %d, stderr %q", code, errOut)
	}
}
