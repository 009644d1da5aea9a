package nbdattach

import (
	"errors"
	"fmt"
	"math"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
)

// The kernel's generic netlink interface to the NBD driver, as declared by
// the UAPI headers linux/nbd-netlink.h (family, commands, attributes) and
// linux/nbd.h (client flags). The numbers are ABI; we define them here
// rather than depend on a C header.
const (
	nbdGenlName    = "nbd"
	nbdGenlVersion = 1
	nbdMcastGroup  = "nbd_mc_group"
)

// NBD_CMD_* (generic netlink commands, not the wire commands of proto.md).
const (
	nlCmdConnect     uint8 = 1
	nlCmdDisconnect  uint8 = 2
	nlCmdReconfigure uint8 = 3
	nlCmdLinkDead    uint8 = 4
	nlCmdStatus      uint8 = 5
)

// NBD_ATTR_*. Integer attributes are u64 except INDEX (u32); the kernel's
// policy (nbd_attr_policy) rejects other widths.
const (
	nlAttrIndex           uint16 = 1  // u32
	nlAttrSizeBytes       uint16 = 2  // u64
	nlAttrBlockSizeBytes  uint16 = 3  // u64
	nlAttrTimeout         uint16 = 4  // u64, seconds
	nlAttrServerFlags     uint16 = 5  // u64, transmission flags
	nlAttrClientFlags     uint16 = 6  // u64, NBD_CFLAG_*
	nlAttrSockets         uint16 = 7  // nested SOCK_ITEMs
	nlAttrDeadConnTimeout uint16 = 8  // u64, seconds
	nlAttrDeviceList      uint16 = 9  // nested DEVICE_ITEMs (STATUS reply)
	nlAttrBackendID       uint16 = 10 // NUL-terminated string (Linux >= 5.14)
)

// Nested attribute types.
const (
	nlSockItem uint16 = 1 // NBD_SOCK_ITEM
	nlSockFD   uint16 = 1 // NBD_SOCK_FD, u32

	nlDeviceItem      uint16 = 1 // NBD_DEVICE_ITEM
	nlDeviceIndex     uint16 = 1 // NBD_DEVICE_INDEX, u32
	nlDeviceConnected uint16 = 2 // NBD_DEVICE_CONNECTED, u8
)

// ClientFlags are the NBD_CFLAG_* bits of NBD_ATTR_CLIENT_FLAGS.
type ClientFlags uint64

const (
	// ClientDestroyOnDisconnect deletes the device when it is disconnected,
	// so a detached volume leaves no /dev/nbdN behind.
	ClientDestroyOnDisconnect ClientFlags = 1 << 0
	// ClientDisconnectOnClose disconnects when the last opener closes the
	// device. zq-csi never sets it: a pod closing its block device between
	// two opens must not lose the volume.
	ClientDisconnectOnClose ClientFlags = 1 << 1
)

func (f ClientFlags) String() string {
	var parts []string
	if f&ClientDestroyOnDisconnect != 0 {
		parts = append(parts, "DESTROY_ON_DISCONNECT")
	}
	if f&ClientDisconnectOnClose != 0 {
		parts = append(parts, "DISCONNECT_ON_CLOSE")
	}
	if rest := f &^ (ClientDestroyOnDisconnect | ClientDisconnectOnClose); rest != 0 {
		parts = append(parts, fmt.Sprintf("0x%x", uint64(rest)))
	}
	if len(parts) == 0 {
		return "0"
	}
	return strings.Join(parts, "|")
}

// ErrNoKernelNBD means the kernel offers no netlink NBD interface: the nbd
// module is not loaded (or not built). The error text tells the operator
// what the node lacks.
var ErrNoKernelNBD = errors.New(`nbd: the kernel has no "nbd" generic netlink family: load the nbd module (modprobe nbd)`)

// GenlConn is the part of *genetlink.Conn the client uses. It is an
// interface so tests can inject genltest.Dial's fake kernel and callers can
// share or wrap connections; there is no package-global connection.
type GenlConn interface {
	GetFamily(name string) (genetlink.Family, error)
	Execute(m genetlink.Message, family uint16, flags netlink.HeaderFlags) ([]genetlink.Message, error)
	Receive() ([]genetlink.Message, []netlink.Message, error)
	JoinGroup(group uint32) error
	SetReadDeadline(t time.Time) error
	Close() error
}

