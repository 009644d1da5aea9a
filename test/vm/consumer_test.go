//go:build linux

package vm

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
	"github.com/zq-csi/zq-csi/pkg/nbdattach/ublk"
	"github.com/zq-csi/zq-csi/pkg/qcow2"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// The differential consumer lane (issue 12): software nobody here wrote —
// f2fs, zoned btrfs, zonefs, fio --zonemode=zbd — runs the same workload
// on our host-managed /dev/ublkbN and on zoned null_blk configured with the
// same geometry, in the same VM run. A workload that fails on ours and not
// on the reference device, or a kernel log line about our device's zone
// resources or I/O errors that the reference does not also produce, fails
// the test. One line per comparison:
//
//	ZQVM: CONSUMER <workload> <geometry> ublk=<ok|FAIL: reason> nullblk=<ok|FAIL: reason>

// consumerGeom is one zone geometry of the lane.
type consumerGeom struct {
	name               string
	size, zs, cap, app uint64
	conv, maxOpen      uint32
	maxActive          uint32
}

func (g consumerGeom) String() string {
	return fmt.Sprintf("%s(%dx%dMiB,cap=%dMiB,conv=%d,open=%d,active=%d,append=%dK)",
		g.name, g.size/g.zs, g.zs>>20, g.cap>>20, g.conv, g.maxOpen, g.maxActive, g.app>>10)
}

var consumerGeoms = []consumerGeom{
	// (a) conventional zones, capacity = size.
	{name: "a", size: 256 << 20, zs: 4 << 20, cap: 4 << 20, conv: 4, maxOpen: 8, maxActive: 12, app: 64 << 10},
	// (b) no conventional zones, capacity < size.
	{name: "b", size: 256 << 20, zs: 4 << 20, cap: 3 << 20, conv: 0, maxOpen: 8, maxActive: 12, app: 64 << 10},
	// (c) large enough for zoned-device test suites: 130 sequential zones
	// after 8 conventional ones.
	{name: "c", size: 138 * 4 << 20, zs: 4 << 20, cap: 4 << 20, conv: 8, maxOpen: 14, maxActive: 14, app: 128 << 10},
	// (d) the seed's geometry (its README example: 768 MiB, 64 MiB zones,
	// max_open 6, max_active 8, max_append 4 KiB).
	{name: "d", size: 768 << 20, zs: 64 << 20, cap: 64 << 20, conv: 0, maxOpen: 6, maxActive: 8, app: 4 << 10},
}

// zoneDev is one side of a comparison: a zoned block device and how to
// take it away and bring it back with its data.
type zoneDev struct {
	kind string // "ublk" or "nullblk"
	path string
	// reattach unmounts nothing: the caller has unmounted. For ublk it
	// stops the device, closes the image, reopens it and serves it on a new
	// device (the product's restage); null_blk keeps its zone state only
	// while powered, so it is left as it is.
	reattach func(t *testing.T)
	close    func()
	counts   func() string
}

func (g consumerGeom) zonedGeometry() zoned.Geometry {
	return zoned.Geometry{Size: g.size, ZoneSize: g.zs, ZoneCapacity: g.cap, NrZones: uint32(g.size / g.zs),
		Conventional: g.conv, MaxOpen: g.maxOpen, MaxActive: g.maxActive, MaxAppendBytes: uint32(g.app)}
}

