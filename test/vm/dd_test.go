//go:build linux

package vm

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestDDVsQemuNBD puts the same busybox dd through /dev/nbdX served by
// "zq-csi nbd attach" and through a device of "qemu-nbd -c", in the same VM
// run: both serve a fresh qcow2 image made by "zq-csi img create" (first
// writes allocate clusters on both sides), qemu-nbd with its default cache
// mode (writeback: no O_DIRECT, flush = fdatasync), ours with its only one
// (page cache, flush = fsync). Each round runs both sides, the first side
// alternating, with caches dropped and the device detached between runs;
// each run is a write (allocating, ending with fsync), a rewrite of the
// allocated blocks and a read, each timed with the monotonic clock; the
// first round also compares both devices' content with the source. It prints every round,
// the medians and the median of the per-round ratios; the goal (>= 1.0x)
// is reported, not asserted: speed is measured, never a test verdict.
func TestDDVsQemuNBD(t *testing.T) {
	requireKernel(t)
	bin := zqBin(t)
	if _, err := exec.LookPath("qemu-nbd"); err != nil {
		if os.Getenv("ZQ_VM") == "1" {
			t.Fatal("qemu-nbd missing in the test VM: run.sh copies it from the host (apt-get install qemu-utils)")
		}
		t.Skip("SKIPPED: qemu-nbd not installed (apt-get install qemu-utils): no dd comparison")
	}
	n := mib()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	data := make([]byte, n<<20)
	r := rand.New(rand.NewPCG(7, 7))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	data = nil

	rounds := 3
	if v, err := strconv.Atoi(os.Getenv("ZQ_VM_DD_ROUNDS")); err == nil && v > 0 {
		rounds = v
	}
	sides := []string{"zq-csi", "qemu-nbd"}
	res := map[string][]ddResult{}
	var ratioW, ratioRW, ratioR []float64
	for round := range rounds {
		order := sides
		if round%2 == 1 {
			order = []string{sides[1], sides[0]}
		}
		got := map[string]ddResult{}
		for _, side := range order {
			img := filepath.Join(dir, fmt.Sprintf("%s-%d.qcow2", side, round))
			if out, err := exec.Command(bin, "img", "create", "-f", "qcow2", img, fmt.Sprintf("%dM", n)).CombinedOutput(); err != nil {
				t.Fatalf("img create: %v\n%s", err, out)
			}
			dropCaches(t)
			var d ddResult
			// The first round checks what both devices hold (cmp against
			// the source): the figures are of real writes.
			if side == "zq-csi" {
				d = ddOurs(t, bin, dir, img, src, n, round, round == 0)
			} else {
				d = ddQemu(t, img, src, n, round == 0)
			}
			os.Remove(img)
			got[side] = d
			res[side] = append(res[side], d)
		}
		z, q := got["zq-csi"], got["qemu-nbd"]
		ratioW = append(ratioW, z.w/q.w)
		ratioRW = append(ratioRW, z.rw/q.rw)
		ratioR = append(ratioR, z.r/q.r)
		fmt.Printf("ZQVM: DD round %d (%s first) %dMiB bs=1M O_DIRECT MiB/s: write zq-csi %.1f qemu-nbd %.1f (%.2fx); rewrite %.1f %.1f (%.2fx); read %.1f %.1f (%.2fx); server CPU user+sys s: zq-csi %s, qemu-nbd %s\n",
			round+1, order[0], n, z.w, q.w, z.w/q.w, z.rw, q.rw, z.rw/q.rw, z.r, q.r, z.r/q.r, z.cpuLine(), q.cpuLine())
	}
	med := func(f func(ddResult) float64, side string) float64 {
		var v []float64
		for _, d := range res[side] {
			v = append(v, f(d))
		}
		return median(v)
	}
	w := func(d ddResult) float64 { return d.w }
	rw := func(d ddResult) float64 { return d.rw }
	rd := func(d ddResult) float64 { return d.r }
	fmt.Printf("ZQVM: DD write   %dMiB bs=1M O_DIRECT (allocating) median of %d: zq-csi %.1f MiB/s, qemu-nbd -c %.1f MiB/s\n", n, rounds, med(w, "zq-csi"), med(w, "qemu-nbd"))
	fmt.Printf("ZQVM: DD rewrite %dMiB bs=1M O_DIRECT (allocated)  median of %d: zq-csi %.1f MiB/s, qemu-nbd -c %.1f MiB/s\n", n, rounds, med(rw, "zq-csi"), med(rw, "qemu-nbd"))
	fmt.Printf("ZQVM: DD read    %dMiB bs=1M O_DIRECT              median of %d: zq-csi %.1f MiB/s, qemu-nbd -c %.1f MiB/s\n", n, rounds, med(rd, "zq-csi"), med(rd, "qemu-nbd"))
	fmt.Printf("ZQVM: DD servers: zq-csi nbd attach (netlink CONNECT, 1 socket, block size 512, page cache, FLUSH=fsync); qemu-nbd -c DEV -f qcow2 (ioctl, 1 socket, defaults --cache=writeback --aio=threads: page cache, FLUSH=fdatasync)\n")
	fmt.Printf("ZQVM: DD devices zq-csi %s; qemu-nbd %s\n", res["zq-csi"][0].queue, res["qemu-nbd"][0].queue)
	fmt.Printf("ZQVM: RATIO zq-csi/qemu-nbd (median of %d alternating rounds) write %.2fx rewrite %.2fx read %.2fx\n",
		rounds, median(ratioW), median(ratioRW), median(ratioR))
}

type ddResult struct {
	w, rw, r float64       // MiB/s
	cpu      [3][2]float64 // user and system CPU seconds of the serving process in write, rewrite, read
	queue    string        // the device's queue limits
}

