package registration

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"time"

	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// SupportedVersions are the CSI versions the plugin reports to the kubelet.
// The kubelet's CSI handler accepts 1.x only (a major version it knows).
var SupportedVersions = []string{"1.0.0"}

// ErrRefused is wrapped by the error OnStatus gets when the kubelet reports
// that it did not register the plugin.
var ErrRefused = errors.New("the kubelet did not register the plugin")

// Config says what to register and where.
type Config struct {
	// DriverName is the CSI driver name (GetPluginInfo's name).
	DriverName string
	// Endpoint is the path of the CSI socket as the kubelet dials it: a
	// path on the host, like csi-node-driver-registrar's
	// --kubelet-registration-path.
	Endpoint string
	// Dir is the kubelet's plugin registration directory
	// (<kubelet root>/plugins_registry) as this process sees it. It must
	// exist: a missing one means the kubelet is not watching it.
	Dir string
	// WaitFor, when set, is a unix socket path that must accept a
	// connection before the registration socket appears: the plugin's own
	// CSI socket, which the kubelet calls as soon as it registers.
	WaitFor string
	// OnStatus, when set, gets every status the kubelet reports: nil when
	// it registered the plugin, an error wrapping ErrRefused otherwise. It
	// is called from a gRPC handler and must not block for long.
	OnStatus func(error)
}

// SocketPath is where Serve listens: <dir>/<driver name>-reg.sock, the name
// csi-node-driver-registrar uses, so switching between the two replaces
// one socket with the other.
func SocketPath(dir, driverName string) string {
	return filepath.Join(dir, driverName+"-reg.sock")
}

// waitInterval is how often Serve tries WaitFor.
const waitInterval = 200 * time.Millisecond

// Serve serves the plugin registration API until ctx ends, then removes
// the socket and returns nil. It returns an error if the configuration is
// incomplete, the socket cannot be made, or serving fails.
func Serve(ctx context.Context, cfg Config) error {
	if cfg.DriverName == "" || cfg.Endpoint == "" || cfg.Dir == "" {
		return errors.New("registration needs the driver name, the endpoint the kubelet dials, and the registration directory")
	}
	if !filepath.IsAbs(cfg.Endpoint) {
		return fmt.Errorf("registration endpoint %q: must be an absolute path (the kubelet dials it on the host)", cfg.Endpoint)
	}
	if st, err := os.Stat(cfg.Dir); err != nil {
		return fmt.Errorf("registration directory: %w", err)
	} else if !st.IsDir() {
		return fmt.Errorf("registration directory %s: not a directory", cfg.Dir)
	}
	if cfg.WaitFor != "" {
		if err := waitForSocket(ctx, cfg.WaitFor); err != nil {
			return err
		}
	}
	sock := SocketPath(cfg.Dir, cfg.DriverName)
	if err := removeStale(sock); err != nil {
		return err
	}
	l, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("registration socket: %w", err)
	}
	s := grpc.NewServer()
	registerapi.RegisterRegistrationServer(s, &server{cfg: cfg})
	errc := make(chan error, 1)
	go func() { errc <- s.Serve(l) }()
	select {
	case <-ctx.Done():
		s.Stop()
		<-errc
		err = nil
	case err = <-errc:
		if err != nil {
			err = fmt.Errorf("registration socket %s: %w", sock, err)
		}
	}
	// The kubelet unregisters the plugin when its socket goes.
	if rerr := os.Remove(sock); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) && err == nil {
		err = fmt.Errorf("remove registration socket: %w", rerr)
	}
	return err
}

// removeStale removes a socket an earlier run left at path (listen would
// fail with EADDRINUSE), and refuses to remove anything that is not one.
func removeStale(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("registration socket: %w", err)
	}
	if st.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("registration socket %s: exists and is not a socket (%s)", path, st.Mode().Type())
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("remove stale registration socket: %w", err)
	}
	return nil
}

// waitForSocket returns once a connection to the unix socket at path
// succeeds, or with ctx's error.
func waitForSocket(ctx context.Context, path string) error {
	t := time.NewTicker(waitInterval)
	defer t.Stop()
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return c.Close()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the CSI socket %s: %w (last: %v)", path, ctx.Err(), err)
		case <-t.C:
		}
	}
}

type server struct {
	registerapi.UnimplementedRegistrationServer
	cfg Config
}

func (s *server) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              s.cfg.DriverName,
		Endpoint:          s.cfg.Endpoint,
		SupportedVersions: append([]string(nil), SupportedVersions...),
	}, nil
}

func (s *server) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if s.cfg.OnStatus != nil {
		var err error
		if !st.PluginRegistered {
			err = fmt.Errorf("%w: %s", ErrRefused, st.Error)
		}
		s.cfg.OnStatus(err)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}
