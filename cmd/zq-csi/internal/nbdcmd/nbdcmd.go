//go:build linux

// Package nbdcmd implements "zq-csi nbd", a debugging front end to the
// kernel attach code the node plugin uses (pkg/nbdattach's
// NetlinkAttacher): attach a qcow2 image as /dev/nbdN and serve it in the
// foreground, detach, list the attachment records, and recover them after
// the serving process died.
//
// attach and recover serve until the device is detached (by "zq-csi nbd
// detach" or any other DISCONNECT) or a signal arrives. SIGTERM and SIGINT
// are the graceful stop: in-flight requests finish, the image is flushed
// and closed, the socket is shut down, and the kernel parks I/O on the
// device until "zq-csi nbd recover" takes over (within the dead-connection
// timeout). SIGKILL leaves the same state, minus the drain.
package nbdcmd

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/cli"
	"github.com/zq-csi/zq-csi/pkg/nbdattach"
)

// Env carries the standard streams, so the commands can run in-process.
type Env struct {
	Stdout, Stderr io.Writer
}

const usage = `Usage: zq-csi nbd <command> [options]

Commands:
  attach [options] IMAGE   attach a qcow2 image as /dev/nbdN and serve it
                           until detached or signalled (SIGTERM/SIGINT park
                           the device for 'recover')
  detach [options] VOLUME  flush and disconnect a volume's device
  list   [options]         list attachment records and the kernel's view
  recover [options]        re-serve every recorded device after a restart,
                           then serve until all are detached or signalled

Common options:
  --state-dir DIR          attachment records (default /var/lib/zq-csi/nbd)
`

// DefaultStateDir is where the records live unless --state-dir says otherwise.
const DefaultStateDir = "/var/lib/zq-csi/nbd"

// Main runs "zq-csi nbd ARGS..." and returns the exit status.
func Main(args []string, e Env) int {
	if len(args) == 0 {
		return cli.Bare(e.Stderr, usage)
	}
	var run func(Env, []string) error
	switch args[0] {
	case "attach":
		run = runAttach
	case "detach":
		run = runDetach
	case "list":
		run = runList
	case "recover":
		run = runRecover
	case "-h", "--help", "help":
		fmt.Fprint(e.Stdout, usage)
		return 0
	default:
		return cli.UnknownCommand(e.Stderr, "zq-csi nbd", args[0], []string{"attach", "detach", "list", "recover"})
	}
	if err := run(e, args[1:]); err != nil {
		if code, ok := cli.Report(e.Stdout, e.Stderr, err); ok {
			return code
		}
		var ue usageError
		if errors.As(err, &ue) {
			fmt.Fprintf(e.Stderr, "zq-csi nbd %s: %v\n", args[0], err)
			return 2
		}
		fmt.Fprintf(e.Stderr, "zq-csi nbd %s: %v\n", args[0], err)
		return 1
	}
	return 0
}

type usageError string

func (u usageError) Error() string { return string(u) }

// common holds the options every subcommand takes.
type common struct {
	stateDir        string
	deadConnTimeout time.Duration
	requeue         time.Duration
}

func newFlags(e Env, name string, c *common) *flag.FlagSet {
	fs := flag.NewFlagSet("zq-csi nbd "+name, flag.ContinueOnError)
	fs.StringVar(&c.stateDir, "state-dir", DefaultStateDir, "directory of attachment records")
	fs.DurationVar(&c.deadConnTimeout, "dead-conn-timeout", 120*time.Second, "how long the kernel parks I/O while no process serves the device")
	fs.DurationVar(&c.requeue, "requeue-interval", 2*time.Second, "the device's request timer (resends requests lost with a dead server)")
	return fs
}

func (c *common) attacher(e Env) (*nbdattach.NetlinkAttacher, func(), error) {
	nl, err := nbdattach.DialNetlink()
	if err != nil {
		return nil, nil, err
	}
	a, err := nbdattach.NewNetlinkAttacher(nl, nbdattach.NetlinkOptions{
		StateDir:        c.stateDir,
		DeadConnTimeout: c.deadConnTimeout,
		RequeueInterval: c.requeue,
		OnServeError: func(vol string, err error) {
			fmt.Fprintf(e.Stderr, "zq-csi nbd: volume %s: %v\n", vol, err)
		},
	})
	if err != nil {
		nl.Close()
		return nil, nil, err
	}
	return a, func() { nl.Close() }, nil
}

func runAttach(e Env, args []string) error {
	var c common
	fs := newFlags(e, "attach", &c)
	vol := fs.String("volume-id", "", "volume id, also the kernel's backend identifier (default: the image file name)")
	bs := fs.Uint("block-size", 512, "logical block size of the device")
	ro := fs.Bool("read-only", false, "attach read-only")
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
	if err := nbdattach.SetIOFlusher(); err != nil {
		fmt.Fprintf(e.Stderr, "zq-csi nbd: warning: %v\n", err)
	}
	a, closeNL, err := c.attacher(e)
	if err != nil {
		return err
	}
	defer closeNL()
	b, err := OpenImage(img, *ro)
	if err != nil {
		return err
	}
	att, err := a.Attach(context.Background(), nbdattach.AttachRequest{
		VolumeID: *vol, ImagePath: img, Backend: b, ReadOnly: *ro, BlockSize: uint32(*bs),
	})
	if err != nil {
		b.Close()
		return err
	}
	fmt.Fprintln(e.Stdout, att.DevicePath)
	return serveUntilDone(e, a, []string{att.VolumeID})
}

