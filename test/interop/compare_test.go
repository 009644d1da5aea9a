package interop

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
)

// compareJSON decodes two JSON documents and reports every key whose value
// differs; keys listed in ignore are skipped.
func compareJSON(t *testing.T, what, ours, theirs string, ignore ...string) {
	t.Helper()
	var a, b any
	if err := json.Unmarshal([]byte(ours), &a); err != nil {
		t.Fatalf("%s: our output is not JSON: %v\n%s", what, err, ours)
	}
	if err := json.Unmarshal([]byte(theirs), &b); err != nil {
		t.Fatalf("%s: qemu-img output is not JSON: %v\n%s", what, err, theirs)
	}
	am, aok := a.(map[string]any)
	bm, bok := b.(map[string]any)
	if !aok || !bok {
		if !reflect.DeepEqual(a, b) {
			t.Errorf("%s differs:\nours:\n%s\nqemu-img:\n%s", what, ours, theirs)
		}
		return
	}
	skip := map[string]bool{}
	for _, k := range ignore {
		skip[k] = true
	}
	keys := map[string]bool{}
	for k := range am {
		keys[k] = true
	}
	for k := range bm {
		keys[k] = true
	}
	var sorted []string
	for k := range keys {
		sorted = append(sorted, k)
	}
	sort.Strings(sorted)
	for _, k := range sorted {
		if skip[k] {
			continue
		}
		av, ainok := am[k]
		bv, binok := bm[k]
		switch {
		case !ainok:
			t.Errorf("%s: key %q missing from our output (qemu-img: %v)", what, k, bv)
		case !binok:
			t.Errorf("%s: key %q not in qemu-img's output (ours: %v)", what, k, av)
		case !reflect.DeepEqual(av, bv):
			t.Errorf("%s: %q = %v, qemu-img says %v", what, k, av, bv)
		}
	}
}

// sameText fails with both texts unless they are equal.
func sameText(t *testing.T, what, ours, theirs string) {
	t.Helper()
	if ours != theirs {
		t.Errorf("%s differs from qemu-img's\nours:\n%s\nqemu-img:\n%s", what, ours, theirs)
	}
}

// compareInfo compares "img info" with "qemu-img info", JSON key by key and
// the human text exactly.
func compareInfo(t *testing.T, dir, img string) {
	t.Helper()
	ours := mustZq(t, dir, "info", "--output=json", img)
	theirs := mustRun(t, dir, "qemu-img", "info", "--output=json", img)
	compareJSON(t, "info --output=json "+img, ours.stdout, theirs.stdout)
	ours = mustZq(t, dir, "info", img)
	theirs = mustRun(t, dir, "qemu-img", "info", img)
	sameText(t, "info "+img, ours.stdout, theirs.stdout)
}

// compareMap compares "img map" with "qemu-img map" in both output formats:
// the extents (host offsets included, as both read the same file) and the
// text layout must be identical.
func compareMap(t *testing.T, dir, img string, extra ...string) {
	t.Helper()
	for _, out := range []string{"json", "human"} {
		args := append([]string{"map", "--output=" + out}, extra...)
		args = append(args, img)
		ours := zq(t, dir, args...)
		theirs := run(t, dir, "qemu-img", args...)
		if ours.code != theirs.code {
			t.Errorf("map --output=%s %s: exit %d, qemu-img exits %d\nours: %v\nqemu-img: %v", out, img, ours.code, theirs.code, ours, theirs)
			continue
		}
		sameText(t, fmt.Sprintf("map --output=%s %s %s", out, strings.Join(extra, " "), img), ours.stdout, theirs.stdout)
	}
}

