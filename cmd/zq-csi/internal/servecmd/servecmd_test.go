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

func TestBackendFlag(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--backend", "ufo"}, "--backend=ufo: must be local or cluster"},
		// No kubeconfig and not in a pod: the error says where the config comes from.
		{[]string{"--backend", "cluster", "--mode", "controller"}, "--backend=cluster: API server config (--kubeconfig or in-cluster)"},
		{[]string{"--backend", "cluster", "--mode", "controller", "--kubeconfig", "/nonexistent/kubeconfig"}, "/nonexistent/kubeconfig"},
	} {
		var stderr bytes.Buffer
		args := append([]string{"--data-dir", t.TempDir(), "--node-id", "n1", "--attacher", "file"}, tc.args...)
		code := Main(args, Env{Stdout: &stderr, Stderr: &stderr, Getenv: func(string) string { return "" }})
		if code != 1 || !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit 1 and %q", tc.args, code, stderr.String(), tc.want)
		}
	}
}