func newUblkSide(t *testing.T, g consumerGeom) *zoneDev {
	t.Helper()
	img := filepath.Join(t.TempDir(), "consumer-"+g.name+".qcow2")
	zs, zc, conv, mo, ma, app := g.zs, g.cap, g.conv, g.maxOpen, g.maxActive, g.app
	if _, err := qcow2.Create(img, qcow2.CreateOptions{Size: g.size, Zoned: &qcow2.ZonedOptions{
		ZoneSize: &zs, ZoneCapacity: &zc, ConventionalZones: &conv, MaxOpenZones: &mo, MaxActiveZones: &ma, MaxAppendBytes: &app}}); err != nil {
		t.Fatal(err)
	}
	s := &zoneDev{kind: "ublk"}
	var d *zoned.Device
	var dev *ublk.Device
	serve := func() {
		var err error
		if d, err = zoned.Open(img, zoned.OpenOptions{}); err != nil {
			t.Fatal(err)
		}
		if dev, err = ublk.Start(d, ublk.Options{OnError: func(err error) { t.Logf("ublk serve: %v", err) }}); err != nil {
			d.Close()
			t.Fatal(err)
		}
		s.path = dev.BlockPath()
	}
	stop := func() {
		if dev != nil {
			if err := dev.Stop(); err != nil {
				t.Errorf("ublk stop: %v", err)
			}
			dev = nil
		}
		if d != nil {
			if err := d.Close(); err != nil {
				t.Errorf("close image: %v", err)
			}
			d = nil
		}
	}
	serve()
	s.reattach = func(t *testing.T) { stop(); serve() }
	s.close = stop
	s.counts = func() string {
		if dev == nil {
			return ""
		}
		c := dev.Counts()
		n := d.Machine().Counts()
		for _, f := range dev.Failures() {
			t.Logf("ublk request failed: %s", f)
		}
		return fmt.Sprintf("requests: %d writes, %d appends, %d zone mgmt, %d discards, %d failed; now open %d active %d",
			c.Writes, c.Appends, c.ZoneMgmt, c.Discards, c.Failed, n.Open(), n.Active())
	}
	return s
}

func newNullBlkSide(t *testing.T, g consumerGeom) *zoneDev {
	t.Helper()
	path := zonedNullBlk(t, g.zonedGeometry(), true)
	return &zoneDev{kind: "nullblk", path: path, reattach: func(*testing.T) {}, close: removeNullBlk, counts: func() string { return "" }}
}

// consumerWorkload runs against one device and returns nil or why it
// failed. It may use t only for logging and for set-up errors that are not
// the device's fault (Fatal).
type consumerWorkload struct {
	name string
	// applies tells whether the workload can run on the geometry, and if
	// not, why (printed).
	applies func(g consumerGeom) (bool, string)
	run     func(t *testing.T, g consumerGeom, s *zoneDev) error
	// digest, when set, runs after a successful run while the device is
	// still there and returns what must be equal on both devices (zone
	// report and the data under the write pointers).
	digest func(t *testing.T, g consumerGeom, s *zoneDev) (string, error)
}

var consumerWorkloads = []consumerWorkload{
	{name: "fio-zbd-write-verify", run: fioZbdVerify(64<<10, false)},
	// fio 3.33 refuses --verify when the block size does not divide the
	// zone size ("block size 28672 is not a divisor of the zone size"):
	// the data is compared between the two devices instead.
	// Four jobs: which zones get written when depends on timing, so the
	// check is that every byte under every write pointer is fio's pattern.
	{name: "fio-zbd-28k", run: fioZbdPlain(28<<10, 4), digest: patternCheck},
	// One job is deterministic: zone conditions, write pointers and data
	// must equal null_blk's.
	{name: "fio-zbd-28k-1job", run: fioZbdPlain(28<<10, 1), digest: zoneDigest},
	{name: "fio-zbd-conv-and-seq", run: fioZbdVerify(16<<10, true),
		applies: func(g consumerGeom) (bool, string) { return g.conv > 0, "the geometry has no conventional zones" }},
	{name: "fio-zbd-randwrite-resets", run: fioZbdRandReset},
	{name: "f2fs", run: f2fsWorkload(false), applies: f2fsFits},
	{name: "f2fs-conventional-meta", run: f2fsWorkload(true),
		applies: func(g consumerGeom) (bool, string) {
			// mkfs.f2fs keeps its metadata in the conventional zones: on
			// geometry (a) it asks for 5 ("Device does not have enough
			// random write zones for F2FS volume (5 needed)").
			if ok, why := f2fsFits(g); !ok {
				return ok, why
			}
			return g.conv >= 5, fmt.Sprintf("mkfs.f2fs needs at least 5 conventional zones for its metadata, the geometry has %d", g.conv)
		}},
	{name: "btrfs", run: btrfsWorkload},
}

// f2fsFits: mkfs.f2fs refuses a device of 12 sections ("Device size is not
// sufficient for F2FS volume"): six logs and overprovisioning need more.
func f2fsFits(g consumerGeom) (bool, string) {
	return g.size/g.zs >= 32, fmt.Sprintf("mkfs.f2fs needs more than %d zones (sections) for its six logs and overprovisioning", g.size/g.zs)
}

