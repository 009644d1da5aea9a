package nbdattach

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/genetlink/genltest"
	"github.com/mdlayher/netlink"
)

// The fake kernel: genltest serves "get family" for nbd, and each test
// scripts the replies to NBD commands, checking the exact attributes sent.

const fakeFamilyID = 0x2a

var fakeFamily = genetlink.Family{
	ID:      fakeFamilyID,
	Version: nbdGenlVersion,
	Name:    nbdGenlName,
	Groups:  []genetlink.MulticastGroup{{ID: 7, Name: nbdMcastGroup}},
}

// attr is a decoded attribute tree: leaves keep their raw bytes, nested
// attributes (the ones the NBD family nests) their children.
type attr struct {
	Type     uint16
	Data     []byte
	Children []attr
}

func isNested(typ uint16, depth int) bool {
	switch depth {
	case 0:
		return typ == nlAttrSockets || typ == nlAttrDeviceList
	case 1:
		return true // SOCK_ITEM / DEVICE_ITEM
	}
	return false
}

func decodeTree(t *testing.T, b []byte, parent uint16, depth int) []attr {
	t.Helper()
	attrs, err := netlink.UnmarshalAttributes(b)
	if err != nil {
		t.Fatalf("decoding attributes: %v", err)
	}
	var out []attr
	for _, a := range attrs {
		n := attr{Type: a.Type &^ (netlink.Nested | netlink.NetByteOrder)}
		if isNested(n.Type, depth) {
			n.Children = decodeTree(t, a.Data, n.Type, depth+1)
		} else {
			n.Data = a.Data
		}
		out = append(out, n)
	}
	return out
}

func u32(v uint32) []byte  { b := make([]byte, 4); binary.NativeEndian.PutUint32(b, v); return b }
func u64(v uint64) []byte  { b := make([]byte, 8); binary.NativeEndian.PutUint64(b, v); return b }
func cstr(s string) []byte { return append([]byte(s), 0) }

func sockets(fds ...uint32) attr {
	a := attr{Type: nlAttrSockets}
	for _, fd := range fds {
		a.Children = append(a.Children, attr{Type: nlSockItem, Children: []attr{{Type: nlSockFD, Data: u32(fd)}}})
	}
	return a
}

