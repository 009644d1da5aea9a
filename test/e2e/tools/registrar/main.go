// Command registrar is a stand-in for csi-node-driver-registrar, for the
// e2e lane only: the module proxy refuses the real one, so its image cannot
// be built here. It takes the real one's flags that the chart passes
// (--csi-address, --kubelet-registration-path, --v), asks the driver for
// its name (GetPluginInfo), and serves the kubelet plugin registration API
// (pluginregistration/v1) on /registration/<driver>-reg.sock, which the
// kubelet watches in <kubelet-dir>/plugins_registry.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type server struct {
	registerapi.UnimplementedRegistrationServer
	name, endpoint string
}

func (s *server) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              s.name,
		Endpoint:          s.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (s *server) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !st.PluginRegistered {
		log.Printf("kubelet did not register %s: %s", s.name, st.Error)
		// The real registrar exits so that the pod restarts and retries.
		os.Exit(1)
	}
	log.Printf("kubelet registered %s at %s", s.name, s.endpoint)
	return &registerapi.RegistrationStatusResponse{}, nil
}

func main() {
	csiAddress := flag.String("csi-address", "/csi/csi.sock", "the driver's CSI socket inside this container")
	regPath := flag.String("kubelet-registration-path", "", "the driver's CSI socket on the host, as the kubelet dials it")
	regDir := flag.String("plugin-registration-path", "/registration", "the kubelet's plugins_registry directory inside this container")
	flag.String("v", "", "log verbosity (accepted for compatibility)")
	flag.Parse()
	if *regPath == "" {
		log.Fatal("--kubelet-registration-path is required")
	}
	name, err := driverName(*csiAddress)
	if err != nil {
		log.Fatal(err)
	}
	sock := filepath.Join(*regDir, name+"-reg.sock")
	_ = os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		log.Fatal(err)
	}
	g := grpc.NewServer()
	registerapi.RegisterRegistrationServer(g, &server{name: name, endpoint: *regPath})
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		g.Stop()
		_ = os.Remove(sock)
		os.Exit(0)
	}()
	log.Printf("serving plugin registration for %s on %s", name, sock)
	if err := g.Serve(l); err != nil {
		log.Fatal(err)
	}
}

// driverName waits for the driver's socket and asks it for its name.
func driverName(addr string) (string, error) {
	deadline := time.Now().Add(5 * time.Minute)
	for {
		name, err := tryName(addr)
		if err == nil {
			return name, nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("GetPluginInfo on %s: %w", addr, err)
		}
		log.Printf("waiting for the driver on %s: %v", addr, err)
		time.Sleep(2 * time.Second)
	}
}

func tryName(addr string) (string, error) {
	conn, err := grpc.NewClient("unix://"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := csi.NewIdentityClient(conn).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil {
		return "", err
	}
	return resp.GetName(), nil
}
