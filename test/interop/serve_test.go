package interop

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// nbdPeer returns the path of a libnbd tool (Debian package libnbd-bin),
// skipping loudly or failing with ZQ_REQUIRE_PEERS=1 when it is missing.
func nbdPeer(t *testing.T, tool string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err == nil {
		return p
	}
	msg := tool + " not found in PATH: install the Debian/Ubuntu package libnbd-bin (apt-get install libnbd-bin)"
	if os.Getenv("ZQ_REQUIRE_PEERS") == "1" {
		t.Fatalf("%s (ZQ_REQUIRE_PEERS=1)", msg)
	}
	t.Skipf("!!! SKIPPING interop test: %s; set ZQ_REQUIRE_PEERS=1 to make this a failure !!!", msg)
	return ""
}

// served is a running "zq-csi img serve".
type served struct {
	cmd    *exec.Cmd
	sock   string // unix socket, or
	addr   string // TCP host:port
	stderr bytes.Buffer
	done   chan struct{}
	err    error
	// noisy: the test expects the server to report connection errors.
	noisy bool
}

func (s *served) uri() string {
	if s.addr != "" {
		return "nbd://" + s.addr
	}
	return "nbd+unix:///?socket=" + s.sock
}

// serve starts "zq-csi img serve -k SOCK ARGS..." in dir and returns once
// the socket is listening. The server is stopped when the test ends.
func serve(t *testing.T, dir string, args ...string) *served {
	t.Helper()
	// A unix socket path must fit in 108 bytes; test temp dirs may not.
	sdir, err := os.MkdirTemp("", "zqserve")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sdir) })
	s := &served{sock: filepath.Join(sdir, "nbd.sock")}
	startServed(t, s, dir, func() bool { return listening(s.sock) }, append([]string{"-k", s.sock}, args...)...)
	return s
}

