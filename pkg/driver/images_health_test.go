package driver

import (
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

// countChecks counts the full checks Health runs until the test ends.
func countChecks(t *testing.T) *atomic.Int64 {
	t.Helper()
	var n atomic.Int64
	orig := checkImage
	checkImage = func(path string, o qcow2.CheckOptions) (*qcow2.CheckResult, error) {
		n.Add(1)
		return orig(path, o)
	}
	t.Cleanup(func() { checkImage = orig })
	return &n
}

// TestHealthKeepsVerdictOfUnchangedImage: the full check runs once per
// state of an image file: not again for an untouched image, again after a
// write from outside the driver (seen in the file's identity), after an
// operation of the driver, and for each image of its own.
func TestHealthKeepsVerdictOfUnchangedImage(t *testing.T) {
	checks := countChecks(t)
	m, err := NewImages(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	create := func(id string) {
		spec, err := buildSpec(map[string]string{ParamZoneSize: "1M"}, 4*mib)
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Create(id, spec); err != nil {
			t.Fatal(err)
		}
	}
	expect := func(step, id string, wantChecks int64, wantReason string) {
		t.Helper()
		probs := m.Health(id)
		reason := ""
		if len(probs) > 0 {
			reason = probs[0].Reason
		}
		if got := checks.Load(); got != wantChecks || reason != wantReason {
			t.Fatalf("%s: %d checks so far, problems %+v; want %d checks and reason %q", step, got, probs, wantChecks, wantReason)
		}
	}
	create("zqv-a")
	expect("first call", "zqv-a", 1, "")
	expect("second call, image untouched", "zqv-a", 1, "")
	expect("third call", "zqv-a", 1, "")

	// A write by another program (the image tool, qemu-io) changes the
	// file's mtime and so its identity.
	im, err := qcow2.Open(m.VolumePath("zqv-a"), qcow2.OpenOptions{NoBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt([]byte("data"), 0); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	expect("after an outside write", "zqv-a", 2, "")
	expect("again", "zqv-a", 2, "")

	// The driver's own operations drop the verdict.
	if _, err := m.Expand("zqv-a", 6*mib); err != nil {
		t.Fatal(err)
	}
	expect("after Expand", "zqv-a", 3, "")
	expect("again", "zqv-a", 3, "")

	// Another image has a verdict of its own.
	create("zqv-b")
	expect("new image", "zqv-b", 4, "")
	expect("the first image, untouched", "zqv-a", 4, "")

	// Damage that keeps size and mtime (restored by hand) still changes
	// ctime, and is found.
	path := m.VolumePath("zqv-b")
	var before unix.Stat_t
	if err := unix.Stat(path, &before); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("XXXX"), 0); err != nil { // the magic
		t.Fatal(err)
	}
	f.Close()
	ts := []unix.Timespec{before.Atim, before.Mtim}
	if err := unix.UtimesNano(path, ts); err != nil {
		t.Fatal(err)
	}
	var after unix.Stat_t
	if err := unix.Stat(path, &after); err != nil {
		t.Fatal(err)
	}
	if after.Size != before.Size || after.Mtim != before.Mtim {
		t.Fatalf("test setup: size or mtime changed (%d %v → %d %v)", before.Size, before.Mtim, after.Size, after.Mtim)
	}
	expect("after damage behind a restored mtime", "zqv-b", 5, "ImageCorrupt")
	expect("a kept bad verdict", "zqv-b", 5, "ImageCorrupt")

	// A missing image is reported without a check, and a new image at the
	// same path (another inode) is checked afresh.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	expect("missing", "zqv-b", 5, "ImageMissing")
	if err := m.Delete("zqv-b"); err != nil {
		t.Fatal(err)
	}
	create("zqv-b")
	expect("remade", "zqv-b", 6, "")
}

// TestHealthUnreadableNotKept: a check that failed for a reason that may
// pass (an I/O error reading the image) is run again next time, and its
// later clean verdict is kept.
func TestHealthUnreadableNotKept(t *testing.T) {
	m, err := NewImages(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	spec, err := buildSpec(map[string]string{ParamZoneSize: "1M"}, 4*mib)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Create("zqv-a", spec); err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int64
	orig := checkImage
	t.Cleanup(func() { checkImage = orig })
	checkImage = func(path string, o qcow2.CheckOptions) (*qcow2.CheckResult, error) {
		if calls.Add(1) == 1 {
			return nil, fmt.Errorf("read %s: %w", path, syscall.EIO)
		}
		return orig(path, o)
	}
	if probs := m.Health("zqv-a"); len(probs) == 0 || probs[0].Reason != "ImageUnreadable" {
		t.Fatalf("first call: %+v; want ImageUnreadable", probs)
	}
	for i := range 2 {
		if probs := m.Health("zqv-a"); len(probs) != 0 {
			t.Fatalf("call %d after the I/O error passed: %+v; want healthy", i+2, probs)
		}
	}
	if n := calls.Load(); n != 2 {
		t.Fatalf("%d checks for three calls; want 2 (the failed one not kept, the clean one kept)", n)
	}
}
