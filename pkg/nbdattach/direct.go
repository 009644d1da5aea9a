package nbdattach

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

// Direct reads. A READ reply is normally the data read into a buffer, then
// written to the socket: two copies (page cache to buffer, buffer to
// socket). When the backend can say where the data lies in a file
// (DirectReader) and the connection is a socket the server can reach
// (syscall.Conn), the reply header is written and the data goes from the
// file to the socket with sendfile(2), one copy fewer.
//
// Two consequences of the kernel taking page cache pages by reference
// (TCP, and AF_UNIX since Linux 6.5 splice pages into the socket):
//   - the receiver copies straight from the page cache, from memory the
//     server has not touched: the server's CPU per GiB about halves, but
//     part of that cost moves to the client (bench/nbd.sh, fio 1 MiB qd4:
//     fio's CPU per GiB rose from ~230 to ~440 ms), so a single-threaded
//     client on a busy machine may see less throughput, not more.
//   - pages sit in the socket until the client reads them, after the
//     mapping is released: a cluster that a concurrent TRIM frees and a
//     WRITE elsewhere reuses before then can show that write's data in the
//     reply of a READ that raced with both.

// DirectReader is implemented by backends whose data can be sent from a
// file. ReadDirect maps [off, off+length) onto extents of f (zero extents
// read as zeros; f may be nil when every extent is zero) and calls fn while
// that mapping is held valid. It returns an error wrapping
// qcow2.ErrNotDirect, without calling fn, when part of the range is not in
// the file as it is (compressed, from a backing file): the server then uses
// ReadAt. fn's own error is returned unchanged.
type DirectReader interface {
	ReadDirect(off, length int64, fn func(f *os.File, ext []qcow2.DirectExtent) error) error
}

// directMin is the shortest READ sent with sendfile. Below it the copy
// through a buffer costs less than the extra system calls (header write,
// fstat, sendfile per extent) and the header and data leave in one writev
// (BenchmarkNBDReadImage compares the two). A variable for the benchmark.
var directMin uint32 = 64 << 10

// directReplies counts READ replies sent with sendfile, for tests.
var directReplies atomic.Int64