// NetlinkClient speaks the kernel's generic netlink NBD family over one
// connection. Its methods may be called from several goroutines (Execute
// serialises request and reply), except ReceiveLinkDead, which needs a
// connection of its own.
type NetlinkClient struct {
	conn   GenlConn
	family genetlink.Family
	group  uint32 // nbd_mc_group id; 0 if the kernel has none
}

// NewNetlinkClient resolves the "nbd" family on conn. It returns
// ErrNoKernelNBD (wrapped) when the family does not exist.
func NewNetlinkClient(conn GenlConn) (*NetlinkClient, error) {
	f, err := conn.GetFamily(nbdGenlName)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOENT) {
			return nil, fmt.Errorf("%w (%v)", ErrNoKernelNBD, err)
		}
		return nil, fmt.Errorf("nbd: resolving generic netlink family %q: %w", nbdGenlName, err)
	}
	c := &NetlinkClient{conn: conn, family: f}
	for _, g := range f.Groups {
		if g.Name == nbdMcastGroup {
			c.group = g.ID
		}
	}
	return c, nil
}

// DialNetlink opens a generic netlink socket and resolves the family.
func DialNetlink() (*NetlinkClient, error) {
	conn, err := genetlink.Dial(nil)
	if err != nil {
		return nil, fmt.Errorf("nbd: opening generic netlink socket: %w", err)
	}
	c, err := NewNetlinkClient(conn)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// Close closes the connection.
func (c *NetlinkClient) Close() error { return c.conn.Close() }

// ConnectConfig is NBD_CMD_CONNECT. Timeouts are sent in whole seconds, as
// the kernel takes them.
type ConnectConfig struct {
	// Index asks for /dev/nbd<Index>; a negative Index lets the kernel pick
	// a free device (or create one).
	Index int
	// Size is the device size in bytes, a multiple of BlockSize.
	Size uint64
	// BlockSize is the logical block size: a power of two from 512 to the
	// page size.
	BlockSize uint64
	// ServerFlags are the transmission flags of the export (Export.Flags).
	ServerFlags TransmissionFlags
	// Timeout is the per-request timeout. 0 disables it: a slow request is
	// never failed and its connection is never declared dead because of it.
	Timeout time.Duration
	// DeadConnTimeout is how long I/O waits for a dead connection to be
	// replaced (NBD_CMD_RECONFIGURE) before it fails: the window in which
	// the serving process may restart.
	DeadConnTimeout time.Duration
	// ClientFlags are NBD_CFLAG_* bits.
	ClientFlags ClientFlags
	// BackendID is NBD_ATTR_BACKEND_IDENTIFIER, shown in
	// /sys/block/nbdN/backend; the kernel refuses a RECONFIGURE naming
	// another one. Empty: not sent.
	BackendID string
	// Sockets are the connected socket file descriptors, one per
	// connection. The kernel takes its own reference; the caller may close
	// them once Connect returns.
	Sockets []int
}

// Connect configures a device and returns its index.
func (c *NetlinkClient) Connect(cfg ConnectConfig) (int, error) {
	if len(cfg.Sockets) == 0 {
		return -1, errors.New("nbd: connect: no sockets")
	}
	if cfg.BlockSize == 0 || cfg.Size%cfg.BlockSize != 0 {
		return -1, fmt.Errorf("nbd: connect: size %d is not a multiple of block size %d", cfg.Size, cfg.BlockSize)
	}
	ae := netlink.NewAttributeEncoder()
	if cfg.Index >= 0 {
		if cfg.Index > math.MaxInt32 {
			return -1, fmt.Errorf("nbd: connect: index %d out of range", cfg.Index)
		}
		ae.Uint32(nlAttrIndex, uint32(cfg.Index))
	}
	ae.Uint64(nlAttrSizeBytes, cfg.Size)
	ae.Uint64(nlAttrBlockSizeBytes, cfg.BlockSize)
	ae.Uint64(nlAttrServerFlags, uint64(cfg.ServerFlags))
	ae.Uint64(nlAttrTimeout, seconds(cfg.Timeout))
	ae.Uint64(nlAttrDeadConnTimeout, seconds(cfg.DeadConnTimeout))
	ae.Uint64(nlAttrClientFlags, uint64(cfg.ClientFlags))
	if cfg.BackendID != "" {
		ae.String(nlAttrBackendID, cfg.BackendID)
	}
	encodeSockets(ae, cfg.Sockets)
	// No NLM_F_ACK: the kernel answers with a CONNECT message carrying the
	// index, and an ACK after it would be left in the socket for the next
	// request to trip over. Errors come back either way.
	msgs, err := c.execute(nlCmdConnect, ae, netlink.Request)
	if err != nil {
		return -1, fmt.Errorf("nbd: connect: %w", err)
	}
	for _, m := range msgs {
		idx, ok, err := decodeIndex(m.Data)
		if err != nil {
			return -1, fmt.Errorf("nbd: connect reply: %w", err)
		}
		if ok {
			return idx, nil
		}
	}
	return -1, errors.New("nbd: connect reply carries no device index")
}

// ReconfigureConfig is NBD_CMD_RECONFIGURE: a new socket for a device whose
// connection died, and optionally new timeouts. Nil pointers are not sent.
type ReconfigureConfig struct {
	Index           int
	BackendID       string // must equal the device's, or the kernel refuses (EINVAL)
	Sockets         []int
	Timeout         *time.Duration
	DeadConnTimeout *time.Duration
	ClientFlags     *ClientFlags
	// Size is a new size in bytes (NBD_ATTR_SIZE_BYTES; Linux 5.3 and
	// later resize a configured device on RECONFIGURE). The block size
	// stays the device's.
	Size *uint64
}

// Reconfigure replaces dead connections of a configured device, or
// changes its timeouts, flags or size. The kernel
// answers EINVAL when the backend identifier differs. When no connection of
// the device is dead (another process still serves it) it drops the socket
// but answers success (Linux 4.12 to at least 6.12 turn that -ENOSPC into
// 0): the caller must check that the kernel kept the socket, as
// NetlinkAttacher does.
func (c *NetlinkClient) Reconfigure(cfg ReconfigureConfig) error {
	if cfg.Index < 0 || cfg.Index > math.MaxInt32 {
		return fmt.Errorf("nbd: reconfigure: index %d out of range", cfg.Index)
	}
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(nlAttrIndex, uint32(cfg.Index))
	if cfg.Timeout != nil {
		ae.Uint64(nlAttrTimeout, seconds(*cfg.Timeout))
	}
	if cfg.DeadConnTimeout != nil {
		ae.Uint64(nlAttrDeadConnTimeout, seconds(*cfg.DeadConnTimeout))
	}
	if cfg.ClientFlags != nil {
		ae.Uint64(nlAttrClientFlags, uint64(*cfg.ClientFlags))
	}
	if cfg.Size != nil {
		ae.Uint64(nlAttrSizeBytes, *cfg.Size)
	}
	if cfg.BackendID != "" {
		ae.String(nlAttrBackendID, cfg.BackendID)
	}
	if len(cfg.Sockets) > 0 {
		encodeSockets(ae, cfg.Sockets)
	}
	if _, err := c.execute(nlCmdReconfigure, ae, netlink.Request|netlink.Acknowledge); err != nil {
		return fmt.Errorf("nbd: reconfigure nbd%d: %w", cfg.Index, err)
	}
	return nil
}

// Disconnect asks the kernel to disconnect device index: it sends
// NBD_CMD_DISC on every connection and shuts them down; with
// ClientDestroyOnDisconnect the device then goes away.
func (c *NetlinkClient) Disconnect(index int) error {
	if index < 0 || index > math.MaxInt32 {
		return fmt.Errorf("nbd: disconnect: index %d out of range", index)
	}
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(nlAttrIndex, uint32(index))
	if _, err := c.execute(nlCmdDisconnect, ae, netlink.Request|netlink.Acknowledge); err != nil {
		return fmt.Errorf("nbd: disconnect nbd%d: %w", index, err)
	}
	return nil
}

// DeviceStatus is one entry of a STATUS reply. Connected means the device
// has a configuration (it stays true while a dead connection waits for
// RECONFIGURE).
type DeviceStatus struct {
	Index     int
	Connected bool
}

// Status lists devices; with index >= 0 only that one (the kernel answers
// with an empty list for an index that does not exist).
func (c *NetlinkClient) Status(index int) ([]DeviceStatus, error) {
	ae := netlink.NewAttributeEncoder()
	if index >= 0 {
		if index > math.MaxInt32 {
			return nil, fmt.Errorf("nbd: status: index %d out of range", index)
		}
		ae.Uint32(nlAttrIndex, uint32(index))
	}
	msgs, err := c.execute(nlCmdStatus, ae, netlink.Request)
	if err != nil {
		return nil, fmt.Errorf("nbd: status: %w", err)
	}
	var out []DeviceStatus
	for _, m := range msgs {
		devs, err := decodeStatus(m.Data)
		if err != nil {
			return nil, fmt.Errorf("nbd: status reply: %w", err)
		}
		out = append(out, devs...)
	}
	return out, nil
}

// JoinLinkDead subscribes this connection to the NBD multicast group, whose
// only message is NBD_CMD_LINK_DEAD. Use a connection dedicated to it: a
// multicast message could otherwise arrive where a reply is expected.
func (c *NetlinkClient) JoinLinkDead() error {
	if c.group == 0 {
		return fmt.Errorf("nbd: the kernel's nbd family has no %q multicast group", nbdMcastGroup)
	}
	if err := c.conn.JoinGroup(c.group); err != nil {
		return fmt.Errorf("nbd: joining %s: %w", nbdMcastGroup, err)
	}
	return nil
}

// ReceiveLinkDead blocks until the kernel reports dead connections and
// returns the indexes of their devices. Messages other than LINK_DEAD are
// skipped. SetReadDeadline on the connection bounds the wait.
func (c *NetlinkClient) ReceiveLinkDead() ([]int, error) {
	for {
		msgs, _, err := c.conn.Receive()
		if err != nil {
			return nil, fmt.Errorf("nbd: receiving link-dead events: %w", err)
		}
		var out []int
		for _, m := range msgs {
			if m.Header.Command != nlCmdLinkDead {
				continue
			}
			idx, ok, err := decodeIndex(m.Data)
			if err != nil {
				return nil, fmt.Errorf("nbd: link-dead event: %w", err)
			}
			if ok {
				out = append(out, idx)
			}
		}
		if len(out) > 0 {
			return out, nil
		}
	}
}

// SetReadDeadline bounds ReceiveLinkDead.
func (c *NetlinkClient) SetReadDeadline(t time.Time) error { return c.conn.SetReadDeadline(t) }

func (c *NetlinkClient) execute(cmd uint8, ae *netlink.AttributeEncoder, flags netlink.HeaderFlags) ([]genetlink.Message, error) {
	b, err := ae.Encode()
	if err != nil {
		return nil, err
	}
	req := genetlink.Message{
		Header: genetlink.Header{Command: cmd, Version: nbdGenlVersion},
		Data:   b,
	}
	return c.conn.Execute(req, c.family.ID, flags)
}

func encodeSockets(ae *netlink.AttributeEncoder, fds []int) {
	ae.Nested(nlAttrSockets, func(nae *netlink.AttributeEncoder) error {
		for _, fd := range fds {
			nae.Nested(nlSockItem, func(sae *netlink.AttributeEncoder) error {
				sae.Uint32(nlSockFD, uint32(fd))
				return nil
			})
		}
		return nil
	})
}

// seconds rounds a timeout up to whole seconds, so a positive duration
// never turns into 0 (which means "none" to the kernel).
func seconds(d time.Duration) uint64 {
	if d <= 0 {
		return 0
	}
	return uint64((d + time.Second - 1) / time.Second)
}

// decodeIndex finds NBD_ATTR_INDEX in a message body.
func decodeIndex(b []byte) (int, bool, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return 0, false, err
	}
	idx, found := 0, false
	for ad.Next() {
		if ad.Type() == nlAttrIndex {
			idx, found = int(ad.Uint32()), true
		}
	}
	if err := ad.Err(); err != nil {
		return 0, false, err
	}
	return idx, found, nil
}

// decodeStatus decodes NBD_ATTR_DEVICE_LIST. The decoder's error is sticky
// and checked once per level, as mdlayher/netlink intends.
func decodeStatus(b []byte) ([]DeviceStatus, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return nil, err
	}
	var out []DeviceStatus
	for ad.Next() {
		if ad.Type() != nlAttrDeviceList {
			continue
		}
		ad.Nested(func(lad *netlink.AttributeDecoder) error {
			for lad.Next() {
				if lad.Type() != nlDeviceItem {
					continue
				}
				d := DeviceStatus{Index: -1}
				lad.Nested(func(iad *netlink.AttributeDecoder) error {
					for iad.Next() {
						switch iad.Type() {
						case nlDeviceIndex:
							d.Index = int(iad.Uint32())
						case nlDeviceConnected:
							d.Connected = iad.Uint8() != 0
						}
					}
					return iad.Err()
				})
				if d.Index < 0 {
					return errors.New("device item without index")
				}
				out = append(out, d)
			}
			return lad.Err()
		})
	}
	if err := ad.Err(); err != nil {
		return nil, err
	}
	return out, nil
}
