//go:build !linux

package nbdcmd

import (
	"fmt"
	"io"
)

// Env carries the standard streams.
type Env struct {
	Stdout, Stderr io.Writer
}

// Main reports that kernel NBD attach exists on Linux only.
func Main(args []string, e Env) int {
	fmt.Fprintln(e.Stderr, "zq-csi nbd: kernel NBD attach needs Linux")
	return 1
}
