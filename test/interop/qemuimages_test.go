package interop

import (
	"encoding/binary"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// qemuWrites are qemu-io commands used to fill images made by qemu-img:
// patterns, zero writes with and without unmap, a discard, unaligned and
// cluster-crossing writes.
var qemuWrites = []string{
	"write -P 0x11 0 64k",
	"write -P 0x22 100k 300k",
	"write -P 0x33 1M 4k",
	"write -P 0x44 1536 1024",
	"write -z 150k 64k",
	"write -z -u 256k 128k",
	"write -P 0x55 3M 2M",
	"discard 4M 1M",
	"write -P 0x66 7M 512",
	"write -P 0x77 14M 2M",
}

func qemuIO(t *testing.T, dir, img string, cmds ...string) {
	t.Helper()
	args := []string{}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	mustRun(t, dir, "qemu-io", append(args, img)...)
}

// mixedRaw writes 16 MiB of compressible text, random blocks and holes.
func mixedRaw(t *testing.T, path string) {
	rng := rand.New(rand.NewPCG(7, 7))
	b := make([]byte, 16<<20)
	for off := 0; off < len(b); off += 64 << 10 {
		blk := b[off : off+64<<10]
		switch rng.IntN(4) {
		case 0:
			for i := range blk {
				blk[i] = "zq-csi qcow2 zoned "[i%19]
			}
		case 1:
			for i := range blk[:40000] {
				blk[i] = byte(rng.Uint32())
			}
		case 2:
			copy(blk, "short text at the start of a mostly empty cluster")
		}
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestReadQemuImages reads images that qemu-img and qemu-io wrote, in many
// shapes, and compares "zq-csi img convert -O raw" with "qemu-img convert
// -O raw" byte for byte.
func TestReadQemuImages(t *testing.T) {
	needQemu(t)
	cases := []struct {
		name  string
		build func(t *testing.T, dir string) // must leave img.qcow2
	}{
		{"plain", func(t *testing.T, dir string) {
			mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "img.qcow2", "16M")
			qemuIO(t, dir, "img.qcow2", qemuWrites...)
		}},
		{"compat-0.10", func(t *testing.T, dir string) {
			mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10", "img.qcow2", "16M")
			qemuIO(t, dir, "img.qcow2", qemuWrites...)
		}},
		{"compressed-zlib", func(t *testing.T, dir string) {
			mixedRaw(t, filepath.Join(dir, "src.raw"))
			mustRun(t, dir, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "src.raw", "img.qcow2")
			qemuIO(t, dir, "img.qcow2", "write -P 0x99 64k 4k") // a compressed cluster rewritten
		}},
		{"compressed-zstd", func(t *testing.T, dir string) {
			mixedRaw(t, filepath.Join(dir, "src.raw"))
			mustRun(t, dir, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", "src.raw", "img.qcow2")
		}},
		{"snapshot", func(t *testing.T, dir string) {
			mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "img.qcow2", "16M")
			qemuIO(t, dir, "img.qcow2", qemuWrites[:5]...)
			mustRun(t, dir, "qemu-img", "snapshot", "-c", "snap1", "img.qcow2")
			qemuIO(t, dir, "img.qcow2", "write -P 0xa1 32k 64k", "discard 1M 64k", "write -P 0xa2 10M 64k")
			mustRun(t, dir, "qemu-img", "snapshot", "-c", "snap2", "img.qcow2")
			qemuIO(t, dir, "img.qcow2", "write -P 0xa3 0 8k")
		}},
		{"backing-chain-3", func(t *testing.T, dir string) {
			mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "base.qcow2", "16M")
			qemuIO(t, dir, "base.qcow2", qemuWrites...)
			mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2")
			qemuIO(t, dir, "mid.qcow2", "write -P 0xb1 0 32k", "write -z 3M 64k", "write -P 0xb2 8M 1M")
			mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "img.qcow2")
			qemuIO(t, dir, "img.qcow2", "write -P 0xc1 16k 32k", "discard 8M 64k", "write -P 0xc2 15M 512")
		}},
		{"raw-backing", func(t *testing.T, dir string) {
			mixedRaw(t, filepath.Join(dir, "base.raw"))
			mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "img.qcow2")
			qemuIO(t, dir, "img.qcow2", qemuWrites...)
		}},
		{"cluster-512", func(t *testing.T, dir string) {
			mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=512", "img.qcow2", "16M")
			qemuIO(t, dir, "img.qcow2", qemuWrites...)
		}},
		{"cluster-2M", func(t *testing.T, dir string) {
			mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=2M", "img.qcow2", "16M")
			qemuIO(t, dir, "img.qcow2", qemuWrites...)
		}},
		{"refcount-bits-1", func(t *testing.T, dir string) {
			mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "-o", "refcount_bits=1", "img.qcow2", "16M")
			qemuIO(t, dir, "img.qcow2", qemuWrites...)
		}},
		{"refcount-bits-64", func(t *testing.T, dir string) {
			mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "-o", "refcount_bits=64", "img.qcow2", "16M")
			qemuIO(t, dir, "img.qcow2", qemuWrites...)
		}},
		{"lazy-refcounts-dirty", func(t *testing.T, dir string) {
			mustRun(t, dir, "qemu-img", "create", "-f", "qcow2", "-o", "lazy_refcounts=on", "img.qcow2", "16M")
			// sigraise 9 kills qemu-io before it closes the image, so the
			// dirty bit set by the first lazy-refcount write stays set.
			args := []string{}
			for _, c := range qemuWrites {
				args = append(args, "-c", c)
			}
			args = append(args, "-c", "sigraise 9", "img.qcow2")
			if r := run(t, dir, "qemu-io", args...); r.code == 0 {
				t.Fatalf("qemu-io was not killed: %v", r)
			}
			hdr := make([]byte, 80)
			f, err := os.Open(filepath.Join(dir, "img.qcow2"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.ReadAt(hdr, 0); err != nil {
				t.Fatal(err)
			}
			if incompat := binary.BigEndian.Uint64(hdr[72:80]); incompat&1 == 0 {
				t.Fatalf("dirty bit not set after sigraise 9 (incompatible_features %#x)", incompat)
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			tc.build(t, dir)
			mustRun(t, dir, "qemu-img", "convert", "-O", "raw", "img.qcow2", "qemu.raw")
			mustZq(t, dir, "convert", "-O", "raw", "img.qcow2", "zq.raw")
			sameFiles(t, filepath.Join(dir, "zq.raw"), filepath.Join(dir, "qemu.raw"))

			// Our qcow2 output of the same disk must be consistent and equal.
			mustZq(t, dir, "convert", "-O", "qcow2", "img.qcow2", "zq.qcow2")
			if r := run(t, dir, "qemu-img", "check", "zq.qcow2"); r.code != 0 {
				t.Errorf("qemu-img check of our convert output: %v", r)
			}
			if r := run(t, dir, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", "zq.qcow2", "qemu.raw"); r.code != 0 {
				t.Errorf("qemu-img compare of our convert output: %v", r)
			}

			// img info must report what qemu-img info reports.
			compareInfo(t, dir, "img.qcow2")
		})
	}
}
