// Package sanity runs the CSI conformance suite (csi-test v5 sanity)
// against zq-csi in-process, once per StorageClass parameter set.
package sanity

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	. "github.com/onsi/ginkgo/v2"
	"github.com/onsi/ginkgo/v2/types"
	. "github.com/onsi/gomega"
	"google.golang.org/grpc"
	"k8s.io/klog/v2"

	"github.com/zq-csi/zq-csi/pkg/driver"
)

const mib = 1 << 20

// paramSet is one StorageClass. Sizes are whole numbers of zones: the
// driver rounds capacity up to whole zones, and csi-sanity checks that a
// volume created with limit_bytes = required_bytes has exactly that size
// and that expansion returns exactly the requested size.
type paramSet struct {
	name       string
	params     map[string]string
	mutable    map[string]string
	size       int64
	expandSize int64
}

var paramSets = []paramSet{
	{
		name:       "1M zones",
		params:     map[string]string{"zone.size": "1M", "zone.max_open_zones": "4"},
		mutable:    map[string]string{"zone.max_open_zones": "2", "zone.max_active_zones": "3"},
		size:       8 * mib,
		expandSize: 16 * mib,
	},
	{
		// exporter=auto on a node without zoned ublk: the file attacher.
		name:       "conventional zones",
		params:     map[string]string{"zone.size": "2M", "zone.conventional_zones": "2", "exporter": "auto"},
		mutable:    map[string]string{"zone.max_open_zones": "3"},
		size:       16 * mib,
		expandSize: 24 * mib,
	},
	{
		name: "capacity below size",
		params: map[string]string{"zone.size": "1M", "zone.capacity": "768K", "zone.max-append-bytes": "128K",
			"zone.mode": "host-managed"},
		mutable:    map[string]string{"zone.max-active-zones": "5"},
		size:       6 * mib,
		expandSize: 10 * mib,
	},
	{
		// exporter=nbd: always the node's own attacher.
		name: "limits and cluster size",
		params: map[string]string{"zone.size": "512K", "zone.max_active_zones": "6", "zone.max_open_zones": "4",
			"clusterSize": "16K", "exporter": "nbd"},
		mutable:    map[string]string{"zone.max_open_zones": "2", "zone.max_active_zones": "4"},
		size:       4 * mib,
		expandSize: 8 * mib,
	},
}

// allowedSkip names the only specs that may be skipped, and why: zq-csi
// declares attachRequired: false (DESIGN.md point 7) — a node-local volume
// needs no ControllerPublish — so it does not offer PUBLISH_UNPUBLISH_VOLUME
// and csi-sanity skips the ControllerPublishVolume, ControllerUnpublishVolume
// and "volume lifecycle" (publish/unpublish) specs.
func allowedSkip(fullText string) bool {
	for _, s := range []string{"ControllerPublishVolume", "ControllerUnpublishVolume", "Controller Server] volume lifecycle"} {
		if strings.Contains(fullText, s) {
			return true
		}
	}
	return false
}

// idGen makes IDs in zq-csi's own format, so "valid but unknown" IDs reach
// the lookups rather than the format check.
type idGen struct{}

