package nbdattach

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// transmitter runs the transmission phase of one connection. A single reader
// goroutine decodes requests (and WRITE payloads) in order; each request then
// runs on its own goroutine, at most `workers` at a time, and writes its reply
// under wmu once its I/O has finished, so replies may leave out of order
// (proto.md allows it: the handle pairs them up).
type transmitter struct {
	srv     *Server
	nc      net.Conn
	br      *bufio.Reader
	sess    *session
	cfg     *exportConfig
	backend Backend
	// size caches backend.Size(). Requests are checked on the reader
	// goroutine (WRITE) and on workers (the rest), and any of them may
	// refresh it after a resize, so it is only accessed atomically.
	size atomic.Uint64

	sem chan struct{} // one token per request in flight

	orderer  Orderer // nil unless the backend needs per-key ordering
	omu      sync.Mutex
	order    map[int64]chan struct{} // per key: closed when the last dispatched request finishes
	inflight sync.WaitGroup
	dirty    atomic.Bool // a write-type command succeeded since the last flush
	closing  atomic.Bool // shutdown began: keep the shutdown write deadline

	wmu  sync.Mutex
	werr error // first reply write error; guarded by wmu

	// direct and raw are set when READs can be answered with sendfile:
	// the backend maps its data onto a file and the connection is a
	// socket (direct.go).
	direct DirectReader
	raw    syscall.RawConn
}

func (s *Server) newTransmitter(c net.Conn, br *bufio.Reader, sess *session) *transmitter {
	t := &transmitter{
		srv:     s,
		nc:      c,
		br:      br,
		sess:    sess,
		cfg:     sess.cfg,
		backend: sess.cfg.backend,
		sem:     make(chan struct{}, s.workers),
		order:   map[int64]chan struct{}{},
	}
	t.size.Store(uint64(t.backend.Size()))
	t.orderer, _ = t.backend.(Orderer)
	if dr, ok := t.backend.(DirectReader); ok {
		if rc := rawConnOf(c); rc != nil {
			t.direct, t.raw = dr, rc
		}
	}
	return t
}

// run reads requests until NBD_CMD_DISC, end of stream, a protocol error or
// cancellation of ctx; then it waits for the requests in flight, flushes the
// backend if anything was written, and returns. The caller closes the conn.
func (t *transmitter) run(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() {
		// Stop reading new requests, and give in-flight replies a bounded
		// time to reach a client that may have stopped reading.
		t.closing.Store(true)
		t.nc.SetReadDeadline(time.Unix(1, 0))
		if t.srv.shutdownTimeout > 0 {
			t.nc.SetWriteDeadline(time.Now().Add(t.srv.shutdownTimeout))
		}
	})
	defer stop()

	var hdr [requestSize]byte
	var err error
	for {
		if _, err = io.ReadFull(t.br, hdr[:]); err != nil {
			break
		}
		var req request
		if req, err = decodeRequest(hdr[:]); err != nil {
			// Without a valid header the stream cannot be resynchronised.
			break
		}
		if req.typ == cmdDisc {
			break
		}
		if err = t.dispatch(req); err != nil {
			break
		}
	}
	switch {
	case ctx.Err() != nil:
		err = nil // shutdown: the read was interrupted on purpose
	case errors.Is(err, io.EOF):
		err = nil // the client closed between requests
	}
	t.inflight.Wait()
	if t.dirty.Load() {
		if ferr := t.backend.Flush(); ferr != nil && err == nil {
			err = fmt.Errorf("nbd: flush at disconnect: %w", ferr)
		}
	}
	t.wmu.Lock()
	werr := t.werr
	t.wmu.Unlock()
	if werr != nil {
		return werr
	}
	return err
}

