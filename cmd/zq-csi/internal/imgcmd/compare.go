package imgcmd

import (
	"bytes"
	"fmt"
)

const compareUsage = `Usage: zq-csi img compare [-q] [-s] [-U] [-f FMT] [-F FMT] FILE1 FILE2

Compare the guest contents of two images, like qemu-img compare: exit 0
"Images are identical.", 1 "Content mismatch at offset N!" (N the first
differing 512-byte sector), 2 on an error. Zoned images are read through
the zone engine: what lies at or past a write pointer reads as zeros.
Without -s, images of different sizes are equal when the larger one holds
only zeros past the end of the smaller one.

  -f FMT, -F FMT  formats of FILE1 and FILE2 (detected when omitted)
  -s              strict: a size mismatch is a mismatch
  -U              force shared permissions (read an image someone writes)
  -q              quiet: only the exit code
`

func runCompare(e Env, args []string) int {
	opts, pos, code, done := parseArgs(e, "compare", args, optSpec{short: "f:F:sqUp", long: map[string]bool{"force-share": false}})
	if done {
		return code
	}
	var fmt1, fmt2 string
	var strict, quiet, share bool
	for _, o := range opts {
		switch o.name {
		case "f":
			fmt1 = o.val
		case "F":
			fmt2 = o.val
		case "s":
			strict = true
		case "q":
			quiet = true
		case "U", "force-share":
			share = true
		}
	}
	if len(pos) != 2 {
		usageFail(e, "compare", "Expecting two image file names")
		return 2
	}
	a, _, err := openIODevice(pos[0], openMode{format: fmt1, readOnly: true, forceShare: share})
	if err != nil {
		fail(e, pos[0], fmt.Errorf("Could not open '%s': %w", pos[0], err))
		return 2
	}
	defer a.Close()
	b, _, err := openIODevice(pos[1], openMode{format: fmt2, readOnly: true, forceShare: share})
	if err != nil {
		fail(e, pos[1], fmt.Errorf("Could not open '%s': %w", pos[1], err))
		return 2
	}
	defer b.Close()
	say := func(format string, args ...any) {
		if !quiet {
			fmt.Fprintf(e.Stdout, format, args...)
		}
	}
	sa, sb := a.Size(), b.Size()
	if strict && sa != sb {
		say("Strict mode: Image size mismatch!\n")
		return 1
	}
	common := min(sa, sb)
	ba, bb := make([]byte, copyChunk), make([]byte, copyChunk)
	read := func(d device, name string, p []byte, off uint64) bool {
		if _, err := d.ReadAt(p, int64(off)); err != nil {
			fail(e, name, fmt.Errorf("error while reading offset %d: %w", off, err))
			return false
		}
		return true
	}
	for off := uint64(0); off < common; {
		n := min(uint64(copyChunk), common-off)
		pa, pb := ba[:n], bb[:n]
		if !read(a, pos[0], pa, off) || !read(b, pos[1], pb, off) {
			return 2
		}
		if !bytes.Equal(pa, pb) {
			i := uint64(0)
			for pa[i] == pb[i] {
				i++
			}
			say("Content mismatch at offset %d!\n", (off+i)&^511)
			return 1
		}
		off += n
	}
	if sa != sb {
		// As qemu-img: the warning, then the larger image's tail must be zeros.
		say("Warning: Image size mismatch!\n")
		big, name := a, pos[0]
		if sb > sa {
			big, name = b, pos[1]
		}
		for off := common; off < max(sa, sb); {
			n := min(uint64(copyChunk), max(sa, sb)-off)
			p := ba[:n]
			if !read(big, name, p, off) {
				return 2
			}
			j := 0
			for j < len(p) && p[j] == 0 {
				j++
			}
			if j < len(p) {
				say("Content mismatch at offset %d!\n", (off+uint64(j))&^511)
				return 1
			}
			off += n
		}
	}
	say("Images are identical.\n")
	return 0
}
