//go:build !linux

package ublkcmd

import (
	"fmt"
	"io"
)

// Env carries the standard streams.
type Env struct {
	Stdout, Stderr io.Writer
}

// Main reports that ublk exists on Linux only.
func Main(args []string, e Env) int {
	fmt.Fprintln(e.Stderr, "zq-csi ublk: ublk devices need Linux (>= 6.6 for zoned devices)")
	return 1
}