// dispatch hands one request to a worker. WRITE payloads are read here, in
// stream order; a WRITE refused up front has its payload drained instead, so
// the stream stays in sync.
func (t *transmitter) dispatch(req request) error {
	var payload *buffer
	if req.typ == cmdWrite {
		if rerr := t.checkWrite(req); rerr != nil {
			// Drain in bufio-sized pieces: memory stays bounded whatever the
			// length, and the length itself is bounded by uint32.
			if _, err := io.CopyN(io.Discard, t.br, int64(req.length)); err != nil {
				return fmt.Errorf("nbd: draining refused write payload: %w", err)
			}
			t.replyError(req, rerr)
			return nil
		}
		t.sem <- struct{}{}
		payload = getBuffer(int(req.length))
		if _, err := io.ReadFull(t.br, payload.b); err != nil {
			payload.release()
			<-t.sem
			return fmt.Errorf("nbd: reading write payload: %w", err)
		}
	} else {
		t.sem <- struct{}{}
	}
	t.inflight.Add(1)
	prev, done := t.sequence(req)
	go func() {
		if prev != nil {
			<-prev
		}
		t.work(req, payload)
		if done != nil {
			t.omu.Lock()
			close(done)
			for k, c := range t.order {
				if c == done {
					delete(t.order, k)
				}
			}
			t.omu.Unlock()
		}
	}()
	return nil
}

// sequence chains a request behind the previous one with the same ordering
// key, when the backend asks for it (Orderer): writes to one sequential zone
// must be applied in the order they arrived, as a zoned device's zone write
// lock would. Called from the reader goroutine, so chains follow arrival.
func (t *transmitter) sequence(req request) (prev, done chan struct{}) {
	if t.orderer == nil {
		return nil, nil
	}
	switch req.typ {
	case cmdWrite, cmdWriteZeroes, cmdTrim:
	default:
		return nil, nil
	}
	key, ok := t.orderer.OrderKey(int64(req.offset), int64(req.length))
	if !ok {
		return nil, nil
	}
	done = make(chan struct{})
	t.omu.Lock()
	prev = t.order[key]
	t.order[key] = done
	t.omu.Unlock()
	return prev, done
}

func (t *transmitter) work(req request, payload *buffer) {
	defer func() {
		if r := recover(); r != nil {
			// A panicking backend must not take down every other export
			// served by this process; the client sees EIO.
			t.replyError(req, errorf(EIO, "internal error: %v", r))
		}
		payload.release()
		<-t.sem
		t.inflight.Done()
	}()
	switch req.typ {
	case cmdRead:
		t.read(req)
	case cmdWrite:
		// proto.md: a client SHOULD NOT send a zero-length request, and a
		// server SHOULD treat one as a no-op; a backend need not accept
		// one (the zone engine refuses a write of no blocks).
		var err error
		if req.length > 0 {
			_, err = t.backend.WriteAt(payload.b, int64(req.offset), req.flags&cmdFlagFUA != 0)
		}
		t.finishWrite(req, err)
	case cmdFlush:
		if rerr := t.checkFlags(req, cmdFlagFUA); rerr != nil {
			t.replyError(req, rerr)
			return
		}
		err := t.backend.Flush()
		t.reply(req, err)
	case cmdTrim:
		if rerr := t.check(req, cmdFlagFUA, true, EINVAL, false); rerr != nil {
			t.replyError(req, rerr)
			return
		}
		var err error
		if req.length > 0 {
			err = t.backend.Trim(int64(req.offset), int64(req.length))
		}
		if err == nil && req.flags&cmdFlagFUA != 0 {
			err = t.backend.Flush()
		}
		t.finishWrite(req, err)
	case cmdWriteZeroes:
		t.writeZeroes(req)
	case cmdCache:
		if rerr := t.check(req, cmdFlagFUA, false, EINVAL, false); rerr != nil {
			t.replyError(req, rerr)
			return
		}
		var err error
		if c, ok := t.backend.(Cacher); ok && req.length > 0 {
			err = c.Cache(int64(req.offset), int64(req.length))
		}
		t.reply(req, err)
	case cmdBlockStatus:
		t.blockStatus(req)
	default:
		// proto.md: EINVAL for an unknown command. A client must not send a
		// payload with a command the server did not advertise, so the
		// stream is still in sync.
		t.replyError(req, errorf(EINVAL, "unknown command %v", req.typ))
	}
}

// checkFlags refuses command flags that are not valid for the command.
func (t *transmitter) checkFlags(req request, allowed uint16) *replyError {
	if extra := req.flags &^ allowed; extra != 0 {
		return errorf(EINVAL, "flags 0x%x are not valid for %v", extra, req.typ)
	}
	return nil
}

