//go:build linux

package vm

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	mount "k8s.io/mount-utils"

	"github.com/zq-csi/zq-csi/pkg/driver"
	"github.com/zq-csi/zq-csi/pkg/nbdattach"
	"github.com/zq-csi/zq-csi/pkg/nbdattach/ublk"
	"github.com/zq-csi/zq-csi/pkg/qcow2"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// Exporter selection seen from the kernel: "zq-csi ublk" on an image, and
// the driver staging exporter=ublk volumes as /dev/ublkbN and exporter=nbd
// volumes as /dev/nbdN on the same node.

// startUblkCmd runs "zq-csi ublk ARGS" as a child serving in the
// foreground (the server type of kernel_test.go).
func startUblkCmd(t *testing.T, args ...string) *server {
	t.Helper()
	cmd := exec.Command(zqBin(t), append([]string{"ublk"}, args...)...)
	cmd.Stderr = &prefixWriter{t: t, prefix: "ublk " + args[0] + ": "}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &server{cmd: cmd, out: bufio.NewScanner(out), waited: make(chan error, 1)}
	t.Cleanup(func() {
		if s.cmd.ProcessState == nil {
			s.cmd.Process.Kill()
		}
	})
	return s
}

func zqUblk(t *testing.T, args ...string) string {
	t.Helper()
	return run(t, zqBin(t), append([]string{"ublk"}, args...)...)
}

// listLine returns the list line of volume vol, "" if none.
func listLine(t *testing.T, state, vol string) string {
	t.Helper()
	for _, l := range strings.Split(zqUblk(t, "list", "--state-dir", state), "\n") {
		if f := strings.Fields(l); len(f) > 0 && f[0] == vol {
			return l
		}
	}
	return ""
}

func zonedImage(t *testing.T, path string, size, zs uint64, conv uint32) {
	t.Helper()
	if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: size, Zoned: &qcow2.ZonedOptions{ZoneSize: &zs, ConventionalZones: &conv}}); err != nil {
		t.Fatal(err)
	}
}

