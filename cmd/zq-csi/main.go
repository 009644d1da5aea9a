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

	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/csicmd"
	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/imgcmd"
	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/kubectlcmd"
	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/nbdcmd"
	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/servecmd"
	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/ublkcmd"
	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/volumecmd"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

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
		fmt.Fprint(stderr, usage)
		return 1
	}
	switch args[0] {
	case "img":
		return imgcmd.Main(args[1:], imgcmd.Env{Stdin: stdin, Stdout: stdout, Stderr: stderr})
	case "nbd": // kernel attach debugging: zq-csi nbd attach|detach|list|recover
		return nbdcmd.Main(args[1:], nbdcmd.Env{Stdout: stdout, Stderr: stderr})
	case "ublk": // zoned kernel attach debugging: zq-csi ublk attach|detach|list|recover
		return ublkcmd.Main(args[1:], ublkcmd.Env{Stdout: stdout, Stderr: stderr})
	case "version", "--version":
		fmt.Fprintf(stdout, "zq-csi version %s%s\n", version, vcsRevision())
		return 0
	case "volume":
		return volumecmd.Main(args[1:], volumecmd.Env{Stdout: stdout, Stderr: stderr})
	case "kubectl":
		return kubectlcmd.Main(args[1:], kubectlcmd.Env{Stdout: stdout, Stderr: stderr})
	case "csi": // a CSI client for a running driver (debugging, make demo)
		return csicmd.Main(args[1:], csicmd.Env{Stdout: stdout, Stderr: stderr, Getenv: os.Getenv})
	case "serve":
		return servecmd.Main(args[1:], servecmd.Env{Stdout: stdout, Stderr: stderr, Version: version})
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "zq-csi: unknown command %q\n%s", args[0], usage)
	return 1
}

func vcsRevision() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return ""
	}
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && s.Value != "" {
			return " (" + s.Value + ")"
		}
	}
	return ""
}
