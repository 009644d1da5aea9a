package imgcmd

import (
	"encoding/xml"
	"path/filepath"
	"strings"
	"testing"
)

// img info --output=wide|svg: the zone picture of a zoned image (zoneview),
// from the same zone engine report as --output=json.
func TestInfoZonePicture(t *testing.T) {
	img := filepath.Join(t.TempDir(), "z.qcow2")
	if _, e, code := runImg(t, "create", "-f", "qcow2", img, "-o", "size=192M", "-o", "zone.mode=host-managed",
		"-o", "zone.size=16M", "-o", "zone.capacity=16M", "-o", "zone.conventional_zones=1", "-o", "zone.max_open_zones=4",
		"-o", "zone.max_active_zones=4"); code != 0 {
		t.Fatalf("create: %s", e)
	}
	// Zone 1: 4 MiB written (closed on reopen, a quarter); zone 2 full; the rest empty.
	if _, e, code := runImg(t, "io", "-c", "write 16M 4M", "-c", "write 32M 16M", img); code != 0 {
		t.Fatalf("io: %s", e)
	}
	out, e, code := runImg(t, "info", "--output=wide", img)
	if code != 0 {
		t.Fatalf("info --output=wide: exit %d: %s", code, e)
	}
	want := "image " + img + "\n12 zones of 16 MiB: conventional 1, empty 9, closed 1, full 1\n" +
		" 0 ▒▂█····· ····\n" +
		"   =cF..... ....\n"
	if !strings.HasPrefix(out, "image: "+img+"\n") || !strings.Contains(out, "\n\n"+want) {
		t.Errorf("--output=wide: want the human output, a blank line, then\n%s\ngot:\n%s", want, out)
	}

	out, e, code = runImg(t, "info", "--output=svg", img)
	if code != 0 {
		t.Fatalf("info --output=svg: exit %d: %s", code, e)
	}
	if err := xml.Unmarshal([]byte(out), new(struct{})); err != nil || !strings.Contains(out, "<svg ") {
		t.Errorf("--output=svg: not an SVG document (%v): %.200s", err, out)
	}
	if n := strings.Count(out, "<title>zone "); n != 12 {
		t.Errorf("--output=svg: %d zone tooltips, want 12", n)
	}
	if !strings.Contains(out, "<title>zone 1: CLOSED, start 16777216, write pointer 20971520, capacity 16 MiB, 4 MiB written (25.0%)</title>") {
		t.Errorf("--output=svg: no tooltip for zone 1 with its write pointer")
	}

	raw := filepath.Join(t.TempDir(), "r.raw")
	runImg(t, "create", "-f", "raw", raw, "1M")
	if _, e, code := runImg(t, "info", "--output=svg", raw); code != 1 || !strings.Contains(e, "--output=svg draws the zones of a zoned image; this raw image has no zones") {
		t.Errorf("raw image: exit %d, stderr %q", code, e)
	}
}