// openZoned creates a zoned image at path (zonedImage) and opens it as a
// device; the caller (or the attacher it hands the device to) closes it.
func openZoned(t *testing.T, path string, size, zs uint64, conv uint32) *zoned.Device {
	t.Helper()
	zonedImage(t, path, size, zs, conv)
	d, err := zoned.Open(path, zoned.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func waitGone(t *testing.T, path string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still exists", path)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestUblkCLI: zq-csi ublk attach presents an image as a host-managed
// /dev/ublkbN; list shows it live with the serving pid; SIGTERM leaves
// it (quiesced) for recover, which takes it over; detach from another
// process stops it, and the serving process exits; the data is in the
// image.
func TestUblkCLI(t *testing.T) {
	requireUblk(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "cli.qcow2")
	const zs = 4 << 20
	zonedImage(t, img, 32<<20, zs, 1)
	state := filepath.Join(dir, "state")

	att := startUblkCmd(t, "attach", "--state-dir", state, "--volume-id", "cli-vol", img)
	dev := att.line(t)
	if !strings.HasPrefix(dev, "/dev/ublkb") {
		t.Fatalf("attach printed %q, want /dev/ublkbN", dev)
	}
	att.drain(t)
	if z, nz, cs := sysfs(dev, "zoned"), sysfs(dev, "nr_zones"), sysfs(dev, "chunk_sectors"); z != "host-managed" || nz != "8" || cs != fmt.Sprint(zs/512) {
		t.Fatalf("%s: zoned=%s nr_zones=%s chunk_sectors=%s; want host-managed, 8, %d", dev, z, nz, cs, zs/512)
	}
	line := listLine(t, state, "cli-vol")
	if f := strings.Fields(line); len(f) != 6 || f[1] != dev || f[3] != "live" || f[4] != fmt.Sprint(att.cmd.Process.Pid) || f[5] != img {
		t.Fatalf("list: %q; want %s live, served by pid %d, image %s", line, dev, att.cmd.Process.Pid, img)
	}
	f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := alignedBuf(t, 64<<10)
	for i := range buf {
		buf[i] = byte(i*3 + 1)
	}
	if _, err := f.WriteAt(buf, zs); err != nil {
		t.Fatalf("write at zone 1's write pointer: %v", err)
	}
	if _, err := f.WriteAt(buf, 2*zs+4096); err == nil {
		t.Fatal("a write off zone 2's write pointer succeeded")
	}

	// SIGTERM: the device stays, quiesced, for recover.
	att.cmd.Process.Signal(syscall.SIGTERM)
	if err := att.wait(15 * time.Second); err != nil {
		t.Fatalf("attach after SIGTERM: %v", err)
	}
	if _, err := os.Stat(dev); err != nil {
		t.Fatalf("%s after SIGTERM: %v", dev, err)
	}
	if l := listLine(t, state, "cli-vol"); !strings.Contains(l, " quiesced ") {
		t.Fatalf("list after SIGTERM: %q; want quiesced", l)
	}
	rec := startUblkCmd(t, "recover", "--state-dir", state)
	if got := rec.line(t); !strings.HasPrefix(got, "recovered cli-vol "+dev+" generation 2") {
		t.Fatalf("recover printed %q", got)
	}
	rec.drain(t)
	if _, err := f.WriteAt(buf, zs+int64(len(buf))); err != nil {
		t.Fatalf("write after recover: %v", err)
	}
	if l := listLine(t, state, "cli-vol"); !strings.Contains(l, " live ") || !strings.Contains(l, fmt.Sprint(rec.cmd.Process.Pid)) {
		t.Fatalf("list after recover: %q; want live, served by pid %d", l, rec.cmd.Process.Pid)
	}
	f.Close()

	// detach from this process: the serving process sees its device
	// stop, releases it and exits.
	zqUblk(t, "detach", "--state-dir", state, "cli-vol")
	if err := rec.wait(15 * time.Second); err != nil {
		t.Fatalf("recover after detach: %v", err)
	}
	waitGone(t, dev)
	if l := listLine(t, state, "cli-vol"); l != "" {
		t.Fatalf("list after detach: %q", l)
	}
	zqUblk(t, "detach", "--state-dir", state, "cli-vol") // a second detach is a no-op

	d, err := zoned.Open(img, zoned.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	z1 := d.Report(1, 1)[0]
	got := make([]byte, 2*len(buf))
	if _, err := d.ReadAt(got, zs); err != nil || z1.WP != zs+uint64(len(got)) || !bytes.Equal(got[:len(buf)], buf) || !bytes.Equal(got[len(buf):], buf) {
		t.Fatalf("image after detach: zone 1 %+v, %v; want the 128 KiB written", z1, err)
	}
	fmt.Printf("ZQVM: UBLK CLI attach %s (host-managed, 8 zones), list live, SIGTERM -> quiesced, recover (generation 2), detach from another process -> server exited, device gone, data in the image\n", dev)
}

// csiClients dials the driver's socket.
type csiClients struct {
	csi.ControllerClient
	csi.NodeClient
}

// TestDriverExporter: the driver in-process with the real NBD and ublk
// attachers. exporter=ublk and exporter=auto volumes are staged as
// host-managed /dev/ublkbN, exporter=nbd as /dev/nbdN (not zoned);
// NodeGetInfo reports ublk; unstage detaches each through its attacher.
func TestDriverExporter(t *testing.T) {
	requireKernel(t)
	requireUblk(t)
	ctx := context.Background()
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	nbdAtt := newAttacher(t, filepath.Join(state, "attach-nbd"))
	ublkAtt, err := ublk.NewAttacher(ublk.AttacherOptions{StateDir: filepath.Join(state, "attach-ublk"),
		OnServeError: func(v string, err error) { t.Logf("ublk serve %s: %v", v, err) }})
	if err != nil {
		t.Fatal(err)
	}
	d, err := driver.New(driver.Config{NodeID: "vm", Mode: driver.ModeAll, DataDir: filepath.Join(dir, "data"), StateDir: state,
		Attacher: nbdAtt, ZonedAttacher: ublkAtt, Mounter: mount.NewFakeMounter(nil)})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "csi.sock")
	l, err := driver.Listen("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := d.NewServer(driver.ModeAll)
	go srv.Serve(l)
	defer srv.Stop()
	if err := d.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := csiClients{csi.NewControllerClient(conn), csi.NewNodeClient(conn)}

	info, err := c.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	seg := info.GetAccessibleTopology().GetSegments()
	if seg[driver.ExporterTopologyKey] != "ublk" || seg[driver.TopologyKey] != "vm" {
		t.Fatalf("NodeGetInfo topology %v; want %s=ublk and %s=vm", seg, driver.ExporterTopologyKey, driver.TopologyKey)
	}
	block := &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	const zs = 4 << 20
	var summary []string
	for _, tc := range []struct {
		exporter, kind, zoned string
	}{
		{"ublk", "ublk", "host-managed"},
		{"nbd", "nbd", "none"},
		{"auto", "ublk", "host-managed"},
	} {
		cv, err := c.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "vol-" + tc.exporter, CapacityRange: &csi.CapacityRange{RequiredBytes: 32 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{block},
			Parameters:         map[string]string{"zone.size": "4M", "zone.conventional_zones": "1", "exporter": tc.exporter}})
		if err != nil {
			t.Fatalf("CreateVolume exporter=%s: %v", tc.exporter, err)
		}
		v := cv.GetVolume()
		if v.VolumeContext["exporter"] != tc.exporter {
			t.Errorf("volume context %v: exporter missing", v.VolumeContext)
		}
		staging := filepath.Join(dir, "staging", v.VolumeId)
		if _, err := c.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.VolumeId, StagingTargetPath: staging,
			VolumeCapability: block, VolumeContext: v.VolumeContext}); err != nil {
			t.Fatalf("NodeStageVolume exporter=%s: %v", tc.exporter, err)
		}
		var dev string
		for _, a := range []nbdattach.Attacher{nbdAtt, ublkAtt} {
			atts, err := a.List(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, x := range atts {
				if x.VolumeID != v.VolumeId {
					continue
				}
				if a.Kind() != tc.kind || dev != "" {
					t.Fatalf("exporter=%s: attached through %s (%s), want %s only", tc.exporter, a.Kind(), x.DevicePath, tc.kind)
				}
				dev = x.DevicePath
			}
		}
		prefix := map[string]string{"ublk": "/dev/ublkb", "nbd": "/dev/nbd"}[tc.kind]
		if !strings.HasPrefix(dev, prefix) || sysfs(dev, "zoned") != tc.zoned {
			t.Fatalf("exporter=%s: device %q with queue/zoned=%s; want %sN, %s", tc.exporter, dev, sysfs(dev, "zoned"), prefix, tc.zoned)
		}
		// Zone rules hold through either device; only ublk reports zones.
		f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		buf := alignedBuf(t, 64<<10)
		if _, err := f.WriteAt(buf, zs); err != nil {
			t.Fatalf("exporter=%s: write at zone 1's write pointer: %v", tc.exporter, err)
		}
		if _, err := f.WriteAt(buf, 3*zs); err != nil {
			t.Fatalf("exporter=%s: write at zone 3's write pointer: %v", tc.exporter, err)
		}
		_, offErr := f.WriteAt(buf, 2*zs+8192)
		if offErr == nil {
			t.Errorf("exporter=%s: a write off zone 2's write pointer succeeded", tc.exporter)
		}
		zr, repErr := reportZones(f, zs/512, 1)
		if tc.kind == "ublk" && (repErr != nil || len(zr) != 1 || zr[0].WP != (zs+64<<10)/512) {
			t.Errorf("exporter=%s: BLKREPORTZONE zone 1: %+v %v; want wp at +64 KiB", tc.exporter, zr, repErr)
		}
		if tc.kind == "nbd" && repErr == nil {
			t.Errorf("exporter=nbd: BLKREPORTZONE succeeded on %s", dev)
		}
		f.Close()
		if _, err := c.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.VolumeId, StagingTargetPath: staging}); err != nil {
			t.Fatalf("NodeUnstageVolume exporter=%s: %v", tc.exporter, err)
		}
		for _, a := range []nbdattach.Attacher{nbdAtt, ublkAtt} {
			if atts, _ := a.List(ctx); len(atts) != 0 {
				t.Fatalf("exporter=%s: %s attachments after unstage: %+v", tc.exporter, a.Kind(), atts)
			}
		}
		if tc.kind == "ublk" {
			waitGone(t, dev)
		}
		// What the device wrote is in the image: zones 1 and 3 hold 64 KiB.
		zd, err := zoned.Open(filepath.Join(dir, "data", "volumes", v.VolumeId+".qcow2"), zoned.OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		r := zd.Report(0, 8)
		zd.Close()
		if r[1].WP != zs+64<<10 || r[3].WP != 3*zs+64<<10 || r[2].WP != 2*zs {
			t.Errorf("exporter=%s: image write pointers after unstage: %+v", tc.exporter, r[:4])
		}
		summary = append(summary, fmt.Sprintf("exporter=%s -> %s (zoned=%s, off-WP write: %s)", tc.exporter, dev, tc.zoned, errName(offErr)))
	}
	fmt.Printf("ZQVM: UBLK DRIVER NodeGetInfo %s=%s; %s; unstaged\n", driver.ExporterTopologyKey, seg[driver.ExporterTopologyKey], strings.Join(summary, "; "))
}
