package interop

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

const randomImageSize = 16 << 20

// ioOp is one qemu-io command and its effect on a raw reference.
type ioOp struct {
	kind    string // "write", "zero", "discard"
	off, n  int64
	pattern byte
	unmap   bool
}

func (o ioOp) command() string {
	switch o.kind {
	case "write":
		return fmt.Sprintf("write -P 0x%02x %d %d", o.pattern, o.off, o.n)
	case "zero":
		if o.unmap {
			return fmt.Sprintf("write -z -u %d %d", o.off, o.n)
		}
		return fmt.Sprintf("write -z %d %d", o.off, o.n)
	}
	return fmt.Sprintf("discard %d %d", o.off, o.n)
}

// apply mirrors the command on the raw reference. Discarded and zeroed
// ranges read as zeros, also over a backing file (qcow2 v3 sets the zero
// flag rather than exposing the backing data).
func (o ioOp) apply(ref []byte) {
	var b byte
	if o.kind == "write" {
		b = o.pattern
	}
	for i := o.off; i < o.off+o.n; i++ {
		ref[i] = b
	}
}

// randomOps makes n commands at 512-aligned offsets and lengths. Discards
// are cluster aligned: a partial-cluster discard is advisory in qemu (it may
// keep the data), so only whole-cluster discards have a defined result.
func randomOps(rng *rand.Rand, n int, size, cluster int64) []ioOp {
	var ops []ioOp
	sector := func(max int64) int64 { return rng.Int64N(max/512) * 512 }
	for len(ops) < n {
		var o ioOp
		switch r := rng.IntN(100); {
		case r < 60:
			o = ioOp{kind: "write", off: sector(size), n: 512 * (1 + rng.Int64N(512)), pattern: byte(1 + rng.IntN(255))}
		case r < 80:
			o = ioOp{kind: "zero", off: sector(size), n: 512 * (1 + rng.Int64N(512)), unmap: rng.IntN(2) == 0}
		default:
			c := max(cluster, 512)
			o = ioOp{kind: "discard", off: rng.Int64N(size/c) * c, n: c * (1 + rng.Int64N(4))}
		}
		o.n = min(o.n, size-o.off)
		ops = append(ops, o)
	}
	return ops
}

// seedFor returns the seed of one configuration: ZQ_SEED if set (to replay
// a failure), else a fixed value so runs are reproducible.
func seedFor(t *testing.T, base uint64) uint64 {
	if s := os.Getenv("ZQ_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 0, 64)
		if err != nil {
			t.Fatalf("ZQ_SEED=%q: %v", s, err)
		}
		return v
	}
	return base
}

// backingData is random-looking content with holes, zero runs and patterns
// in 64 KiB blocks.
func backingData(rng *rand.Rand, size int) []byte {
	b := make([]byte, size)
	for off := 0; off < size; off += 64 << 10 {
		blk := b[off:min(off+64<<10, size)]
		switch rng.IntN(5) {
		case 0, 1:
			for i := range blk {
				blk[i] = byte(rng.Uint32())
			}
		case 2:
			p := byte(rng.Uint32())
			for i := range blk[:len(blk)/2] {
				blk[i] = p
			}
		}
	}
	return b
}

// TestRandomIOMatchesRaw writes through "zq-csi img io" and through a raw
// reference, then asks qemu-img whether the qcow2 image is consistent and
// reads the same as the reference.
func TestRandomIOMatchesRaw(t *testing.T) {
	needQemu(t)
	configs := []struct {
		cluster, refbits int
	}{
		{512, 1}, {512, 64}, {4096, 16}, {4096, 1},
		{65536, 16}, {65536, 64}, {2 << 20, 1}, {2 << 20, 16},
	}
	for i, cfg := range configs {
		for _, withBacking := range []bool{false, true} {
			name := fmt.Sprintf("cluster=%d/refcount_bits=%d/backing=%t", cfg.cluster, cfg.refbits, withBacking)
			seed := seedFor(t, uint64(1000+2*i)+map[bool]uint64{false: 0, true: 1}[withBacking])
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				t.Logf("seed %d (replay with ZQ_SEED=%d)", seed, seed)
				rng := rand.New(rand.NewPCG(seed, 0x5a71))
				dir := t.TempDir()
				ref := make([]byte, randomImageSize)
				opts := fmt.Sprintf("cluster_size=%d,refcount_bits=%d", cfg.cluster, cfg.refbits)
				if withBacking {
					ref = backingData(rng, randomImageSize)
					if err := os.WriteFile(filepath.Join(dir, "base.raw"), ref, 0o644); err != nil {
						t.Fatal(err)
					}
					mustRun(t, dir, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "base.raw", "backing.qcow2")
					// No SIZE: it comes from the backing file.
					mustZq(t, dir, "create", "-f", "qcow2", "-b", "backing.qcow2", "-F", "qcow2", "-o", opts, "img.qcow2")
				} else {
					mustZq(t, dir, "create", "-f", "qcow2", "-o", opts, "img.qcow2", strconv.Itoa(randomImageSize))
				}

				ops := randomOps(rng, 50, randomImageSize, int64(cfg.cluster))
				args := []string{"io"}
				for j, o := range ops {
					args = append(args, "-c", o.command())
					if j%17 == 16 {
						args = append(args, "-c", "flush")
					}
					o.apply(ref)
				}
				args = append(args, "img.qcow2")
				r := mustZq(t, dir, args...)
				if got := strings.Count(r.stdout, " bytes at offset "); got != len(ops) {
					t.Errorf("img io printed %d reports for %d commands:\n%s", got, len(ops), r.stdout)
				}
				if err := os.WriteFile(filepath.Join(dir, "ref.raw"), ref, 0o644); err != nil {
					t.Fatal(err)
				}

				if r := run(t, dir, "qemu-img", "check", "img.qcow2"); r.code != 0 {
					t.Errorf("qemu-img check: %v", r)
				}
				if r := run(t, dir, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", "img.qcow2", "ref.raw"); r.code != 0 {
					t.Errorf("qemu-img compare with the raw reference: %v\ncommands: %s", r, strings.Join(args, " "))
				}
				if r := zq(t, dir, "check", "img.qcow2"); r.code != 0 {
					t.Errorf("zq-csi img check: %v", r)
				}
				// Our own read path must agree too.
				mustZq(t, dir, "convert", "-O", "raw", "img.qcow2", "out.raw")
				sameFiles(t, filepath.Join(dir, "out.raw"), filepath.Join(dir, "ref.raw"))
			})
		}
	}
}
