//go:build linux

package vm

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
	"github.com/zq-csi/zq-csi/pkg/nbdattach/ublk"
	"github.com/zq-csi/zq-csi/pkg/qcow2"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// The ublk exporter seen from the kernel side: a true host-managed zoned
// block device, checked through sysfs and the zone ioctls, and compared
// with a zoned null_blk device driven through the same operations.

// Zone ioctls (include/uapi/linux/blkzoned.h).
const (
	blkReportZone = 0xc0101282 // _IOWR(0x12, 130, struct blk_zone_report)
	blkResetZone  = 0x40101283 // _IOW(0x12, 131, struct blk_zone_range)
	blkOpenZone   = 0x40101286
	blkCloseZone  = 0x40101287
	blkFinishZone = 0x40101288
)

func requireUblk(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(ublk.ControlPath); err != nil {
		if os.Getenv("ZQ_VM") == "1" {
			t.Fatalf("%s missing in the test VM (is ublk_drv in the kernel package?)", ublk.ControlPath)
		}
		t.Skip("SKIPPED: no ublk driver here (modprobe ublk_drv, Linux >= 6.6); these tests run in the VM lane: make test-vm")
	}
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: ublk devices with user copy need CAP_SYS_ADMIN")
	}
}

type kzone struct {
	Start, Len, WP, Cap uint64 // sectors
	Type, Cond          uint8
}

// reportZones is BLKREPORTZONE from sector for up to n zones.
func reportZones(f *os.File, sector uint64, n int) ([]kzone, error) {
	buf := make([]byte, 16+64*n)
	binary.LittleEndian.PutUint64(buf[0:], sector)
	binary.LittleEndian.PutUint32(buf[8:], uint32(n))
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), blkReportZone, uintptr(unsafe.Pointer(&buf[0]))); errno != 0 {
		return nil, errno
	}
	got := int(binary.LittleEndian.Uint32(buf[8:]))
	out := make([]kzone, got)
	for i := range out {
		b := buf[16+64*i:]
		out[i] = kzone{Start: binary.LittleEndian.Uint64(b[0:]), Len: binary.LittleEndian.Uint64(b[8:]),
			WP: binary.LittleEndian.Uint64(b[16:]), Type: b[24], Cond: b[25], Cap: binary.LittleEndian.Uint64(b[32:])}
	}
	return out, nil
}

func zoneIoctl(f *os.File, req uintptr, sector, sectors uint64) error {
	rng := [2]uint64{sector, sectors}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), req, uintptr(unsafe.Pointer(&rng))); errno != 0 {
		return errno
	}
	return nil
}

func sysfs(dev, attr string) string {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "queue", attr))
	if err != nil {
		return "err:" + err.Error()
	}
	return strings.TrimSpace(string(b))
}

func errName(err error) string {
	if err == nil {
		return "ok"
	}
	var en syscall.Errno
	if errors.As(err, &en) {
		return unix.ErrnoName(en)
	}
	return err.Error()
}

// zoneScript drives dev (zone size zs sectors, zone 0 conventional, the
// rest sequential) through writes and zone commands and returns what
// each step gave, for comparison between our device and null_blk.
func zoneScript(t *testing.T, dev string, zs uint64) []string {
	f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := alignedBuf(t, 64<<10)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	var out []string
	step := func(name string, err error) { out = append(out, name+": "+errName(err)) }
	zone := func(i int) string {
		zr, err := reportZones(f, uint64(i)*zs, 1)
		if err != nil || len(zr) != 1 {
			return fmt.Sprintf("zone %d: report %v", i, err)
		}
		z := zr[0]
		wp := int64(z.WP) - int64(z.Start)
		if z.Type == uint8(zoned.TypeConventional) {
			wp = 0 // undefined for conventional zones
		}
		return fmt.Sprintf("zone %d: type %d cond %s wp +%d", i, z.Type, zoned.Cond(z.Cond), wp)
	}
	sec := func(s uint64) int64 { return int64(s * 512) }
	_, err = f.WriteAt(buf, sec(zs))
	step("write at WP of zone 1", err)
	_, err = f.WriteAt(buf, sec(zs)+int64(len(buf))+4096)
	step("write off the WP of zone 1", err)
	// Linux 6.12 zone write plugging refuses the off-WP write in the block
	// layer and puts the zone's plug in error until an asynchronous zone
	// report has resynchronised its write pointer: a write issued at once
	// may fail too, on null_blk alike. Give the recovery a moment.
	time.Sleep(300 * time.Millisecond)
	out = append(out, zone(1))
	wp := func(i int) int64 {
		zr, err := reportZones(f, uint64(i)*zs, 1)
		if err != nil || len(zr) != 1 {
			return -1
		}
		return int64(zr[0].WP * 512)
	}
	_, err = f.WriteAt(buf, wp(1))
	step("write at the reported WP of zone 1", err)
	out = append(out, zone(1))
	_, err = f.WriteAt(buf[:4096], sec(16))
	step("random write in conventional zone 0", err)
	rd := alignedBuf(t, len(buf))
	for k := range 2 {
		_, err = f.ReadAt(rd, sec(zs)+int64(k*len(buf)))
		if err == nil && !bytes.Equal(rd, buf) {
			err = errors.New("data differs")
		}
		step(fmt.Sprintf("read back write %d of zone 1", k+1), err)
	}
	step("open zone 2", zoneIoctl(f, blkOpenZone, 2*zs, zs))
	out = append(out, zone(2))
	step("close zone 2", zoneIoctl(f, blkCloseZone, 2*zs, zs))
	out = append(out, zone(2))
	step("finish zone 2", zoneIoctl(f, blkFinishZone, 2*zs, zs))
	out = append(out, zone(2))
	_, err = f.WriteAt(buf, sec(2*zs))
	step("write to full zone 2", err)
	step("reset zone 1", zoneIoctl(f, blkResetZone, zs, zs))
	out = append(out, zone(1))
	// What the reset zone reads as, told apart from a buffer the device
	// did not touch.
	for i := range rd {
		rd[i] = 0x5a
	}
	_, err = f.ReadAt(rd, sec(zs))
	if err != nil {
		step("data: read reset zone 1", err)
	} else {
		out = append(out, "data: read reset zone 1: "+contentClass(rd, buf))
	}
	step("reset zone 2 (full)", zoneIoctl(f, blkResetZone, 2*zs, zs))
	out = append(out, zone(2))
	step("open conventional zone 0", zoneIoctl(f, blkOpenZone, 0, zs))
	step("reset unaligned range", zoneIoctl(f, blkResetZone, zs+8, zs))
	return out
}