// check validates flags, read-only state, bounds, alignment and (for
// payload-carrying commands) the length cap. oob is the error for a range
// beyond the export: proto.md asks for ENOSPC on writes, EINVAL otherwise.
func (t *transmitter) check(req request, allowed uint16, writes bool, oob Errno, capped bool) *replyError {
	if rerr := t.checkFlags(req, allowed); rerr != nil {
		return rerr
	}
	if writes && t.cfg.readOnly {
		return errorf(EPERM, "export is read-only")
	}
	end := req.offset + uint64(req.length)
	size := t.size.Load()
	if end > size && end >= req.offset {
		// The backend may have grown since the session began: a kernel
		// device resized with RECONFIGURE (NetlinkAttacher.Resize) asks
		// for the new blocks on the same connection. Concurrent refreshes
		// may store out of order; a stale value only costs another Size.
		size = uint64(t.backend.Size())
		t.size.Store(size)
	}
	if end < req.offset || end > size {
		return errorf(oob, "%v of %d bytes at offset %d is beyond the export size %d", req.typ, req.length, req.offset, size)
	}
	if capped && req.length > t.cfg.maxBlock {
		return errorf(EINVAL, "%v of %d bytes exceeds the maximum block size %d", req.typ, req.length, t.cfg.maxBlock)
	}
	// Enforce the advertised minimum block size. A request may end
	// unaligned exactly at the end of an export whose size is unaligned,
	// otherwise that tail could never be reached.
	mb := uint64(t.cfg.minBlock)
	if req.offset%mb != 0 || (uint64(req.length)%mb != 0 && end != size) {
		return errorf(EINVAL, "%v at %d+%d is not aligned to %d bytes", req.typ, req.offset, req.length, mb)
	}
	return nil
}

func (t *transmitter) checkWrite(req request) *replyError {
	return t.check(req, cmdFlagFUA, true, ENOSPC, true)
}

func (t *transmitter) finishWrite(req request, err error) {
	if err == nil {
		t.dirty.Store(true)
	}
	t.reply(req, err)
}

func (t *transmitter) read(req request) {
	allowed := cmdFlagFUA
	if t.sess.structured {
		// Every read is answered with a single data chunk, so "don't
		// fragment" costs nothing.
		allowed |= cmdFlagDF
	}
	if rerr := t.check(req, allowed, false, EINVAL, true); rerr != nil {
		t.replyError(req, rerr)
		return
	}
	if t.direct != nil && req.length >= directMin && t.readDirect(req) {
		return
	}
	buf := getBuffer(int(req.length))
	defer buf.release()
	n, err := t.backend.ReadAt(buf.b, int64(req.offset))
	if n == len(buf.b) && errors.Is(err, io.EOF) {
		err = nil
	}
	if err == nil && n != len(buf.b) {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		t.replyBackendError(req, err)
		return
	}
	if !t.sess.structured {
		var h [simpleReplySize]byte
		simpleReply{handle: req.handle}.encode(h[:])
		t.send(h[:], buf.b)
		return
	}
	if req.length == 0 {
		t.sendNone(req)
		return
	}
	var h [structuredHeaderSize + 8]byte
	chunkHeader{flags: replyFlagDone, typ: replyTypeOffsetData, handle: req.handle, length: 8 + req.length}.encode(h[:])
	binary.BigEndian.PutUint64(h[structuredHeaderSize:], req.offset)
	t.send(h[:], buf.b)
}

func (t *transmitter) writeZeroes(req request) {
	allowed := cmdFlagFUA | cmdFlagNoHole
	if t.sess.flags&FlagSendFastZero != 0 {
		allowed |= cmdFlagFastZero
	}
	if rerr := t.check(req, allowed, true, ENOSPC, false); rerr != nil {
		t.replyError(req, rerr)
		return
	}
	off, length := int64(req.offset), int64(req.length)
	noHole := req.flags&cmdFlagNoHole != 0
	if req.flags&cmdFlagFastZero != 0 {
		// proto.md: fail fast with ENOTSUP unless zeroing is known to be
		// quicker than writing; the export must be left untouched.
		fz, ok := t.backend.(FastZeroer)
		if !ok || !fz.CanFastZero(off, length, noHole) {
			t.replyError(req, errorf(ENOTSUP, "fast zero is not available for this range"))
			return
		}
	}
	var err error
	if length > 0 {
		err = t.backend.WriteZeroes(off, length, noHole)
	}
	if err == nil && req.flags&cmdFlagFUA != 0 {
		err = t.backend.Flush()
	}
	t.finishWrite(req, err)
}

