package sanity

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	. "github.com/onsi/ginkgo/v2"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/klog/v2"

	"github.com/zq-csi/zq-csi/pkg/driver"
	"github.com/zq-csi/zq-csi/test/kubetest"
)

// The cluster run: the same csi-sanity suite against zq-csi's cluster
// backend (DESIGN.md point 7) — a controller (--mode controller --backend
// cluster) and a node (--mode node --backend cluster, with its node agent)
// as two separate in-process drivers that share nothing but a real
// kube-apiserver with etcd, started on loopback by
// scripts/e2e/apiserver.sh with the CRDs of deploy/crds installed.
//
// Ginkgo runs one suite per process and TestSanity already runs one, so
// TestClusterSanity starts the API server and then runs the suite in a
// child process (this test binary, -test.run=^TestClusterSanity$, with
// clusterChildEnv naming the kubeconfig).

const clusterChildEnv = "ZQ_CLUSTER_SANITY_KUBECONFIG"

func TestClusterSanity(t *testing.T) {
	if kc := os.Getenv(clusterChildEnv); kc != "" {
		runClusterSuite(t, kc)
		return
	}
	if os.Geteuid() != 0 {
		if os.Getenv("ZQ_SKIP_ROOT_TESTS") == "1" {
			t.Skip("needs root for bind mounts; skipped because ZQ_SKIP_ROOT_TESTS=1")
		}
		t.Fatal("csi-sanity needs root (NodePublishVolume bind-mounts); run as root or set ZQ_SKIP_ROOT_TESTS=1 to skip")
	}
	requirePeers(t)
	dir, err := os.MkdirTemp("", "zq-cluster-sanity-")
	if err != nil {
		t.Fatal(err)
	}
	// Registered first, so it runs after the API server is stopped (the
	// pid files are in dir); kept when the test failed, for the logs.
	t.Cleanup(func() {
		if !t.Failed() {
			os.RemoveAll(dir)
		}
	})
	kubeconfig := kubetest.Start(t, "../..", dir)
	var gvrs []schema.GroupVersionResource
	for gvr := range driver.ClusterGVRs() {
		gvrs = append(gvrs, gvr)
	}
	kubetest.InstallCRDs(t, dynamicFor(t, kubeconfig), "../..", gvrs)

	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^TestClusterSanity$", "-test.timeout=20m", "-ginkgo.no-color")
	cmd.Env = append(os.Environ(), clusterChildEnv+"="+kubeconfig)
	// The child's lines are prefixed, so that its own PASS/FAIL lines are
	// not read as this test's.
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		fmt.Println("[cluster-sanity] " + sc.Text())
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("the cluster sanity suite failed (%v); the API server's logs are under %s/log", err, dir)
	}
}

// requirePeers skips, loudly, when kube-apiserver or etcd is missing —
// unless ZQ_REQUIRE_PEERS=1 and the Kubernetes binary cache exists (it was
// meant to be built), which fails instead.
func requirePeers(t *testing.T) {
	what, how, err := kubetest.Missing("../..")
	if err != nil {
		t.Fatal(err)
	}
	if what == "" {
		return
	}
	msg := fmt.Sprintf("%s is missing; %s builds it", what, how)
	if cache, _ := kubetest.Cache("../.."); os.Getenv("ZQ_REQUIRE_PEERS") == "1" {
		if _, err := os.Stat(cache); err == nil {
			t.Fatal(msg + " (ZQ_REQUIRE_PEERS=1 and " + cache + " exists, so this fails)")
		}
	}
	t.Skip("SKIPPING the cluster-backend sanity run: " + msg)
}

// dynamicFor is a client of kubeconfig's API server; a test's controller,
// node and checks share it, hence the high limits.
func dynamicFor(t *testing.T, kubeconfig string) dynamic.Interface {
	return kubetest.Client(t, kubeconfig, 500, 1000)
}

// startCluster runs the controller and the node as two drivers over the
// API server. The node uses driver.FileAttacher, as the local run does (no
// /dev/nbd here): the staged "device" is a stand-in file; see startDriver.
func startCluster(t *testing.T, kubeconfig, dir string) (ctrlAddr, nodeAddr string) {
	ctx, cancel := context.WithCancel(context.Background())
	att, err := driver.NewFileAttacher(filepath.Join(dir, "node", "state", "fileattach"), 16)
	if err != nil {
		t.Fatal(err)
	}
	node, err := driver.New(driver.Config{
		DriverName: "zq-csi.sanity.test", NodeID: "sanity-node", Mode: driver.ModeNode,
		DataDir: filepath.Join(dir, "node", "data"), StateDir: filepath.Join(dir, "node", "state"), Attacher: att,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := node.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	wait, err := node.StartNodeAgent(ctx, dynamicFor(t, kubeconfig), driver.NodeAgentConfig{
		Resync: 10 * time.Second, CapacityEvery: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); wait() })
	ctrl, err := driver.New(driver.Config{
		DriverName: "zq-csi.sanity.test", NodeID: "sanity-controller", Mode: driver.ModeController,
		DataDir: filepath.Join(dir, "controller", "data"), StateDir: filepath.Join(dir, "controller", "state"),
		Backend: driver.NewClusterBackend(dynamicFor(t, kubeconfig), driver.ClusterBackendOptions{DefaultWait: 60 * time.Second}),
	})
	if err != nil {
		t.Fatal(err)
	}
	serve := func(d *driver.Driver, mode driver.Mode, sock string) string {
		l, err := driver.Listen("unix://" + sock)
		if err != nil {
			t.Fatal(err)
		}
		s := d.NewServer(mode)
		go s.Serve(l)
		t.Cleanup(func() { stopServer(s) })
		return "unix://" + sock
	}
	return serve(ctrl, driver.ModeController, filepath.Join(dir, "ctrl.sock")), serve(node, driver.ModeNode, filepath.Join(dir, "node.sock"))
}

// runClusterSuite is the child process: csi-sanity once per parameter set
// against one controller and one node (a second node would make
// CreateVolume without topology ambiguous, as it is in a real cluster).
func runClusterSuite(t *testing.T, kubeconfig string) {
	base, err := os.MkdirTemp("", "zq-cluster-sanity-run-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	logPath := base + ".log"
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	klogFlags.Set("stderrthreshold", "FATAL") // errors the suite provokes go to the log file only
	klog.LogToStderr(false)
	klog.SetOutput(logFile)
	t.Cleanup(func() {
		klog.Flush()
		logFile.Close()
		if !t.Failed() {
			os.Remove(logPath)
		} else {
			t.Logf("driver log: %s", logPath)
		}
	})
	ctrl, node := startCluster(t, kubeconfig, base)
	for i, ps := range paramSets {
		dir := filepath.Join(base, fmt.Sprint(i))
		if err := os.MkdirAll(dir, 0o750); err != nil {
			t.Fatal(err)
		}
		cfg := sanityConfig(ctrl, node, dir, ps)
		Describe("[cluster backend]["+ps.name+"]", func() {
			sanity.GinkgoTest(&cfg)
		})
	}
	runSuite(t, "zq-csi sanity, cluster backend", "zq-csi sanity (cluster backend, kube-apiserver)", 15*time.Minute)
}
