package imgcmd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
	"github.com/zq-csi/zq-csi/pkg/qcow2"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

const serveUsage = `Usage: zq-csi img serve [-k PATH | -p PORT [-b ADDR]] [-r] [-e N] [-t] [-x NAME] FILE

Export a qcow2 image over NBD, like qemu-nbd. A zoned image is served
through the zone engine: writes off a write pointer fail with EIO, a TRIM
of whole sequential zones resets them, and the zones are visible in the
"zq:zones" metadata context (nbdinfo --map=zq:zones).

  -k, --socket PATH       listen on the unix socket PATH
  -p, --port PORT         listen on TCP port PORT (default 10809)
  -b, --bind ADDR         address to listen on with --port (default
                          127.0.0.1; qemu-nbd binds 0.0.0.0, we do not
                          expose an unauthenticated export by default)
  -r, --read-only         export read-only
  -e, --shared N          serve up to N clients at once (default 1, 0 for
                          no limit); N > 1 advertises multi-conn, since a
                          flush on any connection covers all of them
  -t, --persistent        keep serving after the last client disconnects
  -x, --export-name NAME  the export's name (default "")
  -f, --format FMT        qcow2 (the only format served)

Without -k or -p, a listening socket passed by systemd socket activation
(LISTEN_PID, LISTEN_FDS=1, fd 3) is used, so libnbd tools can start the
server themselves: nbdinfo -- [ zq-csi img serve FILE ].

Like qemu-nbd, the server exits when its last client disconnects unless
--persistent is given. SIGTERM or SIGINT stops it gracefully: requests in
flight finish, the image is flushed and closed.
`

// Socket activation (sd_listen_fds(3)): the first passed descriptor is 3.
const listenFDsStart = 3

type serveConfig struct {
	socket, port, bind, name string
	readOnly, persistent     bool
	shared                   int
}