func runRecover(e Env, args []string) error {
	var c common
	fs := newFlags(e, "recover", &c)
	once := fs.Bool("once", false, "recover, then stop gracefully at once (leaving the devices parked) instead of serving")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return usageError("takes no arguments")
	}
	if err := nbdattach.SetIOFlusher(); err != nil {
		fmt.Fprintf(e.Stderr, "zq-csi nbd: warning: %v\n", err)
	}
	a, closeNL, err := c.attacher(e)
	if err != nil {
		return err
	}
	defer closeNL()
	start := time.Now()
	atts, rerr := a.Recover(context.Background(), func(rec nbdattach.Attachment) (nbdattach.Backend, error) {
		return OpenImage(rec.ImagePath, rec.ReadOnly)
	})
	vols := make([]string, 0, len(atts))
	for _, att := range atts {
		fmt.Fprintf(e.Stdout, "recovered %s %s generation %d\n", att.VolumeID, att.DevicePath, att.Generation)
		vols = append(vols, att.VolumeID)
	}
	fmt.Fprintf(e.Stdout, "recovered %d device(s) in %v\n", len(atts), time.Since(start).Round(time.Millisecond))
	if rerr != nil {
		fmt.Fprintf(e.Stderr, "zq-csi nbd recover: %v\n", rerr)
	}
	if *once {
		a.Shutdown(context.Background())
		return rerr
	}
	if err := serveUntilDone(e, a, vols); err != nil {
		return err
	}
	return rerr
}

// WaitServed waits until none of vols is served any more (served says
// when each stops: their devices were detached, here or from another
// process) or until SIGTERM or SIGINT arrives, which it returns (nil when
// the volumes ended). The attach commands of nbd and ublk serve in the
// foreground through it.
func WaitServed(served func(volumeID string) (<-chan struct{}, bool), vols []string) os.Signal {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sig)
	all := make(chan struct{})
	go func() {
		for _, v := range vols {
			if done, ok := served(v); ok {
				<-done
			}
		}
		close(all)
	}()
	select {
	case <-all:
		return nil
	case s := <-sig:
		return s
	}
}

// serveUntilDone waits for every volume to stop being served, or for a
// signal, which stops gracefully.
func serveUntilDone(e Env, a *nbdattach.NetlinkAttacher, vols []string) error {
	s := WaitServed(a.Served, vols)
	if s == nil {
		return nil
	}
	fmt.Fprintf(e.Stderr, "zq-csi nbd: %v: draining, flushing and parking the device(s) for 'zq-csi nbd recover'\n", s)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return a.Shutdown(ctx)
}

func runDetach(e Env, args []string) error {
	var c common
	fs := newFlags(e, "detach", &c)
	timeout := fs.Duration("timeout", 30*time.Second, "how long to wait for the disconnect")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usageError("expects one VOLUME")
	}
	a, closeNL, err := c.attacher(e)
	if err != nil {
		return err
	}
	defer closeNL()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	return a.Detach(ctx, fs.Arg(0))
}

func runList(e Env, args []string) error {
	var c common
	fs := newFlags(e, "list", &c)
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	st, err := nbdattach.NewStateStore(c.stateDir)
	if err != nil {
		return err
	}
	recs, lerr := st.List()
	kernel := map[int]bool{}
	nl, nerr := nbdattach.DialNetlink()
	if nerr == nil {
		defer nl.Close()
		if devs, err := nl.Status(-1); err == nil {
			for _, d := range devs {
				kernel[d.Index] = d.Connected
			}
		} else {
			nerr = err
		}
	}
	fmt.Fprintf(e.Stdout, "%-24s %-10s %-4s %-7s %s\n", "VOLUME", "DEVICE", "GEN", "KERNEL", "IMAGE")
	for _, r := range recs {
		state := "?"
		if nerr == nil {
			state = "gone"
			if conn, ok := kernel[r.Index]; ok {
				state = "idle"
				if conn {
					state = "conn"
				}
				if b, err := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/backend", r.Index)); err == nil && string(b) != r.BackendID+"\n" {
					state = "foreign"
				}
			}
		}
		fmt.Fprintf(e.Stdout, "%-24s %-10s %-4d %-7s %s\n", r.VolumeID, r.DevicePath, r.Generation, state, r.ImagePath)
	}
	if nerr != nil {
		fmt.Fprintf(e.Stderr, "zq-csi nbd list: kernel state unknown: %v\n", nerr)
	}
	return lerr
}
