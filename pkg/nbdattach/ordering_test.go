package nbdattach

import (
	"bytes"
	"path/filepath"
	"testing"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// TestPipelinedZoneWritesApplyInOrder sends 4 zones × 48 sequential 4 KiB
// writes on one connection without waiting for replies (as the kernel and
// fio with iodepth > 1 do). A zoned device accepts a write only at the
// write pointer, so all succeed only if each zone's writes are applied in
// arrival order.
func TestPipelinedZoneWritesApplyInOrder(t *testing.T) {
	const zs = 1 << 20
	path := filepath.Join(t.TempDir(), "z.qcow2")
	zsz := uint64(zs)
	if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: 8 * zs, ClusterSize: 4096, Zoned: &qcow2.ZonedOptions{ZoneSize: &zsz}}); err != nil {
		t.Fatal(err)
	}
	d, err := zoned.Open(path, zoned.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	tc, _ := connect(t, &Export{Name: "z", Backend: ZonedBackend{D: d}}, clientOpts{name: "z", structured: true})
	const per = 48
	sendErr := make(chan error, 1)
	go func() {
		for k := 0; k < per; k++ {
			for z := 0; z < 4; z++ {
				p := bytes.Repeat([]byte{byte(z*per + k)}, 4096)
				req := request{typ: cmdWrite, handle: uint64(z*per + k), offset: uint64(z*zs + k*4096), length: 4096}
				if err := tc.send(req, p); err != nil {
					sendErr <- err
					return
				}
			}
		}
		sendErr <- nil
	}()
	for i := 0; i < 4*per; i++ {
		r, err := tc.readReply(func(uint64) (uint32, bool) { return 0, false })
		if err != nil {
			t.Fatal(err)
		}
		if r.errno != 0 {
			t.Fatalf("write %d: errno %v (%s): writes to a zone were applied out of order", r.handle, r.errno, r.msg)
		}
	}
	if err := <-sendErr; err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	for z := 0; z < 4; z++ {
		for k := 0; k < per; k++ {
			d.ReadAt(buf, int64(z*zs+k*4096))
			if buf[0] != byte(z*per+k) {
				t.Fatalf("zone %d block %d holds %d", z, k, buf[0])
			}
		}
	}
}