// startServed starts "zq-csi img serve ARGS..." in dir and returns once
// ready says it listens. The server is stopped when the test ends.
func startServed(t *testing.T, s *served, dir string, ready func() bool, args ...string) {
	t.Helper()
	s.done = make(chan struct{})
	s.cmd = exec.Command(zqBin, append([]string{"img", "serve"}, args...)...)
	s.cmd.Dir = dir
	s.cmd.Stderr = &s.stderr
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.err = s.cmd.Wait(); close(s.done) }()
	t.Cleanup(func() {
		select {
		case <-s.done:
		default:
			s.cmd.Process.Kill()
			<-s.done
		}
	})
	for deadline := time.Now().Add(10 * time.Second); !ready(); {
		select {
		case <-s.done:
			t.Fatalf("img serve exited early: %v\n%s", s.err, s.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("img serve %s did not start listening\n%s", strings.Join(args, " "), s.stderr.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// listening reports whether a unix socket is bound to path and listening
// (flag __SO_ACCEPTCON in /proc/net/unix). Probing with a connection would
// itself be a client, and end a server that is not --persistent.
func listening(path string) bool {
	b, err := os.ReadFile("/proc/net/unix")
	if err != nil {
		_, err := os.Stat(path)
		return err == nil
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) == 8 && f[7] == path {
			flags, _ := strconv.ParseUint(f[3], 16, 32)
			return flags&0x10000 != 0
		}
	}
	return false
}

// stop sends SIGTERM and fails the test unless the server exits 0.
func (s *served) stop(t *testing.T) {
	t.Helper()
	s.cmd.Process.Signal(syscall.SIGTERM)
	s.wait(t)
}

// wait fails the test unless the server exits 0 within 10 s.
func (s *served) wait(t *testing.T) {
	t.Helper()
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("img serve did not exit\n%s", s.stderr.String())
	}
	if s.err != nil || (s.stderr.Len() != 0 && !s.noisy) {
		t.Errorf("img serve: %v\n%s", s.err, s.stderr.String())
	}
}

type nbdInfo struct {
	Exports []struct {
		Contexts     []string `json:"contexts"`
		ReadOnly     bool     `json:"is_read_only"`
		CanFlush     bool     `json:"can_flush"`
		CanFUA       bool     `json:"can_fua"`
		CanTrim      bool     `json:"can_trim"`
		CanZero      bool     `json:"can_zero"`
		CanMultiConn bool     `json:"can_multi_conn"`
		MinBlock     int      `json:"block_size_minimum"`
		PrefBlock    int      `json:"block_size_preferred"`
		MaxBlock     int      `json:"block_size_maximum"`
		Size         uint64   `json:"export-size"`
	} `json:"exports"`
}

func nbdinfoJSON(t *testing.T, args ...string) nbdInfo {
	t.Helper()
	r := mustRun(t, "", nbdPeer(t, "nbdinfo"), append([]string{"--json"}, args...)...)
	var info nbdInfo
	if err := json.Unmarshal([]byte(r.stdout), &info); err != nil || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo --json: %v\n%s", err, r.stdout)
	}
	return info
}

// TestServeNbdinfo: nbdinfo sees the size, block sizes and capabilities
// we advertise; multi-conn only with --shared > 1; a client leaving ends a
// server that is not --persistent, cleanly.
func TestServeNbdinfo(t *testing.T) {
	nbdPeer(t, "nbdinfo")
	dir := seedImage(t)
	s := serve(t, dir, "-t", "--shared", "2", "zbc.qcow2")
	e := nbdinfoJSON(t, s.uri()).Exports[0]
	if e.Size != seedImageBytes || e.ReadOnly || !e.CanFlush || !e.CanFUA || !e.CanTrim || !e.CanZero || !e.CanMultiConn ||
		e.MinBlock != 512 || e.PrefBlock != 4096 || e.MaxBlock != 32<<20 || strings.Join(e.Contexts, ",") != "base:allocation,zq:zones" {
		t.Errorf("zoned export, --shared 2: %+v", e)
	}
	s.stop(t)

	s = serve(t, dir, "--read-only", "zbc.qcow2")
	e = nbdinfoJSON(t, s.uri()).Exports[0]
	if e.Size != seedImageBytes || !e.ReadOnly || e.CanMultiConn {
		t.Errorf("zoned export, read-only, --shared 1: %+v", e)
	}
	s.wait(t) // not --persistent: gone with its only client

	mustZq(t, dir, "create", "-f", "qcow2", "plain.qcow2", "1G")
	s = serve(t, dir, "-x", "vol", "plain.qcow2")
	e = nbdinfoJSON(t, "nbd+unix:///vol?socket="+s.sock).Exports[0]
	if e.Size != 1<<30 || e.ReadOnly || !e.CanTrim || strings.Join(e.Contexts, ",") != "base:allocation" {
		t.Errorf("plain qcow2 export: %+v", e)
	}
	s.wait(t)
}

// mapLine is one line of "nbdinfo --map".
type mapLine struct {
	off, len uint64
	typ      uint32
}

func nbdinfoMap(t *testing.T, args ...string) []mapLine {
	t.Helper()
	r := mustRun(t, "", nbdPeer(t, "nbdinfo"), args...)
	var out []mapLine
	for _, l := range strings.Split(strings.TrimSpace(r.stdout), "\n") {
		f := strings.Fields(l)
		if len(f) < 3 {
			t.Fatalf("nbdinfo map line %q", l)
		}
		o, _ := strconv.ParseUint(f[0], 10, 64)
		n, _ := strconv.ParseUint(f[1], 10, 64)
		ty, _ := strconv.ParseUint(f[2], 10, 32)
		out = append(out, mapLine{o, n, uint32(ty)})
	}
	return out
}

// Flags of the zq:zones context (pkg/nbdattach, docs/zoned-format.md).
const (
	zfUnwritten  = 1 << 8
	zfZoneStart  = 1 << 9
	zfIndexShift = 12
)

// seedZone is the expected state of one zone of the seed image.
type seedZone struct {
	wp   uint64 // absolute; a FULL zone's is its end
	cond uint32
}

// checkZoneMap checks nbdinfo's zq:zones map against the zones' states:
// the lines tile the device, every zone begins a line and no line crosses
// a zone boundary or a write pointer (the zone index in the flags keeps
// nbdinfo from joining neighbouring zones), and each line carries its
// zone's condition, type and index, "unwritten" exactly at or past the WP
// and "zone start" exactly at the zone's start.
func checkZoneMap(t *testing.T, lines []mapLine, zones []seedZone) {
	t.Helper()
	starts := map[uint64]bool{}
	pos := uint64(0)
	for _, l := range lines {
		starts[l.off] = true
		if l.off != pos || l.len == 0 {
			t.Fatalf("map does not tile the device at %d: %+v", pos, lines)
		}
		i := int(l.off / seedZoneSize)
		zs, wp := uint64(i)*seedZoneSize, zones[i].wp
		if l.off+l.len > zs+seedZoneSize || (l.off < wp && l.off+l.len > wp) {
			t.Errorf("line %+v crosses the end or the WP %#x of zone %d", l, wp, i)
		}
		want := zones[i].cond | 2<<4 | uint32(i)<<zfIndexShift
		if l.off >= wp {
			want |= zfUnwritten
		}
		if l.off == zs {
			want |= zfZoneStart
		}
		if l.typ != want {
			t.Errorf("line %+v: flags %#x, want %#x", l, l.typ, want)
		}
		pos += l.len
	}
	if pos != seedImageBytes {
		t.Errorf("map covers %d bytes, want %d", pos, seedImageBytes)
	}
	for i := range zones {
		if !starts[uint64(i)*seedZoneSize] {
			t.Errorf("zone %d does not begin a line of the map: %+v", i, lines)
		}
	}
}

// TestServeZonedClients serves the seed image to qemu-io and nbdinfo: a
// write at the write pointer succeeds, one off it fails with EIO and
// changes nothing, zq:zones and base:allocation show the result, a TRIM of
// a whole zone resets it while a partial one is ignored; after SIGTERM the
// image is consistent for us and for qemu-img.
func TestServeZonedClients(t *testing.T) {
	qemuIO := peer(t, "qemu-io")
	peer(t, "qemu-img")
	nbdPeer(t, "nbdinfo")
	dir := seedImage(t)
	const z = seedZoneSize
	s := serve(t, dir, "-t", "-e", "4", "zbc.qcow2")

	r := run(t, dir, qemuIO, "-f", "raw",
		"-c", "write -P 0x5a 0 64k", // zone 0 at its WP
		"-c", "write -P 0x66 4k 4k", // behind the WP
		"-c", "write -P 0x66 128k 4k", // past the WP
		"-c", "read -P 0x5a 0 64k",
		"-c", "read -P 0 64k 64k",
		"-c", "write -P 0x77 64M 64M", // fills zone 1 (in 32 MiB requests, in order)
		"-c", "write -P 0x88 128M 1M",
		s.uri())
	if r.code != 1 || strings.Count(r.stdout, "write failed: Input/output error") != 2 ||
		strings.Contains(r.stdout, "Pattern verification failed") || strings.Contains(r.stdout, "read failed") ||
		strings.Count(r.stdout, "wrote ") != 3 {
		t.Errorf("qemu-io over NBD: want 3 writes, 2 refused with EIO, reads verified:\n%v", r)
	}

	zones := make([]seedZone, seedNrZones)
	for i := range zones {
		zones[i] = seedZone{uint64(i) * z, 1}
	}
	zones[0] = seedZone{64 << 10, 2}
	zones[1] = seedZone{2 * z, 0xe}
	zones[2] = seedZone{2*z + 1<<20, 2}
	checkZoneMap(t, nbdinfoMap(t, "--map=zq:zones", s.uri()), zones)

	got := nbdinfoMap(t, "--map", s.uri())
	want := []mapLine{{0, 64 << 10, 0}, {64 << 10, z - 64<<10, 3}, {z, z + 1<<20, 0}, {2*z + 1<<20, seedImageBytes - 2*z - 1<<20, 3}}
	if !slices.Equal(got, want) {
		t.Errorf("base:allocation map %+v, want %+v", got, want)
	}

	r = run(t, dir, qemuIO, "-f", "raw",
		"-c", "discard 64M 64M", // whole zone 1: reset
		"-c", "discard 0 32M", // part of zone 0: ignored
		"-c", "read -P 0x5a 0 64k",
		"-c", "read -P 0 64M 64M",
		"-c", "write -P 0x99 64M 4k", // zone 1 is writable from its start again
		s.uri())
	if r.code != 0 || strings.Contains(r.stdout, "failed") {
		t.Errorf("qemu-io discard: %v", r)
	}
	s.stop(t)

	if m, _ := filepath.Glob(filepath.Join(dir, "*.wplive")); len(m) != 0 {
		t.Errorf("img serve left %v behind: the image was not closed", m)
	}
	out := zoneIO(t, dir, 0, "zrp 0 3", "read -q -P 0x5a 0 64k", "read -q -P 0x99 64M 4k", "read -q -P 0x88 128M 1M")
	diffLines(t, "zones after the server stopped", out, []string{
		zrpLine(0, 64<<10, 4), zrpLine(1, z+4096, 4), zrpLine(2, 2*z+1<<20, 4)})
	if r := zq(t, dir, "check", "zbc.qcow2"); r.code != 0 || !strings.Contains(r.stdout, "No errors were found") {
		t.Errorf("img check after serve: %v", r)
	}
	checkUnzonedCopy(t, dir, "zbc.qcow2")
}

// TestServeNbdcopy copies 64 MiB of random data with nbdcopy into the
// conventional zones of a zoned image and back.
func TestServeNbdcopy(t *testing.T) {
	nbdcopy := nbdPeer(t, "nbdcopy")
	dir := t.TempDir()
	mustZq(t, dir, "create", "-f", "qcow2", "zbc.qcow2", "-o",
		"size=512M,zone.mode=host-managed,zone.size=64M,zone.conventional_zones=2,zone.max_open_zones=4,zone.max_active_zones=6")
	data := make([]byte, 64<<20)
	rand.Read(data)
	in, out := filepath.Join(dir, "in.raw"), filepath.Join(dir, "out.raw")
	if err := os.WriteFile(in, data, 0o644); err != nil {
		t.Fatal(err)
	}
	s := serve(t, dir, "-t", "zbc.qcow2")
	mustRun(t, dir, nbdcopy, in, s.uri())
	mustRun(t, dir, nbdcopy, s.uri(), out)
	s.stop(t)
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, len(data))
	if _, err := io.ReadFull(f, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the first 64 MiB did not round-trip (%v)", err)
	}
	var rest int
	buf, zero := make([]byte, 1<<20), make([]byte, 1<<20)
	for {
		n, err := f.Read(buf)
		if !bytes.Equal(buf[:n], zero[:n]) {
			t.Fatalf("non-zero data copied back after offset %d", len(data)+rest)
		}
		rest += n
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if rest != 512<<20-len(data) {
		t.Errorf("copied back %d bytes after the data, want %d", rest, 512<<20-len(data))
	}
	out2 := zoneIO(t, dir, 0, "zrp 0 3")
	diffLines(t, "zones after nbdcopy", out2, []string{
		"start: 0x0, len 0x20000, cap 0x20000, wptr 0x0, zcond:0, [type: 1]",
		"start: 0x20000, len 0x20000, cap 0x20000, wptr 0x20000, zcond:0, [type: 1]",
		"start: 0x40000, len 0x20000, cap 0x20000, wptr 0x40000, zcond:1, [type: 2]",
	})
	if r := zq(t, dir, "check", "zbc.qcow2"); r.code != 0 {
		t.Errorf("img check: %v", r)
	}
}

// TestServeSocketActivation: libnbd starts the server itself with
// "[ CMD ]", passing a listening socket by systemd socket activation, and
// the server closes the image cleanly when libnbd is done.
func TestServeSocketActivation(t *testing.T) {
	nbdinfo := nbdPeer(t, "nbdinfo")
	dir := seedImage(t)
	zoneIO(t, dir, 0, "write -q 0 1M")
	r := mustRun(t, dir, nbdinfo, "--map=zq:zones", "--", "[", zqBin, "img", "serve", "zbc.qcow2", "]")
	if !strings.HasPrefix(r.stdout, "         0     1048576  548\n") { // zone start | type 2 | CLOSED
		t.Errorf("nbdinfo --map=zq:zones over socket activation:\n%s", r.stdout)
	}
	// libnbd does not wait for the server: give it a moment to close.
	deadline := time.Now().Add(10 * time.Second)
	for {
		m, _ := filepath.Glob(filepath.Join(dir, "*.wplive"))
		if len(m) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the server never closed the image: %v remains", m)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if r := zq(t, dir, "check", "zbc.qcow2"); r.code != 0 {
		t.Errorf("img check: %v", r)
	}
}

// TestServeShared: with --shared 1 a second client is not served until the
// first leaves (qemu-nbd's behaviour), and SIGTERM ends the server even
// while a client sits in the handshake.
func TestServeShared(t *testing.T) {
	dir := seedImage(t)
	s := serve(t, dir, "-t", "zbc.qcow2")
	greet := func(c net.Conn, d time.Duration) error {
		c.SetReadDeadline(time.Now().Add(d))
		var b [8]byte
		if _, err := io.ReadFull(c, b[:]); err != nil {
			return err
		}
		if string(b[:]) != "NBDMAGIC" {
			return errors.New("bad greeting " + string(b[:]))
		}
		return nil
	}
	c1, err := net.Dial("unix", s.sock)
	if err != nil {
		t.Fatal(err)
	}
	if err := greet(c1, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	c2, err := net.Dial("unix", s.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	var ne net.Error
	if err := greet(c2, 300*time.Millisecond); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("second client greeted while the first is connected (%v)", err)
	}
	c1.Close()
	s.noisy = true // the first client left in the middle of the handshake
	if err := greet(c2, 5*time.Second); err != nil {
		t.Fatalf("second client after the first left: %v", err)
	}
	start := time.Now()
	s.stop(t)
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("SIGTERM took %v with a client in the handshake", d)
	}
}

// TestServePlainQcow2: an image without zones is served as a plain disk;
// what qemu-io writes through the server, qemu's own qcow2 driver reads
// back from the file, and "qemu-img check" finds it consistent.
func TestServePlainQcow2(t *testing.T) {
	qemuIO := peer(t, "qemu-io")
	peer(t, "qemu-img")
	nbdPeer(t, "nbdinfo")
	dir := t.TempDir()
	mustZq(t, dir, "create", "-f", "qcow2", "plain.qcow2", "16M")
	s := serve(t, dir, "-t", "plain.qcow2")
	mustRun(t, dir, qemuIO, "-f", "raw", "-c", "write -P 0x42 1M 1M", "-c", "write -f -P 0x43 4M 64k",
		"-c", "write -z 1M 64k", "-c", "discard 4M 64k", s.uri())
	got := nbdinfoMap(t, "--map", s.uri())
	// The zeroed cluster at 1M reads as a hole like the unallocated space
	// before it, and nbdinfo joins equal neighbours; the discarded cluster
	// at 4M likewise.
	want := []mapLine{{0, 1<<20 + 64<<10, 3}, {1<<20 + 64<<10, 1<<20 - 64<<10, 0}, {2 << 20, 14 << 20, 3}}
	if !slices.Equal(got, want) {
		t.Errorf("base:allocation map %+v, want %+v", got, want)
	}
	s.stop(t)
	// qemu-io 7.2 reports a pattern mismatch on stdout but exits 0.
	if r := mustRun(t, dir, qemuIO, "-f", "qcow2", "-r", "-c", "read -P 0 1M 64k", "-c", "read -P 0x42 1088k 960k",
		"-c", "read -P 0 4M 64k", "plain.qcow2"); strings.Contains(r.stdout, "verification failed") {
		t.Errorf("qemu reads back other data than written through the server:\n%s", r.stdout)
	}
	if r := run(t, dir, "qemu-img", "check", "plain.qcow2"); r.code != 0 {
		t.Errorf("qemu-img check: %v", r)
	}
}

// freePort returns a TCP port that was free on 127.0.0.1 a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}

// tcpListeners returns the IPv4 addresses ("127.0.0.1", "0.0.0.0") that
// listen on port, from /proc/net/tcp. Probing with a connection would
// itself be a client, and end a server that is not --persistent.
func tcpListeners(t *testing.T, port string) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatalf("cannot tell whether img serve listens: %v", err)
	}
	p, _ := strconv.Atoi(port)
	var out []string
	for _, l := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(l)
		if len(f) < 4 || f[3] != "0A" { // TCP_LISTEN
			continue
		}
		host, hexPort, ok := strings.Cut(f[1], ":")
		lp, _ := strconv.ParseUint(hexPort, 16, 16)
		ip, _ := strconv.ParseUint(host, 16, 32)
		if !ok || int(lp) != p {
			continue
		}
		// /proc/net/tcp prints the address as a host-order word.
		out = append(out, fmt.Sprintf("%d.%d.%d.%d", byte(ip), byte(ip>>8), byte(ip>>16), byte(ip>>24)))
	}
	return out
}