func (d ddResult) cpuLine() string {
	return fmt.Sprintf("write %.2f+%.2f rewrite %.2f+%.2f read %.2f+%.2f", d.cpu[0][0], d.cpu[0][1], d.cpu[1][0], d.cpu[1][1], d.cpu[2][0], d.cpu[2][1])
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func dropCaches(t *testing.T) {
	t.Helper()
	exec.Command("sync").Run()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0); err != nil {
		t.Logf("drop_caches: %v", err)
	}
}

// cpuTimes is the user and system CPU seconds of process pid (all its threads).
func cpuTimes(t *testing.T, pid int) [2]float64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatalf("server CPU time: %v", err)
	}
	// Fields after the command name, which is in parentheses.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return [2]float64{ut / 100, st / 100} // USER_HZ
}

// timedDD runs busybox dd and returns MiB/s measured with the monotonic clock.
func timedDD(t *testing.T, n int64, args ...string) float64 {
	t.Helper()
	start := time.Now()
	out, err := exec.Command("dd", args...).CombinedOutput()
	d := time.Since(start)
	if err != nil {
		t.Fatalf("dd %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return float64(n) / d.Seconds()
}

func queueLimits(dev string) string {
	var s []string
	for _, a := range []string{"logical_block_size", "max_sectors_kb", "nr_requests", "scheduler", "write_cache", "fua", "rotational"} {
		s = append(s, a+"="+sysfs(dev, a))
	}
	return strings.Join(s, " ")
}

// ddRuns writes, rewrites and reads dev, checks its content against src
// when verify is set, and measures the serving process pid's CPU time
// in each of the three.
func ddRuns(t *testing.T, dev, src string, n int64, pid int, verify bool) ddResult {
	t.Helper()
	d := ddResult{queue: queueLimits(dev)}
	phase := func(i int, args ...string) float64 {
		c0 := cpuTimes(t, pid)
		v := timedDD(t, n, args...)
		c1 := cpuTimes(t, pid)
		d.cpu[i] = [2]float64{c1[0] - c0[0], c1[1] - c0[1]}
		return v
	}
	d.w = phase(0, "if="+src, "of="+dev, "bs=1M", "oflag=direct", "conv=fsync")
	d.rw = phase(1, "if="+src, "of="+dev, "bs=1M", "oflag=direct", "conv=fsync")
	d.r = phase(2, "if="+dev, "of=/dev/null", "bs=1M", "iflag=direct")
	if verify {
		if out, err := exec.Command("cmp", src, dev).CombinedOutput(); err != nil {
			t.Fatalf("%s does not hold what dd wrote: %v %s", dev, err, out)
		}
	}
	return d
}

func ddOurs(t *testing.T, bin, dir, img, src string, n int64, round int, verify bool) ddResult {
	t.Helper()
	state := filepath.Join(dir, "ddstate")
	vol := fmt.Sprintf("dd%d", round)
	srv := startServer(t, "attach", "--state-dir", state, "--volume-id", vol, img)
	dev := srv.line(t)
	srv.drain(t)
	d := ddRuns(t, dev, src, n, srv.cmd.Process.Pid, verify)
	if out, err := exec.Command(bin, "nbd", "detach", "--state-dir", state, vol).CombinedOutput(); err != nil {
		t.Fatalf("detach: %v\n%s", err, out)
	}
	if err := srv.wait(30 * time.Second); err != nil {
		t.Fatalf("zq-csi nbd attach after detach: %v", err)
	}
	return d
}

// ddQemu serves img with qemu-nbd -c on the highest free preallocated
// /dev/nbdN (init.sh loads nbd with nbds_max=16; a CONNECT without an
// index, ours, takes the lowest free one and destroys it on detach).
func ddQemu(t *testing.T, img, src string, n int64, verify bool) ddResult {
	t.Helper()
	dev := ""
	for i := 15; i >= 0 && dev == ""; i-- {
		b, err := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/size", i))
		if err != nil || strings.TrimSpace(string(b)) != "0" {
			continue
		}
		if _, err := os.Stat(fmt.Sprintf("/sys/block/nbd%d/pid", i)); err == nil {
			continue
		}
		dev = fmt.Sprintf("/dev/nbd%d", i)
	}
	if dev == "" {
		t.Fatal("no free preallocated /dev/nbdN for qemu-nbd -c")
	}
	if out, err := exec.Command("qemu-nbd", "-c", dev, "-f", "qcow2", img).CombinedOutput(); err != nil {
		t.Fatalf("qemu-nbd -c %s: %v\n%s", dev, err, out)
	}
	defer exec.Command("qemu-nbd", "-d", dev).Run()
	name := filepath.Base(dev)
	deadline := time.Now().Add(10 * time.Second)
	var pid int
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile("/sys/block/" + name + "/pid")
		sz, _ := os.ReadFile("/sys/block/" + name + "/size")
		if p, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && strings.TrimSpace(string(sz)) == strconv.FormatInt(n<<11, 10) {
			pid = p
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if pid == 0 {
		t.Fatalf("qemu-nbd -c %s: the device did not come up", dev)
	}
	// The pid file names the thread that called NBD_DO_IT: count the whole process.
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
		for _, l := range strings.Split(string(st), "\n") {
			if v, ok := strings.CutPrefix(l, "Tgid:"); ok {
				pid, _ = strconv.Atoi(strings.TrimSpace(v))
			}
		}
	}
	d := ddRuns(t, dev, src, n, pid, verify)
	if out, err := exec.Command("qemu-nbd", "-d", dev).CombinedOutput(); err != nil {
		t.Fatalf("qemu-nbd -d %s: %v\n%s", dev, err, out)
	}
	return d
}