func runServe(e Env, args []string) int {
	opts, pos, code, done := parseArgs(e, "serve", args, optSpec{short: "k:p:b:re:tx:f:", long: map[string]bool{
		"socket": true, "port": true, "bind": true, "read-only": false, "shared": true,
		"persistent": false, "export-name": true, "format": true,
	}})
	if done {
		return code
	}
	cfg := serveConfig{shared: 1}
	want := ""
	for _, o := range opts {
		switch o.name {
		case "k", "socket":
			cfg.socket = o.val
		case "p", "port":
			cfg.port = o.val
		case "b", "bind":
			cfg.bind = o.val
		case "r", "read-only":
			cfg.readOnly = true
		case "t", "persistent":
			cfg.persistent = true
		case "x", "export-name":
			cfg.name = o.val
		case "f", "format":
			want = o.val
		case "e", "shared":
			n, err := strconv.Atoi(o.val)
			if err != nil || n < 0 {
				return usageFail(e, "serve", fmt.Sprintf("Invalid shared device number '%s'", o.val))
			}
			cfg.shared = n
		}
	}
	if len(pos) != 1 {
		return usageFail(e, "serve", "Expecting one image file name")
	}
	if cfg.socket != "" && (cfg.port != "" || cfg.bind != "") {
		return usageFail(e, "serve", "--socket cannot be used with --port or --bind")
	}
	if cfg.port != "" {
		if p, err := strconv.ParseUint(cfg.port, 10, 16); err != nil || p == 0 {
			return usageFail(e, "serve", fmt.Sprintf("Invalid port '%s'", cfg.port))
		}
	}
	file := pos[0]

	activated, err := activationListener()
	if err != nil {
		return fail(e, "", err)
	}
	if activated != nil && (cfg.socket != "" || cfg.port != "" || cfg.bind != "") {
		activated.Close()
		return usageFail(e, "serve", "--socket, --port and --bind cannot be used with socket activation")
	}

	backend, closeImage, err := openServeBackend(file, want, cfg.readOnly, e.Stderr)
	if err != nil {
		if activated != nil {
			activated.Close()
		}
		return fail(e, file, err)
	}
	l := activated
	if l == nil {
		if l, err = listen(cfg); err != nil {
			closeImage()
			return fail(e, "", err)
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sl := newServeListener(l, cfg.shared)
	if !cfg.persistent {
		sl.idle = cancel // qemu-nbd without --persistent: the last client leaving ends the server
	}
	exp := &nbdattach.Export{
		Name:        cfg.name,
		Description: file,
		Backend:     backend,
		ReadOnly:    cfg.readOnly,
		// One process, one file: Flush (an fsync, plus the durable write
		// pointers of every zone) covers the writes of every connection.
		MultiConn: cfg.shared != 1,
	}
	stderr := &lockedWriter{w: e.Stderr}
	srv := nbdattach.NewServer(nbdattach.ExportList{exp}, nbdattach.WithConnErrorHandler(func(_ net.Conn, err error) {
		fmt.Fprintf(stderr, "%s serve: %v\n", prog, err)
	}))
	failed := false
	if err := srv.Serve(ctx, sl); err != nil {
		// The listener failed: stop the connections still running too.
		fmt.Fprintf(stderr, "%s serve: %v\n", prog, err)
		cancel()
		sl.wait()
		failed = true
	}
	if err := closeImage(); err != nil {
		fmt.Fprintf(stderr, "%s serve: %s: %v\n", prog, file, err)
		failed = true
	}
	if failed {
		return 1
	}
	return 0
}

// openServeBackend opens a qcow2 image as an NBD backend: a zoned one
// through the zone engine, any other as a plain image.
func openServeBackend(file, want string, readOnly bool, warn io.Writer) (nbdattach.Backend, func() error, error) {
	f, _, err := resolveFormat(file, want)
	if err != nil {
		return nil, nil, err
	}
	if f != fmtQcow2 {
		return nil, nil, errors.New("only qcow2 images can be served")
	}
	z, err := isZoned(file)
	if err != nil {
		return nil, nil, err
	}
	if z {
		d, err := zoned.Open(file, zoned.OpenOptions{ReadOnly: readOnly})
		if err != nil {
			return nil, nil, err
		}
		warnClamped(warn, d)
		return nbdattach.ZonedBackend{D: d}, d.Close, nil
	}
	im, err := qcow2.Open(file, qcow2.OpenOptions{ReadOnly: readOnly})
	if err != nil {
		return nil, nil, err
	}
	return nbdattach.ImageBackend{Img: im, RO: readOnly}, im.Close, nil
}

func listen(cfg serveConfig) (net.Listener, error) {
	if cfg.socket != "" {
		// qemu-nbd replaces a stale socket file rather than failing.
		if fi, err := os.Lstat(cfg.socket); err == nil && fi.Mode()&os.ModeSocket != 0 {
			os.Remove(cfg.socket)
		}
		return net.Listen("unix", cfg.socket)
	}
	port, bind := cfg.port, cfg.bind
	if port == "" {
		port = "10809"
	}
	if bind == "" {
		bind = "127.0.0.1"
	}
	return net.Listen("tcp", net.JoinHostPort(bind, port))
}

// activationListener returns the listening socket passed by systemd socket
// activation, or nil when there is none. As sd_listen_fds(3) does, it
// ignores the variables unless LISTEN_PID names this process, and unsets
// them so that they do not leak into children.
func activationListener() (net.Listener, error) {
	pid, fds := os.Getenv("LISTEN_PID"), os.Getenv("LISTEN_FDS")
	if pid == "" || fds == "" {
		return nil, nil
	}
	if pid != strconv.Itoa(os.Getpid()) {
		return nil, nil
	}
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	os.Unsetenv("LISTEN_FDNAMES")
	n, err := strconv.Atoi(fds)
	if err != nil || n < 1 {
		return nil, fmt.Errorf("socket activation: bad LISTEN_FDS %q", fds)
	}
	if n != 1 {
		return nil, fmt.Errorf("socket activation: LISTEN_FDS=%d, but only one socket is supported", n)
	}
	syscall.CloseOnExec(listenFDsStart)
	f := os.NewFile(listenFDsStart, "LISTEN_FD_3")
	defer f.Close() // FileListener works on a duplicate
	l, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("socket activation: fd %d: %w", listenFDsStart, err)
	}
	return l, nil
}

// serveListener enforces --shared like qemu-nbd: while N clients are
// connected it stops accepting, so further clients wait in the listen
// backlog until one leaves. It also tells the server when the last client
// has gone.
type serveListener struct {
	net.Listener
	slots     chan struct{} // nil: no limit
	done      chan struct{}
	closeOnce sync.Once
	idle      func() // called when the last connection closes; nil: persistent

	mu     sync.Mutex
	active int
	zero   *sync.Cond
}

func newServeListener(l net.Listener, shared int) *serveListener {
	sl := &serveListener{Listener: l, done: make(chan struct{})}
	if shared > 0 {
		sl.slots = make(chan struct{}, shared)
	}
	sl.zero = sync.NewCond(&sl.mu)
	return sl
}

func (l *serveListener) Accept() (net.Conn, error) {
	if l.slots != nil {
		select {
		case l.slots <- struct{}{}:
		case <-l.done:
			return nil, net.ErrClosed
		}
	}
	c, err := l.Listener.Accept()
	if err != nil {
		if l.slots != nil {
			<-l.slots
		}
		return nil, err
	}
	l.mu.Lock()
	l.active++
	l.mu.Unlock()
	return &serveConn{Conn: c, l: l}, nil
}

func (l *serveListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// release ends a connection's claim. The count drops before the slot is
// freed, so that a client leaving is seen as the last one even if another
// is accepted into its slot at once.
func (l *serveListener) release() {
	l.mu.Lock()
	l.active--
	last := l.active == 0
	if last {
		l.zero.Broadcast()
	}
	l.mu.Unlock()
	if last && l.idle != nil {
		l.idle()
	}
	if l.slots != nil {
		<-l.slots
	}
}

// wait returns once every accepted connection has been closed.
func (l *serveListener) wait() {
	l.mu.Lock()
	for l.active > 0 {
		l.zero.Wait()
	}
	l.mu.Unlock()
}

type serveConn struct {
	net.Conn
	l    *serveListener
	once sync.Once
}

// WriteBuffers lets the NBD server send a reply's header and data with one
// writev through the wrapper (nbdattach.BuffersWriter).
func (c *serveConn) WriteBuffers(b *net.Buffers) (int64, error) { return b.WriteTo(c.Conn) }

// SyscallConn exposes the socket under the wrapper, so that the NBD server
// can send READ data from the image file with sendfile.
func (c *serveConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("connection %T has no socket to hand over", c.Conn)
	}
	return sc.SyscallConn()
}

func (c *serveConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.l.release)
	return err
}

// lockedWriter serialises the messages of concurrent connections.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.w.Write(p)
}
