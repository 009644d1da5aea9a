package qcow2

import (
	"bytes"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestRandomIOMatchesModel writes, zeroes and discards at random through the
// engine and compares every read with an in-memory model, across cluster
// sizes and refcount widths, then reopens and compares again.
func TestRandomIOMatchesModel(t *testing.T) {
	for _, tc := range []struct {
		cs, rb uint32
	}{{512, 1}, {512, 64}, {4096, 16}, {65536, 16}, {65536, 2}, {1 << 21, 8}} {
		t.Run("", func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "a.qcow2")
			size := uint64(8 << 20)
			if _, err := Create(path, CreateOptions{Size: size, ClusterSize: tc.cs, RefcountBits: tc.rb}); err != nil {
				t.Fatal(err)
			}
			im, err := Open(path, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			model := make([]byte, size)
			seed := int64(tc.cs) * int64(tc.rb)
			rng := rand.New(rand.NewSource(seed))
			for i := 0; i < 300; i++ {
				off := uint64(rng.Intn(int(size/512))) * 512
				n := uint64(rng.Intn(64)+1) * 512
				if rng.Intn(8) == 0 {
					n = uint64(rng.Intn(2048)+1) * 512
				}
				if off+n > size {
					n = size - off
				}
				switch rng.Intn(6) {
				case 0:
					if err := im.Discard(int64(off), int64(n)); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+n])
				case 1:
					if err := im.WriteZeroes(int64(off), int64(n), false); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+n])
				default:
					p := make([]byte, n)
					rng.Read(p)
					if _, err := im.WriteAt(p, int64(off)); err != nil {
						t.Fatal(err)
					}
					copy(model[off:], p)
				}
			}
			got := make([]byte, size)
			if _, err := im.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, model) {
				t.Fatalf("cs=%d rb=%d: contents differ from model", tc.cs, tc.rb)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			res, err := Check(path, CheckOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if res.ExitCode() != 0 {
				t.Fatalf("check: %+v", res)
			}
			// The engine's own checks passed; now the peer's.
			q := needTool(t, "qemu-img", "qemu-utils")
			out, err := exec.Command(q, "check", path).CombinedOutput()
			if err != nil {
				t.Fatalf("qemu-img check: %v\n%s", err, out)
			}
			raw := filepath.Join(t.TempDir(), "raw")
			if err := os.WriteFile(raw, model, 0o644); err != nil {
				t.Fatal(err)
			}
			out, err = exec.Command(q, "compare", "-f", "qcow2", "-F", "raw", path, raw).CombinedOutput()
			if err != nil {
				t.Fatalf("qemu-img compare: %v\n%s", err, out)
			}
		})
	}
}
