// Command zq-csi is the zq-csi CSI driver and its image tool.
//
//	zq-csi img <subcommand> ...   qemu-img/qemu-io style image tool
//	zq-csi serve ...              the CSI driver
//	zq-csi volume ...             a node plugin's staged volumes (debug socket)
//	zq-csi kubectl ...            the kubectl plugin; also run as kubectl-zq
//	zq-csi nbd|ublk ...           kernel attach debugging (/dev/nbdN, /dev/ublkbN)
//	zq-csi version
package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"

	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/cli"
	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/csicmd"
	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/imgcmd"
	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/kubectlcmd"
	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/nbdcmd"
	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/servecmd"
	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/ublkcmd"
	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/volumecmd"
)

// version and commit are set at build time (the Makefile's build line):
//
//	-ldflags "-X main.version=v1.2.3 -X main.commit=0123abc"
//
// Without them, versionString falls back to what the Go toolchain
// recorded (debug.ReadBuildInfo: the module version of `go install
// ...@v1.2.3`, the VCS revision of a build in a checkout).
var (
	version = ""
	commit  = ""
)

func main() {
	args := os.Args[1:]
	// kubectl runs plugins by file name: kubectl zq ... execs kubectl-zq ...
	if strings.TrimSuffix(filepath.Base(os.Args[0]), ".exe") == "kubectl-zq" {
		args = append([]string{"kubectl"}, args...)
	}
	os.Exit(run(args, os.Stdin, os.Stdout, os.Stderr))
}

const usage = `Usage: zq-csi <command> [arguments]

Commands:
  img      inspect and modify qcow2 images (like qemu-img and qemu-io);
           see 'zq-csi img --help'
  serve    run the CSI driver
  volume   show the node plugin's staged volumes and their live zones;
           see 'zq-csi volume --help'
  kubectl  the kubectl plugin (install this binary as kubectl-zq):
           kubectl zq zones|describe PVC; see 'zq-csi kubectl --help'
  nbd      attach an image as /dev/nbdN and serve it (debugging):
           attach|detach|list|recover; see 'zq-csi nbd --help'
  ublk     attach a zoned image as /dev/ublkbN, a host-managed zoned block
           device, and serve it (debugging): attach|detach|list|recover;
           see 'zq-csi ublk --help'
  csi      call a running driver's CSI services (create, stage, publish,
           snapshot, ...); see 'zq-csi csi --help'
  version  print the version
`

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		return cli.Bare(stderr, usage)
	}
	switch args[0] {
	case "img":
		return imgcmd.Main(args[1:], imgcmd.Env{Stdin: stdin, Stdout: stdout, Stderr: stderr})
	case "nbd": // kernel attach debugging: zq-csi nbd attach|detach|list|recover
		return nbdcmd.Main(args[1:], nbdcmd.Env{Stdout: stdout, Stderr: stderr})
	case "ublk": // zoned kernel attach debugging: zq-csi ublk attach|detach|list|recover
		return ublkcmd.Main(args[1:], ublkcmd.Env{Stdout: stdout, Stderr: stderr})
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, versionString(version, commit, readBuildInfo()))
		return 0
	case "volume":
		return volumecmd.Main(args[1:], volumecmd.Env{Stdout: stdout, Stderr: stderr})
	case "kubectl":
		return kubectlcmd.Main(args[1:], kubectlcmd.Env{Stdout: stdout, Stderr: stderr})
	case "csi": // a CSI client for a running driver (debugging, make demo)
		return csicmd.Main(args[1:], csicmd.Env{Stdout: stdout, Stderr: stderr, Getenv: os.Getenv})
	case "serve":
		return servecmd.Main(args[1:], servecmd.Env{Stdout: stdout, Stderr: stderr, Version: shortVersion(version, commit, readBuildInfo())})
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	return cli.UnknownCommand(stderr, "zq-csi", args[0], []string{"img", "serve", "volume", "kubectl", "nbd", "ublk", "version", "help"})
}

// readBuildInfo is debug.ReadBuildInfo (nil when the binary has none).
func readBuildInfo() *debug.BuildInfo {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return nil
	}
	return bi
}

// buildFacts is what is known of this build: the version (the -ldflags
// one, else the module version when it is a release, else "devel"), the
// commit (the -ldflags one, else the VCS revision, "-dirty" when the tree
// had changes), the commit time and the Go version.
func buildFacts(ver, rev string, bi *debug.BuildInfo) (v, c, when, goVer string) {
	v, c = ver, rev
	if bi != nil {
		goVer = bi.GoVersion
		if v == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v = bi.Main.Version
		}
		settings := map[string]string{}
		for _, s := range bi.Settings {
			settings[s.Key] = s.Value
		}
		if c == "" && settings["vcs.revision"] != "" {
			c = settings["vcs.revision"]
			if settings["vcs.modified"] == "true" {
				c += "-dirty"
			}
		}
		when = settings["vcs.time"]
	}
	if v == "" {
		v = "devel"
	}
	return v, c, when, goVer
}

// versionString is `zq-csi version`'s line, e.g.
// "zq-csi v0.4.0-12-g0123abc (commit 0123abc..., 2026-12-07T20:00:00Z, go1.26.0)".
func versionString(ver, rev string, bi *debug.BuildInfo) string {
	v, c, when, goVer := buildFacts(ver, rev, bi)
	var extra []string
	if c != "" {
		extra = append(extra, "commit "+c)
	} else {
		extra = append(extra, "commit unknown (build with make build, or go build in a git checkout)")
	}
	if when != "" {
		extra = append(extra, when)
	}
	if goVer != "" {
		extra = append(extra, goVer)
	}
	return "zq-csi " + v + " (" + strings.Join(extra, ", ") + ")"
}

// shortVersion is the version the CSI plugin reports (GetPluginInfo):
// the version, with the short commit when the version does not carry it.
func shortVersion(ver, rev string, bi *debug.BuildInfo) string {
	v, c, _, _ := buildFacts(ver, rev, bi)
	if c != "" && !strings.Contains(v, c[:min(7, len(c))]) {
		v += "+" + c[:min(12, len(c))]
	}
	return v
}