// TestUblkZonedDevice exports a zoned image through ublk and checks the
// block device the kernel made of it.
func TestUblkZonedDevice(t *testing.T) {
	requireUblk(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "z.qcow2")
	zs, conv, maxOpen, maxActive, maxApp := uint64(4<<20), uint32(1), uint32(4), uint32(6), uint64(128<<10)
	if _, err := qcow2.Create(img, qcow2.CreateOptions{Size: 64 << 20, Zoned: &qcow2.ZonedOptions{
		ZoneSize: &zs, ConventionalZones: &conv, MaxOpenZones: &maxOpen, MaxActiveZones: &maxActive, MaxAppendBytes: &maxApp,
	}}); err != nil {
		t.Fatal(err)
	}
	d, err := zoned.Open(img, zoned.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	g := d.Geometry()
	t0 := time.Now()
	dev, err := ublk.Start(d, ublk.Options{OnError: func(err error) { t.Logf("ublk serve: %v", err) }})
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	defer func() {
		if !stopped {
			dev.Stop()
		}
	}()
	bdev := dev.BlockPath()
	info, err := dev.State()
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("ZQVM: UBLK %s started in %v: state %d flags %#x queues %d depth %d max_io %d\n", bdev, time.Since(t0).Round(time.Millisecond), info.State, info.Flags, info.NrHWQueues, info.QueueDepth, info.MaxIOBufBytes)
	// One queue per CPU up to four by default: blk-mq shows each.
	if want := min(runtime.NumCPU(), 4); int(info.NrHWQueues) != want || mqQueues(t, bdev) != want {
		t.Errorf("%s: %d hardware queues, %d in sysfs; want %d (NumCPU %d)", bdev, info.NrHWQueues, mqQueues(t, bdev), want, runtime.NumCPU())
	}
	got := map[string]string{}
	for _, a := range []string{"zoned", "nr_zones", "chunk_sectors", "zone_append_max_bytes", "max_open_zones", "max_active_zones", "logical_block_size", "physical_block_size", "write_cache", "fua"} {
		got[a] = sysfs(bdev, a)
	}
	fmt.Printf("ZQVM: UBLK sysfs zoned=%s nr_zones=%s chunk_sectors=%s zone_append_max_bytes=%s max_open=%s max_active=%s lbs=%s pbs=%s write_cache=%q fua=%s\n",
		got["zoned"], got["nr_zones"], got["chunk_sectors"], got["zone_append_max_bytes"], got["max_open_zones"], got["max_active_zones"],
		got["logical_block_size"], got["physical_block_size"], got["write_cache"], got["fua"])
	want := map[string]string{
		"zoned": "host-managed", "nr_zones": fmt.Sprint(g.NrZones), "chunk_sectors": fmt.Sprint(g.ZoneSize / 512),
		"zone_append_max_bytes": fmt.Sprint(g.MaxAppendBytes), "max_open_zones": fmt.Sprint(g.MaxOpen),
		"max_active_zones": fmt.Sprint(g.MaxActive), "logical_block_size": "512",
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("sysfs %s = %q, want %q (image)", k, got[k], v)
		}
	}

	// BLKREPORTZONE equals the engine's report.
	f, err := os.OpenFile(bdev, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	kz, err := reportZones(f, 0, int(g.NrZones)+4)
	f.Close()
	if err != nil {
		t.Fatalf("BLKREPORTZONE: %v", err)
	}
	if len(kz) != int(g.NrZones) {
		t.Fatalf("BLKREPORTZONE returned %d zones, image has %d", len(kz), g.NrZones)
	}
	for i, r := range d.Report(0, int(g.NrZones)) {
		w := kzone{Start: r.Start / 512, Len: r.Len / 512, WP: r.WP / 512, Cap: r.Cap / 512, Type: uint8(r.Type), Cond: uint8(r.Cond)}
		if kz[i] != w {
			t.Errorf("zone %d: kernel %+v, engine %+v", i, kz[i], w)
		}
	}
	fmt.Printf("ZQVM: UBLK BLKREPORTZONE %d zones match the image (zone 0 %s, zone 1 %s)\n", len(kz), zoned.Cond(kz[0].Cond), zoned.Cond(kz[1].Cond))

	ours := zoneScript(t, bdev, g.ZoneSize/512)
	for _, s := range ours {
		t.Logf("ublk    %s", s)
		if strings.HasPrefix(s, "data:") && !strings.HasSuffix(s, ": "+readsZeros) {
			t.Errorf("ublk %s (want %s: a reset zone reads as zeros, docs/zoned-format.md §4)", s, readsZeros)
		}
	}
	// The engine saw the same thing the kernel reported.
	if r := d.Report(1, 1)[0]; r.Cond != zoned.CondEmpty || r.WP != r.Start {
		t.Errorf("engine after the script: zone 1 %+v", r)
	}
	t1 := time.Now()
	if err := dev.Stop(); err != nil {
		t.Errorf("stop: %v", err)
	}
	stopped = true
	if _, err := os.Stat(bdev); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s still exists after Stop (%v)", bdev, err)
	}
	fmt.Printf("ZQVM: UBLK stop+delete in %v\n", time.Since(t1).Round(time.Millisecond))

	// The same script on zoned null_blk with the same geometry.
	nb := zonedNullBlk(t, g, true)
	theirs := zoneScript(t, nb, g.ZoneSize/512)
	same := 0
	for i := range max(len(ours), len(theirs)) {
		var a, b string
		if i < len(ours) {
			a = ours[i]
		}
		if i < len(theirs) {
			b = theirs[i]
		}
		t.Logf("null_blk %s", b)
		if a == b {
			same++
			continue
		}
		if strings.HasPrefix(a, "data:") && strings.HasSuffix(a, ": "+readsZeros) && strings.HasSuffix(b, ": "+readsFF) {
			// The one deliberate difference: sectors at or above a write
			// pointer (all of a reset zone) read as zeros here (spec §4);
			// memory-backed null_blk frees a reset zone's memory and fills
			// reads beyond the write pointer with 0xff bytes.
			fmt.Printf("ZQVM: UBLK vs NULLBLK documented difference: a reset zone reads as %s on ublk, %s on memory-backed null_blk\n", readsZeros, readsFF)
			continue
		}
		t.Errorf("differs from null_blk: ublk %q, null_blk %q", a, b)
	}
	fmt.Printf("ZQVM: UBLK vs NULLBLK zone script: %d/%d steps identical (%s)\n", same, len(ours), nullBlkLine(nb))

	// Without memory_backed, null_blk moves no data at all: what a read
	// returns is whatever the reader's buffer held, written or reset.
	removeNullBlk()
	nb = zonedNullBlk(t, g, false)
	nf, err := os.OpenFile(nb, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer nf.Close()
	wbuf, rbuf := alignedBuf(t, 64<<10), alignedBuf(t, 64<<10)
	for i := range wbuf {
		wbuf[i] = byte(i*7 + 1)
	}
	zsb := int64(g.ZoneSize)
	if _, err := nf.WriteAt(wbuf, zsb); err != nil {
		t.Fatalf("null_blk memory_backed=0: write at the WP of zone 1: %v", err)
	}
	readClass := func() string {
		for i := range rbuf {
			rbuf[i] = 0x5a
		}
		if _, err := nf.ReadAt(rbuf, zsb); err != nil {
			return errName(err)
		}
		return contentClass(rbuf, wbuf)
	}
	written := readClass()
	if err := zoneIoctl(nf, blkResetZone, uint64(zsb/512), g.ZoneSize/512); err != nil {
		t.Fatalf("null_blk memory_backed=0: reset zone 1: %v", err)
	}
	reset := readClass()
	fmt.Printf("ZQVM: NULLBLK memory_backed=0: zone 1 read after a write: %s; after its reset: %s\n", written, reset)
	if written != readsUntouched || reset != readsUntouched {
		t.Errorf("null_blk memory_backed=0 read %q after a write and %q after a reset; the documented difference says %q for both", written, reset, readsUntouched)
	}
}

// What a read returned, for the reset-zone step of zoneScript.
const (
	readsZeros     = "zeros"
	readsFF        = "0xff fill"
	readsUntouched = "buffer untouched (no data transferred)"
)

// contentClass names what a read into b (filled with 0x5a before) returned;
// old is the data written there before the zone was reset.
func contentClass(b, old []byte) string {
	all := func(v byte) bool { return bytes.Count(b, []byte{v}) == len(b) }
	switch {
	case all(0):
		return readsZeros
	case all(0xff):
		return readsFF
	case bytes.Equal(b, old):
		return "old data"
	case all(0x5a):
		return readsUntouched
	}
	return "mixed content"
}

// TestMain runs the ublk server process of TestUblkRecovery when the test
// binary is re-executed with ZQ_UBLK_HELPER set (so that it can be killed
// with SIGKILL), and the tests otherwise.
func TestMain(m *testing.M) {
	if mode := os.Getenv("ZQ_UBLK_HELPER"); mode != "" {
		ublkHelper(mode, os.Getenv("ZQ_UBLK_IMAGE"))
		return
	}
	// One line for the whole package where the kernel tests skip (each
	// test's own skip names its missing piece too, with -v).
	if os.Getenv("ZQ_VM") != "1" {
		var why []string
		if _, err := os.Stat("/sys/module/nbd"); err != nil {
			why = append(why, "no nbd module (modprobe nbd)")
		}
		if _, err := os.Stat(ublk.ControlPath); err != nil {
			why = append(why, "no ublk driver (modprobe ublk_drv, Linux >= 6.6)")
		}
		if os.Geteuid() != 0 {
			why = append(why, "not root")
		}
		if len(why) > 0 {
			fmt.Fprintf(os.Stderr, "******** test/vm: kernel tests SKIPPED on this host: %s; they run in the VM lane: make test-vm ********\n", strings.Join(why, ", "))
		}
	}
	os.Exit(m.Run())
}

// ublkHelper serves img ("serve": a new device; a number: recover that
// device), prints "DEV <id>" once serving and stops the device on SIGTERM.
func ublkHelper(mode, img string) {
	d, err := zoned.Open(img, zoned.OpenOptions{})
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	o := ublk.Options{Flags: ublk.FlagUserRecovery | ublk.FlagUserRecoveryReissue,
		OnError: func(err error) { fmt.Fprintln(os.Stderr, "serve:", err) }}
	var dev *ublk.Device
	if mode == "serve" {
		dev, err = ublk.Start(d, o)
	} else {
		var id int
		fmt.Sscan(mode, &id)
		dev, err = ublk.Recover(uint32(id), d, o)
	}
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	fmt.Println("DEV", dev.ID)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	err = dev.Stop()
	d.Close()
	fmt.Println("STOPPED", err)
	os.Exit(0)
}

type helper struct {
	cmd *exec.Cmd
	out *bufio.Reader
}

func startHelper(t *testing.T, img, mode string) (*helper, uint32) {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "ZQ_UBLK_HELPER="+mode, "ZQ_UBLK_IMAGE="+img)
	cmd.Stderr = &prefixWriter{t: t, prefix: "helper: "}
	pipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := &helper{cmd: cmd, out: bufio.NewReader(pipe)}
	line, err := h.out.ReadString('\n')
	var id uint32
	if _, serr := fmt.Sscanf(line, "DEV %d", &id); err != nil || serr != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("helper %s: %q %v", mode, line, err)
	}
	return h, id
}

