package nbdattach

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/genetlink/genltest"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// fakeNBD is a kernel NBD driver in miniature, behind genltest: CONNECT
// takes the socket handed over (a dup of it, since the attacher closes its
// copy), creates the sysfs and /dev entries the attacher waits for, and the
// test then drives the server over that socket as the kernel would.
// DISCONNECT sends NBD_CMD_DISC and removes the device; RECONFIGURE replaces
// a dead socket; STATUS lists devices.
type fakeNBD struct {
	t                *testing.T
	sysRoot, devRoot string

	mu      sync.Mutex
	devs    map[int]*fakeDev
	next    int
	connect []ConnectConfig // what each CONNECT carried (fds as received)
	cmds    map[int][]uint8 // the commands naming each device index, in order

	// sizeLate, when set, is how long after answering CONNECT the device's
	// sysfs size goes from 0 to its size (negative: never), as when the
	// kernel's udev events and size update lag behind the reply.
	sizeLate time.Duration
}

// commands returns the commands sent for device idx so far.
func (f *fakeNBD) commands(idx int) []uint8 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]uint8(nil), f.cmds[idx]...)
}

type fakeDev struct {
	backend string
	conn    net.Conn // the "kernel" end, nil when dead
	client  *testClient
	handle  uint64
}

func newFakeNBD(t *testing.T) *fakeNBD {
	d := t.TempDir()
	f := &fakeNBD{t: t, sysRoot: filepath.Join(d, "sys"), devRoot: filepath.Join(d, "dev"), devs: map[int]*fakeDev{}, cmds: map[int][]uint8{}}
	os.MkdirAll(f.devRoot, 0o755)
	return f
}

func (f *fakeNBD) takeSocket(attrs []attr) (net.Conn, error) {
	for _, a := range attrs {
		if a.Type != nlAttrSockets {
			continue
		}
		fd := int(binaryU32(a.Children[0].Children[0].Data))
		nfd, err := unix.Dup(fd)
		if err != nil {
			return nil, err
		}
		file := os.NewFile(uintptr(nfd), "kernel-end")
		defer file.Close()
		return net.FileConn(file)
	}
	return nil, errors.New("no socket")
}

func binaryU32(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24 // little-endian hosts only
}

func binaryU64(b []byte) uint64 {
	return uint64(binaryU32(b)) | uint64(binaryU32(b[4:]))<<32
}

