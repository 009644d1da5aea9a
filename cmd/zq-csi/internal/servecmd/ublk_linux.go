package servecmd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"k8s.io/klog/v2"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
	"github.com/zq-csi/zq-csi/pkg/nbdattach/ublk"
)

// probeZonedUblk checks that this kernel can present zoned ublk devices:
// /dev/ublk-control exists, or `modprobe ublk_drv` creates it, and the
// driver lists UBLK_F_ZONED and UBLK_F_USER_COPY among its features. The
// error says what is missing.
func probeZonedUblk() error {
	if _, err := os.Stat(ublk.ControlPath); errors.Is(err, os.ErrNotExist) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		out, merr := exec.CommandContext(ctx, "modprobe", "ublk_drv").CombinedOutput()
		if _, err := os.Stat(ublk.ControlPath); err != nil {
			msg := strings.TrimSpace(string(out))
			if msg == "" && merr != nil {
				msg = merr.Error()
			}
			if msg == "" {
				msg = "no error, but the node is still missing"
			}
			return fmt.Errorf("%s is missing and modprobe ublk_drv failed (%s); ublk needs Linux >= 6.6 with CONFIG_BLK_DEV_UBLK", ublk.ControlPath, msg)
		}
	}
	if _, err := ublk.CheckZoned(); err != nil {
		return err
	}
	return nil
}

// newUblkAttacher serves zoned volumes as /dev/ublkbN from this process,
// which therefore marks itself an I/O flusher (as for nbd: the kernel
// must not throttle the server its own writeback waits on).
func newUblkAttacher(stateDir string, queues int) (zonedAttacher, error) {
	if err := nbdattach.SetIOFlusher(); err != nil {
		return nil, fmt.Errorf("prctl(PR_SET_IO_FLUSHER): %w", err)
	}
	a, err := ublk.NewAttacher(ublk.AttacherOptions{
		StateDir: stateDir,
		Device:   ublk.Options{Queues: queues},
		OnServeError: func(volumeID string, err error) {
			klog.ErrorS(err, "ublk device serving failed", "volumeID", volumeID)
		},
	})
	if err != nil {
		return nil, fmt.Errorf("the ublk attacher: %w", err)
	}
	return a, nil
}