// TestConsumers is the differential consumer lane.
func TestConsumers(t *testing.T) {
	requireUblk(t)
	for _, tool := range []string{"fio", "mkfs.f2fs", "fsck.f2fs", "mkfs.btrfs", "btrfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("ZQ_VM") == "1" {
				t.Fatalf("%s missing in the test VM (run.sh copies it from the host: install fio, f2fs-tools, btrfs-progs)", tool)
			}
			t.Skipf("******** SKIPPED: %s not installed ********", tool)
		}
	}
	exec.Command("modprobe", "crc32_generic").Run()
	exec.Command("modprobe", "crc32c_generic").Run()
	for _, m := range []string{"f2fs", "btrfs", "loop"} {
		if out, err := exec.Command("modprobe", m).CombinedOutput(); err != nil && os.Getenv("ZQ_VM") == "1" {
			t.Fatalf("modprobe %s in the test VM: %v: %s", m, err, out)
		}
	}
	fmt.Printf("ZQVM: CONSUMER zonefs %s\n", zonefsNote())
	if d := os.Getenv("ZQ_NULLBLK_COMPLETION_NSEC"); d != "" {
		nullBlkExtra["irqmode"], nullBlkExtra["completion_nsec"] = "2", d
	}
	only := os.Getenv("ZQ_CONSUMER_RUN")
	for _, g := range consumerGeoms {
		queueAttrs(t, g)
		for _, w := range consumerWorkloads {
			if only != "" && !regexp.MustCompile(only).MatchString(w.name+" "+g.name) {
				continue
			}
			if w.applies != nil {
				if ok, why := w.applies(g); !ok {
					fmt.Printf("ZQVM: CONSUMER %s %s not run: %s\n", w.name, g, why)
					continue
				}
			}
			t.Run(w.name+"/"+g.name, func(t *testing.T) { compareConsumer(t, g, w) })
		}
	}
}

// kernelLine matches what the kernel logs about a device's zone resources
// and I/O errors.
var kernelLine = regexp.MustCompile(`zones exceeded|I/O error|Aborting plugged|blk_update_request|critical|error`)

func compareConsumer(t *testing.T, g consumerGeom, w consumerWorkload) {
	result := map[string]string{}
	logs := map[string][]string{}
	digests := map[string]string{}
	for _, kind := range []string{"ublk", "nullblk"} {
		var s *zoneDev
		if kind == "ublk" {
			s = newUblkSide(t, g)
		} else {
			s = newNullBlkSide(t, g)
		}
		clearKmsg()
		err := w.run(t, g, s)
		if err == nil && w.digest != nil {
			var d string
			if d, err = w.digest(t, g, s); err == nil {
				digests[kind] = d
			}
		}
		counts := s.counts()
		dev := filepath.Base(s.path)
		logs[kind] = deviceLog(dev)
		s.close()
		if err != nil {
			result[kind] = "FAIL: " + oneLine(err.Error())
		} else {
			result[kind] = "ok"
		}
		if counts != "" {
			t.Logf("%s %s: %s", kind, s.path, counts)
		}
		for _, l := range logs[kind] {
			t.Logf("%s kernel: %s", kind, l)
		}
	}
	fmt.Printf("ZQVM: CONSUMER %s %s ublk=%s nullblk=%s\n", w.name, g, result["ublk"], result["nullblk"])
	if result["ublk"] != "ok" && result["nullblk"] == "ok" {
		t.Errorf("%s on %s: ours %s, null_blk ok", w.name, g, result["ublk"])
	}
	if du, dn := digests["ublk"], digests["nullblk"]; du != dn {
		fmt.Printf("ZQVM: CONSUMER %s %s zones/data differ: ublk %s nullblk %s\n", w.name, g.name, du, dn)
		t.Errorf("%s on %s: zone reports or data under the write pointers differ:\nublk:    %s\nnullblk: %s", w.name, g, du, dn)
	}
	// Kernel lines about our device that the reference does not produce
	// (device names differ: compare what follows them).
	theirs := map[string]bool{}
	for _, l := range logs["nullblk"] {
		theirs[logKey(l)] = true
	}
	for _, l := range logs["ublk"] {
		if !theirs[logKey(l)] {
			fmt.Printf("ZQVM: CONSUMER %s %s kernel (ublk only): %s\n", w.name, g.name, l)
			t.Errorf("kernel log for our device, not for null_blk: %s", l)
		}
	}
}

