//go:build linux

package ublkcmd

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

func run(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	rc := Main(args, Env{Stdout: &out, Stderr: &errb})
	return rc, out.String(), errb.String()
}

// The argument errors, none of which reaches the kernel.
func TestUsage(t *testing.T) {
	dir := t.TempDir()
	plain := filepath.Join(dir, "plain.qcow2")
	if _, err := qcow2.Create(plain, qcow2.CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	sd := filepath.Join(dir, "state")
	tests := []struct {
		args []string
		rc   int
		want string // in stdout+stderr
	}{
		// Usage errors exit 2, as the subcommands' own argument checks do.
		{nil, 2, "Usage: zq-csi ublk"},
		{[]string{"--help"}, 0, "recover"},
		{[]string{"bogus"}, 2, `unknown command "bogus"`},
		{[]string{"attach", "--state-dir", sd}, 2, "zq-csi ublk attach: expects one IMAGE"},
		{[]string{"attach", "--state-dir", sd, "a", "b"}, 2, "expects one IMAGE"},
		{[]string{"detach", "--state-dir", sd}, 2, "expects one VOLUME"},
		{[]string{"detach", "--state-dir", sd, "a", "b"}, 2, "expects one VOLUME"},
		{[]string{"recover", "--state-dir", sd, "x"}, 2, "takes no arguments"},
		{[]string{"list", "--state-dir", sd, "x"}, 2, "takes no arguments"},
		{[]string{"list", "--nope"}, 2, "zq-csi ublk list: unknown flag --nope\nRun 'zq-csi ublk list --help' for usage.\n"},
		{[]string{"attach", "--state-dir", sd, filepath.Join(dir, "missing.qcow2")}, 1, "missing.qcow2"},
		// ublk presents zoned images only; refused before any device exists.
		{[]string{"attach", "--state-dir", sd, plain}, 1, "is not a zoned image"},
		// Nothing recorded: detaching is a no-op, as the Attacher contract says.
		{[]string{"detach", "--state-dir", sd, "nothing"}, 0, ""},
	}
	for _, tt := range tests {
		rc, out, errs := run(tt.args...)
		if rc != tt.rc || !strings.Contains(out+errs, tt.want) {
			t.Errorf("%q: rc %d, output %q; want rc %d and %q", tt.args, rc, out+errs, tt.rc, tt.want)
		}
	}
}

// TestListRecords: list prints the records, and says why the kernel's
// view is missing on a host without ublk.
func TestListRecords(t *testing.T) {
	dir := t.TempDir()
	st, err := nbdattach.NewStateStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	rec := nbdattach.Attachment{VolumeID: "vol-a", DevicePath: "/dev/ublkb7", Index: 7, ImagePath: "/img/a.qcow2", Generation: 3, Kind: "ublk"}
	if err := st.Save(rec); err != nil {
		t.Fatal(err)
	}
	// An NBD record in the same directory is not ublk's.
	if err := st.Save(nbdattach.Attachment{VolumeID: "vol-n", DevicePath: "/dev/nbd1", Index: 1, Kind: "nbd"}); err != nil {
		t.Fatal(err)
	}
	rc, out, errs := run("list", "--state-dir", dir)
	if rc != 0 {
		t.Fatalf("list: rc %d\n%s%s", rc, out, errs)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "VOLUME") {
		t.Fatalf("list output:\n%s", out)
	}
	f := strings.Fields(lines[1])
	if len(f) != 6 || f[0] != "vol-a" || f[1] != "/dev/ublkb7" || f[2] != "3" || f[5] != "/img/a.qcow2" {
		t.Errorf("record line %q", lines[1])
	}
	if _, err := os.Stat("/dev/ublk-control"); err != nil && !strings.Contains(errs, "kernel state unknown") {
		t.Errorf("no ublk here, but stderr %q does not say the kernel state is unknown", errs)
	}
}