// TestServeTCP: with --port (and --bind) the server listens on TCP, on
// loopback unless told otherwise, and nbdinfo reaches it through
// nbd://127.0.0.1:PORT; --socket together with --port or --bind, and a
// port that is not one, are refused with a message naming the problem.
func TestServeTCP(t *testing.T) {
	nbdPeer(t, "nbdinfo")
	dir := seedImage(t)
	for _, args := range [][]string{{"-p", "", "-b", "127.0.0.1"}, {"--port", ""}} {
		port := freePort(t)
		args[1] = port
		s := &served{addr: "127.0.0.1:" + port}
		startServed(t, s, dir, func() bool { return len(tcpListeners(t, port)) > 0 }, append(args, "zbc.qcow2")...)
		if got := tcpListeners(t, port); !slices.Equal(got, []string{"127.0.0.1"}) {
			t.Errorf("img serve %s listens on %v, want only 127.0.0.1", strings.Join(args, " "), got)
		}
		e := nbdinfoJSON(t, s.uri()).Exports[0]
		if e.Size != seedImageBytes || strings.Join(e.Contexts, ",") != "base:allocation,zq:zones" {
			t.Errorf("nbdinfo %s (img serve %s): %+v", s.uri(), strings.Join(args, " "), e)
		}
		s.wait(t) // not --persistent: gone with its only client
	}

	for _, tt := range []struct {
		args []string
		msg  string
	}{
		{[]string{"-k", "x.sock", "-p", "10809"}, "--socket cannot be used with --port or --bind"},
		{[]string{"--socket", "x.sock", "--bind", "127.0.0.1"}, "--socket cannot be used with --port or --bind"},
		{[]string{"-p", "0"}, "Invalid port '0'"},
		{[]string{"-p", "65536"}, "Invalid port '65536'"},
		{[]string{"--port", "nbd"}, "Invalid port 'nbd'"},
	} {
		r := zq(t, dir, append(append([]string{"serve"}, tt.args...), "zbc.qcow2")...)
		if r.code != 1 || !strings.Contains(r.stderr, tt.msg) {
			t.Errorf("img serve %s: exit %d, stderr %q; want exit 1 saying %q", strings.Join(tt.args, " "), r.code, r.stderr, tt.msg)
		}
		if _, err := os.Stat(filepath.Join(dir, "x.sock")); err == nil {
			t.Errorf("img serve %s created its socket before refusing", strings.Join(tt.args, " "))
		}
	}
}