// TestUblkRecovery kills the serving process with SIGKILL while a
// verifying writer runs on /dev/ublkbN, starts a new one that takes the
// device over (UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE), and
// reports the writer's errors, corrupt blocks and longest stall.
func TestUblkRecovery(t *testing.T) {
	requireUblk(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "r.qcow2")
	zs, conv := uint64(4<<20), uint32(1)
	if _, err := qcow2.Create(img, qcow2.CreateOptions{Size: 64 << 20, Zoned: &qcow2.ZonedOptions{ZoneSize: &zs, ConventionalZones: &conv}}); err != nil {
		t.Fatal(err)
	}
	h1, id := startHelper(t, img, "serve")
	bdev := fmt.Sprintf("/dev/ublkb%d", id)
	f, err := os.OpenFile(bdev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		h1.cmd.Process.Kill()
		t.Fatal(err)
	}
	defer f.Close()
	const bs = 64 << 10
	type result struct {
		written    int64 // bytes acknowledged from zone 1 on
		errs       []error
		maxStall   time.Duration
		errsAfterK int
	}
	stop := make(chan struct{})
	done := make(chan result)
	killed := make(chan struct{})
	go func() {
		var r result
		buf := alignedBuf(t, bs)
		off := int64(zs) // sequential from zone 1: crosses zones at their WP
		for k := uint64(1); ; k++ {
			select {
			case <-stop:
				done <- r
				return
			default:
			}
			if off+bs > int64(64<<20) {
				done <- r
				return
			}
			fillBlock(buf, int(off/bs), k)
			t0 := time.Now()
			_, err := f.WriteAt(buf, off)
			if d := time.Since(t0); d > r.maxStall {
				r.maxStall = d
			}
			if err != nil {
				r.errs = append(r.errs, fmt.Errorf("write at %d: %w", off, err))
				select {
				case <-killed:
					r.errsAfterK++
				default:
				}
				if len(r.errs) > 20 {
					done <- r
					return
				}
				time.Sleep(50 * time.Millisecond)
				continue
			}
			off += bs
			r.written = off - int64(zs)
		}
	}()
	time.Sleep(time.Second)
	t0 := time.Now()
	h1.cmd.Process.Kill()
	h1.cmd.Wait()
	close(killed)
	time.Sleep(200 * time.Millisecond)
	info := ""
	if c, err := ublk.OpenControl(); err == nil {
		if di, err := c.GetDevInfo(id); err == nil {
			info = fmt.Sprintf("state %d after kill", di.State)
		}
		c.Close()
	}
	h2, id2 := startHelper(t, img, fmt.Sprint(id))
	takeover := time.Since(t0)
	defer func() {
		f.Close() // before the stop: a device still open is only freed when closed
		h2.cmd.Process.Signal(syscall.SIGTERM)
		line, _ := h2.out.ReadString('\n')
		h2.cmd.Wait()
		t.Logf("helper: %s", strings.TrimSpace(line))
		if !strings.HasPrefix(line, "STOPPED <nil>") {
			t.Errorf("recovered server's stop: %q", line)
		}
	}()
	if id2 != id {
		t.Fatalf("recovered device %d, want %d", id2, id)
	}
	time.Sleep(time.Second)
	close(stop)
	r := <-done
	// Verify every acknowledged block through the recovered device.
	corrupt := 0
	rd := alignedBuf(t, bs)
	for off := int64(zs); off < int64(zs)+r.written; off += bs {
		if _, err := f.ReadAt(rd, off); err != nil {
			t.Fatalf("read back at %d: %v", off, err)
		}
		if seq, err := checkBlock(rd[:vblock], int(off/bs)); err != nil || seq == 0 && bytes.Equal(rd[:vblock], make([]byte, vblock)) {
			corrupt++
		}
	}
	fmt.Printf("ZQVM: UBLK RESTART kill -9 + recover (REISSUE): %s, takeover %v, writer %d MiB acknowledged, errors %d, corrupt blocks %d, longest write %v\n",
		info, takeover.Round(time.Millisecond), r.written>>20, len(r.errs), corrupt, r.maxStall.Round(time.Millisecond))
	for _, e := range r.errs {
		t.Logf("writer: %v", e)
	}
	if corrupt != 0 {
		t.Errorf("%d corrupt blocks after recovery", corrupt)
	}
	if len(r.errs) != 0 {
		t.Errorf("the writer saw %d errors across the restart", len(r.errs))
	}
}

