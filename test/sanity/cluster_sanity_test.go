package sanity

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	. "github.com/onsi/ginkgo/v2"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	"sigs.k8s.io/yaml"

	"github.com/zq-csi/zq-csi/pkg/driver"
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

var gvrCRD = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

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
	kubeconfig := startAPIServer(t, dir)
	installCRDs(t, kubeconfig)

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

// k8sCache returns where scripts/e2e/build-k8s.sh puts the Kubernetes
// binaries: $ZQ_CACHE/k8s/$K8S_VERSION, the version read from
// scripts/e2e/versions.sh.
func k8sCache(t *testing.T) string {
	b, err := os.ReadFile("../../scripts/e2e/versions.sh")
	if err != nil {
		t.Fatalf("read the pinned Kubernetes version: %v", err)
	}
	m := regexp.MustCompile(`(?m)^K8S_VERSION=\$\{K8S_VERSION:-(v[0-9.]+)\}`).FindSubmatch(b)
	if m == nil {
		t.Fatal("scripts/e2e/versions.sh has no K8S_VERSION default")
	}
	version := string(m[1])
	if v := os.Getenv("K8S_VERSION"); v != "" {
		version = v
	}
	cache := os.Getenv("ZQ_CACHE")
	if cache == "" {
		cache = "/var/cache/zq-csi"
	}
	return filepath.Join(cache, "k8s", version)
}

// requirePeers skips, loudly, when kube-apiserver or etcd is missing —
// unless ZQ_REQUIRE_PEERS=1 and the Kubernetes binary cache exists (it was
// meant to be built), which fails instead.
func requirePeers(t *testing.T) {
	cache := k8sCache(t)
	missing := func(what, how string) {
		msg := fmt.Sprintf("%s is missing; %s builds it", what, how)
		if _, err := os.Stat(cache); err == nil && os.Getenv("ZQ_REQUIRE_PEERS") == "1" {
			t.Fatal(msg + " (ZQ_REQUIRE_PEERS=1 and " + cache + " exists, so this fails)")
		}
		t.Skip("SKIPPING the cluster-backend sanity run: " + msg)
	}
	if _, err := os.Stat(filepath.Join(cache, "bin", "kube-apiserver")); err != nil {
		missing(filepath.Join(cache, "bin", "kube-apiserver"), "scripts/e2e/build-k8s.sh")
	}
	if _, err := exec.LookPath("etcd"); err != nil {
		missing("etcd", "scripts/e2e/build-tools.sh etcd")
	}
}

// freePorts finds a port p with p and p+1 free (etcd's client and peer
// ports) and another free port (the API server's).
func freePorts(t *testing.T) (etcd, api int) {
	free := func(p int) bool {
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			return false
		}
		l.Close()
		return true
	}
	for range 100 {
		p := 30000 + rand.IntN(20000)
		if free(p) && free(p+1) && free(p+2) {
			return p, p + 2
		}
	}
	t.Fatal("no free loopback ports for etcd and kube-apiserver")
	return 0, 0
}

func startAPIServer(t *testing.T, dir string) string {
	script, err := filepath.Abs("../../scripts/e2e/apiserver.sh")
	if err != nil {
		t.Fatal(err)
	}
	etcdPort, apiPort := freePorts(t)
	env := append(os.Environ(), fmt.Sprintf("ZQ_ETCD_PORT=%d", etcdPort), fmt.Sprintf("ZQ_API_PORT=%d", apiPort))
	up := exec.Command("bash", script, "up", dir)
	up.Env = env
	up.Stderr = os.Stderr
	t.Cleanup(func() {
		down := exec.Command("bash", script, "down", dir)
		down.Env = env
		if out, err := down.CombinedOutput(); err != nil {
			t.Logf("apiserver.sh down: %v: %s", err, out)
		}
	})
	out, err := up.Output()
	if err != nil {
		t.Fatalf("apiserver.sh up %s: %v", dir, err)
	}
	lines := strings.Fields(strings.TrimSpace(string(out)))
	if len(lines) == 0 {
		t.Fatal("apiserver.sh up printed no kubeconfig")
	}
	return lines[len(lines)-1]
}

func dynamicFor(t *testing.T, kubeconfig string) dynamic.Interface {
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	rc.QPS, rc.Burst = 500, 1000 // a test's controller, node and checks share one API server
	c, err := dynamic.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// installCRDs applies deploy/crds and waits until each is Established.
func installCRDs(t *testing.T, kubeconfig string) {
	c := dynamicFor(t, kubeconfig)
	files, err := filepath.Glob("../../deploy/crds/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no CRDs under deploy/crds: %v", err)
	}
	ctx := context.Background()
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		u := &unstructured.Unstructured{}
		if err := yaml.Unmarshal(b, &u.Object); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if _, err := c.Resource(gvrCRD).Create(ctx, u, metav1.CreateOptions{}); err != nil {
			t.Fatalf("install %s: %v", f, err)
		}
		name := u.GetName()
		deadline := time.Now().Add(30 * time.Second)
		for {
			got, err := c.Resource(gvrCRD).Get(ctx, name, metav1.GetOptions{})
			if err == nil && crdEstablished(got) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("CRD %s not established: %v", name, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

func crdEstablished(u *unstructured.Unstructured) bool {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] == "Established" && m["status"] == "True" {
			return true
		}
	}
	return false
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