// fakeKernel builds a genltest conn: check verifies each NBD request and
// returns the scripted reply.
func fakeKernel(t *testing.T, fn func(cmd uint8, flags netlink.HeaderFlags, attrs []attr) ([]genetlink.Message, error)) *NetlinkClient {
	t.Helper()
	conn := genltest.Dial(genltest.ServeFamily(fakeFamily, func(greq genetlink.Message, nreq netlink.Message) ([]genetlink.Message, error) {
		if nreq.Header.Type != fakeFamilyID {
			return nil, fmt.Errorf("request to family %d, want %d", nreq.Header.Type, fakeFamilyID)
		}
		if greq.Header.Version != nbdGenlVersion {
			return nil, fmt.Errorf("genl version %d, want %d", greq.Header.Version, nbdGenlVersion)
		}
		msgs, err := fn(greq.Header.Command, nreq.Header.Flags, decodeTree(t, greq.Data, 0, 0))
		if err == nil && len(msgs) == 0 {
			// An ACK: genltest's way to say "no messages, no error".
			return nil, io.EOF
		}
		return msgs, err
	}))
	c, err := NewNetlinkClient(conn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func replyMsg(cmd uint8, build func(ae *netlink.AttributeEncoder)) genetlink.Message {
	ae := netlink.NewAttributeEncoder()
	build(ae)
	b, err := ae.Encode()
	if err != nil {
		panic(err)
	}
	return genetlink.Message{Header: genetlink.Header{Command: cmd, Version: nbdGenlVersion}, Data: b}
}

func TestNetlinkConnect(t *testing.T) {
	tests := []struct {
		name  string
		cfg   ConnectConfig
		want  []attr
		reply int
	}{
		{
			name: "any index, every option",
			cfg: ConnectConfig{
				Index: -1, Size: 64 << 20, BlockSize: 4096,
				ServerFlags:     FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim,
				Timeout:         0,
				DeadConnTimeout: 90 * time.Second,
				ClientFlags:     ClientDestroyOnDisconnect,
				BackendID:       "pvc-1234",
				Sockets:         []int{9},
			},
			want: []attr{
				{Type: nlAttrSizeBytes, Data: u64(64 << 20)},
				{Type: nlAttrBlockSizeBytes, Data: u64(4096)},
				{Type: nlAttrServerFlags, Data: u64(uint64(FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim))},
				{Type: nlAttrTimeout, Data: u64(0)},
				{Type: nlAttrDeadConnTimeout, Data: u64(90)},
				{Type: nlAttrClientFlags, Data: u64(uint64(ClientDestroyOnDisconnect))},
				{Type: nlAttrBackendID, Data: cstr("pvc-1234")},
				sockets(9),
			},
			reply: 3,
		},
		{
			name: "fixed index, two sockets, sub-second timeout rounds up",
			cfg: ConnectConfig{
				Index: 5, Size: 1 << 20, BlockSize: 512, ServerFlags: FlagHasFlags,
				Timeout: 1500 * time.Millisecond, Sockets: []int{4, 6},
			},
			want: []attr{
				{Type: nlAttrIndex, Data: u32(5)},
				{Type: nlAttrSizeBytes, Data: u64(1 << 20)},
				{Type: nlAttrBlockSizeBytes, Data: u64(512)},
				{Type: nlAttrServerFlags, Data: u64(uint64(FlagHasFlags))},
				{Type: nlAttrTimeout, Data: u64(2)},
				{Type: nlAttrDeadConnTimeout, Data: u64(0)},
				{Type: nlAttrClientFlags, Data: u64(0)},
				sockets(4, 6),
			},
			reply: 5,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := fakeKernel(t, func(cmd uint8, flags netlink.HeaderFlags, attrs []attr) ([]genetlink.Message, error) {
				if cmd != nlCmdConnect {
					return nil, fmt.Errorf("command %d, want CONNECT", cmd)
				}
				if flags&netlink.Acknowledge != 0 {
					return nil, errors.New("CONNECT sent with NLM_F_ACK: the ACK would trail the reply")
				}
				if !reflect.DeepEqual(attrs, tt.want) {
					return nil, fmt.Errorf("attributes:\n got %+v\nwant %+v", attrs, tt.want)
				}
				return []genetlink.Message{replyMsg(nlCmdConnect, func(ae *netlink.AttributeEncoder) {
					ae.Uint32(nlAttrIndex, uint32(tt.reply))
				})}, nil
			})
			idx, err := c.Connect(tt.cfg)
			if err != nil {
				t.Fatal(err)
			}
			if idx != tt.reply {
				t.Fatalf("index %d, want %d", idx, tt.reply)
			}
		})
	}
}

func TestNetlinkConnectErrors(t *testing.T) {
	c := fakeKernel(t, func(cmd uint8, _ netlink.HeaderFlags, _ []attr) ([]genetlink.Message, error) {
		return nil, genltest.Error(int(syscall.EBUSY))
	})
	_, err := c.Connect(ConnectConfig{Index: 0, Size: 4096, BlockSize: 512, Sockets: []int{3}})
	if !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("err = %v, want EBUSY", err)
	}
	if _, err := c.Connect(ConnectConfig{Index: -1, Size: 4096, BlockSize: 512}); err == nil {
		t.Fatal("connect without sockets succeeded")
	}
	if _, err := c.Connect(ConnectConfig{Index: -1, Size: 1000, BlockSize: 512, Sockets: []int{3}}); err == nil {
		t.Fatal("connect with a size not a multiple of the block size succeeded")
	}

	noIndex := fakeKernel(t, func(uint8, netlink.HeaderFlags, []attr) ([]genetlink.Message, error) {
		return []genetlink.Message{replyMsg(nlCmdConnect, func(ae *netlink.AttributeEncoder) {})}, nil
	})
	if _, err := noIndex.Connect(ConnectConfig{Index: -1, Size: 4096, BlockSize: 512, Sockets: []int{3}}); err == nil {
		t.Fatal("reply without index accepted")
	}
	short := fakeKernel(t, func(uint8, netlink.HeaderFlags, []attr) ([]genetlink.Message, error) {
		return []genetlink.Message{replyMsg(nlCmdConnect, func(ae *netlink.AttributeEncoder) { ae.Uint16(nlAttrIndex, 1) })}, nil
	})
	if _, err := short.Connect(ConnectConfig{Index: -1, Size: 4096, BlockSize: 512, Sockets: []int{3}}); err == nil {
		t.Fatal("2-byte index accepted")
	}
}

