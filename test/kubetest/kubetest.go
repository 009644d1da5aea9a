// Package kubetest gives tests a real etcd and kube-apiserver on loopback
// (scripts/e2e/apiserver.sh, with the binaries scripts/e2e/build-k8s.sh
// and build-tools.sh cache) and installs the driver's custom resource
// definitions from deploy/crds. Used by the cluster-backend conformance run
// (test/sanity) and the driver's cluster benchmarks.
package kubetest

import (
	"context"
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

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/yaml"
)

// Cache returns where scripts/e2e/build-k8s.sh puts the Kubernetes
// binaries: $ZQ_CACHE/k8s/$K8S_VERSION, the version read from
// <root>/scripts/e2e/versions.sh unless K8S_VERSION is set.
func Cache(root string) (string, error) {
	b, err := os.ReadFile(filepath.Join(root, "scripts/e2e/versions.sh"))
	if err != nil {
		return "", fmt.Errorf("read the pinned Kubernetes version: %w", err)
	}
	m := regexp.MustCompile(`(?m)^K8S_VERSION=\$\{K8S_VERSION:-(v[0-9.]+)\}`).FindSubmatch(b)
	if m == nil {
		return "", fmt.Errorf("%s has no K8S_VERSION default", filepath.Join(root, "scripts/e2e/versions.sh"))
	}
	version := string(m[1])
	if v := os.Getenv("K8S_VERSION"); v != "" {
		version = v
	}
	cache := os.Getenv("ZQ_CACHE")
	if cache == "" {
		cache = "/var/cache/zq-csi"
	}
	return filepath.Join(cache, "k8s", version), nil
}

// Missing names the first peer that is not there (kube-apiserver in the
// cache, etcd on PATH) and the script that provides it; "" when both are.
func Missing(root string) (what, how string, err error) {
	cache, err := Cache(root)
	if err != nil {
		return "", "", err
	}
	if _, err := os.Stat(filepath.Join(cache, "bin", "kube-apiserver")); err != nil {
		return filepath.Join(cache, "bin", "kube-apiserver"), "scripts/e2e/build-k8s.sh", nil
	}
	if _, err := exec.LookPath("etcd"); err != nil {
		return "etcd", "scripts/e2e/build-tools.sh etcd", nil
	}
	return "", "", nil
}

// FreePorts finds a port p with p and p+1 free (etcd's client and peer
// ports) and p+2 free (the API server's).
func FreePorts(tb testing.TB) (etcd, api int) {
	tb.Helper()
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
	tb.Fatal("no free loopback ports for etcd and kube-apiserver")
	return 0, 0
}

// Start brings up etcd and kube-apiserver with their state in dir, stops
// them when the test ends, and returns the kubeconfig's path.
func Start(tb testing.TB, root, dir string) string {
	tb.Helper()
	script, err := filepath.Abs(filepath.Join(root, "scripts/e2e/apiserver.sh"))
	if err != nil {
		tb.Fatal(err)
	}
	etcdPort, apiPort := FreePorts(tb)
	env := append(os.Environ(), fmt.Sprintf("ZQ_ETCD_PORT=%d", etcdPort), fmt.Sprintf("ZQ_API_PORT=%d", apiPort))
	up := exec.Command("bash", script, "up", dir)
	up.Env, up.Stderr = env, os.Stderr
	tb.Cleanup(func() {
		down := exec.Command("bash", script, "down", dir)
		down.Env = env
		if out, err := down.CombinedOutput(); err != nil {
			tb.Logf("apiserver.sh down: %v: %s", err, out)
		}
	})
	out, err := up.Output()
	if err != nil {
		tb.Fatalf("apiserver.sh up %s: %v", dir, err)
	}
	fields := strings.Fields(string(out))
	if len(fields) == 0 {
		tb.Fatal("apiserver.sh up printed no kubeconfig")
	}
	return fields[len(fields)-1]
}

// Client returns a dynamic client for kubeconfig with the given rate
// limits (0: client-go's defaults).
func Client(tb testing.TB, kubeconfig string, qps float32, burst int) dynamic.Interface {
	tb.Helper()
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		tb.Fatal(err)
	}
	rc.QPS, rc.Burst = qps, burst
	c, err := dynamic.NewForConfig(rc)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

var gvrCRD = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// InstallCRDs creates every definition under <root>/deploy/crds, waits
// until each is Established, then until each resource in served answers
// a List (a CRD is served a moment after it is Established).
func InstallCRDs(tb testing.TB, c dynamic.Interface, root string, served []schema.GroupVersionResource) {
	tb.Helper()
	files, err := filepath.Glob(filepath.Join(root, "deploy/crds/*.yaml"))
	if err != nil || len(files) == 0 {
		tb.Fatalf("no CRDs under deploy/crds: %v", err)
	}
	ctx := context.Background()
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			tb.Fatal(err)
		}
		u := &unstructured.Unstructured{}
		if err := yaml.Unmarshal(b, &u.Object); err != nil {
			tb.Fatalf("%s: %v", f, err)
		}
		if _, err := c.Resource(gvrCRD).Create(ctx, u, metav1.CreateOptions{}); err != nil {
			tb.Fatalf("install %s: %v", f, err)
		}
		for end := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			got, err := c.Resource(gvrCRD).Get(ctx, u.GetName(), metav1.GetOptions{})
			if err == nil && established(got) {
				break
			}
			if time.Now().After(end) {
				tb.Fatalf("CRD %s not established: %v", u.GetName(), err)
			}
		}
	}
	for end := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		var lerr error
		for _, gvr := range served {
			if _, err := c.Resource(gvr).List(ctx, metav1.ListOptions{Limit: 1}); err != nil {
				lerr = fmt.Errorf("%s: %w", gvr.Resource, err)
			}
		}
		if lerr == nil {
			return
		}
		if time.Now().After(end) {
			tb.Fatalf("custom resources not served: %v", lerr)
		}
	}
}

func established(u *unstructured.Unstructured) bool {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] == "Established" && m["status"] == "True" {
			return true
		}
	}
	return false
}
