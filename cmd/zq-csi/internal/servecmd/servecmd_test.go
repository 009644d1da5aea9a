package servecmd

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"
)

func TestFlagsFromEnvironment(t *testing.T) {
	env := map[string]string{"CSI_ENDPOINT": "unix:///env.sock", "ZQ_CSI_MODE": "bogus", "NODE_NAME": "n-env"}
	var stderr bytes.Buffer
	// A flag given on the command line wins over its variable; the others
	// come from the environment, so the bad ZQ_CSI_MODE is what fails.
	code := Main([]string{"--data-dir", t.TempDir(), "--attacher", "file"},
		Env{Stdout: &stderr, Stderr: &stderr, Getenv: func(k string) string { return env[k] }})
	if code != 2 || !strings.Contains(stderr.String(), `--mode=bogus: must be controller, node or all`) {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
	stderr.Reset()
	code = Main([]string{"--mode", "all", "--attacher", "ufo", "--data-dir", t.TempDir()},
		Env{Stdout: &stderr, Stderr: &stderr, Getenv: func(k string) string { return env[k] }})
	if code != 2 || !strings.Contains(stderr.String(), "--attacher=ufo: must be nbd, fuse-loop, auto or file") {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
}

func TestBackendFlag(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int // 2: a bad invocation, refused before anything is made; 1: it fails when run
		want string
	}{
		{[]string{"--backend", "ufo"}, 2, "--backend=ufo: must be local or cluster"},
		// No kubeconfig and not in a pod: the error says where the config comes from.
		{[]string{"--backend", "cluster", "--mode", "controller"}, 1, "--backend=cluster: API server config (--kubeconfig or in-cluster)"},
		{[]string{"--backend", "cluster", "--mode", "controller", "--kubeconfig", "/nonexistent/kubeconfig"}, 1, "/nonexistent/kubeconfig"},
		{[]string{"--backend", "cluster", "--mode", "controller", "--kube-api-qps", "0"}, 2, "--kube-api-qps=0 --kube-api-burst=100: both must be positive"},
		{[]string{"--backend", "cluster", "--mode", "controller", "--kube-api-burst", "-1"}, 2, "--kube-api-qps=50 --kube-api-burst=-1: both must be positive"},
	} {
		var stderr bytes.Buffer
		args := append([]string{"--data-dir", t.TempDir(), "--node-id", "n1", "--attacher", "file"}, tc.args...)
		code := Main(args, Env{Stdout: &stderr, Stderr: &stderr, Getenv: func(string) string { return "" }})
		if code != tc.code || !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d and %q", tc.args, code, stderr.String(), tc.code, tc.want)
		}
	}
}

func TestExporterFlag(t *testing.T) {
	_, statErr := os.Stat("/dev/ublk-control")
	for _, tc := range []struct {
		args []string
		env  map[string]string
		code int
		want string
		skip bool
	}{
		{args: []string{"--exporter", "zoned"}, code: 2, want: "--exporter=zoned: must be auto, nbd or ublk"},
		{args: []string{"--ublk-queues", "-2"}, code: 2, want: "--ublk-queues=-2: must be 0 (one per CPU, at most 4) to 4096"},
		{env: map[string]string{"ZQ_CSI_EXPORTER": "UBLK"}, code: 2, want: "--exporter=UBLK: must be auto, nbd or ublk"},
		// Required but missing: the node plugin does not start, and says
		// what the node lacks.
		{args: []string{"--exporter", "ublk"}, code: 1, want: "--exporter=ublk: /dev/ublk-control is missing and modprobe ublk_drv failed", skip: statErr == nil},
	} {
		if tc.skip {
			t.Logf("SKIPPED %v: this host has /dev/ublk-control", tc.args)
			continue
		}
		var stderr bytes.Buffer
		args := append([]string{"--data-dir", t.TempDir(), "--node-id", "n1", "--attacher", "file", "--endpoint", "unix://" + t.TempDir() + "/csi.sock"}, tc.args...)
		code := Main(args, Env{Stdout: &stderr, Stderr: &stderr, Getenv: func(k string) string { return tc.env[k] }})
		if code != tc.code || !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("%v %v: exit %d, stderr %q; want exit %d and %q", tc.args, tc.env, code, stderr.String(), tc.code, tc.want)
		}
	}
}

func TestNewZonedAttacherNBD(t *testing.T) {
	a, why, err := newZonedAttacher("nbd", t.TempDir(), 0)
	if a != nil || err != nil || !strings.Contains(why, "--exporter=nbd") {
		t.Fatalf("--exporter=nbd: %v %q %v; want no zoned attacher, and why", a, why, err)
	}
}

func TestMetricsAddressFlag(t *testing.T) {
	var stderr bytes.Buffer
	code := Main([]string{"--data-dir", t.TempDir(), "--node-id", "n1", "--attacher", "file", "--metrics-address", "9809"},
		Env{Stdout: &stderr, Stderr: &stderr, Getenv: func(string) string { return "" }})
	if code != 2 || !strings.Contains(stderr.String(), "--metrics-address=9809: must be host:port") {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}

	// From the environment, port 0: the log says where; /metrics answers
	// with the driver's metrics while serve runs.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	logs := &syncBuffer{}
	done := make(chan int, 1)
	env := map[string]string{"ZQ_CSI_METRICS_ADDRESS": "127.0.0.1:0"}
	go func() {
		done <- Main([]string{"--data-dir", t.TempDir(), "--node-id", "n1", "--attacher", "file", "--endpoint", "unix://" + t.TempDir() + "/csi.sock"},
			Env{Stdout: logs, Stderr: logs, Getenv: func(k string) string { return env[k] }, Context: ctx})
	}()
	re := regexp.MustCompile(`"Serving metrics" address="([^"]+)"`)
	var addr string
	for deadline := time.Now().Add(20 * time.Second); addr == "" && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if m := re.FindStringSubmatch(logs.String()); m != nil {
			addr = m[1]
		}
	}
	if addr == "" {
		cancel()
		t.Fatalf("no metrics address logged: %s", logs.String())
	}
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"# TYPE zq_csi_node_data_dir_free_bytes gauge", "go_goroutines"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q:\n%s", want, body)
		}
	}
	cancel()
	if code := <-done; code != 0 {
		t.Fatalf("serve exit %d: %s", code, logs.String())
	}
}
