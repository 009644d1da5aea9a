//go:build linux

package vm

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// nullblkConfigfs is where null_blk's configfs devices are made; init.sh
// mounts configfs at /sys/kernel/config.
const nullblkConfigfs = "/sys/kernel/config/nullb"

// nullBlkExtra are further configfs attributes for the next reference
// devices (e.g. irqmode and completion_nsec for a reference with the
// latency of ours).
var nullBlkExtra = map[string]string{}

// zonedNullBlk creates the reference device: a zoned null_blk with the
// geometry g of one of our images (capacity, zone size and capacity,
// conventional zones, max open and active), through configfs, where the
// capacity is set in MiB. Only when configfs has no nullb directory does it
// fall back to module parameters, whose capacity is whole GiB: it says so
// on the console (ZQVM: NULLBLK FALLBACK) and in the test log. memoryBacked
// keeps written data (memory_backed=1); without it null_blk transfers no
// data at all. The device is removed at the end of the test.
//
// A missing null_blk fails inside the VM lane (ZQ_VM=1), which ships the
// module; elsewhere it skips, loudly, after the test's own checks ran.
func zonedNullBlk(t *testing.T, g zoned.Geometry, memoryBacked bool) string {
	t.Helper()
	for _, v := range []uint64{g.Size, g.ZoneSize, g.ZoneCapacity} {
		if v == 0 || v%(1<<20) != 0 {
			t.Fatalf("null_blk geometry is in MiB; size %d, zone size %d, zone capacity %d are not all whole MiB", g.Size, g.ZoneSize, g.ZoneCapacity)
		}
	}
	mb := func(v uint64) string { return fmt.Sprint(v >> 20) }
	mem := "0"
	if memoryBacked {
		mem = "1"
	}
	removeNullBlk() // a leftover of an earlier test or step
	if out, err := exec.Command("modprobe", "null_blk", "nr_devices=0").CombinedOutput(); err != nil {
		msg := fmt.Sprintf("null_blk unavailable (modprobe null_blk: %v: %s)", err, strings.TrimSpace(string(out)))
		if os.Getenv("ZQ_VM") == "1" {
			t.Fatalf("%s in the test VM, which ships the module: the null_blk reference comparison cannot run", msg)
		}
		t.Skipf("******** SKIPPED the null_blk reference comparison: %s ********", msg)
	}
	t.Cleanup(removeNullBlk)

	if _, err := os.Stat(nullblkConfigfs); err == nil {
		item := filepath.Join(nullblkConfigfs, "nullb0")
		if err := os.Mkdir(item, 0o755); err != nil {
			t.Fatalf("null_blk configfs: %v", err)
		}
		for _, kv := range [][2]string{
			{"size", mb(g.Size)}, {"blocksize", "512"}, {"memory_backed", mem},
			{"zoned", "1"}, {"zone_size", mb(g.ZoneSize)}, {"zone_capacity", mb(g.ZoneCapacity)},
			{"zone_nr_conv", fmt.Sprint(g.Conventional)}, {"zone_max_open", fmt.Sprint(g.MaxOpen)},
			{"zone_max_active", fmt.Sprint(g.MaxActive)},
		} {
			if err := os.WriteFile(filepath.Join(item, kv[0]), []byte(kv[1]), 0); err != nil {
				t.Fatalf("null_blk configfs %s=%s: %v", kv[0], kv[1], err)
			}
		}
		// The append limit too, where this null_blk has the attribute
		// (Linux >= 6.11): else it takes its own 255 sectors.
		if g.MaxAppendBytes != 0 {
			if _, err := os.Stat(filepath.Join(item, "zone_append_max_sectors")); err == nil {
				if err := os.WriteFile(filepath.Join(item, "zone_append_max_sectors"), []byte(fmt.Sprint(g.MaxAppendBytes/512)), 0); err != nil {
					t.Fatalf("null_blk configfs zone_append_max_sectors=%d: %v", g.MaxAppendBytes/512, err)
				}
			}
		}
		for k, v := range nullBlkExtra {
			if err := os.WriteFile(filepath.Join(item, k), []byte(v), 0); err != nil {
				t.Fatalf("null_blk configfs %s=%s: %v", k, v, err)
			}
		}
		if err := os.WriteFile(filepath.Join(item, "power"), []byte("1"), 0); err != nil {
			t.Fatalf("null_blk configfs power=1: %v", err)
		}
		// The disk is named after the configfs item on recent kernels and
		// after its index on older ones; with nr_devices=0 both are nullb0.
		dev := "/dev/nullb0"
		if _, err := os.Stat(dev); err != nil {
			t.Fatalf("null_blk configfs device powered on, but %s: %v", dev, err)
		}
		checkNullBlk(t, dev, g)
		return dev
	}

	// Fallback: module parameters; the capacity is whole GiB.
	exec.Command("rmmod", "null_blk").Run()
	gb := max((g.Size+(1<<30)-1)>>30, 1)
	msg := fmt.Sprintf("NULLBLK FALLBACK %s missing (is configfs mounted?): module parameters, capacity %d GiB = %d zones instead of %d MiB = %d zones; zone conditions beyond zone %d are not compared",
		nullblkConfigfs, gb, (gb<<30)/g.ZoneSize, g.Size>>20, g.NrZones, g.NrZones-1)
	fmt.Printf("ZQVM: %s\n", msg)
	t.Logf("******** %s ********", msg)
	args := []string{"null_blk", "nr_devices=1", "zoned=1", "gb=" + fmt.Sprint(gb), "bs=512", "memory_backed=" + mem,
		"zone_size=" + mb(g.ZoneSize), "zone_capacity=" + mb(g.ZoneCapacity), "zone_nr_conv=" + fmt.Sprint(g.Conventional),
		"zone_max_open=" + fmt.Sprint(g.MaxOpen), "zone_max_active=" + fmt.Sprint(g.MaxActive)}
	if out, err := exec.Command("modprobe", args...).CombinedOutput(); err != nil {
		t.Fatalf("modprobe %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return "/dev/nullb0"
}

// removeNullBlk removes the reference device and the module; idempotent.
func removeNullBlk() {
	item := filepath.Join(nullblkConfigfs, "nullb0")
	if _, err := os.Stat(item); err == nil {
		os.WriteFile(filepath.Join(item, "power"), []byte("0"), 0)
		os.Remove(item)
	}
	exec.Command("rmmod", "null_blk").Run()
}

// checkNullBlk verifies that the reference device has the geometry asked for.
func checkNullBlk(t *testing.T, dev string, g zoned.Geometry) {
	t.Helper()
	want := map[string]string{
		"zoned": "host-managed", "nr_zones": fmt.Sprint(g.NrZones), "chunk_sectors": fmt.Sprint(g.ZoneSize / 512),
		"max_open_zones": fmt.Sprint(g.MaxOpen), "max_active_zones": fmt.Sprint(g.MaxActive),
	}
	for k, v := range want {
		if got := sysfs(dev, k); got != v {
			t.Errorf("null_blk reference %s: %s = %q, want %q (our image's geometry)", dev, k, got, v)
		}
	}
	if got := blockSize64(t, dev); uint64(got) != g.Size {
		t.Errorf("null_blk reference %s: %d bytes, want %d", dev, got, g.Size)
	}
}

// nullBlkLine describes the reference device for the ZQVM summary.
func nullBlkLine(dev string) string {
	return fmt.Sprintf("null_blk zoned=%s nr_zones=%s chunk_sectors=%s max_open=%s max_active=%s",
		sysfs(dev, "zoned"), sysfs(dev, "nr_zones"), sysfs(dev, "chunk_sectors"), sysfs(dev, "max_open_zones"), sysfs(dev, "max_active_zones"))
}