// TestUblkAttacher drives the ublk exporter through the nbdattach.Attacher
// interface: attach, I/O, a restart of the serving side (Abandon: the
// device stays, its I/O waits) with a write issued while nobody serves,
// Recover by a new attacher on the same state directory, detach.
func TestUblkAttacher(t *testing.T) {
	requireUblk(t)
	ctx := t.Context()
	dir := t.TempDir()
	img := filepath.Join(dir, "a.qcow2")
	zs := uint64(4 << 20)
	d := openZoned(t, img, 32<<20, zs, 1)
	defer d.Close()
	state := filepath.Join(dir, "state")
	a1, err := ublk.NewAttacher(ublk.AttacherOptions{StateDir: state})
	if err != nil {
		t.Fatal(err)
	}
	att, err := a1.Attach(ctx, nbdattach.AttachRequest{VolumeID: "vol-u", ImagePath: img, Backend: nbdattach.ZonedBackend{D: d}})
	if err != nil {
		t.Fatal(err)
	}
	again, err := a1.Attach(ctx, nbdattach.AttachRequest{VolumeID: "vol-u", ImagePath: img, Backend: nbdattach.ZonedBackend{D: d}})
	if err != nil || *again != *att {
		t.Fatalf("second attach: %+v, %v", again, err)
	}
	f, err := os.OpenFile(att.DevicePath, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := alignedBuf(t, 64<<10)
	for i := range buf {
		buf[i] = byte(i*13 + 5)
	}
	if _, err := f.WriteAt(buf, int64(zs)); err != nil {
		t.Fatalf("write at the WP: %v", err)
	}
	// The serving side goes away; a write issued meanwhile waits.
	if err := a1.Abandon(); err != nil {
		t.Fatalf("abandon: %v", err)
	}
	wrote := make(chan error, 1)
	go func() {
		_, err := f.WriteAt(buf, int64(zs)+int64(len(buf)))
		wrote <- err
	}()
	time.Sleep(300 * time.Millisecond)
	select {
	case err := <-wrote:
		t.Fatalf("a write completed while no server runs: %v", err)
	default:
	}
	a2, err := ublk.NewAttacher(ublk.AttacherOptions{StateDir: state})
	if err != nil {
		t.Fatal(err)
	}
	atts, err := a2.Recover(ctx, func(rec nbdattach.Attachment) (nbdattach.Backend, error) {
		return nbdattach.ZonedBackend{D: d}, nil
	})
	if err != nil || len(atts) != 1 || atts[0].DevicePath != att.DevicePath || atts[0].Generation != 2 {
		t.Fatalf("recover: %+v, %v", atts, err)
	}
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatalf("the write queued across the restart: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the write queued across the restart never completed")
	}
	rd := alignedBuf(t, 2*len(buf))
	if _, err := f.ReadAt(rd, int64(zs)); err != nil || !bytes.Equal(rd[:len(buf)], buf) || !bytes.Equal(rd[len(buf):], buf) {
		t.Fatalf("read back after recovery: %v", err)
	}
	if l, _ := a2.List(ctx); len(l) != 1 || l[0].Kind != "ublk" {
		t.Fatalf("list: %+v", l)
	}
	fmt.Printf("ZQVM: UBLK ATTACHER attach %s, abandon, write queued while unserved, recover (generation %d): write completed, data intact\n", att.DevicePath, atts[0].Generation)
	f.Close()
	if err := a2.Detach(ctx, "vol-u"); err != nil {
		t.Fatalf("detach: %v", err)
	}
	if l, _ := a2.List(ctx); len(l) != 0 {
		t.Fatalf("records after detach: %+v", l)
	}
	if _, err := os.Stat(att.DevicePath); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s after detach: %v", att.DevicePath, err)
	}
	if err := a2.Detach(ctx, "vol-u"); err != nil {
		t.Fatalf("second detach: %v", err)
	}
}

