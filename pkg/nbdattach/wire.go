package nbdattach

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// Wire constants from the NBD protocol document (NetworkBlockDevice/nbd,
// doc/proto.md). Every multi-byte field is big-endian.

// Handshake magics.
const (
	nbdMagic      uint64 = 0x4e42444d41474943 // "NBDMAGIC" (INIT_PASSWD)
	ihaveOptMagic uint64 = 0x49484156454F5054 // "IHAVEOPT"; also prefixes every option
	optReplyMagic uint64 = 0x0003e889045565a9 // option reply header
)

// Transmission magics.
const (
	requestMagic         uint32 = 0x25609513
	simpleReplyMagic     uint32 = 0x67446698
	structuredReplyMagic uint32 = 0x668e33ef
)

// Handshake flags (server, 16 bits) and client flags (32 bits).
const (
	flagFixedNewstyle uint16 = 1 << 0
	flagNoZeroes      uint16 = 1 << 1

	clientFlagFixedNewstyle uint32 = 1 << 0
	clientFlagNoZeroes      uint32 = 1 << 1
	clientFlagsKnown               = clientFlagFixedNewstyle | clientFlagNoZeroes
)

// TransmissionFlags is the 16-bit field sent with NBD_INFO_EXPORT (or after
// NBD_OPT_EXPORT_NAME) and handed to the kernel with NBD_ATTR_SERVER_FLAGS.
type TransmissionFlags uint16

// Transmission flags.
const (
	FlagHasFlags        TransmissionFlags = 1 << 0
	FlagReadOnly        TransmissionFlags = 1 << 1
	FlagSendFlush       TransmissionFlags = 1 << 2
	FlagSendFUA         TransmissionFlags = 1 << 3
	FlagRotational      TransmissionFlags = 1 << 4
	FlagSendTrim        TransmissionFlags = 1 << 5
	FlagSendWriteZeroes TransmissionFlags = 1 << 6
	FlagSendDF          TransmissionFlags = 1 << 7
	FlagCanMultiConn    TransmissionFlags = 1 << 8
	FlagSendResize      TransmissionFlags = 1 << 9
	FlagSendCache       TransmissionFlags = 1 << 10
	FlagSendFastZero    TransmissionFlags = 1 << 11
)

var transmissionFlagNames = [...]string{
	"HAS_FLAGS", "READ_ONLY", "SEND_FLUSH", "SEND_FUA", "ROTATIONAL", "SEND_TRIM",
	"SEND_WRITE_ZEROES", "SEND_DF", "CAN_MULTI_CONN", "SEND_RESIZE", "SEND_CACHE", "SEND_FAST_ZERO",
}

func (f TransmissionFlags) String() string {
	var parts []string
	for i, name := range transmissionFlagNames {
		if f&(1<<i) != 0 {
			parts = append(parts, name)
		}
	}
	if rest := f &^ (1<<len(transmissionFlagNames) - 1); rest != 0 {
		parts = append(parts, fmt.Sprintf("0x%x", uint16(rest)))
	}
	if len(parts) == 0 {
		return "0"
	}
	return strings.Join(parts, "|")
}

// Option types (NBD_OPT_*).
const (
	optExportName      uint32 = 1
	optAbort           uint32 = 2
	optList            uint32 = 3
	optPeekExport      uint32 = 4 // withdrawn; answered with NBD_REP_ERR_UNSUP
	optStartTLS        uint32 = 5
	optInfo            uint32 = 6
	optGo              uint32 = 7
	optStructuredReply uint32 = 8
	optListMetaContext uint32 = 9
	optSetMetaContext  uint32 = 10
)

func optName(o uint32) string {
	switch o {
	case optExportName:
		return "EXPORT_NAME"
	case optAbort:
		return "ABORT"
	case optList:
		return "LIST"
	case optPeekExport:
		return "PEEK_EXPORT"
	case optStartTLS:
		return "STARTTLS"
	case optInfo:
		return "INFO"
	case optGo:
		return "GO"
	case optStructuredReply:
		return "STRUCTURED_REPLY"
	case optListMetaContext:
		return "LIST_META_CONTEXT"
	case optSetMetaContext:
		return "SET_META_CONTEXT"
	}
	return fmt.Sprintf("OPT_%d", o)
}

// Option reply types (NBD_REP_*). Errors have bit 31 set.
const (
	repAck         uint32 = 1
	repServer      uint32 = 2
	repInfo        uint32 = 3
	repMetaContext uint32 = 4

	repErrUnsup         uint32 = 1<<31 + 1
	repErrPolicy        uint32 = 1<<31 + 2
	repErrInvalid       uint32 = 1<<31 + 3
	repErrPlatform      uint32 = 1<<31 + 4
	repErrTLSReqd       uint32 = 1<<31 + 5
	repErrUnknown       uint32 = 1<<31 + 6
	repErrShutdown      uint32 = 1<<31 + 7
	repErrBlockSizeReqd uint32 = 1<<31 + 8
	repErrTooBig        uint32 = 1<<31 + 9
)

// Information types carried by NBD_REP_INFO.
const (
	infoExport      uint16 = 0
	infoName        uint16 = 1
	infoDescription uint16 = 2
	infoBlockSize   uint16 = 3
)