func (f *fakeNBD) handle(cmd uint8, attrs []attr) ([]genetlink.Message, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	get := func(typ uint16) []byte {
		for _, a := range attrs {
			if a.Type == typ {
				return a.Data
			}
		}
		return nil
	}
	if idx := get(nlAttrIndex); idx != nil {
		i := int(binaryU32(idx))
		f.cmds[i] = append(f.cmds[i], cmd)
	}
	switch cmd {
	case nlCmdConnect:
		conn, err := f.takeSocket(attrs)
		if err != nil {
			return nil, err
		}
		idx := f.next
		f.next++
		f.cmds[idx] = append(f.cmds[idx], cmd)
		size := binaryU64(get(nlAttrSizeBytes))
		bs := binaryU64(get(nlAttrBlockSizeBytes))
		id := string(bytes.TrimRight(get(nlAttrBackendID), "\x00"))
		f.connect = append(f.connect, ConnectConfig{
			Size: size, BlockSize: bs, BackendID: id,
			ServerFlags:     TransmissionFlags(binaryU64(get(nlAttrServerFlags))),
			Timeout:         time.Duration(binaryU64(get(nlAttrTimeout))) * time.Second,
			DeadConnTimeout: time.Duration(binaryU64(get(nlAttrDeadConnTimeout))) * time.Second,
			ClientFlags:     ClientFlags(binaryU64(get(nlAttrClientFlags))),
		})
		dir := filepath.Join(f.sysRoot, "block", "nbd"+strconv.Itoa(idx))
		os.MkdirAll(filepath.Join(dir, "queue"), 0o755)
		sectors := []byte(strconv.FormatUint(size/512, 10) + "\n")
		switch {
		case f.sizeLate == 0:
			os.WriteFile(filepath.Join(dir, "size"), sectors, 0o644)
		case f.sizeLate > 0:
			os.WriteFile(filepath.Join(dir, "size"), []byte("0\n"), 0o644)
			time.AfterFunc(f.sizeLate, func() { os.WriteFile(filepath.Join(dir, "size"), sectors, 0o644) })
		default:
			os.WriteFile(filepath.Join(dir, "size"), []byte("0\n"), 0o644)
		}
		os.WriteFile(filepath.Join(dir, "backend"), []byte(id+"\n"), 0o644)
		os.WriteFile(filepath.Join(dir, "queue", "logical_block_size"), []byte(strconv.FormatUint(bs, 10)+"\n"), 0o644)
		os.WriteFile(filepath.Join(dir, "queue", "io_timeout"), []byte("30000\n"), 0o644)
		os.WriteFile(filepath.Join(f.devRoot, "nbd"+strconv.Itoa(idx)), nil, 0o644)
		f.devs[idx] = &fakeDev{backend: id, conn: conn, client: newRawClient(conn)}
		return []genetlink.Message{replyMsg(nlCmdConnect, func(ae *netlink.AttributeEncoder) { ae.Uint32(nlAttrIndex, uint32(idx)) })}, nil
	case nlCmdDisconnect:
		idx := int(binaryU32(get(nlAttrIndex)))
		d := f.devs[idx]
		if d == nil {
			return nil, genltest.Error(int(syscall.EINVAL))
		}
		if d.conn != nil {
			d.client.send(request{typ: cmdDisc}, nil)
			d.conn.Close()
		}
		delete(f.devs, idx)
		os.RemoveAll(filepath.Join(f.sysRoot, "block", "nbd"+strconv.Itoa(idx)))
		os.Remove(filepath.Join(f.devRoot, "nbd"+strconv.Itoa(idx)))
		return nil, nil
	case nlCmdReconfigure:
		idx := int(binaryU32(get(nlAttrIndex)))
		d := f.devs[idx]
		if d == nil {
			return nil, genltest.Error(int(syscall.EINVAL))
		}
		if id := string(bytes.TrimRight(get(nlAttrBackendID), "\x00")); d.backend != "" && id != d.backend {
			return nil, genltest.Error(int(syscall.EINVAL))
		}
		if d.conn != nil {
			// As the kernel does: the socket is dropped, success answered.
			return nil, nil
		}
		conn, err := f.takeSocket(attrs)
		if err != nil {
			return nil, err
		}
		d.conn, d.client = conn, newRawClient(conn)
		return nil, nil
	case nlCmdStatus:
		return []genetlink.Message{replyMsg(nlCmdStatus, func(ae *netlink.AttributeEncoder) {
			ae.Nested(nlAttrDeviceList, func(lae *netlink.AttributeEncoder) error {
				for idx := range f.devs {
					lae.Nested(nlDeviceItem, func(iae *netlink.AttributeEncoder) error {
						iae.Uint32(nlDeviceIndex, uint32(idx))
						iae.Uint8(nlDeviceConnected, 1)
						return nil
					})
				}
				return nil
			})
		})}, nil
	}
	return nil, fmt.Errorf("unexpected command %d", cmd)
}

// kill makes the device's connection dead, as the kernel does when the
// serving process exits: the socket is closed from the kernel's side too.
func (f *fakeNBD) kill(idx int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if d := f.devs[idx]; d != nil && d.conn != nil {
		d.conn.Close()
		d.conn = nil
	}
}

// io sends one request on the device's connection, as the kernel would.
func (f *fakeNBD) io(idx int, req request, payload []byte) (reply, error) {
	f.mu.Lock()
	d := f.devs[idx]
	f.mu.Unlock()
	if d == nil || d.conn == nil {
		return reply{}, fmt.Errorf("nbd%d has no connection", idx)
	}
	d.handle++
	req.handle = d.handle
	return d.client.do(req, payload)
}

