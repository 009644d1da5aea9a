package servecmd

import (
	"fmt"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
)

// zonedAttacher is the ublk attacher as serve uses it: Abandon on a
// graceful stop leaves its devices (queuing I/O) to the next process.
type zonedAttacher interface {
	nbdattach.Attacher
	Abandon() error
}

// newZonedAttacher makes the node's zoned attacher for --exporter=mode:
// nbd never, auto when the kernel has zoned ublk, ublk likewise but a
// node without it fails to start. Without one it returns what the node
// lacks, which exporter=ublk volumes are told at NodeStageVolume.
func newZonedAttacher(mode, stateDir string, queues int) (zonedAttacher, string, error) {
	switch mode {
	case "nbd":
		return nil, "the node plugin runs with --exporter=nbd", nil
	case "auto", "ublk":
	default:
		return nil, "", fmt.Errorf("--exporter=%s: must be auto, nbd or ublk", mode)
	}
	var a zonedAttacher
	err := probeZonedUblk()
	if err == nil {
		a, err = newUblkAttacher(stateDir, queues)
	}
	if err != nil {
		if mode == "ublk" {
			return nil, "", fmt.Errorf("--exporter=ublk: %w", err)
		}
		return nil, err.Error(), nil
	}
	return a, "", nil
}
