package nbdattach

// Interoperability tests against real NBD clients: libnbd's nbdinfo, nbdcopy
// and Python bindings (nbdsh), qemu-io and qemu-img, and fio's nbd engine.
// Each test starts the server in-process on a unix socket and checks the
// peer's view against the backend. A missing peer skips the test loudly, or
// fails it when ZQ_REQUIRE_PEERS=1 (as in CI).

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

const peerTimeout = 30 * time.Second

// requirePeer returns the path of a peer binary, or skips (fails, with
// ZQ_REQUIRE_PEERS=1) naming the Debian package that provides it.
func requirePeer(t *testing.T, bin, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(bin)
	if err != nil {
		missingPeer(t, bin, pkg)
	}
	return p
}

func missingPeer(t *testing.T, what, pkg string) {
	t.Helper()
	if os.Getenv("ZQ_REQUIRE_PEERS") == "1" {
		t.Fatalf("peer %s is missing: apt-get install -y --no-install-recommends %s", what, pkg)
	}
	t.Skipf("!!! SKIPPED: peer %s is missing (apt-get install -y --no-install-recommends %s); set ZQ_REQUIRE_PEERS=1 to fail instead", what, pkg)
}

// requirePython finds a python3 that can import libnbd's bindings. nbdsh is
// "python3 -m nbd" with whatever python3 is first on PATH, which need not be
// Debian's (pyenv, venvs), so look for the interpreter explicitly.
func requirePython(t *testing.T) string {
	t.Helper()
	for _, py := range []string{"/usr/bin/python3", "python3"} {
		if p, err := exec.LookPath(py); err == nil && exec.Command(p, "-c", "import nbd").Run() == nil {
			return p
		}
	}
	missingPeer(t, "python3 module nbd (nbdsh)", "python3-libnbd")
	return ""
}

type peerServer struct {
	sock string
	mu   sync.Mutex
	errs []error
}

func (ps *peerServer) uri(export string) string {
	return "nbd+unix:///" + export + "?socket=" + ps.sock
}

// startPeerServer serves exports on a unix socket until the test ends. Any
// connection that ends with an error fails the test: real peers end their
// sessions properly.
func startPeerServer(t *testing.T, exports ExportList, opts ...Option) *peerServer {
	t.Helper()
	ps := &peerServer{}
	var l net.Listener
	ps.sock, l = listenUnix(t)
	if dir := os.Getenv("ZQ_NBDATTACH_RECORD"); dir != "" {
		l = &recordingListener{Listener: l, dir: dir, name: t.Name()}
	}
	opts = append(opts, WithConnErrorHandler(func(_ net.Conn, err error) {
		ps.mu.Lock()
		ps.errs = append(ps.errs, err)
		ps.mu.Unlock()
	}))
	t.Cleanup(func() { // runs after the server has stopped
		for _, err := range ps.errs {
			t.Errorf("connection ended with error: %v", err)
		}
	})
	serveUntilCleanup(t, NewServer(exports, opts...), l)
	return ps
}

// runPeer runs a peer and returns its stdout; a failure fails the test with
// the peer's output.
func runPeer(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := runPeerErr(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func runPeerErr(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), peerTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String() + stderr.String(), err
	}
	return stdout.String(), nil
}

func randomBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestPeerNbdinfo: libnbd's view of the negotiated export — size, every
// transmission flag, block sizes, metadata contexts, export list — matches
// the Export.
func TestPeerNbdinfo(t *testing.T) {
	nbdinfo := requirePeer(t, "nbdinfo", "libnbd-bin")
	ps := startPeerServer(t, ExportList{
		{Name: "rw", Description: "read-write volume", Backend: newMemBackend(4 << 20)},
		{Name: "ro", Backend: newMemBackend(1 << 20), ReadOnly: true, MultiConn: true, MinBlockSize: 4096, MaxPayload: 1 << 20},
	})
	type info struct {
		Protocol   string `json:"protocol"`
		Structured bool   `json:"structured"`
		Exports    []struct {
			Name        string   `json:"export-name"`
			Description string   `json:"description"`
			Contexts    []string `json:"contexts"`
			ReadOnly    bool     `json:"is_read_only"`
			Cache       bool     `json:"can_cache"`
			DF          bool     `json:"can_df"`
			FastZero    bool     `json:"can_fast_zero"`
			Flush       bool     `json:"can_flush"`
			FUA         bool     `json:"can_fua"`
			MultiConn   bool     `json:"can_multi_conn"`
			Trim        bool     `json:"can_trim"`
			Zero        bool     `json:"can_zero"`
			Min         uint32   `json:"block_size_minimum"`
			Preferred   uint32   `json:"block_size_preferred"`
			Max         uint32   `json:"block_size_maximum"`
			Size        int64    `json:"export-size"`
		} `json:"exports"`
	}
	parse := func(out string) info {
		var i info
		if err := json.Unmarshal([]byte(out), &i); err != nil {
			t.Fatalf("nbdinfo --json: %v\n%s", err, out)
		}
		return i
	}

	rw := parse(runPeer(t, nbdinfo, "--json", ps.uri("rw")))
	if rw.Protocol != "newstyle-fixed" || !rw.Structured || len(rw.Exports) != 1 {
		t.Fatalf("nbdinfo: %+v", rw)
	}
	e := rw.Exports[0]
	if e.Size != 4<<20 || e.ReadOnly || !e.Cache || !e.DF || !e.FastZero || !e.Flush || !e.FUA || e.MultiConn || !e.Trim || !e.Zero {
		t.Errorf("rw export flags: %+v", e)
	}
	if e.Min != 512 || e.Preferred != 4096 || e.Max != 32<<20 {
		t.Errorf("rw block sizes %d/%d/%d", e.Min, e.Preferred, e.Max)
	}
	if !slices.Equal(e.Contexts, []string{BaseAllocation, testContext}) {
		t.Errorf("contexts %v", e.Contexts)
	}

	ro := parse(runPeer(t, nbdinfo, "--json", ps.uri("ro"))).Exports[0]
	if !ro.ReadOnly || !ro.MultiConn || ro.Trim || ro.Zero || ro.FastZero || !ro.Flush || ro.Min != 4096 || ro.Max != 1<<20 {
		t.Errorf("ro export: %+v", ro)
	}

	list := parse(runPeer(t, nbdinfo, "--json", "--list", ps.uri("")))
	var names []string
	for _, e := range list.Exports {
		names = append(names, e.Name)
		if e.Name == "rw" && e.Description != "read-write volume" {
			t.Errorf("description %q", e.Description)
		}
	}
	if !slices.Equal(names, []string{"rw", "ro"}) {
		t.Errorf("--list exports %v", names)
	}
}

// TestPeerNbdinfoMap: nbdinfo --map reads base:allocation and a backend
// context through NBD_CMD_BLOCK_STATUS, including the follow-up requests
// it makes when a reply covers less than it asked for.
func TestPeerNbdinfoMap(t *testing.T) {
	nbdinfo := requirePeer(t, "nbdinfo", "libnbd-bin")
	m := newMemBackend(1 << 20)
	m.WriteAt(make([]byte, 8192), 64<<10, false)
	m.WriteAt(make([]byte, 4096), 200<<10, false)
	m.WriteAt(make([]byte, 64<<10), 1<<20-64<<10, false)
	ps := startPeerServer(t, ExportList{{Backend: m}})

	type extent struct {
		Offset int64  `json:"offset"`
		Length int64  `json:"length"`
		Type   uint32 `json:"type"`
	}
	mapOf := func(args ...string) []extent {
		out := runPeer(t, nbdinfo, append(args, "--json", ps.uri(""))...)
		var ext []extent
		if err := json.Unmarshal([]byte(out), &ext); err != nil {
			t.Fatalf("nbdinfo %v: %v\n%s", args, err, out)
		}
		return ext
	}
	hz := StateHole | StateZero
	wantBase := []extent{
		{0, 64 << 10, hz}, {64 << 10, 8 << 10, 0}, {72 << 10, 128 << 10, hz},
		{200 << 10, 4 << 10, 0}, {204 << 10, 1<<20 - 64<<10 - 204<<10, hz}, {1<<20 - 64<<10, 64 << 10, 0},
	}
	if got := mapOf("--map"); !slices.Equal(got, wantBase) {
		t.Errorf("--map base:allocation\n got %v\nwant %v", got, wantBase)
	}
	var wantZones []extent
	for z := int64(0); z < 16; z++ {
		wantZones = append(wantZones, extent{z * memZoneSize, memZoneSize, uint32(z % 4)})
	}
	if got := mapOf("--map=" + testContext); !slices.Equal(got, wantZones) {
		t.Errorf("--map=%s\n got %v\nwant %v", testContext, got, wantZones)
	}
}

