package nbdattach

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"
)

// metaContext is a metadata context selected with NBD_OPT_SET_META_CONTEXT.
type metaContext struct {
	id   uint32
	name string
}

// session is what the handshake hands to the transmission phase.
type session struct {
	cfg        *exportConfig
	flags      TransmissionFlags
	structured bool
	contexts   []metaContext
}

// maxOptionData bounds the option data the server buffers. The largest
// legitimate option is NBD_OPT_SET_META_CONTEXT with a handful of queries of
// at most 4096 bytes each; anything larger is drained and refused with
// NBD_REP_ERR_TOO_BIG (the handshake deadline bounds the draining).
const maxOptionData = 64 << 10

var errExportNotFound = errors.New("nbd: no such export")

// handshake runs the fixed newstyle negotiation. It returns a nil session
// and nil error when the client aborted or ctx was cancelled.
func (s *Server) handshake(ctx context.Context, c net.Conn, br *bufio.Reader) (*session, error) {
	if s.handshakeTimeout > 0 {
		c.SetDeadline(time.Now().Add(s.handshakeTimeout))
	}
	// Cancellation unblocks the reads by moving the deadline into the past.
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	n := &negotiator{srv: s, br: br, bw: bufio.NewWriterSize(c, 4096)}
	sess, err := n.run()
	stop()
	if ctx.Err() != nil {
		return nil, nil
	}
	c.SetDeadline(time.Time{})
	return sess, err
}

type negotiator struct {
	srv        *Server
	br         *bufio.Reader
	bw         *bufio.Writer
	noZeroes   bool
	structured bool
	metaExport *Export // export the contexts below were selected for
	contexts   []metaContext
}

