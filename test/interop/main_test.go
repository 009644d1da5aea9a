package interop

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// zqBin is the zq-csi binary built once by TestMain.
var zqBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "zq-csi-interop-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	zqBin = filepath.Join(dir, "zq-csi")
	goTool, err := exec.LookPath("go")
	if err != nil {
		fmt.Fprintln(os.Stderr, "interop: the go tool is needed to build zq-csi:", err)
		os.Exit(1)
	}
	build := exec.Command(goTool, "build", "-o", zqBin, "github.com/zq-csi/zq-csi/cmd/zq-csi")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "interop: building zq-csi: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// peer returns the path of a qemu tool, or skips (fails with
// ZQ_REQUIRE_PEERS=1) when it is not installed.
func peer(t *testing.T, tool string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err == nil {
		return p
	}
	msg := fmt.Sprintf("%s not found in PATH: install the Debian/Ubuntu package qemu-utils (apt-get install qemu-utils)", tool)
	if os.Getenv("ZQ_REQUIRE_PEERS") == "1" {
		t.Fatalf("%s (ZQ_REQUIRE_PEERS=1)", msg)
	}
	t.Skipf("!!! SKIPPING interop test: %s; set ZQ_REQUIRE_PEERS=1 to make this a failure !!!", msg)
	return ""
}

// needQemu checks for both qemu tools.
func needQemu(t *testing.T) {
	t.Helper()
	peer(t, "qemu-img")
	peer(t, "qemu-io")
}

type result struct {
	stdout, stderr string
	code           int
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

// run runs a program in dir and returns its output and exit status.
func run(t *testing.T, dir, prog string, args ...string) result {
	t.Helper()
	if prog == "zq-csi" {
		prog = zqBin
	}
	cmd := exec.Command(prog, args...)
	cmd.Dir = dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		t.Fatalf("running %s %s: %v", prog, strings.Join(args, " "), err)
	}
	return r
}

// mustRun runs a program and fails the test unless it exits 0.
func mustRun(t *testing.T, dir, prog string, args ...string) result {
	t.Helper()
	r := run(t, dir, prog, args...)
	if r.code != 0 {
		t.Fatalf("%s %s: %v", filepath.Base(prog), strings.Join(args, " "), r)
	}
	return r
}

func zq(t *testing.T, dir string, args ...string) result {
	t.Helper()
	return run(t, dir, "zq-csi", append([]string{"img"}, args...)...)
}

func mustZq(t *testing.T, dir string, args ...string) result {
	t.Helper()
	return mustRun(t, dir, "zq-csi", append([]string{"img"}, args...)...)
}

// sameFiles fails unless two files have the same content, naming the first
// differing offset.
func sameFiles(t *testing.T, a, b string) {
	t.Helper()
	x, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	y, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(x) != len(y) {
		t.Fatalf("%s is %d bytes, %s is %d bytes", a, len(x), b, len(y))
	}
	for i := range x {
		if x[i] != y[i] {
			t.Fatalf("%s and %s differ first at byte %d (0x%x): %#02x vs %#02x", a, b, i, i, x[i], y[i])
		}
	}
}
