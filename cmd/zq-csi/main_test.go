package main

import (
	"bytes"
	"runtime/debug"
	"strings"
	"testing"
)

// Issue 14: bare command groups exited 1 or 2 depending on the group; help
// went to stderr for some. Bare (and an unknown subcommand) is a usage
// error: usage on stderr, exit 2. Help asked for: stdout, exit 0.
func TestCommandConventions(t *testing.T) {
	for _, args := range [][]string{{}, {"img"}, {"nbd"}, {"ublk"}, {"volume"}, {"kubectl"}} {
		var out, errb bytes.Buffer
		code := run(args, strings.NewReader(""), &out, &errb)
		if code != 2 || out.Len() != 0 || !strings.Contains(errb.String(), "Usage") {
			t.Errorf("zq-csi %v: exit %d, stdout %d bytes, stderr %q; want 2 and the usage on stderr", args, code, out.Len(), firstLine(errb.String()))
		}
	}
	// (`img` keeps qemu-img's exit 1 for its own subcommands and their
	// arguments: it is a qemu-img look-alike.)
	for _, args := range [][]string{{"bogus"}, {"nbd", "bogus"}, {"ublk", "bogus"}, {"volume", "bogus"}, {"kubectl", "bogus"}} {
		var out, errb bytes.Buffer
		if code := run(args, strings.NewReader(""), &out, &errb); code != 2 || out.Len() != 0 || errb.Len() == 0 {
			t.Errorf("zq-csi %v: exit %d, stdout %q, stderr %q; want 2 and a message on stderr", args, code, out.String(), errb.String())
		}
	}
	for _, args := range [][]string{{"--help"}, {"help"}, {"img", "--help"}, {"serve", "--help"}, {"volume", "--help"},
		{"kubectl", "--help"}, {"nbd", "--help"}, {"ublk", "--help"}, {"nbd", "attach", "--help"}, {"nbd", "list", "-h"},
		{"ublk", "attach", "--help"}, {"ublk", "detach", "--help"}, {"img", "create", "--help"}} {
		var out, errb bytes.Buffer
		code := run(args, strings.NewReader(""), &out, &errb)
		if code != 0 || out.Len() == 0 || errb.Len() != 0 {
			t.Errorf("zq-csi %v: exit %d, stdout %d bytes, stderr %q; want 0 and help on stdout", args, code, out.Len(), errb.String())
		}
	}
	// A misspelt flag is one line and a hint, not the usage.
	for _, args := range [][]string{{"serve", "--endpont=x"}, {"nbd", "list", "--state-dri=x"}, {"ublk", "list", "--state-dri=x"}} {
		var out, errb bytes.Buffer
		code := run(args, strings.NewReader(""), &out, &errb)
		if code != 2 || strings.Count(errb.String(), "\n") != 2 || !strings.Contains(errb.String(), "did you mean --") {
			t.Errorf("zq-csi %v: exit %d, stderr %q; want 2, one line with a suggestion and a hint", args, code, errb.String())
		}
	}
}

func firstLine(s string) string { l, _, _ := strings.Cut(s, "\n"); return l }

// Issue 14: `zq-csi --version` said "dev": no version, no commit. The
// Makefile stamps both; without them the toolchain's build info is used.
func TestVersion(t *testing.T) {
	bi := &debug.BuildInfo{GoVersion: "go1.26.0", Main: debug.Module{Version: "(devel)"},
		Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "0123456789abcdef0123"}, {Key: "vcs.time", Value: "2026-12-07T20:00:00Z"},
			{Key: "vcs.modified", Value: "true"}}}
	for _, tc := range []struct {
		ver, rev string
		bi       *debug.BuildInfo
		want     string
		short    string
	}{
		{"v0.4.0-3-g0123456", "0123456789abcdef0123", nil, "zq-csi v0.4.0-3-g0123456 (commit 0123456789abcdef0123)", "v0.4.0-3-g0123456"},
		{"", "", bi, "zq-csi devel (commit 0123456789abcdef0123-dirty, 2026-12-07T20:00:00Z, go1.26.0)", "devel+0123456789ab"},
		{"", "", &debug.BuildInfo{GoVersion: "go1.26.0", Main: debug.Module{Version: "v1.2.3"}}, "zq-csi v1.2.3 (commit unknown", "v1.2.3"},
		{"", "", nil, "zq-csi devel (commit unknown", "devel"},
	} {
		if got := versionString(tc.ver, tc.rev, tc.bi); !strings.HasPrefix(got, tc.want) {
			t.Errorf("versionString(%q, %q) = %q, want %q...", tc.ver, tc.rev, got, tc.want)
		}
		if got := shortVersion(tc.ver, tc.rev, tc.bi); got != tc.short {
			t.Errorf("shortVersion(%q, %q) = %q, want %q", tc.ver, tc.rev, got, tc.short)
		}
	}
	var out bytes.Buffer
	version, commit = "v9.9.9", "feedface"
	defer func() { version, commit = "", "" }()
	if code := run([]string{"--version"}, nil, &out, &out); code != 0 || !strings.HasPrefix(out.String(), "zq-csi v9.9.9 (commit feedface") {
		t.Errorf("--version: %d %q", code, out.String())
	}
}
