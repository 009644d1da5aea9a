package qcow2

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// needTool returns the path of a peer tool. CI sets ZQ_REQUIRE_PEERS=1 so a
// missing peer fails instead of skipping.
func needTool(t testing.TB, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("ZQ_REQUIRE_PEERS") == "1" {
			t.Fatalf("%s not found: install the Debian package %s (ZQ_REQUIRE_PEERS=1)", name, pkg)
		}
		t.Skipf("SKIPPED: %s not found; install the Debian package %s to run this interop test", name, pkg)
	}
	return p
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// readAll reads a whole image through the engine.
func readAll(t testing.TB, path string) []byte {
	t.Helper()
	im, err := Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("open %s: %v", path, err)
	}
	defer im.Close()
	buf := make([]byte, im.Size())
	if _, err := im.ReadAt(buf, 0); err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return buf
}

// TestReadsQemuImages reads images made by qemu-img and qemu-io in many
// shapes and compares them with qemu-img's own raw conversion.
func TestReadsQemuImages(t *testing.T) {
	qimg := needTool(t, "qemu-img", "qemu-utils")
	qio := needTool(t, "qemu-io", "qemu-utils")
	dir := t.TempDir()
	writes := func(img string) {
		run(t, qio, "-f", "qcow2", "-c", "write -P 0x11 0 100k", "-c", "write -P 0x22 1M 3M",
			"-c", "write -z 2M 64k", "-c", "discard 3M 128k", "-c", "write -P 0x33 7M 512", img)
	}
	cases := map[string]func(img string){
		"plain": func(img string) {
			run(t, qimg, "create", "-f", "qcow2", img, "8M")
			writes(img)
		},
		"cluster512-refcount1": func(img string) {
			run(t, qimg, "create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=1", img, "8M")
			writes(img)
		},
		"cluster2M-refcount64": func(img string) {
			run(t, qimg, "create", "-f", "qcow2", "-o", "cluster_size=2M,refcount_bits=64", img, "8M")
			writes(img)
		},
		"compat0.10": func(img string) {
			run(t, qimg, "create", "-f", "qcow2", "-o", "compat=0.10", img, "8M")
			writes(img)
		},
		"compressed-zlib": func(img string) {
			src := img + ".src"
			run(t, qimg, "create", "-f", "qcow2", src, "8M")
			writes(src)
			run(t, qimg, "convert", "-c", "-O", "qcow2", src, img)
		},
		"compressed-zstd": func(img string) {
			src := img + ".src"
			run(t, qimg, "create", "-f", "qcow2", src, "8M")
			writes(src)
			run(t, qimg, "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", src, img)
		},
		"snapshot": func(img string) {
			run(t, qimg, "create", "-f", "qcow2", img, "8M")
			writes(img)
			run(t, qimg, "snapshot", "-c", "s1", img)
			run(t, qio, "-f", "qcow2", "-c", "write -P 0x44 64k 200k", img)
		},
		"backing-chain": func(img string) {
			base, mid := img+".base", img+".mid"
			run(t, qimg, "create", "-f", "qcow2", base, "8M")
			writes(base)
			run(t, qimg, "create", "-f", "qcow2", "-b", filepath.Base(base), "-F", "qcow2", mid)
			run(t, qio, "-f", "qcow2", "-c", "write -P 0x55 512k 1M", mid)
			run(t, qimg, "create", "-f", "qcow2", "-b", filepath.Base(mid), "-F", "qcow2", img)
			run(t, qio, "-f", "qcow2", "-c", "write -P 0x66 1536k 8k", "-c", "write -z 1M 64k", img)
		},
		"raw-backing": func(img string) {
			base := img + ".raw"
			os.WriteFile(base, bytes.Repeat([]byte{0x77}, 3<<20), 0o644)
			run(t, qimg, "create", "-f", "qcow2", "-b", base, "-F", "raw", img, "8M")
			run(t, qio, "-f", "qcow2", "-c", "write -P 0x12 1M 70k", img)
		},
	}
	for name, mk := range cases {
		t.Run(name, func(t *testing.T) {
			img := filepath.Join(dir, name+".qcow2")
			mk(img)
			raw := img + ".raw-out"
			run(t, qimg, "convert", "-O", "raw", img, raw)
			want, _ := os.ReadFile(raw)
			got := readAll(t, img)
			if !bytes.Equal(got, want) {
				for i := range got {
					if got[i] != want[i] {
						t.Fatalf("%s: first difference at byte %d: got 0x%02x want 0x%02x", name, i, got[i], want[i])
					}
				}
				t.Fatalf("%s: length differs: %d vs %d", name, len(got), len(want))
			}
			res, err := Check(img, CheckOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if res.ExitCode() != 0 {
				t.Fatalf("our check disagrees with a clean qemu image: %+v", res)
			}
			// Writing into the image (COW over compressed, snapshot-shared
			// and backing clusters) must keep qemu-img check clean.
			im, err := Open(img, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			p := bytes.Repeat([]byte{0xee}, 70000)
			if _, err := im.WriteAt(p, 1<<20+4096); err != nil {
				t.Fatal(err)
			}
			copy(want[1<<20+4096:], p)
			if err := im.Discard(1<<20+(128<<10), 64<<10); err != nil {
				t.Fatal(err)
			}
			clear(want[1<<20+(128<<10) : 1<<20+(192<<10)])
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			run(t, qimg, "check", img)
			os.WriteFile(raw, want, 0o644)
			run(t, qimg, "compare", "-f", "qcow2", "-F", "raw", img, raw)
		})
	}
}

// TestBitmapsAndUnknownExtensionsPreserved: an image with a persistent
// bitmap (made by qemu-img) checks clean with our Check, and after we write
// to it the bitmaps extension and an unknown extension are still there byte
// for byte (the autoclear bit is cleared, telling qemu the bitmap is stale).
func TestBitmapsAndUnknownExtensionsPreserved(t *testing.T) {
	qimg := needTool(t, "qemu-img", "qemu-utils")
	img := filepath.Join(t.TempDir(), "bm.qcow2")
	run(t, qimg, "create", "-f", "qcow2", img, "4M")
	run(t, qimg, "bitmap", "--add", img, "b0")
	res, err := Check(img, CheckOptions{})
	if err != nil || res.ExitCode() != 0 {
		t.Fatalf("check of an image with a bitmap: %+v %v", res, err)
	}
	im, err := Open(img, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	before := append([]byte(nil), im.h.bitmaps...)
	im.Close()
	if len(before) == 0 {
		t.Fatal("qemu-img bitmap --add made no bitmaps extension")
	}
	// Add an unknown extension by hand-editing through the engine.
	im, err = Open(img, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	im.h.others = append(im.h.others, rawExt{magic: 0x12345678, data: []byte("opaque-bytes")})
	if err := im.writeHeader(); err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(bytes.Repeat([]byte{1}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	im.Close()
	im, err = Open(img, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if !bytes.Equal(im.h.bitmaps, before) {
		t.Fatal("bitmaps extension changed")
	}
	if len(im.h.others) != 1 || string(im.h.others[0].data) != "opaque-bytes" {
		t.Fatalf("unknown extension lost: %+v", im.h.others)
	}
	if im.h.autoclear&autoclearBitmaps != 0 {
		t.Fatal("autoclear bit 0 still set after a write by an engine that does not maintain bitmaps")
	}
	out, _ := exec.Command(qimg, "info", img).CombinedOutput()
	if !strings.Contains(string(out), "virtual size: 4 MiB") {
		t.Fatalf("qemu-img info after our write:\n%s", out)
	}
}