func (n *negotiator) run() (*session, error) {
	var greet [18]byte
	binary.BigEndian.PutUint64(greet[0:8], nbdMagic)
	binary.BigEndian.PutUint64(greet[8:16], ihaveOptMagic)
	binary.BigEndian.PutUint16(greet[16:18], flagFixedNewstyle|flagNoZeroes)
	n.bw.Write(greet[:])
	if err := n.bw.Flush(); err != nil {
		return nil, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(n.br, cf[:]); err != nil {
		return nil, fmt.Errorf("nbd: reading client flags: %w", err)
	}
	clientFlags := binary.BigEndian.Uint32(cf[:])
	if clientFlags&^clientFlagsKnown != 0 {
		// proto.md: the server MUST drop the connection on unknown client flags.
		return nil, fmt.Errorf("nbd: unknown client flags 0x%x", clientFlags)
	}
	// A client without NBD_FLAG_C_FIXED_NEWSTYLE is served fixed newstyle
	// anyway, which proto.md allows; it can only send EXPORT_NAME sensibly.
	n.noZeroes = clientFlags&clientFlagNoZeroes != 0

	var hb [optionHeaderSize]byte
	for {
		if _, err := io.ReadFull(n.br, hb[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil, nil // client left without a word: nothing to clean up
			}
			return nil, fmt.Errorf("nbd: reading option: %w", err)
		}
		h, err := decodeOptionHeader(hb[:])
		if err != nil {
			return nil, err
		}
		if h.length > maxOptionData {
			if h.option == optExportName {
				return nil, fmt.Errorf("nbd: export name of %d bytes", h.length)
			}
			if _, err := io.CopyN(io.Discard, n.br, int64(h.length)); err != nil {
				return nil, fmt.Errorf("nbd: draining option %s: %w", optName(h.option), err)
			}
			if err := n.replyErr(h.option, repErrTooBig, "option data of %d bytes is too large", h.length); err != nil {
				return nil, err
			}
			continue
		}
		data := make([]byte, h.length)
		if _, err := io.ReadFull(n.br, data); err != nil {
			return nil, fmt.Errorf("nbd: reading option %s data: %w", optName(h.option), err)
		}
		sess, done, err := n.option(h.option, data)
		if err != nil || done {
			return sess, err
		}
	}
}

// option handles one option. done reports that negotiation is over, with a
// session (transmission follows) or without one (the client aborted).
func (n *negotiator) option(opt uint32, data []byte) (sess *session, done bool, err error) {
	switch opt {
	case optExportName:
		sess, err := n.exportName(data)
		return sess, true, err
	case optAbort:
		// proto.md: reply ACK, but tolerate a client that has already gone.
		n.reply(opt, repAck, nil)
		return nil, true, nil
	case optList:
		return nil, false, n.list(data)
	case optStartTLS:
		if len(data) != 0 {
			return nil, false, n.replyErr(opt, repErrInvalid, "STARTTLS takes no data")
		}
		return nil, false, n.replyErr(opt, repErrUnsup, "TLS is not supported by this server")
	case optInfo, optGo:
		return n.infoGo(opt, data)
	case optStructuredReply:
		if len(data) != 0 {
			return nil, false, n.replyErr(opt, repErrInvalid, "STRUCTURED_REPLY takes no data")
		}
		n.structured = true
		return nil, false, n.reply(opt, repAck, nil)
	case optListMetaContext, optSetMetaContext:
		return nil, false, n.metaContext(opt, data)
	}
	return nil, false, n.replyErr(opt, repErrUnsup, "option %s is not supported", optName(opt))
}

// reply writes one option reply and flushes it.
func (n *negotiator) reply(opt, typ uint32, payload []byte) error {
	var hb [optReplyHeaderSize]byte
	optReplyHeader{option: opt, typ: typ, length: uint32(len(payload))}.encode(hb[:])
	n.bw.Write(hb[:])
	n.bw.Write(payload)
	return n.bw.Flush()
}

func (n *negotiator) replyErr(opt, typ uint32, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if len(msg) > maxErrorMessage {
		msg = msg[:maxErrorMessage]
	}
	return n.reply(opt, typ, []byte(msg))
}

func (n *negotiator) lookup(name string) (*Export, *exportConfig, error) {
	exp, ok := n.srv.exports.Lookup(name)
	if !ok {
		return nil, nil, fmt.Errorf("%w %q", errExportNotFound, name)
	}
	cfg, err := exp.config()
	if err != nil {
		return nil, nil, err
	}
	return exp, cfg, nil
}

func (n *negotiator) session(exp *Export, cfg *exportConfig) *session {
	sess := &session{cfg: cfg, flags: cfg.flags(n.structured), structured: n.structured}
	// Contexts count only when selected for the export actually chosen
	// (proto.md, NBD_OPT_SET_META_CONTEXT).
	if n.structured && n.metaExport == exp {
		sess.contexts = n.contexts
	}
	return sess
}

func (n *negotiator) exportName(data []byte) (*session, error) {
	if len(data) > maxStringLen {
		return nil, fmt.Errorf("nbd: export name of %d bytes", len(data))
	}
	exp, cfg, err := n.lookup(string(data))
	if err != nil {
		// EXPORT_NAME cannot fail politely: proto.md says terminate.
		return nil, err
	}
	sess := n.session(exp, cfg)
	var b [8 + 2 + exportNameZeroes]byte
	binary.BigEndian.PutUint64(b[0:8], uint64(cfg.backend.Size()))
	binary.BigEndian.PutUint16(b[8:10], uint16(sess.flags))
	out := b[:]
	if n.noZeroes {
		out = b[:10]
	}
	n.bw.Write(out)
	if err := n.bw.Flush(); err != nil {
		return nil, err
	}
	return sess, nil
}

func (n *negotiator) list(data []byte) error {
	if len(data) != 0 {
		return n.replyErr(optList, repErrInvalid, "LIST takes no data")
	}
	for _, name := range n.srv.exports.Names() {
		exp, ok := n.srv.exports.Lookup(name)
		if !ok {
			continue
		}
		p := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
		p = append(p, name...)
		p = append(p, exp.Description...)
		if err := n.reply(optList, repServer, p); err != nil {
			return err
		}
	}
	return n.reply(optList, repAck, nil)
}

// infoGo answers NBD_OPT_INFO and NBD_OPT_GO, which share their format.
func (n *negotiator) infoGo(opt uint32, data []byte) (*session, bool, error) {
	r := optReader{b: data}
	nameLen := r.u32()
	if nameLen > maxStringLen {
		return nil, false, n.replyErr(opt, repErrInvalid, "export name of %d bytes", nameLen)
	}
	name := r.str(nameLen)
	nreq := r.u16()
	var wantName, wantDesc bool
	for i := 0; i < int(nreq) && r.err == nil; i++ {
		switch r.u16() {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}
	if err := r.done(); err != nil {
		return nil, false, n.replyErr(opt, repErrInvalid, "%s: %v", optName(opt), err)
	}
	exp, cfg, err := n.lookup(name)
	if err != nil {
		return nil, false, n.replyErr(opt, repErrUnknown, "%v", err)
	}
	sess := n.session(exp, cfg)

	info := make([]byte, 0, 64)
	info = binary.BigEndian.AppendUint16(info, infoExport)
	info = binary.BigEndian.AppendUint64(info, uint64(cfg.backend.Size()))
	info = binary.BigEndian.AppendUint16(info, uint16(sess.flags))
	if err := n.reply(opt, repInfo, info); err != nil {
		return nil, false, err
	}
	if wantName {
		info = binary.BigEndian.AppendUint16(info[:0], infoName)
		info = append(info, exp.Name...)
		if err := n.reply(opt, repInfo, info); err != nil {
			return nil, false, err
		}
	}
	if wantDesc && exp.Description != "" {
		info = binary.BigEndian.AppendUint16(info[:0], infoDescription)
		info = append(info, exp.Description...)
		if err := n.reply(opt, repInfo, info); err != nil {
			return nil, false, err
		}
	}
	// Block sizes go out unasked too: clients ignore what they did not ask
	// for, and the kernel-facing caller reads the same values from Export.
	info = binary.BigEndian.AppendUint16(info[:0], infoBlockSize)
	info = binary.BigEndian.AppendUint32(info, cfg.minBlock)
	info = binary.BigEndian.AppendUint32(info, cfg.prefBlock)
	info = binary.BigEndian.AppendUint32(info, cfg.maxBlock)
	if err := n.reply(opt, repInfo, info); err != nil {
		return nil, false, err
	}
	if err := n.reply(opt, repAck, nil); err != nil {
		return nil, false, err
	}
	if opt == optGo {
		return sess, true, nil
	}
	return nil, false, nil
}

// metaContext answers NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
//
// Query syntax (proto.md leaves it to the server for non-base namespaces):
// a full context name selects or lists that context; "ns:" (empty leaf)
// lists every context of namespace ns and selects nothing. Queries for
// unknown namespaces or leaves are ignored, as proto.md requires.
func (n *negotiator) metaContext(opt uint32, data []byte) error {
	set := opt == optSetMetaContext
	if set {
		// SET replaces the selection even when it fails.
		n.metaExport, n.contexts = nil, nil
		if !n.structured {
			return n.replyErr(opt, repErrInvalid, "SET_META_CONTEXT needs structured replies first")
		}
	}
	r := optReader{b: data}
	nameLen := r.u32()
	if nameLen > maxStringLen {
		return n.replyErr(opt, repErrInvalid, "export name of %d bytes", nameLen)
	}
	name := r.str(nameLen)
	nq := r.u32()
	var queries []string
	for i := uint32(0); i < nq && r.err == nil; i++ {
		ql := r.u32()
		if ql > maxStringLen {
			return n.replyErr(opt, repErrInvalid, "query of %d bytes", ql)
		}
		queries = append(queries, r.str(ql))
	}
	if err := r.done(); err != nil {
		return n.replyErr(opt, repErrInvalid, "%s: %v", optName(opt), err)
	}
	for _, q := range queries {
		if strings.IndexByte(q, ':') <= 0 {
			return n.replyErr(opt, repErrInvalid, "query %q does not start with a namespace", q)
		}
	}
	exp, cfg, err := n.lookup(name)
	if err != nil {
		return n.replyErr(opt, repErrUnknown, "%v", err)
	}

	var matched []string
	seen := map[string]bool{}
	add := func(c string) {
		if !seen[c] {
			seen[c] = true
			matched = append(matched, c)
		}
	}
	if !set && len(queries) == 0 {
		for _, c := range cfg.contexts {
			add(c)
		}
	}
	for _, q := range queries {
		for _, c := range cfg.contexts {
			switch {
			case c == q:
				add(c)
			case !set && strings.HasSuffix(q, ":") && strings.HasPrefix(c, q):
				add(c)
			}
		}
	}

	var selected []metaContext
	for i, c := range matched {
		var id uint32
		if set {
			id = uint32(i + 1)
			selected = append(selected, metaContext{id: id, name: c})
		}
		p := binary.BigEndian.AppendUint32(nil, id)
		p = append(p, c...)
		if err := n.reply(opt, repMetaContext, p); err != nil {
			return err
		}
	}
	if set {
		n.metaExport, n.contexts = exp, selected
	}
	return n.reply(opt, repAck, nil)
}
