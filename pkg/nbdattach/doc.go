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
// closes the connection. ZonedBackend answers every zone-rule violation,
// the open/active-limit errors included, with EIO (docs/zoned-format.md §6);
// the Linux errno stays wrapped in the error for other mappers.
//
// A reply goes out with one writev when the connection is a *net.UnixConn
// or *net.TCPConn; a wrapper around one should implement BuffersWriter, or
// each reply costs one write per buffer (small ones are copied into one).
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
//
// # Kernel attach
//
// NetlinkAttacher implements Attacher with the kernel's generic netlink NBD
// interface (NetlinkClient; the connection is injected). Attach makes a
// socketpair, serves one end with ServeTransmission and hands the other to
// NBD_CMD_CONNECT with the size, block size, Export.Flags, TIMEOUT 0,
// DEAD_CONN_TIMEOUT, DESTROY_ON_DISCONNECT (never DISCONNECT_ON_CLOSE) and
// the volume id as BACKEND_IDENTIFIER; it then waits for /dev/nbdN and
// writes a record to the state directory (StateStore: temp file, fsync,
// rename). Detach flushes through the device, DISCONNECTs, and waits until
// the server has seen NBD_CMD_DISC and flushed.
//
// Restart: when the serving process stops (Shutdown drains, flushes and
// closes its sockets; SIGKILL just closes them) the kernel parks I/O on the
// device for DEAD_CONN_TIMEOUT. The next process's Recover checks each
// record against NBD_CMD_STATUS and /sys/block/nbdN/backend, leaves a
// device with another backend id alone, RECONFIGUREs ours with a new
// socket (the kernel takes it only if the old one is dead, see
// ErrDeviceBusy) and only then reopens the image. Requests that were in
// flight on the dead socket are resent by the kernel when the device's
// request timer (RequeueInterval, queue/io_timeout) next fires, which
// bounds the stall. The serving process should call SetIOFlusher.
//
// Kernels without the "nbd" family get ErrNoKernelNBD, naming modprobe
// nbd; the ioctl interface is not used, since it cannot survive a restart.
package nbdattach
