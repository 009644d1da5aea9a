//go:build linux

// Package ublkcmd implements "zq-csi ublk", a debugging front end to the
// ublk exporter the node plugin uses for exporter=ublk volumes
// (pkg/nbdattach/ublk's Attacher): attach a zoned qcow2 image as
// /dev/ublkbN, a true host-managed zoned block device, and serve it in the
// foreground; detach; list the attachment records with the kernel's view;
// recover the devices after the serving process died.
//
// attach and recover serve until the device is detached (by "zq-csi ublk
// detach" from another shell, which stops the device through
// /dev/ublk-control) or a signal arrives. SIGTERM and SIGINT stop serving
// without stopping the device: the kernel keeps /dev/ublkbN and queues its
// I/O (UBLK_F_USER_RECOVERY) until "zq-csi ublk recover" takes it over.
// SIGKILL leaves the same state.
package ublkcmd

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"time"

	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/cli"
	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/nbdcmd"
	"github.com/zq-csi/zq-csi/pkg/nbdattach"
	"github.com/zq-csi/zq-csi/pkg/nbdattach/ublk"
)

// Env carries the standard streams, so the commands can run in-process.
type Env struct {
	Stdout, Stderr io.Writer
}

const usage = `Usage: zq-csi ublk <command> [options]

Commands:
  attach [options] IMAGE   attach a zoned qcow2 image as /dev/ublkbN (a
                           host-managed zoned block device) and serve it
                           until detached or signalled (SIGTERM/SIGINT
                           leave the device, its I/O waiting, for 'recover')
  detach [options] VOLUME  stop and delete a volume's device, whether this,
                           another or no process serves it
  list   [options]         list attachment records and the kernel's view
  recover [options]        take every recorded device over after its server
                           died, then serve until all are detached or
                           signalled

Common options:
  --state-dir DIR          attachment records (default /var/lib/zq-csi/ublk)
`

// DefaultStateDir is where the records live unless --state-dir says otherwise.
const DefaultStateDir = "/var/lib/zq-csi/ublk"

// Main runs "zq-csi ublk ARGS..." and returns the exit status: 0, 1 for
// a failure, 2 for bad arguments.
func Main(args []string, e Env) int {
	if len(args) == 0 {
		return cli.Bare(e.Stderr, usage)
	}
	cmds := map[string]func(Env, []string) error{
		"attach": runAttach, "detach": runDetach, "list": runList, "recover": runRecover,
	}
	run, ok := cmds[args[0]]
	switch {
	case args[0] == "-h" || args[0] == "--help" || args[0] == "help":
		fmt.Fprint(e.Stdout, usage)
		return 0
	case !ok:
		return cli.UnknownCommand(e.Stderr, "zq-csi ublk", args[0], []string{"attach", "detach", "list", "recover"})
	}
	err := run(e, args[1:])
	if err == nil {
		return 0
	}
	if code, ok := cli.Report(e.Stdout, e.Stderr, err); ok {
		return code
	}
	fmt.Fprintf(e.Stderr, "zq-csi ublk %s: %v\n", args[0], err)
	var ue usageError
	if errors.As(err, &ue) {
		return 2
	}
	return 1
}

type usageError string

func (u usageError) Error() string { return string(u) }

func newFlags(e Env, name string, stateDir *string) *flag.FlagSet {
	fs := flag.NewFlagSet("zq-csi ublk "+name, flag.ContinueOnError)
	fs.StringVar(stateDir, "state-dir", DefaultStateDir, "directory of attachment records")
	return fs
}

func newAttacher(e Env, stateDir string) (*ublk.Attacher, error) {
	return ublk.NewAttacher(ublk.AttacherOptions{
		StateDir: stateDir,
		OnServeError: func(vol string, err error) {
			fmt.Fprintf(e.Stderr, "zq-csi ublk: volume %s: %v\n", vol, err)
		},
	})
}

// zonedImage opens an image for ublk, which presents zoned images only.
func zonedImage(path string) (nbdcmd.Backend, error) {
	b, err := nbdcmd.OpenImage(path, false)
	if err != nil {
		return nil, err
	}
	if _, ok := b.(nbdattach.ZonedBackend); !ok {
		b.Close()
		return nil, fmt.Errorf("%s is not a zoned image: ublk presents host-managed zoned devices only (zq-csi nbd attach serves any image)", path)
	}
	return b, nil
}

func ioFlusher(e Env) {
	// The kernel's writeback to /dev/ublkbN waits on this process.
	if err := nbdattach.SetIOFlusher(); err != nil {
		fmt.Fprintf(e.Stderr, "zq-csi ublk: warning: %v\n", err)
	}
}