func TestNetlinkReconfigure(t *testing.T) {
	dct := 60 * time.Second
	to := time.Duration(0)
	cf := ClientDestroyOnDisconnect
	size := uint64(96 << 20)
	tests := []struct {
		name string
		cfg  ReconfigureConfig
		want []attr
	}{
		{"socket only", ReconfigureConfig{Index: 2, BackendID: "vol", Sockets: []int{11}},
			[]attr{{Type: nlAttrIndex, Data: u32(2)}, {Type: nlAttrBackendID, Data: cstr("vol")}, sockets(11)}},
		{"timeouts and flags", ReconfigureConfig{Index: 0, Timeout: &to, DeadConnTimeout: &dct, ClientFlags: &cf},
			[]attr{{Type: nlAttrIndex, Data: u32(0)}, {Type: nlAttrTimeout, Data: u64(0)},
				{Type: nlAttrDeadConnTimeout, Data: u64(60)}, {Type: nlAttrClientFlags, Data: u64(1)}}},
		{"size", ReconfigureConfig{Index: 5, BackendID: "vol", Size: &size},
			[]attr{{Type: nlAttrIndex, Data: u32(5)}, {Type: nlAttrSizeBytes, Data: u64(96 << 20)}, {Type: nlAttrBackendID, Data: cstr("vol")}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := fakeKernel(t, func(cmd uint8, flags netlink.HeaderFlags, attrs []attr) ([]genetlink.Message, error) {
				if cmd != nlCmdReconfigure || flags&netlink.Acknowledge == 0 {
					return nil, fmt.Errorf("command %d flags %v, want RECONFIGURE with ACK", cmd, flags)
				}
				if !reflect.DeepEqual(attrs, tt.want) {
					return nil, fmt.Errorf("attributes:\n got %+v\nwant %+v", attrs, tt.want)
				}
				return nil, nil
			})
			if err := c.Reconfigure(tt.cfg); err != nil {
				t.Fatal(err)
			}
		})
	}
	t.Run("kernel refuses", func(t *testing.T) {
		for _, errno := range []syscall.Errno{syscall.ENOSPC, syscall.EINVAL} {
			c := fakeKernel(t, func(uint8, netlink.HeaderFlags, []attr) ([]genetlink.Message, error) {
				return nil, genltest.Error(int(errno))
			})
			if err := c.Reconfigure(ReconfigureConfig{Index: 1, Sockets: []int{3}}); !errors.Is(err, errno) {
				t.Fatalf("err = %v, want %v", err, errno)
			}
		}
	})
}

func TestNetlinkDisconnect(t *testing.T) {
	var got []attr
	c := fakeKernel(t, func(cmd uint8, flags netlink.HeaderFlags, attrs []attr) ([]genetlink.Message, error) {
		if cmd != nlCmdDisconnect || flags&netlink.Acknowledge == 0 {
			return nil, fmt.Errorf("command %d flags %v, want DISCONNECT with ACK", cmd, flags)
		}
		got = attrs
		return nil, nil
	})
	if err := c.Disconnect(7); err != nil {
		t.Fatal(err)
	}
	if want := []attr{{Type: nlAttrIndex, Data: u32(7)}}; !reflect.DeepEqual(got, want) {
		t.Fatalf("attributes %+v, want %+v", got, want)
	}
	if err := c.Disconnect(-1); err == nil {
		t.Fatal("negative index accepted")
	}
}