// TestPeerNbdcopy copies random data (with a hole, so nbdcopy's zeroing
// paths run too) into a file-backed export and out again, over several
// connections since the export allows multi-conn, and compares bytes.
func TestPeerNbdcopy(t *testing.T) {
	nbdcopy := requirePeer(t, "nbdcopy", "libnbd-bin")
	dir := t.TempDir()
	const size = 8 << 20
	src := randomBytes(t, size)
	clear(src[2<<20 : 3<<20])
	srcPath, backPath, dstPath := filepath.Join(dir, "src"), filepath.Join(dir, "back"), filepath.Join(dir, "dst")
	os.WriteFile(srcPath, src, 0o600)
	// Garbage in the export first, so the hole must really be written.
	os.WriteFile(backPath, randomBytes(t, size), 0o600)
	fb, err := openFileBackend(backPath)
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	ps := startPeerServer(t, ExportList{{Backend: fb, MultiConn: true}})

	runPeer(t, nbdcopy, "--flush", srcPath, ps.uri(""))
	if back, _ := os.ReadFile(backPath); !bytes.Equal(back, src) {
		t.Fatalf("export file differs from the source after nbdcopy in")
	}
	runPeer(t, nbdcopy, ps.uri(""), dstPath)
	if dst, _ := os.ReadFile(dstPath); !bytes.Equal(dst, src) {
		t.Fatalf("nbdcopy out differs from the source")
	}
}

// TestPeerQemuIO drives writes, pattern-checked reads, flush, discard and
// write-zeroes through qemu's NBD client and checks the backend directly.
func TestPeerQemuIO(t *testing.T) {
	qemuIO := requirePeer(t, "qemu-io", "qemu-utils")
	m := newMemBackend(4 << 20)
	ps := startPeerServer(t, ExportList{{Backend: m}})
	out := runPeer(t, qemuIO, "-f", "raw", ps.uri(""),
		"-c", "write -P 0xab 0 1M",
		"-c", "read -P 0xab 0 1M",
		"-c", "flush",
		"-c", "discard 0 64k",
		"-c", "read -P 0 0 64k",
		"-c", "write -z 1M 64k",
		"-c", "write -f -P 0xcd 2M 64k", // -f: FUA
		"-c", "aio_write -P 0x11 3M 64k",
		"-c", "aio_write -P 0x22 3200k 64k",
		"-c", "aio_flush",
		"-c", "read -P 0x11 3M 64k",
		"-c", "read -P 0x22 3200k 64k",
	)
	if strings.Contains(out, "fail") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io reported a failure:\n%s", out)
	}
	data := m.bytes()
	check := func(off, n int, b byte) {
		t.Helper()
		if !bytes.Equal(data[off:off+n], bytes.Repeat([]byte{b}, n)) {
			t.Errorf("backend [%d, +%d) is not 0x%02x", off, n, b)
		}
	}
	check(0, 64<<10, 0)
	check(64<<10, 1<<20-64<<10, 0xab)
	check(2<<20, 64<<10, 0xcd)
	check(3<<20, 64<<10, 0x11)
}