// seqZoned writes n bytes sequentially at the write pointers from zone 1
// on (bs-byte O_DIRECT writes), fsyncs, reads them back, and returns the
// rates in MiB/s.
func seqZoned(t *testing.T, dev string, zs, n int64) (w, r float64) {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const bs = 1 << 20
	buf := alignedBuf(t, bs)
	for i := range buf {
		buf[i] = byte(i * 31)
	}
	t0 := time.Now()
	for off := int64(0); off < n; off += bs {
		if _, err := f.WriteAt(buf, zs+off); err != nil {
			t.Fatalf("%s: write at %d: %v", dev, zs+off, err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("%s: fsync: %v", dev, err)
	}
	dw := time.Since(t0)
	t1 := time.Now()
	for off := int64(0); off < n; off += bs {
		if _, err := f.ReadAt(buf, zs+off); err != nil {
			t.Fatalf("%s: read at %d: %v", dev, zs+off, err)
		}
	}
	dr := time.Since(t1)
	mb := float64(n) / (1 << 20)
	return mb / dw.Seconds(), mb / dr.Seconds()
}

// TestUblkThroughput compares sequential zoned writes and reads through
// ublk (the zoned view) with the same through NBD (zone-enforcing,
// non-zoned view), same engine, same VM run.
func TestUblkThroughput(t *testing.T) {
	requireUblk(t)
	n := mib() << 20
	zs := uint64(4 << 20)
	conv := uint32(1)
	mk := func(name string) *zoned.Device {
		img := filepath.Join(t.TempDir(), name)
		if _, err := qcow2.Create(img, qcow2.CreateOptions{Size: uint64(n) + 2*zs, Zoned: &qcow2.ZonedOptions{ZoneSize: &zs, ConventionalZones: &conv}}); err != nil {
			t.Fatal(err)
		}
		d, err := zoned.Open(img, zoned.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		return d
	}
	du := mk("u.qcow2")
	dev, err := ublk.Start(du, ublk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	uw, ur := seqZoned(t, dev.BlockPath(), int64(zs), n)
	if err := dev.Stop(); err != nil {
		t.Errorf("stop: %v", err)
	}
	line := fmt.Sprintf("ZQVM: UBLK SEQ %dMiB bs=1M O_DIRECT: ublk write %.1f MiB/s read %.1f MiB/s", n>>20, uw, ur)
	if _, err := os.Stat("/sys/module/nbd"); err != nil {
		fmt.Println(line + "; nbd not loaded, no comparison")
		return
	}
	dn := mk("n.qcow2")
	a := newAttacher(t, filepath.Join(t.TempDir(), "state"))
	att, err := a.Attach(t.Context(), nbdattach.AttachRequest{VolumeID: "vol-tp", Backend: nbdattach.ZonedBackend{D: dn}})
	if err != nil {
		t.Fatal(err)
	}
	nw, nr := seqZoned(t, att.DevicePath, int64(zs), n)
	a.Detach(t.Context(), "vol-tp")
	fmt.Printf("%s; nbd write %.1f MiB/s read %.1f MiB/s\n", line, nw, nr)
	fmt.Printf("ZQVM: UBLK RATIO ublk/nbd (zoned engine behind both) write %.2fx read %.2fx\n", uw/nw, ur/nr)
}

// zoneLine is one zone of a report as blkzone and qemu-io's zrp print it:
// start, len, cap, wptr (relative to start; 0 for conventional zones),
// condition, type.
type zoneLine [6]uint64

var zoneLineRE = regexp.MustCompile(`start: 0x([0-9a-f]+), len 0x([0-9a-f]+), cap 0x([0-9a-f]+), wptr 0x([0-9a-f]+)[ ,].*zcond:\s*(\d+).*\[type: (\d+)`)

// parseZoneLines reads blkzone report (relative wptr) or zrp (absolute
// wptr: relative when abs) output.
func parseZoneLines(out string, abs bool) []zoneLine {
	var zs []zoneLine
	for _, m := range zoneLineRE.FindAllStringSubmatch(out, -1) {
		var z zoneLine
		for i := range 6 {
			base := 16
			if i >= 4 {
				base = 10
			}
			z[i], _ = strconv.ParseUint(m[i+1], base, 64)
		}
		if abs {
			z[3] -= z[0]
			if z[5] == 1 {
				z[3] = 0
			}
		}
		zs = append(zs, z)
	}
	return zs
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// blkzoneScript runs blkzone commands on dev (zones of zs sectors) and
// returns the reports of its first n zones after each.
func blkzoneScript(t *testing.T, dev string, zs uint64, n int) []string {
	cnt := fmt.Sprint(n)
	var reps []string
	report := func() { reps = append(reps, run(t, "blkzone", "report", "-c", cnt, dev)) }
	off := func(z uint64) string { return fmt.Sprint(z * zs) }
	run(t, "blkzone", "open", "-o", off(2), "-c", "1", dev)
	run(t, "blkzone", "open", "-o", off(3), "-c", "1", dev)
	report()
	run(t, "blkzone", "close", "-o", off(3), "-c", "1", dev)
	run(t, "blkzone", "finish", "-o", off(4), "-c", "2", dev)
	report()
	run(t, "blkzone", "reset", "-o", off(4), "-c", "1", dev)
	report()
	return reps
}

// TestUblkBlkzoneAndFio: blkzone on /dev/ublkbN behaves as on zoned
// null_blk with the same geometry and its report equals the engine's
// (zq-csi img io zrp) after the same operations; fio --zonemode=zbd writes
// with verify pass; fio throughput next to NBD's.
func TestUblkBlkzoneAndFio(t *testing.T) {
	requireUblk(t)
	if _, err := exec.LookPath("blkzone"); err != nil {
		t.Skip("******** SKIPPED: blkzone not in this VM (util-linux on the host) ********")
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "b.qcow2")
	zs, conv, maxOpen := uint64(4<<20), uint32(1), uint32(4)
	if _, err := qcow2.Create(img, qcow2.CreateOptions{Size: 64 << 20, Zoned: &qcow2.ZonedOptions{ZoneSize: &zs, ConventionalZones: &conv, MaxOpenZones: &maxOpen}}); err != nil {
		t.Fatal(err)
	}
	d, err := zoned.Open(img, zoned.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	g := d.Geometry()
	dev, err := ublk.Start(d, ublk.Options{})
	if err != nil {
		d.Close()
		t.Fatal(err)
	}
	bdev := dev.BlockPath()
	// Some data first, so write pointers are not all at zone starts.
	f, err := os.OpenFile(bdev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := alignedBuf(t, 192<<10)
	if _, err := f.WriteAt(buf, int64(zs)); err != nil {
		t.Fatal(err)
	}
	f.Close()
	secs := zs / 512
	ours := blkzoneScript(t, bdev, secs, 16)
	final := parseZoneLines(ours[len(ours)-1], false)
	var engine []zoneLine
	for _, z := range d.Report(0, 16) {
		engine = append(engine, zoneLine{z.Start / 512, z.Len / 512, z.Cap / 512, z.WP / 512, uint64(z.Cond), uint64(z.Type)})
	}
	for i := range engine {
		engine[i][3] -= engine[i][0]
		if engine[i][5] == 1 {
			engine[i][3] = 0
		}
	}
	if fmt.Sprint(engine) != fmt.Sprint(final) {
		t.Errorf("blkzone report on %s:\n%v\nengine report:\n%v", bdev, final, engine)
	}
	if err := dev.Stop(); err != nil {
		t.Errorf("stop: %v", err)
	}
	d.Close()
	if bin := os.Getenv("ZQ_CSI_BIN"); bin != "" {
		// Open conditions do not survive closing the image (as across a
		// drive's power cycle): an open zone comes back CLOSED, or EMPTY
		// when nothing was written to it.
		for i, z := range final {
			if z[4] == uint64(zoned.CondImpOpen) || z[4] == uint64(zoned.CondExpOpen) {
				final[i][4] = uint64(zoned.CondClosed)
				if z[3] == 0 {
					final[i][4] = uint64(zoned.CondEmpty)
				}
			}
		}
		zrp := parseZoneLines(run(t, bin, "img", "io", "-r", "-c", "zrp 0 16", img), true)
		if fmt.Sprint(zrp) != fmt.Sprint(final) || len(zrp) != 16 {
			t.Errorf("blkzone report on %s (open zones as closed):\n%v\nzq-csi img io zrp on the image:\n%v", bdev, final, zrp)
		} else {
			fmt.Printf("ZQVM: UBLK blkzone report == engine report (live) == zq-csi img io 'zrp 0 16' (reopened) after the same operations (%d zones)\n", len(zrp))
		}
	}
	{
		nb := zonedNullBlk(t, g, true)
		nf, err := os.OpenFile(nb, os.O_RDWR|syscall.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := nf.WriteAt(buf, int64(zs)); err != nil {
			t.Fatalf("null_blk: the same first write: %v", err)
		}
		nf.Close()
		theirs := blkzoneScript(t, nb, secs, 16)
		for i := range ours {
			a, b := parseZoneLines(ours[i], false), parseZoneLines(theirs[i], false)
			if fmt.Sprint(a) != fmt.Sprint(b) {
				t.Errorf("blkzone report %d differs:\nublk:\n%s\nnull_blk:\n%s", i, ours[i], theirs[i])
			}
		}
		fmt.Printf("ZQVM: UBLK blkzone open/close/finish/reset: %d reports of 16 zones compared with %s\n", len(ours), nullBlkLine(nb))
	}

	if _, err := exec.LookPath("fio"); err != nil {
		t.Skip("******** SKIPPED: fio not in this VM ********")
	}
	fioTest(t, zs)
}

var fioBW = regexp.MustCompile(`(?m)^\s*(READ|WRITE): bw=([0-9.]+)([KMG]i)B/s`)

// fioRate runs fio and returns the group's bandwidth in MiB/s.
func fioRate(t *testing.T, args ...string) float64 {
	t.Helper()
	out := run(t, "fio", append([]string{"--thread", "--direct=1", "--ioengine=psync", "--group_reporting"}, args...)...)
	m := fioBW.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("fio %v: no bandwidth in\n%s", args, out)
	}
	v, _ := strconv.ParseFloat(m[2], 64)
	switch m[3] {
	case "Ki":
		v /= 1024
	case "Gi":
		v *= 1024
	}
	return v
}

func fioTest(t *testing.T, zs uint64) {
	dir := t.TempDir()
	size := int64(56 << 20)
	mk := func(name string) *zoned.Device {
		img := filepath.Join(dir, name)
		conv, maxOpen := uint32(1), uint32(4)
		if _, err := qcow2.Create(img, qcow2.CreateOptions{Size: uint64(size) + 2*zs, Zoned: &qcow2.ZonedOptions{ZoneSize: &zs, ConventionalZones: &conv, MaxOpenZones: &maxOpen}}); err != nil {
			t.Fatal(err)
		}
		d, err := zoned.Open(img, zoned.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		return d
	}
	du := mk("fu.qcow2")
	dev, err := ublk.Start(du, ublk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Stop()
	b := dev.BlockPath()
	off, sz := fmt.Sprintf("--offset=%d", zs), fmt.Sprintf("--size=%d", size)
	// Sequential writes with verify, several zones, within max open zones.
	out := run(t, "fio", "--name=zbdverify", "--filename="+b, "--thread", "--direct=1", "--ioengine=psync", "--zonemode=zbd",
		"--max_open_zones=4", "--rw=write", "--bs=128k", off, sz, "--verify=crc32c", "--do_verify=1")
	if !strings.Contains(out, "err= 0") {
		t.Fatalf("fio zbd verify:\n%s", out)
	}
	fmt.Printf("ZQVM: UBLK fio --zonemode=zbd --rw=write --verify=crc32c over %d MiB: pass\n", size>>20)
	run(t, "blkzone", "reset", b)
	uw := fioRate(t, "--name=w", "--filename="+b, "--zonemode=zbd", "--max_open_zones=4", "--rw=write", "--bs=1M", off, sz)
	ur := fioRate(t, "--name=r", "--filename="+b, "--zonemode=zbd", "--rw=read", "--bs=1M", off, sz)
	line := fmt.Sprintf("ZQVM: UBLK FIO seq %dMiB bs=1M psync: ublk (zbd) write %.1f read %.1f MiB/s", size>>20, uw, ur)
	if _, err := os.Stat("/sys/module/nbd"); err != nil {
		fmt.Println(line)
		return
	}
	dn := mk("fn.qcow2")
	a := newAttacher(t, filepath.Join(dir, "state"))
	att, err := a.Attach(t.Context(), nbdattach.AttachRequest{VolumeID: "vol-fio", Backend: nbdattach.ZonedBackend{D: dn}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Detach(t.Context(), "vol-fio")
	nw := fioRate(t, "--name=w", "--filename="+att.DevicePath, "--rw=write", "--bs=1M", off, sz)
	nr := fioRate(t, "--name=r", "--filename="+att.DevicePath, "--rw=read", "--bs=1M", off, sz)
	fmt.Printf("%s; nbd (zone-enforcing, not zoned) write %.1f read %.1f MiB/s\n", line, nw, nr)
	fmt.Printf("ZQVM: UBLK RATIO fio ublk/nbd write %.2fx read %.2fx\n", uw/nw, ur/nr)
}

// TestUblkZonedBtrfs: a zoned file system end to end on /dev/ublkbN.
// mkfs.btrfs detects the host-managed device and makes a zoned file
// system (data goes through zone append); files written, unmounted,
// device stopped and the image closed, then served again on a new device
// and mounted: the files are still there.
func TestUblkZonedBtrfs(t *testing.T) {
	requireUblk(t)
	if _, err := exec.LookPath("mkfs.btrfs"); err != nil {
		t.Skip("******** SKIPPED: mkfs.btrfs not in this VM (btrfs-progs on the host) ********")
	}
	// The initramfs has no /sbin/modprobe for the kernel's own module
	// requests: load the crc32c implementation libcrc32c asks for first.
	exec.Command("modprobe", "crc32c_generic").Run()
	if out, err := exec.Command("modprobe", "btrfs").CombinedOutput(); err != nil {
		// run.sh puts the module in the initramfs when the kernel
		// package has it: there its failing to load is a failure.
		if matches, _ := filepath.Glob("/lib/modules/*/kernel/fs/btrfs/btrfs.ko"); os.Getenv("ZQ_VM") == "1" && len(matches) > 0 {
			t.Fatalf("modprobe btrfs failed in the test VM although %s is there: %v: %s", matches[0], err, out)
		}
		t.Skipf("******** SKIPPED: no btrfs module (%v: %s) ********", err, out)
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.qcow2")
	zs, app := uint64(4<<20), uint64(512<<10)
	if _, err := qcow2.Create(img, qcow2.CreateOptions{Size: 512 << 20, Zoned: &qcow2.ZonedOptions{ZoneSize: &zs, MaxAppendBytes: &app}}); err != nil {
		t.Fatal(err)
	}
	serve := func() (*zoned.Device, *ublk.Device) {
		d, err := zoned.Open(img, zoned.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		dev, err := ublk.Start(d, ublk.Options{OnError: func(err error) { t.Logf("ublk serve: %v", err) }})
		if err != nil {
			d.Close()
			t.Fatal(err)
		}
		return d, dev
	}
	stop := func(d *zoned.Device, dev *ublk.Device) {
		if err := dev.Stop(); err != nil {
			t.Errorf("stop: %v", err)
		}
		if err := d.Close(); err != nil {
			t.Errorf("close image: %v", err)
		}
	}
	mnt := filepath.Join(dir, "mnt")
	os.MkdirAll(mnt, 0o755)
	d, dev := serve()
	out, err := exec.Command("mkfs.btrfs", "-f", "-d", "single", "-m", "single", dev.BlockPath()).CombinedOutput()
	if err != nil {
		stop(d, dev)
		t.Fatalf("mkfs.btrfs: %v\n%s", err, out)
	}
	zonedFS := strings.Contains(string(out), "zoned") || strings.Contains(string(out), "Zoned")
	t.Logf("mkfs.btrfs:\n%s", out)
	if err := unix.Mount(dev.BlockPath(), mnt, "btrfs", 0, ""); err != nil {
		stop(d, dev)
		t.Fatalf("mount: %v", err)
	}
	files := map[string][]byte{}
	for i := range 6 {
		b := make([]byte, (i+1)<<20+i*4096)
		for k := range b {
			b[k] = byte(k*(i+3) + k>>12)
		}
		name := filepath.Join(mnt, fmt.Sprintf("f%d", i))
		if err := os.WriteFile(name, b, 0o644); err != nil {
			unix.Unmount(mnt, 0)
			stop(d, dev)
			t.Fatalf("write %s: %v", name, err)
		}
		files[name] = b
	}
	unix.Sync()
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatalf("umount: %v", err)
	}
	written := 0
	for _, z := range d.Report(0, int(d.Geometry().NrZones)) {
		if z.WP > z.Start {
			written++
		}
	}
	c := dev.Counts()
	stop(d, dev)

	d, dev = serve()
	defer stop(d, dev)
	if err := unix.Mount(dev.BlockPath(), mnt, "btrfs", unix.MS_RDONLY, ""); err != nil {
		t.Fatalf("mount after re-attach: %v", err)
	}
	defer unix.Unmount(mnt, 0)
	for name, want := range files {
		got, err := os.ReadFile(name)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s after re-attach: %d bytes, %v", name, len(got), err)
		}
	}
	fmt.Printf("ZQVM: UBLK BTRFS mkfs (zoned=%v) + mount + %d files written, umount, detach, re-attach, mount: all files intact (%d zones written; requests: %d zone appends, %d writes, %d flushes, %d zone mgmt, %d reports, %d failed)\n",
		zonedFS, len(files), written, c.Appends, c.Writes, c.Flushes, c.ZoneMgmt, c.Reports, c.Failed)
	if !zonedFS || c.Appends == 0 {
		t.Errorf("btrfs did not use the zoned device with zone append (zoned=%v, appends %d)", zonedFS, c.Appends)
	}
}

// TestUblkReadOnly attaches a volume read-only: the kernel marks the
// device read-only (UBLK_ATTR_READ_ONLY), so writes are refused before
// they reach the server, and reads work.
func TestUblkReadOnly(t *testing.T) {
	requireUblk(t)
	ctx := t.Context()
	dir := t.TempDir()
	img := filepath.Join(dir, "ro.qcow2")
	zs := uint64(4 << 20)
	if _, err := qcow2.Create(img, qcow2.CreateOptions{Size: 16 << 20, Zoned: &qcow2.ZonedOptions{ZoneSize: &zs}}); err != nil {
		t.Fatal(err)
	}
	d, err := zoned.Open(img, zoned.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	a, err := ublk.NewAttacher(ublk.AttacherOptions{StateDir: filepath.Join(dir, "state")})
	if err != nil {
		t.Fatal(err)
	}
	att, err := a.Attach(ctx, nbdattach.AttachRequest{VolumeID: "vol-ro", ImagePath: img, Backend: nbdattach.ZonedBackend{D: d}, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Detach(ctx, "vol-ro")
	ro, err := os.ReadFile("/sys/block/" + filepath.Base(att.DevicePath) + "/ro")
	if err != nil || strings.TrimSpace(string(ro)) != "1" {
		t.Fatalf("%s: ro = %q (%v), want 1", att.DevicePath, ro, err)
	}
	if f, err := os.OpenFile(att.DevicePath, os.O_WRONLY, 0); err == nil {
		_, werr := f.Write(make([]byte, 4096))
		f.Close()
		if werr == nil {
			t.Fatalf("a write to the read-only %s succeeded", att.DevicePath)
		}
		t.Logf("write refused: %v", werr)
	} else {
		t.Logf("open for writing refused: %v", err)
	}
	f, err := os.Open(att.DevicePath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatalf("read from the read-only %s: %v", att.DevicePath, err)
	}
	fmt.Printf("ZQVM: UBLK READ-ONLY %s: ro=1, writes refused by the kernel, reads work\n", att.DevicePath)
}

// mqQueues counts the hardware queue directories of dev in
// /sys/block/DEV/mq.
func mqQueues(t *testing.T, dev string) int {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join("/sys/block", filepath.Base(dev), "mq"))
	if err != nil {
		t.Errorf("%s: %v", dev, err)
		return -1
	}
	n := 0
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err == nil && e.IsDir() {
			n++
		}
	}
	return n
}

var fioIOPS = regexp.MustCompile(`(?m)^\s*(read|write): IOPS=([0-9.]+)(k?)`)

// fioMQ runs fio with libaio and returns the group's MiB/s and IOPS.
func fioMQ(t *testing.T, args ...string) (mibps, iops float64) {
	t.Helper()
	out := run(t, "fio", append([]string{"--thread", "--direct=1", "--ioengine=libaio", "--group_reporting"}, args...)...)
	m, k := fioBW.FindStringSubmatch(out), fioIOPS.FindStringSubmatch(out)
	if m == nil || k == nil || !strings.Contains(out, "err= 0") {
		t.Fatalf("fio %v:\n%s", args, out)
	}
	mibps, _ = strconv.ParseFloat(m[2], 64)
	switch m[3] {
	case "Ki":
		mibps /= 1024
	case "Gi":
		mibps *= 1024
	}
	iops, _ = strconv.ParseFloat(k[2], 64)
	if k[3] == "k" {
		iops *= 1000
	}
	return mibps, iops
}

// TestUblkMultiQueue serves the same kind of image with one hardware
// queue and with one per CPU (the default), checks blk-mq's view of the
// queues, and compares fio through both in the same VM run: four jobs
// writing four different zones (zonemode=zbd, iodepth 4), then random
// 4 KiB reads by four jobs.
func TestUblkMultiQueue(t *testing.T) {
	requireUblk(t)
	if _, err := exec.LookPath("fio"); err != nil {
		t.Skip("******** SKIPPED: fio not in this VM ********")
	}
	const jobs, zonesPerJob = 4, 3
	zs := uint64(4 << 20)
	type result struct {
		queues        int
		wMiB, rIOPS   float64
		counts        ublk.Counts
		perQueue      []uint64
		sysfsQueueDir int
	}
	measure := func(queues int) result {
		img := filepath.Join(t.TempDir(), "mq.qcow2")
		conv, maxOpen := uint32(1), uint32(jobs)
		if _, err := qcow2.Create(img, qcow2.CreateOptions{Size: (1 + jobs*zonesPerJob) * zs, Zoned: &qcow2.ZonedOptions{ZoneSize: &zs, ConventionalZones: &conv, MaxOpenZones: &maxOpen}}); err != nil {
			t.Fatal(err)
		}
		d, err := zoned.Open(img, zoned.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		dev, err := ublk.Start(d, ublk.Options{Queues: queues, OnError: func(err error) { t.Logf("ublk serve: %v", err) }})
		if err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := dev.Stop(); err != nil {
				t.Errorf("stop: %v", err)
			}
		}()
		b := dev.BlockPath()
		r := result{queues: int(dev.Info.NrHWQueues), sysfsQueueDir: mqQueues(t, b)}
		// Job i writes its own zones 1+i*zonesPerJob.. sequentially; the
		// four jobs run on four different zones at any time.
		region := fmt.Sprint(zonesPerJob * zs)
		r.wMiB, _ = fioMQ(t, "--name=mqw", "--filename="+b, "--zonemode=zbd", fmt.Sprintf("--max_open_zones=%d", jobs), "--rw=write", "--bs=64k", "--iodepth=4",
			fmt.Sprintf("--numjobs=%d", jobs), fmt.Sprintf("--offset=%d", zs), "--offset_increment="+region, "--size="+region)
		_, r.rIOPS = fioMQ(t, "--name=mqr", "--filename="+b, "--rw=randread", "--bs=4k", "--iodepth=4", fmt.Sprintf("--numjobs=%d", jobs),
			fmt.Sprintf("--offset=%d", zs), fmt.Sprintf("--size=%d", jobs*zonesPerJob*zs), "--time_based", "--runtime=4", "--randrepeat=0")
		r.counts = dev.Counts()
		r.perQueue = dev.QueueRequests()
		if r.counts.Failed != 0 {
			t.Errorf("%d queue(s): %d requests failed", queues, r.counts.Failed)
		}
		// fio (3.33, zonemode=zbd, max_open_zones shared by the jobs)
		// now and then leaves one of a job's zones unwritten and writes its
		// size elsewhere in the band: seen in about one run in three with no
		// request failed. A zone left partly written would be a write lost
		// or refused; an EMPTY one is fio's choice, so at most one per job.
		empty := 0
		for i, z := range d.Report(1, jobs*zonesPerJob) {
			switch z.Cond {
			case zoned.CondFull:
			case zoned.CondEmpty:
				empty++
				t.Logf("%d queue(s): zone %d left EMPTY by fio", queues, i+1)
			default:
				t.Errorf("%d queue(s): zone %d after the writers: %+v", queues, i+1, z)
			}
		}
		if empty > jobs {
			t.Errorf("%d queue(s): %d zones left EMPTY by %d writers", queues, empty, jobs)
		}
		return r
	}
	// 1, N, N, 1: a drift over the run (page cache, tmpfs, GC) weighs on
	// both alike; each figure is the mean of its two runs.
	var one, n result
	for _, queues := range []int{1, 0, 0, 1} { // 0: the default, one per CPU up to four
		r := measure(queues)
		if r.sysfsQueueDir != r.queues {
			t.Errorf("%d hardware queues, %d in /sys/block/*/mq", r.queues, r.sysfsQueueDir)
		}
		acc := &one
		if queues == 0 {
			acc = &n
			if want := min(runtime.NumCPU(), 4); r.queues != want {
				t.Errorf("default: %d queues, want %d", r.queues, want)
			}
		}
		acc.queues, acc.perQueue = r.queues, r.perQueue
		if len(r.perQueue) != r.queues {
			t.Errorf("%d queues, requests counted for %d", r.queues, len(r.perQueue))
		}
		acc.wMiB += r.wMiB / 2
		acc.rIOPS += r.rIOPS / 2
	}
	fmt.Printf("ZQVM: UBLK MQ %d CPUs, 1 queue vs %d queues (mean of 2 runs each): zbd write, 4 jobs on their own zones, bs=64k iodepth 4: %.1f vs %.1f MiB/s (%.2fx); randread 4k, 4 jobs iodepth 4: %.0f vs %.0f IOPS (%.2fx); requests per queue %v\n",
		runtime.NumCPU(), n.queues, one.wMiB, n.wMiB, n.wMiB/one.wMiB, one.rIOPS, n.rIOPS, n.rIOPS/one.rIOPS, n.perQueue)
}
