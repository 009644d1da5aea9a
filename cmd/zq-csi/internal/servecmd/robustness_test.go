package servecmd

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/cli"
)

// syncBuffer is a bytes.Buffer safe for the server's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// server is one `zq-csi serve --mode all --backend local` run in-process.
type server struct {
	sock   string
	out    *syncBuffer
	cancel context.CancelFunc
	done   chan int
}

func startServe(t *testing.T, dataDir string, extra ...string) *server {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "csi.sock")
	ctx, cancel := context.WithCancel(context.Background())
	s := &server{sock: sock, out: &syncBuffer{}, cancel: cancel, done: make(chan int, 1)}
	args := append([]string{"--endpoint", "unix://" + sock, "--mode", "all", "--backend", "local", "--node-id", "n1",
		"--data-dir", dataDir, "--attacher", "file", "--exporter", "nbd"}, extra...)
	go func() {
		s.done <- Main(args, Env{Stdout: s.out, Stderr: s.out, Getenv: func(string) string { return "" }, Context: ctx})
	}()
	t.Cleanup(func() { s.stop(t) })
	return s
}

// waitServing waits until the CSI socket answers, or the server exits.
func (s *server) waitServing(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case code := <-s.done:
			s.done <- code
			t.Fatalf("serve exited %d before serving:\n%s", code, s.out)
		default:
		}
		if c, err := net.Dial("unix", s.sock); err == nil {
			c.Close()
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("serve did not answer on %s:\n%s", s.sock, s.out)
}

func (s *server) stop(t *testing.T) int {
	s.cancel()
	select {
	case code := <-s.done:
		s.done <- code
		return code
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop")
	}
	return -1
}

func (s *server) controller(t *testing.T) csi.ControllerClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+s.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return csi.NewControllerClient(conn)
}

// Issue 14: one zero-length record file made serve exit 1 at start
// ("unexpected end of JSON input"). It starts, says what it moved aside,
// and serves the other volumes.
func TestServeStartsWithBadRecord(t *testing.T) {
	data := t.TempDir()
	vols := filepath.Join(data, "state", "controller", "volumes")
	if err := os.MkdirAll(vols, 0o750); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(vols, "zqv-00000000000000000001.json")
	if err := os.WriteFile(bad, nil, 0o640); err != nil {
		t.Fatal(err)
	}
	s := startServe(t, data)
	s.waitServing(t)
	if _, err := s.controller(t).ListVolumes(context.Background(), &csi.ListVolumesRequest{}); err != nil {
		t.Fatal(err)
	}
	if code := s.stop(t); code != 0 {
		t.Fatalf("exit %d:\n%s", code, s.out)
	}
	for _, want := range []string{"RecordQuarantined", bad + " could not be loaded (empty file); moved aside to " + bad + ".quarantined-"} {
		if !strings.Contains(s.out.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, s.out)
		}
	}
}

// Issue 14: a second serve on the same state directory took the first
// one's socket. It is refused, naming the holder's pid, and the first
// still serves.
func TestSecondServeRefused(t *testing.T) {
	data := t.TempDir()
	first := startServe(t, data)
	first.waitServing(t)
	var out bytes.Buffer
	code := Main([]string{"--endpoint", "unix://" + filepath.Join(t.TempDir(), "other.sock"), "--node-id", "n1",
		"--data-dir", data, "--attacher", "file", "--exporter", "nbd"},
		Env{Stdout: &out, Stderr: &out, Getenv: func(string) string { return "" }})
	want := "locked by another process, pid " + strconv.Itoa(os.Getpid())
	if code != cli.ExitError || !strings.Contains(out.String(), want) {
		t.Fatalf("second serve: exit %d, %q; want exit 1 and %q", code, out.String(), want)
	}
	// The same endpoint with another state directory: refused too.
	out.Reset()
	code = Main([]string{"--endpoint", "unix://" + first.sock, "--node-id", "n1",
		"--data-dir", t.TempDir(), "--attacher", "file", "--exporter", "nbd"},
		Env{Stdout: &out, Stderr: &out, Getenv: func(string) string { return "" }})
	if code != cli.ExitError || !strings.Contains(out.String(), "is in use") {
		t.Fatalf("same endpoint: exit %d, %q", code, out.String())
	}
	if _, err := first.controller(t).ListVolumes(context.Background(), &csi.ListVolumesRequest{}); err != nil {
		t.Fatalf("the first server lost its endpoint: %v", err)
	}
}