// compareCheck compares "img check" with "qemu-img check": exit status,
// JSON, human summary and the per-problem lines on stderr. repair is "" or
// a -r argument; repairs run on separate copies.
func compareCheck(t *testing.T, dir, img, repair string) {
	t.Helper()
	for _, out := range []string{"json", "human"} {
		var names [2]string
		for i, who := range []string{"zq", "qemu"} {
			names[i] = img
			if repair != "" {
				names[i] = fmt.Sprintf("%s.%s.%s.qcow2", img, who, out)
				copyFile(t, filepath.Join(dir, img), filepath.Join(dir, names[i]))
			}
		}
		args := func(name string) []string {
			a := []string{"check", "--output=" + out}
			if repair != "" {
				a = append(a, "-r", repair)
			}
			return append(a, name)
		}
		ours := zq(t, dir, args(names[0])...)
		theirs := run(t, dir, "qemu-img", args(names[1])...)
		what := fmt.Sprintf("check --output=%s -r %q %s", out, repair, img)
		if ours.code != theirs.code {
			t.Errorf("%s: exit %d, qemu-img exits %d\nours: %v\nqemu-img: %v", what, ours.code, theirs.code, ours, theirs)
		}
		oursOut := strings.ReplaceAll(ours.stdout, names[0], names[1])
		if out == "json" {
			compareJSON(t, what, oursOut, theirs.stdout)
		} else {
			sameText(t, what, oursOut, theirs.stdout)
		}
		if repair == "" {
			// qemu-img prints every problem on stderr, then again in
			// its second pass after a repair; compare the unrepaired case.
			sameText(t, what+" (stderr)", problemLines(ours.stderr), problemLines(theirs.stderr))
		}
	}
}

// problemLines keeps the "Leaked cluster"/"ERROR" lines, sorted.
func problemLines(s string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "Leaked cluster") || strings.HasPrefix(l, "ERROR") {
			keep = append(keep, l)
		}
	}
	sort.Strings(keep)
	return strings.Join(keep, "\n")
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// leakClusters raises the refcount of two clusters past the end of a 16-bit
// refcount image and grows the file over them, so that qemu-img check
// finds exactly two leaks.
func leakClusters(t *testing.T, path string) []uint64 {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	hdr := make([]byte, 104)
	if _, err := f.ReadAt(hdr, 0); err != nil {
		t.Fatal(err)
	}
	cs := uint64(1) << binary.BigEndian.Uint32(hdr[20:24])
	if order := binary.BigEndian.Uint32(hdr[96:100]); order != 4 {
		t.Fatalf("leakClusters needs 16-bit refcounts, image has order %d", order)
	}
	rt := binary.BigEndian.Uint64(hdr[48:56])
	var e [8]byte
	if _, err := f.ReadAt(e[:], int64(rt)); err != nil {
		t.Fatal(err)
	}
	rb := binary.BigEndian.Uint64(e[:])
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	end := (uint64(fi.Size()) + cs - 1) / cs
	leaked := []uint64{end + 1, end + 2}
	for _, c := range leaked {
		if c >= cs/2 {
			t.Fatalf("cluster %d is beyond the first refcount block", c)
		}
		if _, err := f.WriteAt([]byte{0, 1}, int64(rb+2*c)); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(int64((end + 3) * cs)); err != nil {
		t.Fatal(err)
	}
	return leaked
}

// TestCompareWithQemuImg compares info, map and check output field by field
// (and the text layout) with qemu-img on images qemu-img made.
func TestCompareWithQemuImg(t *testing.T) {
	needQemu(t)
	t.Run("plain", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "img.qcow2", "16M")
		qemuIO(t, dir, "img.qcow2", qemuWrites...)
		compareInfo(t, dir, "img.qcow2")
		compareMap(t, dir, "img.qcow2")
		compareMap(t, dir, "img.qcow2", "--start-offset=96k", "--max-length=5M")
		compareCheck(t, dir, "img.qcow2", "")
	})
	t.Run("backing-chain", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "base.qcow2", "16M")
		qemuIO(t, dir, "base.qcow2", qemuWrites...)
		mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2")
		qemuIO(t, dir, "img.qcow2", "write -P 0xc1 16k 32k", "discard 3M 64k", "write -z 7M 64k", "write -P 0xc2 15M 512")
		compareInfo(t, dir, "img.qcow2")
		compareMap(t, dir, "img.qcow2")
		compareCheck(t, dir, "img.qcow2", "")
	})
	t.Run("compressed", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		mixedRaw(t, filepath.Join(dir, "src.raw"))
		mustRun(t, dir, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "src.raw", "img.qcow2")
		compareInfo(t, dir, "img.qcow2")
		compareMap(t, dir, "img.qcow2") // human map refuses compressed clusters, like qemu-img
		compareCheck(t, dir, "img.qcow2", "")
	})
	t.Run("snapshots", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4k,refcount_bits=64,lazy_refcounts=on", "img.qcow2", "16M")
		qemuIO(t, dir, "img.qcow2", qemuWrites[:4]...)
		mustRun(t, dir, "qemu-img", "snapshot", "-c", "first", "img.qcow2")
		qemuIO(t, dir, "img.qcow2", qemuWrites[4:]...)
		compareInfo(t, dir, "img.qcow2")
		compareMap(t, dir, "img.qcow2")
		compareCheck(t, dir, "img.qcow2", "")
	})
	t.Run("leaks", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "img.qcow2", "16M")
		qemuIO(t, dir, "img.qcow2", qemuWrites...)
		leakClusters(t, filepath.Join(dir, "img.qcow2"))
		if r := run(t, dir, "qemu-img", "check", "img.qcow2"); r.code != 3 {
			t.Fatalf("the doctored image should have leaks only: %v", r)
		}
		compareCheck(t, dir, "img.qcow2", "")
		compareCheck(t, dir, "img.qcow2", "leaks")
		compareCheck(t, dir, "img.qcow2", "all")
	})
	t.Run("raw", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		mixedRaw(t, filepath.Join(dir, "img.raw"))
		compareInfo(t, dir, "img.raw")
		compareMap(t, dir, "img.raw")
	})
}