var devName = regexp.MustCompile(`ublkb[0-9]+|nullb[0-9]+|sector [0-9]+|zone [0-9]+|\[[ 0-9.]+\]`)

func logKey(l string) string { return devName.ReplaceAllString(l, "_") }

func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 300 {
		s = s[:300] + "..."
	}
	return s
}

func clearKmsg() { exec.Command("dmesg", "-c").Run() }

// deviceLog returns the kernel's lines since clearKmsg that name dev (or
// the file system on it) and report zone resources or errors.
func deviceLog(dev string) []string {
	out, _ := exec.Command("dmesg").CombinedOutput()
	var lines []string
	for _, l := range strings.Split(string(out), "\n") {
		if (strings.Contains(l, dev) || strings.Contains(l, "F2FS-fs") || strings.Contains(l, "BTRFS")) && kernelLine.MatchString(l) {
			lines = append(lines, strings.TrimSpace(l))
		}
	}
	return lines
}

// queueAttrs prints the ublk device's queue attributes next to null_blk's
// for geometry g (issue 12: where ours differ the README says why).
func queueAttrs(t *testing.T, g consumerGeom) {
	attrs := []string{"max_sectors_kb", "max_hw_sectors_kb", "physical_block_size", "logical_block_size", "write_cache", "fua",
		"zone_append_max_bytes", "max_open_zones", "max_active_zones", "nr_zones", "chunk_sectors", "zoned", "discard_max_bytes", "write_zeroes_max_bytes", "nr_requests"}
	u := newUblkSide(t, g)
	ub := filepath.Base(u.path)
	uv := map[string]string{}
	for _, a := range attrs {
		uv[a] = sysfs(ub, a)
	}
	u.close()
	n := newNullBlkSide(t, g)
	nb := filepath.Base(n.path)
	var diff []string
	var line strings.Builder
	for _, a := range attrs {
		nv := sysfs(nb, a)
		fmt.Fprintf(&line, " %s=%s", a, uv[a])
		if nv != uv[a] {
			fmt.Fprintf(&line, "(null_blk %s)", nv)
			diff = append(diff, a)
		}
	}
	n.close()
	fmt.Printf("ZQVM: QUEUE %s ublk vs null_blk:%s\n", g.name, line.String())
}

func zonefsNote() string {
	if _, err := exec.LookPath("mkzonefs"); err != nil {
		return "******** NOT RUN: mkzonefs (zonefs-tools) is not packaged by Debian 12; the zonefs module alone cannot format a device ********"
	}
	return "mkzonefs present"
}

// fioZbd runs fio with the given arguments plus the common ones and
// returns its output, or an error naming the failure.
func fioZbd(dev string, args ...string) (string, error) {
	all := append([]string{"--filename=" + dev, "--thread", "--direct=1", "--ioengine=libaio", "--zonemode=zbd", "--group_reporting"}, args...)
	out, err := exec.Command("fio", all...).CombinedOutput()
	s := string(out)
	if err != nil {
		return s, fmt.Errorf("fio exit %v: %s", err, fioErr(s))
	}
	if strings.Contains(s, "verify: bad") || strings.Contains(s, "bad magic") || strings.Contains(s, "crc32c: verify failed") {
		return s, fmt.Errorf("fio verify failed: %s", fioErr(s))
	}
	return s, nil
}

var fioErrLine = regexp.MustCompile(`(?m)^.*(error|err=|verify|Input/output).*$`)

func fioErr(s string) string {
	var keep []string
	for _, l := range fioErrLine.FindAllString(s, -1) {
		if strings.Contains(l, "err= 0") {
			continue
		}
		keep = append(keep, strings.TrimSpace(l))
		if len(keep) == 3 {
			break
		}
	}
	return strings.Join(keep, " | ")
}

func seqRegion(g consumerGeom) (off, size uint64) {
	off = uint64(g.conv) * g.zs
	return off, g.size - off
}