// TestPeerQemuImgCompare: qemu-img compare reads the whole export (using
// block status to skip holes) and finds it identical to its source file,
// then notices a single changed byte.
func TestPeerQemuImgCompare(t *testing.T) {
	qemuImg := requirePeer(t, "qemu-img", "qemu-utils")
	dir := t.TempDir()
	data := randomBytes(t, 4<<20)
	clear(data[1<<20 : 2<<20])
	orig, back := filepath.Join(dir, "orig"), filepath.Join(dir, "back")
	os.WriteFile(orig, data, 0o600)
	os.WriteFile(back, data, 0o600)
	fb, err := openFileBackend(back)
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	fb.Trim(1<<20, 1<<20) // a real hole, reported by base:allocation
	ps := startPeerServer(t, ExportList{{Backend: fb}})

	runPeer(t, qemuImg, "compare", "-f", "raw", "-F", "raw", orig, ps.uri(""))
	data[3<<20+12345] ^= 0xff
	os.WriteFile(orig, data, 0o600)
	out, err := runPeerErr(qemuImg, "compare", "-f", "raw", "-F", "raw", orig, ps.uri(""))
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Fatalf("qemu-img compare after a change: %v\n%s", err, out)
	}
	// qemu-img reports the first differing 512-byte sector.
	if want := fmt.Sprintf("mismatch at offset %d", (3<<20+12345)&^511); !strings.Contains(out, want) {
		t.Errorf("qemu-img compare did not say %q:\n%s", want, out)
	}
}

// nbdshScript runs through libnbd's Python bindings (what nbdsh runs) the
// requests that a polite client never sends, with strict mode off so libnbd
// passes them on, and checks the server's errno and that the connection
// stays usable after each.
const nbdshScript = `
import errno, sys, nbd

uri, ro_uri, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
MiB = 1 << 20

def expect_error(name, want, f, *args):
    try:
        f(*args)
    except nbd.Error as err:
        e = err
        if e.errnum != want:
            sys.exit("%s: errno %s (%s), want %s" % (name, e.errno, e.string, errno.errorcode[want]))
        # libnbd says "command failed" only for an error reply from the
        # server, not for a request it refused to send.
        if "command failed" not in e.string:
            sys.exit("%s: refused by libnbd itself: %s" % (name, e.string))
    else:
        sys.exit("%s: no error, want %s" % (name, errno.errorcode[want]))
    # The connection is still in sync.
    if h.pread(512, 0) != bytes(512):
        sys.exit("%s: follow-up read returned wrong data" % name)
    print("ok", name, "--", e.string)

h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("zq:test")
h.connect_uri(uri)
assert h.get_size() == size
assert h.can_meta_context("base:allocation") and h.can_meta_context("zq:test")
h.set_strict_mode(0)

expect_error("unknown command flag", errno.EINVAL, h.pread, 512, 0, 1 << 9)
expect_error("flag not valid for the command", errno.EINVAL, h.flush, nbd.CMD_FLAG_NO_HOLE)
expect_error("read beyond the end", errno.EINVAL, h.pread, 512, size)
expect_error("write beyond the end", errno.ENOSPC, h.pwrite, bytes(1024), size - 512)
expect_error("misaligned read", errno.EINVAL, h.pread, 100, 0)
expect_error("oversize read", errno.EINVAL, h.pread, 32 * MiB + 512, 0)
expect_error("oversize write, payload drained", errno.EINVAL, h.pwrite, b"\xee" * (32 * MiB + 512), 0)
expect_error("fast zero the backend cannot promise", errno.ENOTSUP, h.zero, 4096, 8192, nbd.CMD_FLAG_FAST_ZERO)

# Zero-length requests: proto.md lets a server treat them as no-ops.
assert h.pread(0, 4096) == b""
h.pwrite(b"", 4096)
print("ok zero-length read and write")

h.zero(4096, 8192)
h.cache(MiB, 0)
h.trim(65536, 0)
h.flush()

seen = {}
def extents(ctx, off, entries, err):
    seen.setdefault(ctx, []).append(list(entries))
    return 0
h.block_status(256 * 1024, 0, extents)
assert set(seen) == {"base:allocation", "zq:test"}, seen
h.block_status(256 * 1024, 0, lambda *a: extents(*a) , nbd.CMD_FLAG_REQ_ONE)
assert all(len(e) == 2 for e in seen["zq:test"][1:]), seen
print("ok block status")

# Many requests in flight: 64 writes, then 64 reads, all outstanding at once.
bufs = []
for i in range(64):
    buf = nbd.Buffer.from_bytearray(bytearray([i]) * 65536)
    h.aio_pwrite(buf, MiB + i * 65536)
    bufs.append(buf)
while h.aio_in_flight() > 0:
    h.poll(-1)
reads = []
for i in range(64):
    buf = nbd.Buffer(65536)
    h.aio_pread(buf, MiB + i * 65536)
    reads.append(buf)
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, buf in enumerate(reads):
    if buf.to_bytearray() != bytearray([i]) * 65536:
        sys.exit("aio read %d returned wrong data" % i)
print("ok 128 concurrent requests")
h.shutdown()

r = nbd.NBD()
r.connect_uri(ro_uri)
assert r.is_read_only()
r.set_strict_mode(0)
h = r
expect_error("write to a read-only export", errno.EPERM, r.pwrite, bytes(512), 0)
expect_error("trim on a read-only export", errno.EPERM, r.trim, 512, 0)
r.shutdown()
`