// TestCreateLikeQemuImg checks that "img create" prints qemu-img's
// Formatting line and makes an image qemu-img reads with the same
// parameters.
func TestCreateLikeQemuImg(t *testing.T) {
	needQemu(t)
	cases := [][]string{
		{"img.qcow2", "10M"},
		{"-o", "cluster_size=4k,lazy_refcounts=on,refcount_bits=64", "img.qcow2", "1.5G"},
		{"-o", "compat=0.10", "-o", "cluster_size=512", "img.qcow2", "1M"},
		{"-o", "cluster_size=2M,refcount_bits=1", "img.qcow2", "100M"},
		{"-b", "base.qcow2", "-F", "qcow2", "img.qcow2"},
		{"-b", "base.qcow2", "-F", "qcow2", "img.qcow2", "64M"},
	}
	for _, args := range cases {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			t.Parallel()
			var out [2]string
			for i, prog := range []string{"zq-csi", "qemu-img"} {
				dir := t.TempDir()
				mustRun(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "32M")
				full := append([]string{"create", "-f", "qcow2"}, args...)
				if prog == "zq-csi" {
					full = append([]string{"img"}, full...)
				}
				out[i] = mustRun(t, dir, prog, full...).stdout
				if i == 0 {
					if r := run(t, dir, "qemu-img", "check", "img.qcow2"); r.code != 0 {
						t.Errorf("qemu-img check of our new image: %v", r)
					}
				}
				// Keep qemu-img's view of the image for comparison.
				info := mustRun(t, dir, "qemu-img", "info", "--output=json", "img.qcow2").stdout
				var m map[string]any
				if err := json.Unmarshal([]byte(info), &m); err != nil {
					t.Fatal(err)
				}
				delete(m, "actual-size") // layouts may differ in size
				b, _ := json.Marshal(m)
				out[i] += string(b)
			}
			sameText(t, "create output and resulting image", out[0], out[1])
		})
	}
}

// TestCreateFailureLeavesNothing: whether the option parser or the engine
// refuses an image, no file is left behind.
func TestCreateFailureLeavesNothing(t *testing.T) {
	cases := [][]string{
		{"img.qcow2", "8E"},                           // beyond qemu's size limit
		{"-o", "cluster_size=512", "img.qcow2", "1P"}, // L1 table too large
		{"-o", "refcount_bits=3", "img.qcow2", "1G"},
	}
	for _, args := range cases {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			dir := t.TempDir()
			r := zq(t, dir, append([]string{"create", "-f", "qcow2"}, args...)...)
			if r.code != 1 || !strings.Contains(r.stderr, "img.qcow2") {
				t.Errorf("want exit 1 and a message naming the file: %v", r)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Errorf("a refused create left %s behind", ents[0].Name())
			}
		})
	}
}
