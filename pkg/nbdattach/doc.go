// Package nbdattach serves block devices over the Network Block Device
// protocol, as specified by NetworkBlockDevice's doc/proto.md, from an
// in-process Backend. It is how zq-csi exposes a volume: to userspace
// clients (qemu, libnbd tools) through the full handshake, and to the Linux
// kernel NBD driver through the transmission phase alone.
//
// # Model
//
// A Server holds an ExportSource and serves any number of connections, each
// on its own goroutines. ServeConn runs the fixed newstyle handshake
// (NBD_OPT_GO/INFO/EXPORT_NAME, LIST, STRUCTURED_REPLY, LIST/SET_META_CONTEXT;
// STARTTLS is refused with NBD_REP_ERR_UNSUP, unknown options likewise, and
// negotiation continues) and then the transmission phase. ServeTransmission
// starts directly in the transmission phase for a socket handed to the
// kernel, which does no handshake and understands simple replies only; the
// caller gives the kernel Export.Flags() and the block sizes of the Export.
//
// In the transmission phase one reader goroutine decodes requests in stream
// order and reads WRITE payloads; each request then runs on its own
// goroutine, at most WithWorkers of them per connection, and writes its
// reply under a per-connection lock only after its I/O has completed. Replies
// may therefore leave out of order, as the protocol allows. NBD_CMD_DISC and
// cancellation of the context both stop the reader, let the requests in
// flight finish, flush the backend if anything was written, and close.
//
// # Errors
//
// A backend error never ends a connection: it becomes an NBD error reply
// through an ErrorMapper (DefaultErrorMapper maps wrapped syscall.Errno
// values, or an Errno the backend returns itself). Requests the server
// refuses — unknown commands or flags, ranges beyond the export (ENOSPC for
// writes, EINVAL otherwise), misaligned requests, READ or WRITE above the
// maximum payload (EINVAL, the error proto.md asks for; a refused WRITE's
// payload is drained so the stream stays in sync), writes to a read-only
// export (EPERM), NBD_CMD_FLAG_FAST_ZERO on a backend that cannot promise a
// fast zero (ENOTSUP) — get an error reply and the connection carries on.
// Only a broken stream (bad request magic, short read, failed reply write)
// closes the connection.
//
// # Metadata contexts
//
// base:allocation is always offered. A backend implementing MetaContexter
// offers more (zq-csi's zoned volumes offer "zq:zones", whose extents break
// at zone boundaries and write pointers). A query naming a context selects
// it; a query "ns:" lists every context of namespace ns. NBD_CMD_BLOCK_STATUS
// sends one chunk per selected context, built from BlockStatuser's extents
// and clipped to the request, the minimum block size and REQ_ONE. A backend
// without BlockStatuser reports everything allocated (status 0), which
// proto.md says is always safe.
//
// # Limits
//
// Offsets and lengths must be multiples of the export's minimum block size
// (512 by default; 4096 for 4Kn zoned volumes). READ and WRITE are capped at
// MaxPayload (32 MiB by default), which bounds memory to workers × payload
// per connection; TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS carry no payload
// and are not capped. Payload buffers are pooled by power-of-two size class.
// The handshake has a deadline (WithHandshakeTimeout) so a silent client
// cannot hold a goroutine. Extended headers, TLS and resizing are not
// implemented.
package nbdattach