// Command types (NBD_CMD_*).
type command uint16

const (
	cmdRead        command = 0
	cmdWrite       command = 1
	cmdDisc        command = 2
	cmdFlush       command = 3
	cmdTrim        command = 4
	cmdCache       command = 5
	cmdWriteZeroes command = 6
	cmdBlockStatus command = 7
)

var commandNames = [...]string{"READ", "WRITE", "DISC", "FLUSH", "TRIM", "CACHE", "WRITE_ZEROES", "BLOCK_STATUS"}

func (c command) String() string {
	if int(c) < len(commandNames) {
		return commandNames[c]
	}
	return fmt.Sprintf("CMD_%d", uint16(c))
}

// Command flags (NBD_CMD_FLAG_*).
const (
	cmdFlagFUA      uint16 = 1 << 0
	cmdFlagNoHole   uint16 = 1 << 1
	cmdFlagDF       uint16 = 1 << 2
	cmdFlagReqOne   uint16 = 1 << 3
	cmdFlagFastZero uint16 = 1 << 4
)

// Structured reply flags and chunk types.
const (
	replyFlagDone uint16 = 1 << 0

	replyTypeNone        uint16 = 0
	replyTypeOffsetData  uint16 = 1
	replyTypeOffsetHole  uint16 = 2
	replyTypeBlockStatus uint16 = 5
	replyTypeError       uint16 = 1<<15 + 1
	replyTypeErrorOffset uint16 = 1<<15 + 2
)

// base:allocation flags.
const (
	StateHole uint32 = 1 << 0 // NBD_STATE_HOLE
	StateZero uint32 = 1 << 1 // NBD_STATE_ZERO
)

// BaseAllocation is the one metadata context the protocol itself defines.
const BaseAllocation = "base:allocation"

// Sizes of fixed wire structures.
const (
	requestSize          = 28 // magic 4, flags 2, type 2, handle 8, offset 8, length 4
	simpleReplySize      = 16 // magic 4, error 4, handle 8
	structuredHeaderSize = 20 // magic 4, flags 2, type 2, handle 8, length 4
	optionHeaderSize     = 16 // magic 8, option 4, length 4
	optReplyHeaderSize   = 20 // magic 8, option 4, type 4, length 4
	exportNameZeroes     = 124
	maxStringLen         = 4096 // proto.md: strings MUST be no longer than 4096 bytes
)

var errBadRequestMagic = errors.New("nbd: bad request magic")

// request is one transmission-phase request header.
type request struct {
	flags  uint16
	typ    command
	handle uint64
	offset uint64
	length uint32
}

// decodeRequest parses a request header. b comes straight off the wire and is
// not trusted: only its length and magic are checked here; the semantic checks
// (flags, bounds, sizes) belong to the command handlers.
func decodeRequest(b []byte) (request, error) {
	if len(b) < requestSize {
		return request{}, fmt.Errorf("nbd: short request header: %d of %d bytes", len(b), requestSize)
	}
	if m := binary.BigEndian.Uint32(b[0:4]); m != requestMagic {
		return request{}, fmt.Errorf("%w 0x%08x", errBadRequestMagic, m)
	}
	return request{
		flags:  binary.BigEndian.Uint16(b[4:6]),
		typ:    command(binary.BigEndian.Uint16(b[6:8])),
		handle: binary.BigEndian.Uint64(b[8:16]),
		offset: binary.BigEndian.Uint64(b[16:24]),
		length: binary.BigEndian.Uint32(b[24:28]),
	}, nil
}

// encode writes the request header into b[:requestSize].
func (r request) encode(b []byte) {
	_ = b[requestSize-1]
	binary.BigEndian.PutUint32(b[0:4], requestMagic)
	binary.BigEndian.PutUint16(b[4:6], r.flags)
	binary.BigEndian.PutUint16(b[6:8], uint16(r.typ))
	binary.BigEndian.PutUint64(b[8:16], r.handle)
	binary.BigEndian.PutUint64(b[16:24], r.offset)
	binary.BigEndian.PutUint32(b[24:28], r.length)
}

// simpleReply is the reply header used without structured replies.
type simpleReply struct {
	errno  Errno
	handle uint64
}

func (r simpleReply) encode(b []byte) {
	_ = b[simpleReplySize-1]
	binary.BigEndian.PutUint32(b[0:4], simpleReplyMagic)
	binary.BigEndian.PutUint32(b[4:8], uint32(r.errno))
	binary.BigEndian.PutUint64(b[8:16], r.handle)
}

func decodeSimpleReply(b []byte) (simpleReply, error) {
	if len(b) < simpleReplySize {
		return simpleReply{}, fmt.Errorf("nbd: short simple reply: %d bytes", len(b))
	}
	if m := binary.BigEndian.Uint32(b[0:4]); m != simpleReplyMagic {
		return simpleReply{}, fmt.Errorf("nbd: bad simple reply magic 0x%08x", m)
	}
	return simpleReply{
		errno:  Errno(binary.BigEndian.Uint32(b[4:8])),
		handle: binary.BigEndian.Uint64(b[8:16]),
	}, nil
}