// fioZbdVerify: four jobs, iodepth 16, each on its own band of zones,
// sequential writes of bs with crc32c verify; bs need not divide the zone
// size. withConv starts the bands in the conventional zones.
func fioZbdVerify(bs uint64, withConv bool) func(t *testing.T, g consumerGeom, s *zoneDev) error {
	return func(t *testing.T, g consumerGeom, s *zoneDev) error {
		off, size := seqRegion(g)
		if withConv {
			off, size = 0, g.size
		}
		return fioBands(t, g, s, off, size, bs, 4, "--verify=crc32c", "--do_verify=1")
	}
}

// fioZbdPlain: as fioZbdVerify without verify, with the same fixed data
// in every block (so the two devices can be compared).
func fioZbdPlain(bs, jobs uint64) func(t *testing.T, g consumerGeom, s *zoneDev) error {
	return func(t *testing.T, g consumerGeom, s *zoneDev) error {
		off, size := seqRegion(g)
		return fioBands(t, g, s, off, size, bs, jobs, "--scramble_buffers=0", "--buffer_pattern="+fioPattern)
	}
}

// fioBands runs fio --zonemode=zbd sequential writes of bs, iodepth 16,
// with jobs jobs each on its own band of [off, off+size), at most 48 MiB
// per job under TCG, within the device's max_open_zones.
func fioBands(t *testing.T, g consumerGeom, s *zoneDev, off, size, bs, jobs uint64, extra ...string) error {
	band := (size / jobs) / g.zs * g.zs
	write := min(band, max(g.zs, 48<<20/g.zs*g.zs))
	args := []string{"--name=zbd", "--rw=write", fmt.Sprintf("--bs=%d", bs), "--iodepth=16", fmt.Sprintf("--numjobs=%d", jobs),
		fmt.Sprintf("--offset=%d", off), fmt.Sprintf("--offset_increment=%d", band), fmt.Sprintf("--size=%d", write)}
	args = append(args, extra...)
	if g.maxOpen > 0 {
		args = append(args, fmt.Sprintf("--max_open_zones=%d", g.maxOpen))
	}
	out, err := fioZbd(s.path, args...)
	if err != nil {
		t.Logf("fio on %s:\n%s", s.path, out)
	}
	return err
}

// fioPattern fills every block fioZbdPlain writes.
const fioPattern = "0x5aa5c33c"