func (f *fakeNBD) client(t *testing.T) *NetlinkClient {
	t.Helper()
	conn := genltest.Dial(genltest.ServeFamily(fakeFamily, func(greq genetlink.Message, nreq netlink.Message) ([]genetlink.Message, error) {
		msgs, err := f.handle(greq.Header.Command, decodeTree(t, greq.Data, 0, 0))
		if err == nil && len(msgs) == 0 {
			return nil, errEOF
		}
		return msgs, err
	}))
	c, err := NewNetlinkClient(conn)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func (f *fakeNBD) attacher(t *testing.T, stateDir string) *NetlinkAttacher {
	t.Helper()
	a, err := NewNetlinkAttacher(f.client(t), NetlinkOptions{
		StateDir: stateDir, DeviceTimeout: 2 * time.Second, ReconfigureWait: 200 * time.Millisecond,
		sysRoot: f.sysRoot, devRoot: f.devRoot,
	})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestNetlinkAttacherLifecycle(t *testing.T) {
	ctx := context.Background()
	k := newFakeNBD(t)
	state := t.TempDir()
	a := k.attacher(t, state)
	b := newMemBackend(1 << 20)

	att, err := a.Attach(ctx, AttachRequest{VolumeID: "pvc/1", ImagePath: "/img/1.qcow2", Backend: b, BlockSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	want := Attachment{VolumeID: "pvc/1", DevicePath: filepath.Join(k.devRoot, "nbd0"), Index: 0,
		ImagePath: "/img/1.qcow2", BackendID: "pvc/1", Generation: 1, Kind: "nbd"}
	if *att != want {
		t.Fatalf("attachment %+v, want %+v", *att, want)
	}
	c := k.connect[0]
	if c.Size != 1<<20 || c.BlockSize != 4096 || c.Timeout != 0 || c.DeadConnTimeout != 120*time.Second ||
		c.ClientFlags != ClientDestroyOnDisconnect || c.BackendID != "pvc/1" || c.ServerFlags&FlagSendDF != 0 || c.ServerFlags&FlagSendFlush == 0 {
		t.Fatalf("CONNECT carried %+v", c)
	}
	if got, _ := os.ReadFile(filepath.Join(k.sysRoot, "block/nbd0/queue/io_timeout")); string(got) != "2000" {
		t.Fatalf("io_timeout %q, want 2000", got)
	}

	// Idempotent: same volume and image.
	again, err := a.Attach(ctx, AttachRequest{VolumeID: "pvc/1", ImagePath: "/img/1.qcow2", Backend: b, BlockSize: 4096})
	if err != nil || *again != want {
		t.Fatalf("second attach: %+v, %v", again, err)
	}
	if _, err := a.Attach(ctx, AttachRequest{VolumeID: "pvc/1", ImagePath: "/img/other", Backend: b}); !errors.Is(err, ErrConflict) {
		t.Fatalf("attach with another image: %v, want ErrConflict", err)
	}

	// I/O as the kernel does it.
	data := bytes.Repeat([]byte{0xa5}, 8192)
	if r, err := k.io(0, request{typ: cmdWrite, offset: 4096, length: 8192}, data); err != nil || r.errno != 0 {
		t.Fatalf("write: %+v %v", r, err)
	}
	if r, err := k.io(0, request{typ: cmdRead, offset: 4096, length: 8192}, nil); err != nil || !bytes.Equal(r.data, data) {
		t.Fatalf("read back: %v", err)
	}

	list, err := a.List(ctx)
	if err != nil || len(list) != 1 || list[0] != want {
		t.Fatalf("list %+v %v", list, err)
	}

	flushes := b.flushes.Load()
	if err := a.Detach(ctx, "pvc/1"); err != nil {
		t.Fatal(err)
	}
	if b.flushes.Load() == flushes {
		t.Fatal("detach did not flush the backend")
	}
	if list, _ := a.List(ctx); len(list) != 0 {
		t.Fatalf("record left after detach: %+v", list)
	}
	if _, ok := a.Served("pvc/1"); ok {
		t.Fatal("still served after detach")
	}
	if err := a.Detach(ctx, "pvc/1"); err != nil {
		t.Fatalf("second detach: %v", err)
	}
}

// TestNetlinkAttacherRestart: a process attaches and stops gracefully; a
// new process (a new attacher on the same state dir) recovers the device
// with RECONFIGURE and a bumped generation, and serves the same data.
func TestNetlinkAttacherRestart(t *testing.T) {
	ctx := context.Background()
	k := newFakeNBD(t)
	state := t.TempDir()
	b := newMemBackend(1 << 20)

	a1 := k.attacher(t, state)
	if _, err := a1.Attach(ctx, AttachRequest{VolumeID: "v1", ImagePath: "/img/v1", Backend: b}); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("zq"), 2048)
	if r, err := k.io(0, request{typ: cmdWrite, offset: 0, length: 4096}, data); err != nil || r.errno != 0 {
		t.Fatalf("write: %+v %v", r, err)
	}
	if err := a1.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := a1.Attach(ctx, AttachRequest{VolumeID: "v2", Backend: b}); !errors.Is(err, ErrStopped) {
		t.Fatalf("attach after shutdown: %v", err)
	}
	k.kill(0) // the kernel notices the closed socket

	a2 := k.attacher(t, state)
	if _, err := a2.Attach(ctx, AttachRequest{VolumeID: "v1", ImagePath: "/img/v1", Backend: b}); !errors.Is(err, ErrNotServed) {
		t.Fatalf("attach before recover: %v, want ErrNotServed", err)
	}
	var opened []Attachment
	got, err := a2.Recover(ctx, func(rec Attachment) (Backend, error) {
		opened = append(opened, rec)
		return b, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Generation != 2 || got[0].Index != 0 || len(opened) != 1 || opened[0].ImagePath != "/img/v1" {
		t.Fatalf("recovered %+v (opened %+v)", got, opened)
	}
	if r, err := k.io(0, request{typ: cmdRead, offset: 0, length: 4096}, nil); err != nil || !bytes.Equal(r.data, data) {
		t.Fatalf("read after recovery: %v", err)
	}
	if rec, _ := a2.store.Get("v1"); rec.Generation != 2 {
		t.Fatalf("record generation %d, want 2", rec.Generation)
	}
	// Recover again: already served, nothing reopened.
	if got, err := a2.Recover(ctx, func(Attachment) (Backend, error) { t.Fatal("reopened"); return nil, nil }); err != nil || len(got) != 1 {
		t.Fatalf("second recover %+v %v", got, err)
	}
	if err := a2.Detach(ctx, "v1"); err != nil {
		t.Fatal(err)
	}
}

func TestNetlinkAttacherRecoverRefuses(t *testing.T) {
	ctx := context.Background()
	k := newFakeNBD(t)
	state := t.TempDir()
	b := newMemBackend(1 << 20)
	a1 := k.attacher(t, state)
	for _, v := range []string{"mine", "gone", "alive"} {
		if _, err := a1.Attach(ctx, AttachRequest{VolumeID: v, ImagePath: "/img/" + v, Backend: b}); err != nil {
			t.Fatal(err)
		}
	}
	a1.Shutdown(ctx)
	k.kill(0)
	k.kill(1)
	// nbd0 now carries someone else's backend id; nbd1 vanished; nbd2's
	// socket is still alive (another process serves it).
	os.WriteFile(filepath.Join(k.sysRoot, "block/nbd0/backend"), []byte("someone-else\n"), 0o644)
	k.mu.Lock()
	k.devs[0].backend = "someone-else"
	delete(k.devs, 1)
	k.mu.Unlock()
	os.RemoveAll(filepath.Join(k.sysRoot, "block/nbd1"))

	before0, before1, before2 := k.commands(0), k.commands(1), k.commands(2)
	if len(before0) != 1 || before0[0] != nlCmdConnect {
		t.Fatalf("commands for nbd0 before recovery: %v, want [CONNECT]", before0)
	}
	a2 := k.attacher(t, state)
	got, err := a2.Recover(ctx, func(Attachment) (Backend, error) { return b, nil })
	if len(got) != 0 {
		t.Fatalf("recovered %+v", got)
	}
	// Nothing at all was sent for the foreign device nor the vanished one;
	// the live one got RECONFIGURE attempts (refused: ErrDeviceBusy).
	if after := k.commands(0); len(after) != len(before0) {
		t.Errorf("commands sent for the foreign nbd0 during recovery: %v (before: %v); want none", after[len(before0):], before0)
	}
	if after := k.commands(1); len(after) != len(before1) {
		t.Errorf("commands sent for the vanished nbd1 during recovery: %v; want none", after[len(before1):])
	}
	if after := k.commands(2); len(after) <= len(before2) || after[len(before2)] != nlCmdReconfigure {
		t.Errorf("commands for the live nbd2 during recovery: %v; want RECONFIGURE attempts", after[len(before2):])
	}
	if !errors.Is(err, ErrBackendMismatch) || !errors.Is(err, ErrDeviceBusy) {
		t.Fatalf("err = %v, want backend mismatch and device busy", err)
	}
	recs, _ := a2.List(ctx)
	if len(recs) != 1 || recs[0].VolumeID != "alive" {
		t.Fatalf("records left %+v, want only alive", recs)
	}
	if id, _, _ := a2.sys.backend(0); id != "someone-else" {
		t.Fatal("foreign device touched")
	}
}

// TestNetlinkAttacherDisconnectedElsewhere: another process detaches the
// volume; the serving process sees the DISC and lets the volume go.
func TestNetlinkAttacherDisconnectedElsewhere(t *testing.T) {
	ctx := context.Background()
	k := newFakeNBD(t)
	state := t.TempDir()
	b := newMemBackend(1 << 20)
	server := k.attacher(t, state)
	if _, err := server.Attach(ctx, AttachRequest{VolumeID: "v", ImagePath: "/i", Backend: b}); err != nil {
		t.Fatal(err)
	}
	done, _ := server.Served("v")
	other := k.attacher(t, state)
	if err := other.Detach(ctx, "v"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("serving process did not let go after DISC")
	}
	if recs, _ := server.List(ctx); len(recs) != 0 {
		t.Fatalf("records %+v", recs)
	}
}

// TestNetlinkAttacherReconnect: a broken stream on our side is repaired
// with RECONFIGURE without the record or the device changing.
func TestNetlinkAttacherReconnect(t *testing.T) {
	ctx := context.Background()
	k := newFakeNBD(t)
	b := newMemBackend(1 << 20)
	var mu sync.Mutex
	var reported []error
	a, err := NewNetlinkAttacher(k.client(t), NetlinkOptions{
		StateDir: t.TempDir(), DeviceTimeout: 2 * time.Second, sysRoot: k.sysRoot, devRoot: k.devRoot,
		OnServeError: func(_ string, err error) { mu.Lock(); reported = append(reported, err); mu.Unlock() },
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Attach(ctx, AttachRequest{VolumeID: "v", Backend: b}); err != nil {
		t.Fatal(err)
	}
	// A request with a bad magic breaks the stream: the server closes it.
	k.mu.Lock()
	broken := k.devs[0].conn
	broken.Write(make([]byte, requestSize))
	k.mu.Unlock()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if rec, _ := a.store.Get("v"); rec.Generation == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no reconnect")
		}
		// The kernel notices the dead socket when its read fails.
		k.mu.Lock()
		if d := k.devs[0]; d.conn == broken {
			var one [1]byte
			d.conn.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
			if _, err := d.conn.Read(one[:]); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
				d.conn.Close()
				d.conn = nil
			}
		}
		k.mu.Unlock()
		time.Sleep(10 * time.Millisecond)
	}
	if r, err := k.io(0, request{typ: cmdFlush}, nil); err != nil || r.errno != 0 {
		t.Fatalf("flush after reconnect: %+v %v", r, err)
	}
	mu.Lock()
	if len(reported) == 0 {
		t.Error("broken connection not reported")
	}
	mu.Unlock()
	a.Detach(ctx, "v")
}

// TestNetlinkAttacherWaitsForSize: the device's sysfs size appears only
// after the CONNECT reply; Attach returns once it is right, not before.
func TestNetlinkAttacherWaitsForSize(t *testing.T) {
	ctx := context.Background()
	k := newFakeNBD(t)
	k.sizeLate = 200 * time.Millisecond
	a := k.attacher(t, t.TempDir())
	if _, err := a.Attach(ctx, AttachRequest{VolumeID: "late", ImagePath: "/img/late", Backend: newMemBackend(1 << 20)}); err != nil {
		t.Fatal(err)
	}
	// Read right after Attach returned: had it not waited, this is "0".
	if got, _ := os.ReadFile(filepath.Join(k.sysRoot, "block/nbd0/size")); string(got) != "2048\n" {
		t.Fatalf("Attach returned while the device's size was %q sectors, want 2048", got)
	}
	if got, _ := os.ReadFile(filepath.Join(k.sysRoot, "block/nbd0/queue/io_timeout")); string(got) != "2000" {
		t.Fatalf("io_timeout %q after the wait, want 2000", got)
	}
	if err := a.Detach(ctx, "late"); err != nil {
		t.Fatal(err)
	}
}

// TestNetlinkAttacherSizeTimeout: a device whose size never shows fails
// Attach after DeviceTimeout with an error naming the device, the size
// waited for and what was seen; the device is disconnected again and no
// record is left.
func TestNetlinkAttacherSizeTimeout(t *testing.T) {
	ctx := context.Background()
	k := newFakeNBD(t)
	k.sizeLate = -1
	state := t.TempDir()
	a, err := NewNetlinkAttacher(k.client(t), NetlinkOptions{
		StateDir: state, DeviceTimeout: 300 * time.Millisecond, sysRoot: k.sysRoot, devRoot: k.devRoot,
	})
	if err != nil {
		t.Fatal(err)
	}
	_, err = a.Attach(ctx, AttachRequest{VolumeID: "never", ImagePath: "/img/never", Backend: newMemBackend(1 << 20)})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("attach of a device that never shows its size: %v, want a deadline error", err)
	}
	for _, want := range []string{"nbd0", "2048 sectors", "300ms", "last seen 0 sectors"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	t.Logf("error: %v", err)
	if cmds := k.commands(0); len(cmds) != 2 || cmds[0] != nlCmdConnect || cmds[1] != nlCmdDisconnect {
		t.Errorf("commands for nbd0: %v, want [CONNECT DISCONNECT]", cmds)
	}
	if recs, _ := a.List(ctx); len(recs) != 0 {
		t.Errorf("records after a failed attach: %+v", recs)
	}
	if _, ok := a.Served("never"); ok {
		t.Error("still served after a failed attach")
	}
}

// errEOF is genltest's "no messages, no error": an ACK.
var errEOF = io.EOF