// chunkHeader is the header of one structured reply chunk.
type chunkHeader struct {
	flags  uint16
	typ    uint16
	handle uint64
	length uint32
}

func (h chunkHeader) encode(b []byte) {
	_ = b[structuredHeaderSize-1]
	binary.BigEndian.PutUint32(b[0:4], structuredReplyMagic)
	binary.BigEndian.PutUint16(b[4:6], h.flags)
	binary.BigEndian.PutUint16(b[6:8], h.typ)
	binary.BigEndian.PutUint64(b[8:16], h.handle)
	binary.BigEndian.PutUint32(b[16:20], h.length)
}

func decodeChunkHeader(b []byte) (chunkHeader, error) {
	if len(b) < structuredHeaderSize {
		return chunkHeader{}, fmt.Errorf("nbd: short chunk header: %d bytes", len(b))
	}
	if m := binary.BigEndian.Uint32(b[0:4]); m != structuredReplyMagic {
		return chunkHeader{}, fmt.Errorf("nbd: bad structured reply magic 0x%08x", m)
	}
	return chunkHeader{
		flags:  binary.BigEndian.Uint16(b[4:6]),
		typ:    binary.BigEndian.Uint16(b[6:8]),
		handle: binary.BigEndian.Uint64(b[8:16]),
		length: binary.BigEndian.Uint32(b[16:20]),
	}, nil
}

// optionHeader is the header of one client option during the handshake.
type optionHeader struct {
	option uint32
	length uint32
}

var errBadOptionMagic = errors.New("nbd: bad option magic")

func decodeOptionHeader(b []byte) (optionHeader, error) {
	if len(b) < optionHeaderSize {
		return optionHeader{}, fmt.Errorf("nbd: short option header: %d bytes", len(b))
	}
	if m := binary.BigEndian.Uint64(b[0:8]); m != ihaveOptMagic {
		return optionHeader{}, fmt.Errorf("%w 0x%016x", errBadOptionMagic, m)
	}
	return optionHeader{
		option: binary.BigEndian.Uint32(b[8:12]),
		length: binary.BigEndian.Uint32(b[12:16]),
	}, nil
}

func (h optionHeader) encode(b []byte) {
	_ = b[optionHeaderSize-1]
	binary.BigEndian.PutUint64(b[0:8], ihaveOptMagic)
	binary.BigEndian.PutUint32(b[8:12], h.option)
	binary.BigEndian.PutUint32(b[12:16], h.length)
}

// optReplyHeader is the header of one option reply.
type optReplyHeader struct {
	option uint32
	typ    uint32
	length uint32
}

func (h optReplyHeader) encode(b []byte) {
	_ = b[optReplyHeaderSize-1]
	binary.BigEndian.PutUint64(b[0:8], optReplyMagic)
	binary.BigEndian.PutUint32(b[8:12], h.option)
	binary.BigEndian.PutUint32(b[12:16], h.typ)
	binary.BigEndian.PutUint32(b[16:20], h.length)
}

func decodeOptReplyHeader(b []byte) (optReplyHeader, error) {
	if len(b) < optReplyHeaderSize {
		return optReplyHeader{}, fmt.Errorf("nbd: short option reply: %d bytes", len(b))
	}
	if m := binary.BigEndian.Uint64(b[0:8]); m != optReplyMagic {
		return optReplyHeader{}, fmt.Errorf("nbd: bad option reply magic 0x%016x", m)
	}
	return optReplyHeader{
		option: binary.BigEndian.Uint32(b[8:12]),
		typ:    binary.BigEndian.Uint32(b[12:16]),
		length: binary.BigEndian.Uint32(b[16:20]),
	}, nil
}

// optReader decodes option payloads with a sticky error, in the manner of
// netlink attribute decoders: every read checks the remaining length first,
// and the caller checks err once at the end.
type optReader struct {
	b   []byte
	err error
}

var errShortOption = errors.New("option data too short")

func (r *optReader) u16() uint16 {
	if r.err != nil || len(r.b) < 2 {
		r.fail()
		return 0
	}
	v := binary.BigEndian.Uint16(r.b)
	r.b = r.b[2:]
	return v
}

func (r *optReader) u32() uint32 {
	if r.err != nil || len(r.b) < 4 {
		r.fail()
		return 0
	}
	v := binary.BigEndian.Uint32(r.b)
	r.b = r.b[4:]
	return v
}

// str reads a string of n bytes, copying it out of the option buffer.
func (r *optReader) str(n uint32) string {
	if r.err != nil || uint64(n) > uint64(len(r.b)) {
		r.fail()
		return ""
	}
	s := string(r.b[:n])
	r.b = r.b[n:]
	return s
}

func (r *optReader) fail() {
	if r.err == nil {
		r.err = errShortOption
	}
}

// done reports an error if anything is left over: proto.md requires lengths
// inside an option to add up to the option length exactly.
func (r *optReader) done() error {
	if r.err != nil {
		return r.err
	}
	if len(r.b) != 0 {
		return fmt.Errorf("%d trailing bytes in option data", len(r.b))
	}
	return nil
}