// writtenZones reports the zones of s and reads, with O_DIRECT, each
// sequential zone's data from its start to its write pointer (its capacity
// when FULL); fn sees each such zone.
func writtenZones(t *testing.T, g consumerGeom, s *zoneDev, fn func(z kzone, data []byte) error) ([]kzone, error) {
	f, err := os.OpenFile(s.path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	zs, err := reportZones(f, 0, int(g.size/g.zs))
	if err != nil {
		return nil, fmt.Errorf("report zones: %v", err)
	}
	buf := alignedBuf(t, int(g.cap))
	for _, z := range zs {
		if z.Type == 1 || z.WP <= z.Start {
			continue
		}
		n := (z.WP - z.Start) * 512
		if z.Cond == uint8(zoned.CondFull) {
			n = z.Cap * 512
		}
		if _, err := f.ReadAt(buf[:n], int64(z.Start*512)); err != nil {
			return nil, fmt.Errorf("read zone at sector %d: %v", z.Start, err)
		}
		if err := fn(z, buf[:n]); err != nil {
			return nil, err
		}
	}
	return zs, nil
}

// checkPattern: every byte from a zone's start to its write pointer is
// fio's pattern (no lost or misplaced write).
func checkPattern(z kzone, b []byte) error {
	pat := []byte{0x5a, 0xa5, 0xc3, 0x3c}
	for k := range b {
		if b[k] != pat[k%4] {
			return fmt.Errorf("zone at sector %d: byte %d of the %d under its write pointer is %#x, not fio's pattern", z.Start, k, len(b), b[k])
		}
	}
	return nil
}

// patternCheck verifies checkPattern on every written zone and returns
// nothing to compare between the devices.
func patternCheck(t *testing.T, g consumerGeom, s *zoneDev) (string, error) {
	written := 0
	_, err := writtenZones(t, g, s, func(z kzone, b []byte) error { written += len(b); return checkPattern(z, b) })
	if err == nil {
		t.Logf("%s: %d KiB under the write pointers, all fio's pattern", s.path, written>>10)
	}
	return "", err
}

// zoneDigest is the zone report (conditions and write pointers, an open
// zone counted as open whatever its kind) and a checksum of the data under
// the write pointers, which must also be fio's pattern.
func zoneDigest(t *testing.T, g consumerGeom, s *zoneDev) (string, error) {
	h := sha256.New()
	zs, err := writtenZones(t, g, s, func(z kzone, b []byte) error { h.Write(b); return checkPattern(z, b) })
	if err != nil {
		return "", err
	}
	conds := map[uint8]int{}
	var wps []string
	for _, z := range zs {
		cond := z.Cond
		if cond == uint8(zoned.CondExpOpen) {
			cond = uint8(zoned.CondImpOpen)
		}
		conds[cond]++
		if z.Type != 1 && z.WP > z.Start && z.Cond != uint8(zoned.CondFull) {
			wps = append(wps, fmt.Sprintf("%d:%d", z.Start/(g.zs/512), (z.WP-z.Start)*512>>10))
		}
	}
	return fmt.Sprintf("conds=%v partial(zone:KiB)=%v sha256=%x", conds, wps, h.Sum(nil)[:8]), nil
}

// fioZbdRandReset: random writes (fio turns them into writes at the write
// pointers of random zones) with zone resets while writing, many jobs,
// iodepth 16; then a verified sequential pass.
func fioZbdRandReset(t *testing.T, g consumerGeom, s *zoneDev) error {
	off, size := seqRegion(g)
	args := []string{"--name=zbdr", "--rw=randwrite", "--bs=32k", "--iodepth=16", "--numjobs=4",
		fmt.Sprintf("--offset=%d", off), fmt.Sprintf("--size=%d", size), "--io_size=24m",
		"--zone_reset_threshold=0.1", "--zone_reset_frequency=0.2", "--random_generator=tausworthe64", "--randseed=7"}
	if g.maxOpen > 0 {
		args = append(args, fmt.Sprintf("--max_open_zones=%d", g.maxOpen))
	}
	out, err := fioZbd(s.path, args...)
	if err != nil {
		t.Logf("fio on %s:\n%s", s.path, out)
		return err
	}
	// Every zone reset, then verified writes again.
	if out, err := exec.Command("blkzone", "reset", s.path).CombinedOutput(); err != nil {
		return fmt.Errorf("blkzone reset: %v: %s", err, out)
	}
	return fioZbdVerify(64<<10, false)(t, g, s)
}

// fsFiles writes n files of different sizes into dir with fio's verify
// off: their checksums are taken by reading them back later.
func fsFiles(dir string, n int, each int) (map[string]string, error) {
	sums := map[string]string{}
	for i := range n {
		b := make([]byte, each+i*12345)
		for k := range b {
			b[k] = byte(k*(i+7) + k>>9 + i)
		}
		name := filepath.Join(dir, fmt.Sprintf("file%d", i))
		if err := os.WriteFile(name, b, 0o644); err != nil {
			return nil, fmt.Errorf("write %s: %v", name, err)
		}
		h := sha256.Sum256(b)
		sums[name] = hex.EncodeToString(h[:])
	}
	return sums, nil
}

func checkSums(sums map[string]string) error {
	names := make([]string, 0, len(sums))
	for n := range sums {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err != nil {
			return fmt.Errorf("read %s: %v", n, err)
		}
		h := sha256.Sum256(b)
		if hex.EncodeToString(h[:]) != sums[n] {
			return fmt.Errorf("%s: contents differ after remount", filepath.Base(n))
		}
	}
	return nil
}

// fsFio runs fio write+verify with several jobs on files in dir (a file
// system: no zonemode).
func fsFio(dir string, size string) error {
	out, err := exec.Command("fio", "--name=fsv", "--directory="+dir, "--thread", "--ioengine=psync", "--rw=write", "--bs=64k",
		"--numjobs=3", "--size="+size, "--verify=crc32c", "--do_verify=1", "--fsync_on_close=1", "--group_reporting").CombinedOutput()
	if err != nil {
		return fmt.Errorf("fio on the file system: %v: %s", err, fioErr(string(out)))
	}
	if bytes.Contains(out, []byte("verify: bad")) {
		return fmt.Errorf("fio verify failed on the file system: %s", fioErr(string(out)))
	}
	return nil
}

// loopDevice makes a regular block device of size bytes (a loop device
// over a file) for file systems that keep metadata apart.
func loopDevice(t *testing.T, size int64) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "meta.img")
	if err := os.WriteFile(f, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(f, size); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "-f", "--show", f).CombinedOutput()
	if err != nil {
		// busybox losetup has no --show
		if out2, err2 := exec.Command("losetup", "-f").CombinedOutput(); err2 == nil {
			dev := strings.TrimSpace(string(out2))
			if out3, err3 := exec.Command("losetup", dev, f).CombinedOutput(); err3 != nil {
				t.Fatalf("losetup %s %s: %v: %s", dev, f, err3, out3)
			}
			t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
			return dev
		}
		t.Fatalf("losetup: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	return dev
}

// fsRoundTrip: mount, write files and run fio with verify, unmount, check,
// detach/re-attach, check again, remount, compare checksums.
func fsRoundTrip(t *testing.T, s *zoneDev, mountDev, fstype string, mountData string, check func() error) error {
	mnt := filepath.Join(t.TempDir(), "mnt")
	os.MkdirAll(mnt, 0o755)
	if err := unix.Mount(mountDev, mnt, fstype, 0, mountData); err != nil {
		return fmt.Errorf("mount %s: %v", fstype, err)
	}
	sums, err := fsFiles(mnt, 6, 3<<20)
	if err == nil {
		err = fsFio(mnt, "32m")
	}
	unix.Sync()
	if out, rerr := exec.Command("blkzone", "report", s.path).CombinedOutput(); rerr == nil {
		t.Logf("%s zones after the writes (mounted):\n%s", s.kind, out)
	}
	if uerr := unix.Unmount(mnt, 0); uerr != nil && err == nil {
		err = fmt.Errorf("umount: %v", uerr)
	}
	if err != nil {
		return err
	}
	if err := check(); err != nil {
		return err
	}
	s.reattach(t)
	if mountDev == "" || strings.Contains(mountDev, "ublkb") || strings.Contains(mountDev, "nullb") {
		mountDev = s.path
	}
	if err := check(); err != nil {
		return fmt.Errorf("after re-attach: %v", err)
	}
	if err := unix.Mount(mountDev, mnt, fstype, 0, mountData); err != nil {
		return fmt.Errorf("mount after re-attach: %v", err)
	}
	defer unix.Unmount(mnt, 0)
	if err := checkSums(sums); err != nil {
		return err
	}
	// Write more after the remount, as a file system in use does.
	if _, err := fsFiles(filepath.Join(mnt), 2, 1<<20); err != nil {
		return fmt.Errorf("after remount: %v", err)
	}
	return nil
}

func f2fsWorkload(convMeta bool) func(t *testing.T, g consumerGeom, s *zoneDev) error {
	return func(t *testing.T, g consumerGeom, s *zoneDev) error {
		var mkfs []string
		mountDev := s.path
		var meta string
		if convMeta {
			mkfs = []string{"-f", "-m", s.path}
		} else {
			// Only what the metadata needs, so the data goes to the zoned
			// device.
			// mkfs.f2fs wants two zones' worth there ("Conventional device
			// is too small, (128 MiB needed)" with 64 MiB zones).
			meta = loopDevice(t, int64(max(24<<20, 2*g.zs)))
			mkfs = []string{"-f", "-m", "-c", s.path, meta}
			mountDev = meta
		}
		out, err := exec.Command("mkfs.f2fs", mkfs...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("mkfs.f2fs %s: %v: %s", strings.Join(mkfs, " "), err, lastLines(string(out), 3))
		}
		fsck := func() error {
			dev := s.path
			if meta != "" {
				dev = meta
			}
			out, err := exec.Command("fsck.f2fs", "-f", dev).CombinedOutput()
			if err != nil {
				return fmt.Errorf("fsck.f2fs: %v: %s", err, lastLines(string(out), 4))
			}
			return nil
		}
		if meta != "" {
			// fsck.f2fs finds the zoned device through the superblock's
			// device list, by path: after a re-attach the path may change,
			// so fsck runs before the re-attach only.
			check := fsck
			done := false
			fsck = func() error {
				if done {
					return nil
				}
				done = true
				return check()
			}
		}
		return fsRoundTrip(t, s, mountDev, "f2fs", "", fsck)
	}
}

func btrfsWorkload(t *testing.T, g consumerGeom, s *zoneDev) error {
	out, err := exec.Command("mkfs.btrfs", "-f", "-O", "zoned", "-d", "single", "-m", "single", s.path).CombinedOutput()
	if err != nil {
		return fmt.Errorf("mkfs.btrfs -O zoned: %v: %s", err, lastLines(string(out), 3))
	}
	return fsRoundTrip(t, s, s.path, "btrfs", "", func() error {
		out, err := exec.Command("btrfs", "check", "--readonly", s.path).CombinedOutput()
		if err != nil {
			return fmt.Errorf("btrfs check: %v: %s", err, lastLines(string(out), 4))
		}
		return nil
	})
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, " | ")
}