func TestNetlinkStatus(t *testing.T) {
	var got []attr
	c := fakeKernel(t, func(cmd uint8, _ netlink.HeaderFlags, attrs []attr) ([]genetlink.Message, error) {
		if cmd != nlCmdStatus {
			return nil, fmt.Errorf("command %d, want STATUS", cmd)
		}
		got = attrs
		return []genetlink.Message{replyMsg(nlCmdStatus, func(ae *netlink.AttributeEncoder) {
			ae.Nested(nlAttrDeviceList, func(lae *netlink.AttributeEncoder) error {
				for _, d := range []struct {
					idx  uint32
					conn uint8
				}{{0, 1}, {1, 0}, {12, 1}} {
					lae.Nested(nlDeviceItem, func(iae *netlink.AttributeEncoder) error {
						iae.Uint32(nlDeviceIndex, d.idx)
						iae.Uint8(nlDeviceConnected, d.conn)
						return nil
					})
				}
				return nil
			})
		})}, nil
	})
	devs, err := c.Status(-1)
	if err != nil {
		t.Fatal(err)
	}
	want := []DeviceStatus{{0, true}, {1, false}, {12, true}}
	if !reflect.DeepEqual(devs, want) {
		t.Fatalf("status %+v, want %+v", devs, want)
	}
	if len(got) != 0 {
		t.Fatalf("STATUS of all devices sent attributes %+v", got)
	}
	if _, err := c.Status(12); err != nil {
		t.Fatal(err)
	}
	if want := []attr{{Type: nlAttrIndex, Data: u32(12)}}; !reflect.DeepEqual(got, want) {
		t.Fatalf("attributes %+v, want %+v", got, want)
	}
}

func TestNetlinkStatusMalformed(t *testing.T) {
	c := fakeKernel(t, func(uint8, netlink.HeaderFlags, []attr) ([]genetlink.Message, error) {
		return []genetlink.Message{replyMsg(nlCmdStatus, func(ae *netlink.AttributeEncoder) {
			ae.Nested(nlAttrDeviceList, func(lae *netlink.AttributeEncoder) error {
				lae.Nested(nlDeviceItem, func(iae *netlink.AttributeEncoder) error {
					iae.Uint8(nlDeviceConnected, 1) // no index
					return nil
				})
				return nil
			})
		})}, nil
	})
	if _, err := c.Status(-1); err == nil {
		t.Fatal("device item without index accepted")
	}
}

func TestNetlinkLinkDead(t *testing.T) {
	events := [][]genetlink.Message{
		{replyMsg(nlCmdStatus, func(ae *netlink.AttributeEncoder) {})}, // not LINK_DEAD: skipped
		{replyMsg(nlCmdLinkDead, func(ae *netlink.AttributeEncoder) { ae.Uint32(nlAttrIndex, 4) })},
	}
	var joined []uint32
	conn := &groupConn{Conn: genltest.Dial(genltest.ServeFamily(fakeFamily, func(greq genetlink.Message, nreq netlink.Message) ([]genetlink.Message, error) {
		if len(events) == 0 {
			return nil, errors.New("no more events")
		}
		e := events[0]
		events = events[1:]
		return e, nil
	})), joined: &joined}
	c, err := NewNetlinkClient(conn)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.JoinLinkDead(); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(joined, []uint32{7}) {
		t.Fatalf("joined groups %v, want [7]", joined)
	}
	idx, err := c.ReceiveLinkDead()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(idx, []int{4}) {
		t.Fatalf("link dead %v, want [4]", idx)
	}
}

// groupConn records JoinGroup (the fake netlink socket cannot join).
type groupConn struct {
	*genetlink.Conn
	joined *[]uint32
}

func (r *groupConn) JoinGroup(g uint32) error { *r.joined = append(*r.joined, g); return nil }

func TestNetlinkNoFamily(t *testing.T) {
	conn := genltest.Dial(func(greq genetlink.Message, nreq netlink.Message) ([]genetlink.Message, error) {
		return nil, genltest.Error(int(syscall.ENOENT))
	})
	_, err := NewNetlinkClient(conn)
	if !errors.Is(err, ErrNoKernelNBD) {
		t.Fatalf("err = %v, want ErrNoKernelNBD", err)
	}
	if want := "modprobe nbd"; !contains(err.Error(), want) {
		t.Fatalf("error %q does not say %q", err, want)
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

func TestClientFlagsString(t *testing.T) {
	for f, want := range map[ClientFlags]string{
		0: "0", ClientDestroyOnDisconnect: "DESTROY_ON_DISCONNECT",
		ClientDestroyOnDisconnect | ClientDisconnectOnClose | 8: "DESTROY_ON_DISCONNECT|DISCONNECT_ON_CLOSE|0x8",
	} {
		if got := f.String(); got != want {
			t.Errorf("%d: %q, want %q", uint64(f), got, want)
		}
	}
}