// Issue 14: every gRPC error was logged four times (klog's file outputs
// per severity plus stderr, all on one writer). Once now.
func TestGRPCErrorLoggedOnce(t *testing.T) {
	s := startServe(t, t.TempDir())
	s.waitServing(t)
	_, err := s.controller(t).CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: ""})
	if err == nil {
		t.Fatal("CreateVolume without a name succeeded")
	}
	s.stop(t)
	if n := strings.Count(s.out.String(), `"GRPC error"`); n != 1 {
		t.Fatalf("the error is logged %d times, want once:\n%s", n, s.out)
	}
	if strings.Contains(s.out.String(), `"GRPC call"`) {
		t.Errorf("--v=0 logs every call:\n%s", s.out)
	}
	// --v=2 logs each call, once.
	s2 := startServe(t, t.TempDir(), "--v=2")
	s2.waitServing(t)
	s2.controller(t).CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: ""})
	s2.stop(t)
	if n := strings.Count(s2.out.String(), `"GRPC call" method="/csi.v1.Controller/CreateVolume"`); n != 1 {
		t.Errorf("--v=2: the call is logged %d times, want once:\n%s", n, s2.out)
	}
}

// Issue 14: an invalid invocation created directories before it was
// refused; usage errors are one line (not the 40-line usage), exit 2.
func TestInvalidInvocationTouchesNothing(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--mode", "bogus"}, "--mode=bogus: must be controller, node or all"},
		{[]string{"--attacher", "ufo"}, "--attacher=ufo: must be nbd, fuse-loop, auto or file"},
		{[]string{"--endpoint", "ftp://x"}, `--endpoint=ftp://x: endpoint "ftp://x": scheme must be unix or tcp`},
		{[]string{"--node-id", ""}, "--node-id is required"},
		{[]string{"--max-volumes", "-1"}, "--max-volumes=-1: must be 0"},
		{[]string{"--driver-name", "-x-"}, `driver name "-x-"`},
		{[]string{"--v", "abc"}, "--v=abc: must be a whole number from 0 to 10"},
		{[]string{"--v=-1"}, "--v=-1: must be a whole number from 0 to 10"},
		{[]string{"--ublk-queues", "x"}, "--ublk-queues=x: must be a whole number"},
		{[]string{"--logtostderr=false"}, "--logtostderr=false: zq-csi logs to stderr only"},
		{[]string{"--logtostderr=maybe"}, "--logtostderr=maybe: must be true or false"},
		{[]string{"--endpont", "unix:///x"}, "unknown flag --endpont (did you mean --endpoint?)"},
		{[]string{"stray"}, `unexpected argument "stray"`},
	} {
		root := t.TempDir()
		data := filepath.Join(root, "data")
		var stdout, stderr bytes.Buffer
		args := append([]string{"--data-dir", data, "--node-id", "n1", "--attacher", "file",
			"--endpoint", "unix://" + filepath.Join(root, "sock", "csi.sock")}, tc.args...)
		code := Main(args, Env{Stdout: &stdout, Stderr: &stderr, Getenv: func(string) string { return "" }})
		if code != cli.ExitUsage || !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit 2 and %q", tc.args, code, stderr.String(), tc.want)
		}
		if lines := strings.Count(stderr.String(), "\n"); lines > 2 {
			t.Errorf("%v: %d lines of stderr, want the error and a hint:\n%s", tc.args, lines, stderr.String())
		}
		if stdout.Len() != 0 {
			t.Errorf("%v: stdout %q", tc.args, stdout.String())
		}
		if ents, _ := os.ReadDir(root); len(ents) != 0 {
			t.Errorf("%v: the refused invocation created %v", tc.args, ents[0].Name())
		}
	}
	// --logtostderr (true) is accepted as other Kubernetes components take it.
	s := startServe(t, t.TempDir(), "--logtostderr", "--v=2")
	s.waitServing(t)
	if code := s.stop(t); code != 0 {
		t.Fatalf("--logtostderr: exit %d\n%s", code, s.out)
	}
}

// Issue 14: serve --help went to stderr, and flags printed their default
// twice.
func TestServeHelp(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := Main([]string{"--help"}, Env{Stdout: &stdout, Stderr: &stderr}); code != 0 {
		t.Fatalf("exit %d", code)
	}
	if stderr.Len() != 0 || !strings.HasPrefix(stdout.String(), "Usage: zq-csi serve") {
		t.Fatalf("help: stdout %q, stderr %q", stdout.String(), stderr.String())
	}
	for _, flagName := range []string{"--endpoint", "--state-dir", "--ublk-queues", "--orphan-grace", "--v", "--logtostderr"} {
		i := strings.Index(stdout.String(), "  "+flagName+" ")
		if i < 0 {
			i = strings.Index(stdout.String(), "  "+flagName+"\n")
		}
		if i < 0 {
			t.Errorf("help lacks %s", flagName)
			continue
		}
		entry := stdout.String()[i:]
		if j := strings.Index(entry[2:], "\n  --"); j >= 0 {
			entry = entry[:j+2]
		}
		if n := strings.Count(strings.ToLower(entry), "default"); n > 1 {
			t.Errorf("%s says default %d times:\n%s", flagName, n, entry)
		}
	}
	if !strings.Contains(stdout.String(), "(default 15m0s)") {
		t.Errorf("--orphan-grace's default is not shown:\n%s", stdout.String())
	}
	_ = errors.New
}
