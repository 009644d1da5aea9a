// Command zq-csi is the zq-csi CSI driver and its image tool.
//
//	zq-csi img <subcommand> ...   qemu-img/qemu-io style image tool
//	zq-csi serve ...              the CSI driver (not yet implemented)
//	zq-csi version
package main

import (
	"fmt"
	"io"
	"os"
	"runtime/debug"

	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/imgcmd"
	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/nbdcmd"
	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/servecmd"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

const usage = `Usage: zq-csi <command> [arguments]

Commands:
  img      inspect and modify qcow2 images (like qemu-img and qemu-io);
           see 'zq-csi img --help'
  serve    run the CSI driver (not yet implemented)
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
	case "version", "--version":
		fmt.Fprintf(stdout, "zq-csi version %s%s\n", version, vcsRevision())
		return 0
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