func TestPeerNbdsh(t *testing.T) {
	py := requirePython(t)
	const size = 64 << 20
	ps := startPeerServer(t, ExportList{
		{Name: "rw", Backend: newMemBackend(size)},
		{Name: "ro", Backend: newMemBackend(1 << 20), ReadOnly: true},
	})
	out := runPeer(t, py, "-c", nbdshScript, ps.uri("rw"), ps.uri("ro"), fmt.Sprint(size))
	t.Logf("nbdsh:\n%s", out)
	if n := strings.Count(out, "ok "); n != 13 {
		t.Errorf("%d checks passed, want 13", n)
	}
}

// nbdshZonedScript drives a zoned export (newZonedDevice: 8 zones of 1 MiB,
// zones 0-1 conventional, max_active_zones 4) through libnbd: zero-length
// requests of every kind succeed and change nothing (proto.md lets a server
// treat them as no-ops), zone violations are EIO (spec §6), also running
// out of active zones, and zq:zones shows the result.
const nbdshZonedScript = `
import errno, sys, nbd

MiB = 1 << 20
h = nbd.NBD()
h.add_meta_context("zq:zones")
h.connect_uri(sys.argv[1])
h.set_strict_mode(0)

def expect_eio(name, f, *args):
    try:
        f(*args)
    except nbd.Error as e:
        if e.errnum != errno.EIO or "command failed" not in e.string:
            sys.exit("%s: errno %s (%s), want EIO from the server" % (name, e.errno, e.string))
        print("ok", name, "--", e.string)
        return
    sys.exit("%s: no error, want EIO" % name)

h.pwrite(b"", 2 * MiB)                       # at the WP of an empty zone
h.pwrite(b"", 2 * MiB + 65536)               # off the WP
h.pwrite(b"", 3 * MiB, nbd.CMD_FLAG_FUA)
h.pwrite(b"", 0)                             # conventional zone
assert h.pread(0, 2 * MiB) == b""
h.trim(0, 2 * MiB)
h.zero(0, 2 * MiB)
h.cache(0, 2 * MiB)
print("ok zero-length requests on a zoned export")

def zones():
    seen = []
    def cb(ctx, off, entries, err):
        seen.extend(entries[1::2])
        return 0
    h.block_status(8 * MiB, 0, cb)
    return seen
# Flags: condition in bits 0-3, EMPTY is 1; sequential zones 2..7 are
# still empty, each one extent.
conds = [f & 0xf for f in zones()]
assert conds == [0, 0, 1, 1, 1, 1, 1, 1], conds

h.pwrite(b"\x11" * 4096, 2 * MiB)
expect_eio("write behind the write pointer", h.pwrite, b"\x22" * 4096, 2 * MiB)
expect_eio("write past the write pointer", h.pwrite, b"\x22" * 4096, 2 * MiB + 65536)
for z in (3, 4, 5):
    h.pwrite(b"\x33" * 4096, z * MiB)
expect_eio("write that needs a fifth active zone", h.pwrite, b"\x44" * 4096, 6 * MiB)
assert h.pread(8192, 2 * MiB) == b"\x11" * 4096 + bytes(4096)
assert h.pread(4096, 6 * MiB) == bytes(4096)
h.shutdown()
`

