package imgcmd

import (
	"bytes"
	"fmt"
	"io"
	"math"
	"math/rand"
	"path/filepath"
	"testing"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// TestWriteZoneReportFormat: the hand-built lines are exactly qemu-io's
// format, "start: 0x%x, len 0x%x, cap 0x%x, wptr 0x%x, zcond:%u, [type: %u]"
// (sectors), for zero, the largest values and random ones.
func TestWriteZoneReportFormat(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	zones := []zoned.ZoneReport{{}, {Start: math.MaxUint64, Len: math.MaxUint64, Cap: math.MaxUint64, WP: math.MaxUint64, Type: 255, Cond: 255}}
	for i := 0; i < 20000; i++ { // several of WriteZoneReport's 64 KiB writes
		zones = append(zones, zoned.ZoneReport{Start: rng.Uint64() >> rng.Intn(64), Len: rng.Uint64() >> rng.Intn(64),
			Cap: uint64(rng.Intn(4096)) << 9, WP: rng.Uint64() >> rng.Intn(64), Type: zoned.ZoneType(rng.Intn(3)), Cond: zoned.Cond(rng.Intn(16))})
	}
	var want bytes.Buffer
	for _, z := range zones {
		fmt.Fprintf(&want, "start: 0x%x, len 0x%x, cap 0x%x, wptr 0x%x, zcond:%d, [type: %d]\n", z.Start>>9, z.Len>>9, z.Cap>>9, z.WP>>9, z.Cond, z.Type)
	}
	var got bytes.Buffer
	if err := WriteZoneReport(&got, zones); err != nil {
		t.Fatal(err)
	}
	if got.String() != want.String() {
		g, w := bytes.Split(got.Bytes(), []byte("\n")), bytes.Split(want.Bytes(), []byte("\n"))
		for i := range min(len(g), len(w)) {
			if !bytes.Equal(g[i], w[i]) {
				t.Fatalf("line %d: got %q, want %q", i, g[i], w[i])
			}
		}
		t.Fatalf("%d lines, want %d", len(g), len(w))
	}
}

// BenchmarkZoneReportAllZones runs `zrp 0 1048576` (the command's own
// function, output to io.Discard) on an image with 2^20 zones: the report
// of the engine and the formatting of 2^20 lines. Opening the image is not
// timed. Goal (issue 3): under 100 ms.
func BenchmarkZoneReportAllZones(b *testing.B) {
	path := filepath.Join(b.TempDir(), "z.qcow2")
	zs := uint64(1 << 20)
	if _, err := qcow2.Create(path, qcow2.CreateOptions{Size: 1 << 40, Zoned: &qcow2.ZonedOptions{ZoneSize: &zs}}); err != nil {
		b.Fatal(err)
	}
	d, err := zoned.Open(path, zoned.OpenOptions{ReadOnly: true})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	var n countWriter
	s := &ioSession{zdev: d, out: &n, errOut: io.Discard, readOnly: true}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		n = countWriter{}
		if err := ioZoneReport(s, nil, []string{"0", "1048576"}); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if n.lines != zoned.MaxZones {
		b.Fatalf("%d lines, want %d", n.lines, zoned.MaxZones)
	}
	b.ReportMetric(float64(n.bytes)/(1<<20), "output-MiB")
}

// countWriter counts the bytes and lines written to it and keeps nothing.
type countWriter struct{ bytes, lines int }

func (c *countWriter) Write(p []byte) (int, error) {
	c.bytes += len(p)
	c.lines += bytes.Count(p, []byte{'\n'})
	return len(p), nil
}
