package driver

import (
	"os"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/zq-csi/zq-csi/test/kubetest"
)

// realAPIServer starts etcd and kube-apiserver on free loopback ports
// (test/kubetest, the harness test/sanity uses), installs deploy/crds and
// returns a dynamic client for it. qps and burst set the client's rate
// limiter (0: client-go's defaults). It skips when the binaries are not
// built: this is for benchmarks, and the conformance run in test/sanity is
// where their absence fails loudly.
func realAPIServer(tb testing.TB, qps float32, burst int) dynamic.Interface {
	tb.Helper()
	what, how, err := kubetest.Missing("../..")
	if err != nil {
		tb.Fatal(err)
	}
	if what != "" {
		tb.Skipf("SKIPPED: %s is missing (%s builds it)", what, how)
	}
	dir, err := os.MkdirTemp("", "zq-driver-apiserver-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	c := kubetest.Client(tb, kubetest.Start(tb, "../..", dir), qps, burst)
	var gvrs []schema.GroupVersionResource
	for gvr := range ClusterGVRs() {
		gvrs = append(gvrs, gvr)
	}
	slices.SortFunc(gvrs, func(a, b schema.GroupVersionResource) int { return strings.Compare(a.Resource, b.Resource) })
	kubetest.InstallCRDs(tb, c, "../..", gvrs)
	return c
}