// TestPeerNbdshZoned runs nbdshZonedScript against a zoned export.
func TestPeerNbdshZoned(t *testing.T) {
	py := requirePython(t)
	d := newZonedDevice(t)
	ps := startPeerServer(t, ExportList{{Backend: ZonedBackend{D: d}}})
	out := runPeer(t, py, "-c", nbdshZonedScript, ps.uri(""))
	t.Logf("nbdsh:\n%s", out)
	if n := strings.Count(out, "ok "); n != 4 {
		t.Errorf("%d checks passed, want 4", n)
	}
}

// TestPeerFio: fio's nbd engine writes 16 MiB at random with 16 requests in
// flight, then reads everything back verifying checksums.
func TestPeerFio(t *testing.T) {
	fio := requirePeer(t, "fio", "fio")
	if out, _ := runPeerErr(fio, "--enghelp=nbd"); !strings.Contains(out, "uri") {
		missingPeer(t, "fio with the nbd ioengine", "fio")
	}
	ps := startPeerServer(t, ExportList{{Backend: newMemBackend(16 << 20)}})
	out := runPeer(t, fio, "--name=verify", "--ioengine=nbd", "--uri="+ps.uri(""),
		"--rw=randwrite", "--bs=4k", "--size=16m", "--iodepth=16",
		"--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--output-format=terse")
	// Terse format v3: field 5 is the error count.
	if f := strings.Split(strings.TrimSpace(out), ";"); len(f) < 5 || f[4] != "0" {
		t.Fatalf("fio: %s", out)
	}
}

// recordingListener saves what each client sends, as a seed for
// FuzzHandshake (ZQ_NBDATTACH_RECORD=pkg/nbdattach/testdata/fuzz/FuzzHandshake).
type recordingListener struct {
	net.Listener
	dir, name string
	mu        sync.Mutex
	n         int
}

func (l *recordingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.n++
	name := fmt.Sprintf("%s-%d", strings.ReplaceAll(l.name, "/", "_"), l.n)
	l.mu.Unlock()
	return &recordingConn{Conn: c, path: filepath.Join(l.dir, name)}, nil
}

type recordingConn struct {
	net.Conn
	path string
	mu   sync.Mutex
	buf  bytes.Buffer
}

// maxRecorded keeps seeds small: the handshake and the first requests.
const maxRecorded = 4096

func (c *recordingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	if room := maxRecorded - c.buf.Len(); room > 0 {
		c.buf.Write(p[:min(n, room)])
	}
	c.mu.Unlock()
	return n, err
}

func (c *recordingConn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.buf.Len() > 0 {
		os.WriteFile(c.path, fmt.Appendf(nil, "go test fuzz v1\n[]byte(%q)\n", c.buf.Bytes()), 0o644)
		c.buf.Reset()
	}
	return c.Conn.Close()
}
