package servecmd

import (
	"fmt"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
)

// newNBDAttacher attaches through the kernel's netlink NBD interface
// (DESIGN.md point 4); this process serves the devices, so it marks itself
// an I/O flusher.
func newNBDAttacher(stateDir string) (nbdattach.Attacher, error) {
	nl, err := nbdattach.DialNetlink()
	if err != nil {
		return nil, fmt.Errorf("the nbd attacher needs the nbd kernel module (modprobe nbd), or use --attacher=file for conformance runs: %w", err)
	}
	if err := nbdattach.SetIOFlusher(); err != nil {
		return nil, fmt.Errorf("prctl(PR_SET_IO_FLUSHER): %w", err)
	}
	return nbdattach.NewNetlinkAttacher(nl, nbdattach.NetlinkOptions{StateDir: stateDir})
}