func hexID(prefix string) string {
	var b [10]byte
	rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

func (idGen) GenerateUniqueValidVolumeID() string { return hexID("zqv-") }
func (idGen) GenerateInvalidVolumeID() string     { return "not-a-zq-csi-volume" }
func (idGen) GenerateUniqueValidNodeID() string   { return hexID("node-") }
func (idGen) GenerateInvalidNodeID() string       { return "" }

// startDriver runs one zq-csi (--mode all, local backend) with the
// controller and the node service on two unix sockets.
//
// The node side uses driver.FileAttacher: this machine (and CI) has no
// /dev/nbd*, so staging exposes each volume as a regular file of its size
// that NodePublishVolume bind-mounts onto the target, as it would /dev/nbdX.
// Data written to that file does NOT reach the image; the attachment,
// locking, snapshot-while-staged, expansion and health paths are real. The
// data path is tested by pkg/nbdattach and by the VM tests with real nbd.
func startDriver(t *testing.T, dir string) (ctrlAddr, nodeAddr string) {
	att, err := driver.NewFileAttacher(filepath.Join(dir, "state", "fileattach"), 16)
	if err != nil {
		t.Fatal(err)
	}
	d, err := driver.New(driver.Config{
		DriverName: "zq-csi.sanity.test",
		NodeID:     "sanity-node",
		Mode:       driver.ModeAll,
		DataDir:    filepath.Join(dir, "data"),
		StateDir:   filepath.Join(dir, "state"),
		Attacher:   att,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Recover(context.Background()); err != nil {
		t.Fatal(err)
	}
	serve := func(mode driver.Mode, sock string) string {
		l, err := driver.Listen("unix://" + sock)
		if err != nil {
			t.Fatal(err)
		}
		s := d.NewServer(mode)
		go s.Serve(l)
		t.Cleanup(func() { stopServer(s) })
		return "unix://" + sock
	}
	return serve(driver.ModeController, filepath.Join(dir, "ctrl.sock")), serve(driver.ModeNode, filepath.Join(dir, "node.sock"))
}

func stopServer(s *grpc.Server) {
	done := make(chan struct{})
	go func() { s.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		s.Stop()
	}
}

// TestSanity runs csi-sanity once per parameter set in one Ginkgo suite
// (Ginkgo allows one RunSpecs per process). It needs root: publishing
// bind-mounts. It fails, rather than skips, without root unless
// ZQ_SKIP_ROOT_TESTS=1 says to skip.
func TestSanity(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("ZQ_SKIP_ROOT_TESTS") == "1" {
			t.Skip("needs root for bind mounts; skipped because ZQ_SKIP_ROOT_TESTS=1")
		}
		t.Fatal("csi-sanity needs root (NodePublishVolume bind-mounts); run as root or set ZQ_SKIP_ROOT_TESTS=1 to skip")
	}
	base, err := os.MkdirTemp("", "zq-sanity-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	// The driver's log goes to a file, shown only when the suite fails.
	logPath := base + ".log"
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
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

	for i, ps := range paramSets {
		dir := filepath.Join(base, fmt.Sprint(i))
		if err := os.MkdirAll(dir, 0o750); err != nil {
			t.Fatal(err)
		}
		ctrl, node := startDriver(t, dir)
		cfg := sanityConfig(ctrl, node, dir, ps)
		Describe("["+ps.name+"]", func() {
			sanity.GinkgoTest(&cfg)
		})
	}

	runSuite(t, "zq-csi sanity", "zq-csi sanity", 3*time.Minute)
}

// sanityConfig is the csi-test configuration shared by both backends' runs.
func sanityConfig(ctrl, node, dir string, ps paramSet) sanity.TestConfig {
	cfg := sanity.NewTestConfig()
	cfg.Address = node
	cfg.ControllerAddress = ctrl
	cfg.TargetPath = filepath.Join(dir, "target")
	cfg.StagingPath = filepath.Join(dir, "staging")
	cfg.TestVolumeAccessType = "block"
	cfg.TestVolumeSize = ps.size
	cfg.TestVolumeExpandSize = ps.expandSize
	cfg.TestVolumeParameters = ps.params
	cfg.TestVolumeMutableParameters = ps.mutable
	cfg.TestNodeVolumeAttachLimit = true
	cfg.IdempotentCount = 10
	cfg.IDGen = idGen{}
	cfg.TestInvalidListVolumesStartingToken = "not-a-token"
	return cfg
}

// runSuite runs the specs described so far, prints the counts under
// label, and fails the test on a failure or on a skip this driver does not
// accept (only ControllerPublish/Unpublish, see allowedSkip).
func runSuite(t *testing.T, suite, label string, timeout time.Duration) {
	var report types.Report
	ReportAfterSuite(suite+" counts", func(r types.Report) { report = r })
	RegisterFailHandler(Fail)
	suiteCfg, reporterCfg := GinkgoConfiguration()
	suiteCfg.Timeout = timeout
	reporterCfg.Succinct = true
	RunSpecs(t, suite, suiteCfg, reporterCfg)

	var passed, failed, pending int
	var skipped, badSkips []string
	for _, sr := range report.SpecReports {
		if sr.LeafNodeType != types.NodeTypeIt {
			continue
		}
		switch sr.State {
		case types.SpecStatePassed:
			passed++
		case types.SpecStateSkipped:
			skipped = append(skipped, sr.FullText())
			if !allowedSkip(sr.FullText()) {
				badSkips = append(badSkips, sr.FullText()+": "+sr.Failure.Message)
			}
		case types.SpecStatePending:
			pending++
		default:
			failed++
		}
	}
	sort.Strings(skipped)
	w := bufio.NewWriter(os.Stdout)
	fmt.Fprintf(w, "\n%s: %d parameter sets, %d specs run (%d passed, %d failed), %d skipped (ControllerPublish/Unpublish: attachRequired false), %d pending upstream\n",
		label, len(paramSets), passed+failed, passed, failed, len(skipped), pending)
	w.Flush()
	for _, s := range badSkips {
		t.Errorf("spec skipped without a reason this driver accepts: %s", s)
	}
	if passed == 0 {
		t.Error("no sanity spec ran")
	}
}
