//go:build linux

package nbdcmd

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

func run(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	rc := Main(args, Env{Stdout: &out, Stderr: &errb})
	return rc, out.String(), errb.String()
}

func TestUsage(t *testing.T) {
	tests := []struct {
		args []string
		rc   int
		want string // in stdout+stderr
	}{
		// Usage errors exit 2, as the subcommands' own argument checks do.
		{nil, 2, "Usage: zq-csi nbd"},
		{[]string{"--help"}, 0, "recover"},
		{[]string{"bogus"}, 2, `unknown command "bogus"`},
		{[]string{"attach"}, 2, "expects one IMAGE"},
		{[]string{"detach", "a", "b"}, 2, "expects one VOLUME"},
		{[]string{"recover", "x"}, 2, "takes no arguments"},
		{[]string{"list", "--nope"}, 2, "zq-csi nbd list: unknown flag --nope\nRun 'zq-csi nbd list --help' for usage.\n"},
		{[]string{"list", "--state-dri", "x"}, 2, "unknown flag --state-dri (did you mean --state-dir?)"},
		{[]string{"list", "--dead-conn-timeout", "soon"}, 2, "--dead-conn-timeout=soon: must be a duration such as 90s, 5m or 1h30m"},
	}
	for _, tt := range tests {
		rc, out, errs := run(tt.args...)
		if rc != tt.rc || !strings.Contains(out+errs, tt.want) {
			t.Errorf("%q: rc %d, output %q; want rc %d and %q", tt.args, rc, out+errs, tt.rc, tt.want)
		}
	}
}

// TestListRecords: list shows the records and says why the kernel's
// view is missing on a host without nbd.
func TestListRecords(t *testing.T) {
	dir := t.TempDir()
	rc, out, errs := run("list", "--state-dir", dir)
	if rc != 0 || !strings.Contains(out, "VOLUME") {
		t.Fatalf("list: rc %d\n%s%s", rc, out, errs)
	}
}

func TestImageBackend(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a.qcow2")
	if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	b, err := OpenImage(path, false)
	if err != nil {
		t.Fatal(err)
	}
	if b.Size() != 1<<20 {
		t.Fatalf("size %d", b.Size())
	}
	data := bytes.Repeat([]byte{7}, 4096)
	if _, err := b.WriteAt(data, 8192, true); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if _, err := b.ReadAt(got, 8192); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v", err)
	}
	if err := b.Trim(8192, 4096); err != nil {
		t.Fatal(err)
	}
	if err := b.WriteZeroes(0, 4096, true); err != nil {
		t.Fatal(err)
	}
	if _, err := b.ReadAt(got, 8192); err != nil || !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatalf("trimmed range not zero: %v", err)
	}
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
}
