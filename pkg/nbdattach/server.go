package nbdattach

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"time"
)

// ExportSource resolves export names during the handshake. Lookup("") asks
// for the default export. Implementations must be safe for concurrent use.
type ExportSource interface {
	Lookup(name string) (*Export, bool)
	// Names lists the exports for NBD_OPT_LIST.
	Names() []string
}

// ExportList is a fixed ExportSource. The default export ("") is the export
// named "" or, when the list holds exactly one export, that export.
type ExportList []*Export

// Lookup implements ExportSource.
func (l ExportList) Lookup(name string) (*Export, bool) {
	for _, e := range l {
		if e.Name == name {
			return e, true
		}
	}
	if name == "" && len(l) == 1 {
		return l[0], true
	}
	return nil, false
}

// Names implements ExportSource.
func (l ExportList) Names() []string {
	names := make([]string, len(l))
	for i, e := range l {
		names[i] = e.Name
	}
	return names
}

// ExportFunc adapts a lookup function (for example, by volume ID) to an
// ExportSource that lists no exports.
type ExportFunc func(name string) (*Export, bool)

// Lookup implements ExportSource.
func (f ExportFunc) Lookup(name string) (*Export, bool) { return f(name) }

// Names implements ExportSource: an ExportFunc cannot enumerate.
func (f ExportFunc) Names() []string { return nil }

// Server serves exports over NBD. One Server may serve many connections at
// once; each connection gets its own goroutines, so a stalled client holds
// up nobody but itself.
type Server struct {
	exports          ExportSource
	mapErr           ErrorMapper
	workers          int
	handshakeTimeout time.Duration
	writeTimeout     time.Duration
	shutdownTimeout  time.Duration
	connErr          func(net.Conn, error)
}

// Option configures a Server.
type Option func(*Server)

// WithErrorMapper replaces DefaultErrorMapper.
func WithErrorMapper(m ErrorMapper) Option { return func(s *Server) { s.mapErr = m } }

// WithWorkers sets how many requests of one connection may be in flight at
// once (default 16). With the default 32 MiB MaxPayload a connection then
// holds at most 16 × 32 MiB of payload buffers.
func WithWorkers(n int) Option { return func(s *Server) { s.workers = max(1, n) } }

// WithHandshakeTimeout bounds the whole option negotiation (default 30 s), so
// a client that connects and says nothing does not hold a goroutine forever.
func WithHandshakeTimeout(d time.Duration) Option { return func(s *Server) { s.handshakeTimeout = d } }

// WithWriteTimeout bounds each reply write (default: none). A client that
// stops reading its replies then loses its connection instead of stalling
// its own requests indefinitely.
func WithWriteTimeout(d time.Duration) Option { return func(s *Server) { s.writeTimeout = d } }

// WithShutdownTimeout bounds how long, after the context is cancelled, replies
// of in-flight requests may take to reach the client (default 10 s).
func WithShutdownTimeout(d time.Duration) Option { return func(s *Server) { s.shutdownTimeout = d } }

// WithConnErrorHandler receives the error that ended a connection accepted by
// Serve (nil-error endings are not reported). The package itself never logs.
func WithConnErrorHandler(f func(net.Conn, error)) Option { return func(s *Server) { s.connErr = f } }

// NewServer returns a server for the exports.
func NewServer(exports ExportSource, opts ...Option) *Server {
	s := &Server{
		exports:          exports,
		mapErr:           DefaultErrorMapper,
		workers:          16,
		handshakeTimeout: 30 * time.Second,
		shutdownTimeout:  10 * time.Second,
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

// Serve accepts connections until ctx is cancelled or the listener fails.
// On cancellation it closes the listener, lets every connection finish its
// in-flight requests, flush and close, and returns nil once all are done.
// On a listener error it returns that error at once; connections already
// accepted keep running until ctx is cancelled.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	var wg sync.WaitGroup
	var delay time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				wg.Wait()
				return nil
			}
			if temporaryAcceptError(err) {
				// Back off as net/http does rather than spin or give up.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				time.Sleep(delay)
				continue
			}
			return err
		}
		delay = 0
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.ServeConn(ctx, c); err != nil && s.connErr != nil {
				s.connErr(c, err)
			}
		}()
	}
}

func temporaryAcceptError(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM) ||
		errors.Is(err, syscall.ECONNABORTED)
}

// ServeConn runs the handshake and then the transmission phase on one
// connection, and closes it. It returns nil when the client ends the session
// properly (NBD_OPT_ABORT, NBD_CMD_DISC, or closing between requests) or when
// ctx is cancelled, after in-flight requests finished.
func (s *Server) ServeConn(ctx context.Context, c net.Conn) error {
	defer c.Close()
	br := bufio.NewReaderSize(c, readBufferSize)
	sess, err := s.handshake(ctx, c, br)
	if err != nil || sess == nil {
		return err
	}
	t := s.newTransmitter(c, br, sess)
	return t.run(ctx)
}

// ServeTransmission serves the transmission phase only, for a socket whose
// other end is the kernel NBD driver: the kernel does no handshake and speaks
// simple replies only. flags are the transmission flags the kernel was given
// (normally exp.Flags()); NBD_FLAG_READ_ONLY among them makes the export
// read-only. The caller must also give the kernel a block size of at least
// the export's minimum block size and a maximum request size of at most its
// MaxPayload, or the kernel's requests will be refused with EINVAL. It
// closes conn before returning.
func (s *Server) ServeTransmission(ctx context.Context, conn net.Conn, exp *Export, flags TransmissionFlags) error {
	defer conn.Close()
	cfg, err := exp.config()
	if err != nil {
		return err
	}
	supported := cfg.flags(false) | FlagReadOnly | FlagRotational | FlagCanMultiConn
	if flags&FlagHasFlags == 0 || flags&^supported != 0 {
		return fmt.Errorf("nbd: transmission flags %v: not offered by export %q (%v)", flags, exp.Name, supported)
	}
	if flags&FlagReadOnly != 0 {
		cfg.readOnly = true
	}
	sess := &session{cfg: cfg, flags: flags}
	t := s.newTransmitter(conn, bufio.NewReaderSize(conn, readBufferSize), sess)
	return t.run(ctx)
}

// readBufferSize is the per-connection read buffer. Request headers are 28
// bytes; payloads larger than the buffer are read straight into their own
// buffer by bufio, so this only batches headers and small writes.
const readBufferSize = 64 << 10