// maxDescriptors bounds one block status chunk (8 bytes each).
const maxDescriptors = 1 << 14

func (t *transmitter) blockStatus(req request) {
	if !t.sess.structured || len(t.sess.contexts) == 0 {
		// proto.md: EINVAL when no metadata context was negotiated.
		t.replyError(req, errorf(EINVAL, "no metadata context was negotiated"))
		return
	}
	if rerr := t.check(req, cmdFlagFUA|cmdFlagReqOne, false, EINVAL, false); rerr != nil {
		t.replyError(req, rerr)
		return
	}
	if req.length == 0 {
		t.replyError(req, errorf(EINVAL, "block status of 0 bytes"))
		return
	}
	bs, _ := t.backend.(BlockStatuser)
	var out []byte
	for i, mc := range t.sess.contexts {
		var ext []Extent
		if bs != nil {
			var err error
			ext, err = bs.BlockStatus(mc.name, int64(req.offset), int64(req.length))
			if err != nil {
				t.replyBackendError(req, err)
				return
			}
		}
		desc := t.descriptors(mc.name, req, ext)
		flags := uint16(0)
		if i == len(t.sess.contexts)-1 {
			flags = replyFlagDone
		}
		var h [structuredHeaderSize]byte
		chunkHeader{flags: flags, typ: replyTypeBlockStatus, handle: req.handle, length: uint32(4 + 8*len(desc))}.encode(h[:])
		out = append(out, h[:]...)
		out = binary.BigEndian.AppendUint32(out, mc.id)
		for _, d := range desc {
			out = binary.BigEndian.AppendUint32(out, uint32(d.Length))
			out = binary.BigEndian.AppendUint32(out, d.Flags)
		}
	}
	t.send(out)
}

// descriptors turns backend extents into what proto.md allows on the wire:
// at least one descriptor, none empty, together no longer than the request,
// each length a multiple of the minimum block size (except at an unaligned
// export end) and below 4 GiB, neighbours with different flags, and only one
// with NBD_CMD_FLAG_REQ_ONE. Backends should return aligned extents; at the
// first boundary that is not aligned the list is cut short (the client asks
// again from there).
func (t *transmitter) descriptors(ctxName string, req request, ext []Extent) []Extent {
	mb := int64(t.cfg.minBlock)
	reqEnd := int64(req.offset) + int64(req.length)
	maxLen := int64(0xFFFFFFFF) / mb * mb
	pos := int64(req.offset)
	var out []Extent
	for _, e := range ext {
		if e.Length <= 0 || pos >= reqEnd || len(out) >= maxDescriptors {
			break
		}
		end := pos + min(e.Length, reqEnd-pos)
		cut := false
		if end%mb != 0 && end != reqEnd {
			end = end / mb * mb
			cut = true
		}
		for pos < end {
			l := min(end-pos, maxLen)
			// Neighbours with equal flags merge for base:allocation only:
			// in other contexts a boundary may carry meaning (zq:zones
			// keeps one extent per zone side).
			if n := len(out); n > 0 && ctxName == BaseAllocation && out[n-1].Flags == e.Flags && out[n-1].Length+l <= maxLen {
				out[n-1].Length += l
			} else {
				out = append(out, Extent{Length: l, Flags: e.Flags})
			}
			pos += l
		}
		if cut {
			break
		}
	}
	if len(out) == 0 {
		// Nothing usable: describe the first block with status 0, which
		// proto.md says is always safe for base:allocation. Other contexts
		// get the backend's first flags, if any.
		var flags uint32
		if ctxName != BaseAllocation && len(ext) > 0 {
			flags = ext[0].Flags
		}
		out = append(out, Extent{Length: min(mb, int64(req.length)), Flags: flags})
	}
	if req.flags&cmdFlagReqOne != 0 {
		out = out[:1]
	}
	return out
}

