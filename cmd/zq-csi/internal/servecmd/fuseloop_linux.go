package servecmd

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
	"github.com/zq-csi/zq-csi/pkg/nbdattach/fuseloop"
	"k8s.io/klog/v2"
)

// newFuseLoopAttacher serves each volume as a FUSE file with a loop device
// on top, for nodes without the nbd module. Attachments do not survive a
// restart of this process (Recover re-attaches them).
func newFuseLoopAttacher(stateDir string) (nbdattach.Attacher, error) {
	a, err := fuseloop.New(fuseloop.Options{StateDir: stateDir, OnEvent: klog.InfoS})
	if err != nil {
		return nil, fmt.Errorf("the fuse-loop attacher: %w", err)
	}
	return a, nil
}

// nbdModule is where the kernel shows a loaded (or built-in) nbd module.
var nbdModule = "/sys/module/nbd"

// chooseAttacher picks the attacher for --attacher=auto: nbd when the nbd
// module is present or `modprobe nbd` loads it, else fuse-loop. The reason
// is for the log.
func chooseAttacher() (kind, reason string) {
	if _, err := os.Stat(nbdModule); err == nil {
		return "nbd", nbdModule + " exists"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "modprobe", "nbd").CombinedOutput()
	if err == nil {
		if _, serr := os.Stat(nbdModule); serr == nil {
			return "nbd", "modprobe nbd loaded the module"
		}
		err = fmt.Errorf("%s still missing", nbdModule)
	}
	msg := strings.TrimSpace(string(out))
	if msg == "" {
		msg = err.Error()
	}
	return "fuse-loop", "no nbd module (" + nbdModule + " missing; modprobe nbd: " + msg + ")"
}
