package interop

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// qcow2Sector is a first sector that probes as qcow2: writing it into a
// guessed-raw image would turn the image into a qcow2 one.
func qcow2Sector(t *testing.T, dir string) string {
	t.Helper()
	b := make([]byte, 512)
	copy(b, "QFI\xfb\x00\x00\x00\x03")
	p := filepath.Join(dir, "qcow2-sector")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestProbeRawAsQemu (issue 13): an image opened for writing without -f
// that probes as raw gets qemu's warning, and a write that would make its
// first sector probe as another format is refused with EPERM, by us as by
// qemu-io; with -f raw, or read-only, neither happens.
func TestProbeRawAsQemu(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	sector := qcow2Sector(t, dir)
	for _, tool := range []string{"qemu-io", "zq-csi"} {
		t.Run(tool, func(t *testing.T) {
			img := filepath.Join(dir, tool+".raw")
			if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
				t.Fatal(err)
			}
			io := func(args ...string) result {
				if tool == "zq-csi" {
					return zq(t, dir, append([]string{"io"}, args...)...)
				}
				return run(t, dir, "qemu-io", args...)
			}
			warn := "WARNING: Image format was not specified for '" + img + "' and probing guessed raw.\n" +
				"         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n" +
				"         Specify the 'raw' format explicitly to remove the restrictions.\n"
			r := io("-c", "write -P 0x11 0 512", img)
			if r.code != 0 || r.stderr != warn {
				t.Errorf("write to a guessed raw image: want success and exactly qemu's warning, got %v", r)
			}
			r = io("-c", "write -s "+sector+" 0 512", img)
			if r.code != 1 || !strings.Contains(r.stdout, "write failed: Operation not permitted") {
				t.Errorf("write of a qcow2 header to block 0: want EPERM, got %v", r)
			}
			if r = io("-c", "write -s "+sector+" 512 512", img); r.code != 0 {
				t.Errorf("the same bytes after block 0: %v", r)
			}
			if r = io("-r", "-c", "read -P 0x11 0 512", img); r.code != 0 || r.stderr != "" {
				t.Errorf("read-only open: want no warning, got %v", r)
			}
			if r = io("-f", "raw", "-c", "write -P 0x22 0 512", img); r.code != 0 || r.stderr != "" {
				t.Errorf("-f raw: want no warning, got %v", r)
			}
			got, _ := os.ReadFile(img)
			if !bytes.Equal(got[:512], bytes.Repeat([]byte{0x22}, 512)) || !bytes.HasPrefix(got[512:], []byte("QFI\xfb")) {
				t.Errorf("image contents: % x ... % x", got[:8], got[512:520])
			}
		})
	}
}

// TestProbeDamagedMagic (issue 13): a qcow2 image whose magic is damaged is
// refused, not written as raw (qemu-img guesses raw, and writing it as
// raw overwrites what a repair of the magic would give back).
func TestProbeDamagedMagic(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "d.qcow2")
	mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", img, "16M")
	mustRun(t, dir, "qemu-io", "-c", "write -P 0x5a 0 64k", img)
	good, _ := os.ReadFile(img)
	for _, c := range []struct {
		name  string
		magic string
	}{{"one bit flipped", "QFI\xfa"}, {"zeroed", "\x00\x00\x00\x00"}} {
		t.Run(c.name, func(t *testing.T) {
			bad := bytes.Clone(good)
			copy(bad, c.magic)
			if err := os.WriteFile(img, bad, 0o644); err != nil {
				t.Fatal(err)
			}
			if r := run(t, dir, "qemu-img", "info", img); !strings.Contains(r.stdout, "file format: raw") {
				t.Logf("qemu-img info no longer calls it raw: %v", r)
			}
			for _, args := range [][]string{
				{"io", "-c", "write -P 0x33 0 512", img},
				{"info", img},
				{"check", img},
				{"convert", "-O", "raw", img, filepath.Join(dir, "out.raw")},
			} {
				r := zq(t, dir, args...)
				if r.code == 0 || !strings.Contains(r.stderr, "damaged qcow2 header") || !strings.Contains(r.stderr, "byte offset 0") {
					t.Errorf("img %s: want a refusal naming the damaged header at offset 0, got %v", args[0], r)
				}
			}
			now, _ := os.ReadFile(img)
			if !bytes.Equal(now, bad) {
				t.Fatal("the refused commands changed the file")
			}
			// Mending the magic gives the image back whole.
			if err := os.WriteFile(img, good, 0o644); err != nil {
				t.Fatal(err)
			}
			mustRun(t, dir, "qemu-img", "check", img)
			mustRun(t, dir, "qemu-io", "-r", "-c", "read -P 0x5a 0 64k", img)
		})
	}
}