func runAttach(e Env, args []string) error {
	var stateDir string
	fs := newFlags(e, "attach", &stateDir)
	vol := fs.String("volume-id", "", "volume id, recorded and tagged on the device (default: the image file name)")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usageError("expects one IMAGE")
	}
	img, err := filepath.Abs(fs.Arg(0))
	if err != nil {
		return err
	}
	if *vol == "" {
		*vol = filepath.Base(img)
	}
	ioFlusher(e)
	a, err := newAttacher(e, stateDir)
	if err != nil {
		return err
	}
	b, err := zonedImage(img)
	if err != nil {
		return err
	}
	att, err := a.Attach(context.Background(), nbdattach.AttachRequest{VolumeID: *vol, ImagePath: img, Backend: b})
	if err != nil {
		b.Close()
		return err
	}
	fmt.Fprintln(e.Stdout, att.DevicePath)
	return serveUntilDone(e, a, []string{att.VolumeID}, []io.Closer{b})
}

func runRecover(e Env, args []string) error {
	var stateDir string
	fs := newFlags(e, "recover", &stateDir)
	once := fs.Bool("once", false, "recover, then stop serving at once (leaving the devices for the next recover) instead of serving")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return usageError("takes no arguments")
	}
	ioFlusher(e)
	a, err := newAttacher(e, stateDir)
	if err != nil {
		return err
	}
	var opened []io.Closer
	start := time.Now()
	atts, rerr := a.Recover(context.Background(), func(rec nbdattach.Attachment) (nbdattach.Backend, error) {
		b, err := zonedImage(rec.ImagePath)
		if err == nil {
			opened = append(opened, b)
		}
		return b, err
	})
	vols := make([]string, 0, len(atts))
	for _, att := range atts {
		fmt.Fprintf(e.Stdout, "recovered %s %s generation %d\n", att.VolumeID, att.DevicePath, att.Generation)
		vols = append(vols, att.VolumeID)
	}
	fmt.Fprintf(e.Stdout, "recovered %d device(s) in %v\n", len(atts), time.Since(start).Round(time.Millisecond))
	if rerr != nil {
		fmt.Fprintf(e.Stderr, "zq-csi ublk recover: %v\n", rerr)
	}
	if *once {
		return errors.Join(rerr, a.Abandon(), closeAll(opened))
	}
	return errors.Join(serveUntilDone(e, a, vols, opened), rerr)
}

func closeAll(cs []io.Closer) error {
	var errs []error
	for _, c := range cs {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

// serveUntilDone serves until every volume's device has been stopped (by
// "zq-csi ublk detach"), then releases this process's side of them, or
// until a signal, which leaves the devices to "zq-csi ublk recover". The
// images are closed (flushed) either way.
func serveUntilDone(e Env, a *ublk.Attacher, vols []string, images []io.Closer) error {
	if s := nbdcmd.WaitServed(a.Served, vols); s != nil {
		fmt.Fprintf(e.Stderr, "zq-csi ublk: %v: leaving the device(s) to 'zq-csi ublk recover' (their I/O waits)\n", s)
		return errors.Join(a.Abandon(), closeAll(images))
	}
	var errs []error
	for _, v := range vols {
		errs = append(errs, a.Detach(context.Background(), v))
	}
	return errors.Join(append(errs, closeAll(images))...)
}

func runDetach(e Env, args []string) error {
	var stateDir string
	fs := newFlags(e, "detach", &stateDir)
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usageError("expects one VOLUME")
	}
	a, err := newAttacher(e, stateDir)
	if err != nil {
		return err
	}
	return a.Detach(context.Background(), fs.Arg(0))
}

func runList(e Env, args []string) error {
	var stateDir string
	fs := newFlags(e, "list", &stateDir)
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return usageError("takes no arguments")
	}
	a, err := newAttacher(e, stateDir)
	if err != nil {
		return err
	}
	recs, lerr := a.List(context.Background())
	ctrl, cerr := ublk.OpenControl()
	if cerr == nil {
		defer ctrl.Close()
	}
	fmt.Fprintf(e.Stdout, "%-24s %-12s %-4s %-9s %-7s %s\n", "VOLUME", "DEVICE", "GEN", "KERNEL", "PID", "IMAGE")
	for _, r := range recs {
		state, pid := "?", "-"
		if cerr == nil {
			var p int32
			if state, p, err = ublk.KernelState(ctrl, r); err != nil {
				state = "error"
				fmt.Fprintf(e.Stderr, "zq-csi ublk list: %s: %v\n", r.DevicePath, err)
			}
			if p > 0 {
				pid = fmt.Sprint(p)
			}
		}
		fmt.Fprintf(e.Stdout, "%-24s %-12s %-4d %-9s %-7s %s\n", r.VolumeID, r.DevicePath, r.Generation, state, pid, r.ImagePath)
	}
	if cerr != nil {
		fmt.Fprintf(e.Stderr, "zq-csi ublk list: kernel state unknown: %v\n", cerr)
	}
	return lerr
}
