package servecmd

import (
	"bytes"
	"strings"
	"testing"
)

func TestFlagsFromEnvironment(t *testing.T) {
	env := map[string]string{"CSI_ENDPOINT": "unix:///env.sock", "ZQ_CSI_MODE": "bogus", "NODE_NAME": "n-env"}
	var stderr bytes.Buffer
	// A flag given on the command line wins over its variable; the others
	// come from the environment, so the bad ZQ_CSI_MODE is what fails.
	code := Main([]string{"--data-dir", t.TempDir(), "--attacher", "file"},
		Env{Stdout: &stderr, Stderr: &stderr, Getenv: func(k string) string { return env[k] }})
	if code != 1 || !strings.Contains(stderr.String(), `mode "bogus"`) {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
	stderr.Reset()
	code = Main([]string{"--mode", "all", "--attacher", "ufo", "--data-dir", t.TempDir()},
		Env{Stdout: &stderr, Stderr: &stderr, Getenv: func(k string) string { return env[k] }})
	if code != 1 || !strings.Contains(stderr.String(), "--attacher=ufo") {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
}