// TestConsumersNBD: the fio workloads that apply to the NBD exporter,
// whose kernel device is not zoned (DESIGN point 6): sequential writes per
// zone (fio --zonemode=strided, each zone written up to its capacity, one
// band of zones per job) with crc32c verify, on every geometry of the
// lane. One write in flight per job: the kernel keeps no order between the
// writes in flight on a device that is not zoned (no zone write plugging),
// so deeper queues to one zone reach the server out of order and are
// refused off the write pointer (seen here: EIO at iodepth 16). The zone engine enforces the rules behind the device; no
// acknowledged write may be lost, and a workload within the limits sees
// no refusal.
func TestConsumersNBD(t *testing.T) {
	requireKernel(t)
	if _, err := exec.LookPath("fio"); err != nil {
		if os.Getenv("ZQ_VM") == "1" {
			t.Fatal("fio missing in the test VM")
		}
		t.Skip("******** SKIPPED: fio not installed ********")
	}
	for _, g := range consumerGeoms {
		t.Run(g.name, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "nbd-"+g.name+".qcow2")
			zs, zc, conv, mo, ma, app := g.zs, g.cap, g.conv, g.maxOpen, g.maxActive, g.app
			if _, err := qcow2.Create(img, qcow2.CreateOptions{Size: g.size, Zoned: &qcow2.ZonedOptions{
				ZoneSize: &zs, ZoneCapacity: &zc, ConventionalZones: &conv, MaxOpenZones: &mo, MaxActiveZones: &ma, MaxAppendBytes: &app}}); err != nil {
				t.Fatal(err)
			}
			d, err := zoned.Open(img, zoned.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			a := newAttacher(t, filepath.Join(dir, "state"))
			att, err := a.Attach(t.Context(), nbdattach.AttachRequest{VolumeID: "vol-" + g.name, ImagePath: img, Backend: nbdattach.ZonedBackend{D: d}})
			if err != nil {
				d.Close()
				t.Fatal(err)
			}
			defer a.Detach(t.Context(), "vol-"+g.name)
			off, size := seqRegion(g)
			jobs := uint64(4)
			if g.maxOpen > 0 {
				jobs = min(jobs, uint64(g.maxOpen))
			}
			band := (size / jobs) / g.zs * g.zs
			write := min(band, max(g.zs, 32<<20/g.zs*g.zs))
			clearKmsg()
			out, ferr := exec.Command("fio", "--name=strided", "--filename="+att.DevicePath, "--thread", "--direct=1", "--ioengine=libaio",
				"--iodepth=1", fmt.Sprintf("--numjobs=%d", jobs), "--rw=write", "--bs=64k", "--zonemode=strided",
				fmt.Sprintf("--zonesize=%d", g.cap), fmt.Sprintf("--zonerange=%d", g.zs),
				fmt.Sprintf("--offset=%d", off), fmt.Sprintf("--offset_increment=%d", band), fmt.Sprintf("--size=%d", write),
				"--verify=crc32c", "--do_verify=1", "--group_reporting").CombinedOutput()
			logs := deviceLog(filepath.Base(att.DevicePath))
			res := "ok"
			if ferr != nil || !strings.Contains(string(out), "err= 0") {
				res = "FAIL: " + oneLine(fioErr(string(out)))
				t.Errorf("fio strided verify through %s: %v\n%s", att.DevicePath, ferr, out)
			}
			n := d.Machine().Counts()
			fmt.Printf("ZQVM: CONSUMER fio-strided-verify %s nbd=%s kernel-errors=%d open=%d active=%d\n", g, res, len(logs), n.Open(), n.Active())
			for _, l := range logs {
				t.Errorf("kernel: %s", l)
			}
		})
	}
}