// reply answers a command without payload: success, or the backend's error.
func (t *transmitter) reply(req request, err error) {
	if err != nil {
		t.replyBackendError(req, err)
		return
	}
	var h [simpleReplySize]byte
	simpleReply{handle: req.handle}.encode(h[:])
	t.send(h[:])
}

func (t *transmitter) replyBackendError(req request, err error) {
	errno := t.srv.mapErr(err)
	if errno == 0 {
		errno = EIO
	}
	t.replyError(req, &replyError{errno: errno, msg: err.Error()})
}

// replyError sends an error: a structured error chunk (with the message)
// when structured replies were negotiated, a simple reply otherwise.
func (t *transmitter) replyError(req request, rerr *replyError) {
	if !t.sess.structured {
		var h [simpleReplySize]byte
		simpleReply{errno: rerr.errno, handle: req.handle}.encode(h[:])
		t.send(h[:])
		return
	}
	msg := rerr.msg
	if len(msg) > maxErrorMessage {
		msg = msg[:maxErrorMessage]
	}
	b := make([]byte, structuredHeaderSize, structuredHeaderSize+6+len(msg))
	chunkHeader{flags: replyFlagDone, typ: replyTypeError, handle: req.handle, length: uint32(6 + len(msg))}.encode(b)
	b = binary.BigEndian.AppendUint32(b, uint32(rerr.errno))
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	b = append(b, msg...)
	t.send(b)
}

func (t *transmitter) sendNone(req request) {
	var h [structuredHeaderSize]byte
	chunkHeader{flags: replyFlagDone, typ: replyTypeNone, handle: req.handle}.encode(h[:])
	t.send(h[:])
}

// BuffersWriter is implemented by a connection that writes several buffers
// with one system call. *net.UnixConn and *net.TCPConn do so through
// net.Buffers (writev), but a wrapper that embeds net.Conn hides that, and
// each reply would then cost one write per buffer: a wrapper passed to
// Serve or ServeConn should implement BuffersWriter as b.WriteTo(inner).
type BuffersWriter interface {
	WriteBuffers(b *net.Buffers) (int64, error)
}

// coalesceMax bounds the replies that are copied into one buffer when the
// connection cannot writev: below it a copy is cheaper than a second system
// call (and the client gets the reply in one piece).
const coalesceMax = 64 << 10

// send writes one complete reply (header and payload with a single writev)
// under the write lock. After a write error the connection is closed, which
// also stops the reader; later replies are dropped.
func (t *transmitter) send(bufs ...[]byte) {
	t.wmu.Lock()
	defer t.wmu.Unlock()
	if t.werr != nil {
		return
	}
	if d := t.srv.writeTimeout; d > 0 && !t.closing.Load() {
		t.nc.SetWriteDeadline(time.Now().Add(d))
	}
	var err error
	switch c := t.nc.(type) {
	case BuffersWriter:
		nb := net.Buffers(bufs)
		_, err = c.WriteBuffers(&nb)
	case *net.UnixConn, *net.TCPConn:
		nb := net.Buffers(bufs)
		_, err = nb.WriteTo(c)
	default:
		err = t.writeCoalesced(bufs)
	}
	if err != nil {
		t.werr = fmt.Errorf("nbd: writing reply: %w", err)
		t.nc.Close()
	}
}

// writeCoalesced writes bufs to a connection of unknown kind: a short reply
// in one write, a long one with one write per buffer.
func (t *transmitter) writeCoalesced(bufs [][]byte) error {
	n := 0
	for _, b := range bufs {
		n += len(b)
	}
	if len(bufs) > 1 && n <= coalesceMax {
		buf := getBuffer(n)
		defer buf.release()
		p := buf.b[:0]
		for _, b := range bufs {
			p = append(p, b...)
		}
		_, err := t.nc.Write(p)
		return err
	}
	nb := net.Buffers(bufs)
	_, err := nb.WriteTo(t.nc)
	return err
}
