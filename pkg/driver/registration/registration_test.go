package registration

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

const driverName = "zq-csi.zq-csi.io"

// shortDir returns a temporary directory with a path short enough for a
// unix socket (108 bytes) whatever the test's name.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "zqreg")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// serve runs Serve in the background and returns a function that stops it
// and returns Serve's result.
func serve(t *testing.T, cfg Config) func() error {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- Serve(ctx, cfg) }()
	stopped := false
	var result error
	stop := func() error {
		if !stopped {
			stopped = true
			cancel()
			select {
			case result = <-errc:
			case <-time.After(10 * time.Second):
				t.Fatal("Serve did not return after its context ended")
			}
		}
		return result
	}
	t.Cleanup(func() { stop() })
	return stop
}

// waitForFile waits until a server accepts connections on the socket at
// path. Its mere existence is not enough: the tests leave a stale socket
// there first, which Serve must replace.
func waitForFile(t *testing.T, path string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if st, err := os.Lstat(path); err == nil && st.Mode().Type() == os.ModeSocket {
			if c, err := net.Dial("unix", path); err == nil {
				c.Close()
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing accepts connections on %s after 10s", path)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// kubelet dials the registration socket the way the kubelet's plugin
// watcher does: gRPC over the unix socket, no transport security.
func kubelet(t *testing.T, sock string) registerapi.RegistrationClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return registerapi.NewRegistrationClient(conn)
}

func TestKubeletRegistersPlugin(t *testing.T) {
	dir := shortDir(t)
	sock := SocketPath(dir, driverName)
	if sock != filepath.Join(dir, "zq-csi.zq-csi.io-reg.sock") {
		t.Fatalf("SocketPath = %s", sock)
	}
	// A socket an earlier run left behind: Serve must replace it.
	stale, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()

	statuses := make(chan error, 4)
	stop := serve(t, Config{
		DriverName: driverName,
		Endpoint:   "/var/lib/kubelet/plugins/zq-csi.zq-csi.io/csi.sock",
		Dir:        dir,
		OnStatus:   func(err error) { statuses <- err },
	})
	waitForFile(t, sock)
	c := kubelet(t, sock)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	info, err := c.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		t.Fatalf("GetInfo: %v", err)
	}
	want := &registerapi.PluginInfo{
		Type:              "CSIPlugin",
		Name:              driverName,
		Endpoint:          "/var/lib/kubelet/plugins/zq-csi.zq-csi.io/csi.sock",
		SupportedVersions: []string{"1.0.0"},
	}
	if info.Type != want.Type || info.Name != want.Name || info.Endpoint != want.Endpoint || !reflect.DeepEqual(info.SupportedVersions, want.SupportedVersions) {
		t.Fatalf("GetInfo = %+v, want %+v", info, want)
	}

	if _, err := c.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatalf("NotifyRegistrationStatus(registered): %v", err)
	}
	if got := <-statuses; got != nil {
		t.Fatalf("OnStatus after a registration: %v, want nil", got)
	}
	// A refusal reaches the caller with the kubelet's reason, and the
	// socket stays up for the kubelet's retry.
	reason := "RegisterPlugin error -- plugin versions [1.0.0] not supported"
	if _, err := c.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: false, Error: reason}); err != nil {
		t.Fatalf("NotifyRegistrationStatus(refused): %v", err)
	}
	got := <-statuses
	if !errors.Is(got, ErrRefused) || !strings.Contains(got.Error(), reason) {
		t.Fatalf("OnStatus after a refusal: %v, want ErrRefused with %q", got, reason)
	}
	if _, err := c.GetInfo(ctx, &registerapi.InfoRequest{}); err != nil {
		t.Fatalf("GetInfo after a refusal: %v", err)
	}

	if err := stop(); err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Fatalf("registration socket still there after Serve returned (%v)", err)
	}
}

// The registration socket appears only once the CSI socket answers: the
// kubelet calls NodeGetInfo as soon as it has the plugin's info.
func TestWaitsForCSISocket(t *testing.T) {
	dir := shortDir(t)
	csiSock := filepath.Join(dir, "csi.sock")
	sock := SocketPath(dir, driverName)
	serve(t, Config{DriverName: driverName, Endpoint: "/host/csi.sock", Dir: dir, WaitFor: csiSock})
	time.Sleep(5 * waitInterval)
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Fatalf("registration socket before the CSI socket exists (%v)", err)
	}
	l, err := net.Listen("unix", csiSock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	waitForFile(t, sock)
}

func TestServeRefuses(t *testing.T) {
	dir := shortDir(t)
	notSocket := filepath.Join(dir, "d")
	if err := os.Mkdir(notSocket, 0o755); err != nil {
		t.Fatal(err)
	}
	// A regular file where the socket goes is not removed.
	blocker := SocketPath(notSocket, driverName)
	if err := os.WriteFile(blocker, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no driver name", Config{Endpoint: "/e.sock", Dir: dir}, "needs the driver name"},
		{"no endpoint", Config{DriverName: driverName, Dir: dir}, "needs the driver name"},
		{"relative endpoint", Config{DriverName: driverName, Endpoint: "csi.sock", Dir: dir}, "must be an absolute path"},
		{"missing directory", Config{DriverName: driverName, Endpoint: "/e.sock", Dir: filepath.Join(dir, "nope")}, "no such file or directory"},
		{"directory is a file", Config{DriverName: driverName, Endpoint: "/e.sock", Dir: blocker}, "not a directory"},
		{"not a socket in the way", Config{DriverName: driverName, Endpoint: "/e.sock", Dir: notSocket}, "exists and is not a socket"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			err := Serve(ctx, tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Serve = %v, want an error containing %q", err, tc.want)
			}
		})
	}
	if b, err := os.ReadFile(blocker); err != nil || string(b) != "x" {
		t.Fatalf("the file in the way was touched: %q, %v", b, err)
	}
}