// rawConnOf returns the socket under c when c exposes one: *net.UnixConn
// and *net.TCPConn do, and so does a wrapper that implements syscall.Conn
// by delegating to the connection it wraps.
func rawConnOf(c net.Conn) syscall.RawConn {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

// zeroes is the source of the zero extents of a direct reply.
var zeroes = make([]byte, 256<<10)

// readDirect answers req with sendfile when the backend maps the range
// onto its file. It reports false, having sent nothing, when the caller
// must answer through ReadAt instead.
//
// The backend holds its mapping (region locks) only while data moves
// without blocking: when the socket is full the mapping is released, the
// poller waits for room, and the rest of the range is mapped again. So a
// client that stops reading holds up its own connection only, not writers
// to the same clusters through other connections.
func (t *transmitter) readDirect(req request) bool {
	var hdr []byte
	var sh [simpleReplySize]byte
	var ch [structuredHeaderSize + 8]byte
	if t.sess.structured {
		chunkHeader{flags: replyFlagDone, typ: replyTypeOffsetData, handle: req.handle, length: 8 + req.length}.encode(ch[:])
		binary.BigEndian.PutUint64(ch[structuredHeaderSize:], req.offset)
		hdr = ch[:]
	} else {
		simpleReply{handle: req.handle}.encode(sh[:])
		hdr = sh[:]
	}
	handled, err := t.sendDirectReply(req, hdr)
	if err != nil {
		t.replyBackendError(req, err) // nothing was sent
	}
	return handled
}

// errShortFile: the mapping reaches past the end of the image file.
var errShortFile = errors.New("image file shorter than its mapping")

// sendDirectReply does readDirect's work under the reply lock. A non-nil
// error is the backend's, before anything was sent: the caller answers
// it (after the lock is released).
func (t *transmitter) sendDirectReply(req request, hdr []byte) (bool, error) {
	t.wmu.Lock()
	defer t.wmu.Unlock()
	if t.werr != nil {
		return true, nil // the connection is gone; the reply is dropped
	}
	if d := t.srv.writeTimeout; d > 0 && !t.closing.Load() {
		t.nc.SetWriteDeadline(time.Now().Add(d))
	}
	broken := func(err error) (bool, error) {
		// Part of the reply may have gone out: the stream cannot be
		// resynchronised.
		t.werr = fmt.Errorf("nbd: writing reply: %w", err)
		t.nc.Close()
		return true, nil
	}
	off, end := int64(req.offset), int64(req.offset)+int64(req.length)
	for first := true; ; first = false {
		var (
			sent    int64
			blocked bool
			serr    error
		)
		err := t.direct.ReadDirect(off, end-off, func(f *os.File, ext []qcow2.DirectExtent) error {
			if first && f != nil {
				// A mapping past the end of the file (a damaged image)
				// is refused before the header leaves, so ReadAt can
				// answer it with an error instead of a broken stream.
				st, err := f.Stat()
				if err != nil {
					return err
				}
				for _, x := range ext {
					if !x.Zero && x.HostOffset+x.Length > st.Size() {
						return errShortFile
					}
				}
			}
			sent, blocked, serr = sendSome(t.raw, &hdr, f, ext)
			return nil
		})
		switch {
		case err != nil && first:
			if errors.Is(err, qcow2.ErrNotDirect) || errors.Is(err, errShortFile) {
				return false, nil
			}
			return true, err
		case errors.Is(err, qcow2.ErrNotDirect):
			// The rest stopped being a plain mapping while the socket
			// was full (a rewrite of a zoned range, say): copy it.
			if err := t.sendRest(hdr, off, end-off); err != nil {
				return broken(err)
			}
			directReplies.Add(1)
			return true, nil
		case err != nil:
			return broken(err)
		case serr != nil:
			return broken(serr)
		}
		off += sent
		if off == end && len(hdr) == 0 {
			directReplies.Add(1)
			return true, nil
		}
		if blocked {
			if err := waitWritable(t.raw); err != nil {
				return broken(err)
			}
		}
	}
}

// sendRest writes what is left of the header and the range [off, off+n)
// read through the backend.
func (t *transmitter) sendRest(hdr []byte, off, n int64) error {
	buf := getBuffer(int(n))
	defer buf.release()
	if k, err := t.backend.ReadAt(buf.b, off); k != len(buf.b) {
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		return err
	}
	nb := net.Buffers{hdr, buf.b}
	_, err := nb.WriteTo(t.nc)
	return err
}

// waitWritable waits, through the runtime poller, until the socket has
// room again (or its write deadline passes). RawConn.Write forgets a
// readiness event that came before it was called (the socket may have
// drained since the EAGAIN), and the poller is edge-triggered, so the
// socket is polled first: wait only when it is still full.
func waitWritable(rc syscall.RawConn) error {
	return rc.Write(func(fd uintptr) bool {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		n, err := unix.Poll(p, 0)
		return err != nil || n > 0 // on an error the next send reports it
	})
}

// sendSome writes what is left of *hdr, then the extents (data with
// sendfile from f, zero extents from a zero buffer) until they are all
// sent or the socket is full, without waiting. It returns the extent bytes
// sent and whether it stopped because the socket was full.
func sendSome(rc syscall.RawConn, hdr *[]byte, f *os.File, ext []qcow2.DirectExtent) (sent int64, blocked bool, err error) {
	var ffd int
	if f != nil {
		// f.Fd would switch the file to blocking mode; the raw descriptor
		// serves the same purpose without that.
		frc, err := f.SyscallConn()
		if err != nil {
			return 0, false, err
		}
		if cerr := frc.Control(func(fd uintptr) { ffd = int(fd) }); cerr != nil {
			return 0, false, cerr
		}
	}
	cerr := rc.Write(func(fd uintptr) bool {
		sfd := int(fd)
		// retry says what a failed send means: EINTR, send again; EAGAIN,
		// the socket is full (blocked); anything else ends the reply.
		retry := func(e error) bool {
			switch e {
			case unix.EINTR:
				return true
			case unix.EAGAIN:
				blocked = true
			default:
				err = e
			}
			return false
		}
		for len(*hdr) > 0 {
			// MSG_MORE: the data follows at once; a TCP socket need not
			// send the header in a packet of its own.
			n, e := unix.SendmsgN(sfd, *hdr, nil, nil, unix.MSG_MORE|unix.MSG_NOSIGNAL)
			if e != nil {
				if retry(e) {
					continue
				}
				return true
			}
			*hdr = (*hdr)[n:]
		}
		var done int64 // bytes of ext[0] sent
		for len(ext) > 0 {
			x := ext[0]
			left := x.Length - done
			if left == 0 {
				ext, done = ext[1:], 0
				continue
			}
			var n int
			var e error
			if x.Zero {
				n, e = unix.Write(sfd, zeroes[:min(left, int64(len(zeroes)))])
			} else {
				off := x.HostOffset + done
				n, e = unix.Sendfile(sfd, ffd, &off, int(min(left, 1<<30)))
			}
			if e != nil {
				if retry(e) {
					continue
				}
				return true
			}
			if n == 0 {
				err = io.ErrUnexpectedEOF // the file ended under the mapping
				return true
			}
			done += int64(n)
			sent += int64(n)
		}
		return true
	})
	if cerr != nil {
		return sent, false, cerr
	}
	return sent, blocked, err
}
