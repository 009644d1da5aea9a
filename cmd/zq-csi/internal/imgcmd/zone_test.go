package imgcmd

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// glibcStrerror is glibc's strerror() for the errnos the zone commands
// print (string/_strerror.c, sysdeps/gnu/errlist.h); qemu-io prints these.
var glibcStrerror = map[syscall.Errno]string{
	syscall.EIO:          "Input/output error",
	syscall.EINVAL:       "Invalid argument",
	syscall.EBUSY:        "Device or resource busy",
	syscall.ENOSPC:       "No space left on device",
	syscall.ETOOMANYREFS: "Too many references: cannot splice",
	syscall.EOVERFLOW:    "Value too large for defined data type",
	syscall.ENOTSUP:      "Operation not supported",
	syscall.EPERM:        "Operation not permitted",
}

// TestStrerrorMatchesGlibc: our messages are Go's errno texts capitalised;
// they must read exactly as glibc's, which qemu-io prints. Where a python3
// is installed its os.strerror (the C library's) is compared as well.
func TestStrerrorMatchesGlibc(t *testing.T) {
	var nums []string
	for errno, want := range glibcStrerror {
		if got := strerror(fmt.Errorf("wrapped: %w", errno)); got != want {
			t.Errorf("strerror(%d) = %q, want %q", int(errno), got, want)
		}
		nums = append(nums, fmt.Sprint(int(errno)))
	}
	if py, err := exec.LookPath("python3"); err == nil {
		script := "import os\nfor n in [" + strings.Join(nums, ",") + "]: print(n, os.strerror(n))"
		out, err := exec.Command(py, "-c", script).Output()
		if err != nil {
			t.Fatalf("python3: %v", err)
		}
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			n, text, _ := strings.Cut(l, " ")
			var e int
			fmt.Sscan(n, &e)
			if want := glibcStrerror[syscall.Errno(e)]; text != want {
				t.Errorf("C strerror(%d) = %q, table says %q", e, text, want)
			}
		}
	}
	// Zone engine errors print as the errno a Linux zoned device returns.
	ze := &zoned.ZoneError{Op: zoned.OpOpen, Zone: 3, Err: zoned.ErrTooManyOpenZones}
	if got := strerror(ze); got != glibcStrerror[syscall.ETOOMANYREFS] {
		t.Errorf("strerror(%v) = %q", ze, got)
	}
}

// TestZoneCommandsUsage: argument errors print qemu-io's usage line for
// the command and fail.
func TestZoneCommandsUsage(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "z.qcow2")
	if _, _, code := runImg(t, "create", "-f", "qcow2", "-o", "zone.mode=host-managed,zone.size=4M", img, "16M"); code != 0 {
		t.Fatal("create failed")
	}
	tests := []struct{ cmd, want string }{
		{"zrp 0", "zone_report offset number -- report zone information\n"},
		{"zo 0", "zone_open offset len -- explicit open a range of zones in zone block device\n"},
		{"zap -p 0", "zone_append [-p] offset len [len..] -- append write a number of bytes at a specified offset\n"},
		{"zrs 0 x", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- x\n"},
		{"zap 0 3G", "Argument '3G' exceeds maximum size 2147483136\n"},
	}
	for _, tc := range tests {
		out, _, code := runImg(t, "io", "-c", tc.cmd, img)
		if code != 1 || out != tc.want {
			t.Errorf("%q: exit %d, output %q; want 1 and %q", tc.cmd, code, out, tc.want)
		}
	}
}

// TestServeListenerShared: with a limit of one, Accept waits until the
// connection in use is closed; closing the listener releases a waiting
// Accept; the idle callback runs when the last connection closes.
func TestServeListenerShared(t *testing.T) {
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	sl := newServeListener(l, 1)
	idle := make(chan struct{}, 2)
	sl.idle = func() { idle <- struct{}{} }
	for range 2 {
		c, err := net.Dial("unix", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	accepted := make(chan net.Conn, 2)
	go func() {
		for {
			c, err := sl.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	c1 := <-accepted
	select {
	case <-accepted:
		t.Fatal("a second connection was accepted while the first is open")
	case <-time.After(100 * time.Millisecond):
	}
	c1.Close()
	<-idle
	c2 := <-accepted
	sl.Close()
	if _, ok := <-accepted; ok {
		t.Fatal("Accept returned a connection after Close")
	}
	c2.Close()
	<-idle
	sl.wait()
}

// An image whose zone limits are larger than its zones allow (written by
// another tool) opens with the limits clamped, and every command that opens
// it through the zone engine says so on stderr (spec note §2), while the
// header keeps the values it had.
func TestClampedLimitsWarn(t *testing.T) {
	img := filepath.Join(t.TempDir(), "z.qcow2")
	if _, errOut, code := runImg(t, "create", "-f", "qcow2", "-o", "size=512K,zone.mode=host-managed,zone.size=64K,zone.max_append_bytes=4K,zone.max_active_zones=4", img); code != 0 {
		t.Fatalf("create: exit %d: %s", code, errOut)
	}
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	ext := bytes.Index(b[:4096], []byte{0x00, 0x7a, 0x62, 0x64}) + 8 // the zoned extension's magic, then type and length
	if ext < 8 {
		t.Fatal("no zoned extension in the first cluster")
	}
	binary.BigEndian.PutUint32(b[ext+28:], 100) // max_active_zones
	if err := os.WriteFile(img, b, 0o644); err != nil {
		t.Fatal(err)
	}
	const want = "warning: zone.max_active_zones=100 exceeds the number of zones 8; using 8\n"
	for _, args := range [][]string{
		{"io", "-c", "zrp 0 1", img},
		{"info", "--output=json", img},
	} {
		_, errOut, code := runImg(t, args...)
		if code != 0 || !strings.Contains(errOut, want) {
			t.Errorf("%v: exit %d, stderr %q; want exit 0 and %q", args[0], code, errOut, want)
		}
	}
	out, _, _ := runImg(t, "info", "--output=json", img)
	if !strings.Contains(out, `"max-active-zones": 100`) {
		t.Errorf("info shows the header as it is; got %s", out)
	}
}

// The errno text a zone-limit refusal prints is followed by the limit
// that was hit (issue 14: "Too many references: cannot splice" alone told
// a user nothing).
func TestZoneLimitErrorNamesLimit(t *testing.T) {
	for _, tc := range []struct{ active, want string }{
		{"3", "zone open failed: Too many references: cannot splice (max_open_zones=2 reached: all 2 open zones are explicitly open, none can be closed implicitly)"},
		{"2", "zone open failed: Value too large for defined data type (max_active_zones=2 reached: 2 open, 0 closed: zones 0 EXP_OPEN, 1 EXP_OPEN)"},
	} {
		img := filepath.Join(t.TempDir(), "z.qcow2")
		if _, _, code := runImg(t, "create", "-f", "qcow2", "-o", "zone.mode=host-managed,zone.size=4M,zone.max_open_zones=2,zone.max_active_zones="+tc.active, img, "32M"); code != 0 {
			t.Fatal("create failed")
		}
		out, _, _ := runImg(t, "io", "-c", "zo 0 4M", "-c", "zo 4M 4M", "-c", "zo 8M 4M", img)
		if !strings.Contains(out, tc.want) {
			t.Errorf("max_active_zones=%s: output lacks %q:\n%s", tc.active, tc.want, out)
		}
	}
}
