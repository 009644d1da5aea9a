package imgcmd

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

const resizeUsage = `Usage: zq-csi img resize [-q] [-f FMT] [--shrink] FILE [+|-]SIZE

Change the virtual size of an image, like qemu-img resize. SIZE is absolute,
or relative with a leading + or -. qcow2 images can only grow; raw files
shrink only with --shrink.
`

func runResize(e Env, args []string) int {
	// qemu-img takes the size off the end before getopt, so that "-1G" is
	// not read as an option.
	var sizeArg string
	if n := len(args); n > 0 && !isHelp(args[n-1]) {
		sizeArg, args = args[n-1], args[:n-1]
	}
	opts, pos, code, done := parseArgs(e, "resize", args, optSpec{short: "f:q", long: map[string]bool{"shrink": false}})
	if done {
		return code
	}
	want, shrinkOK, quiet := "", false, false
	for _, o := range opts {
		switch o.name {
		case "f":
			want = o.val
		case "shrink":
			shrinkOK = true
		case "q":
			quiet = true
		}
	}
	if len(pos) != 1 || sizeArg == "" {
		return usageFail(e, "resize", "Expecting image file name and size")
	}
	file := pos[0]
	rel := 0
	s := sizeArg
	switch {
	case strings.HasPrefix(s, "+"):
		rel, s = 1, s[1:]
	case strings.HasPrefix(s, "-"):
		rel, s = -1, s[1:]
	}
	n, err := qcow2.ParseSize(s)
	if err != nil {
		return fail(e, "", fmt.Errorf("Invalid image size specified: %w", err))
	}
	format, _, err := resolveFormat(file, want)
	if err != nil {
		return fail(e, file, err)
	}
	var cur uint64
	var resize func(uint64) error
	var closeFn func() error
	if format == fmtQcow2 {
		im, err := qcow2.Open(file, qcow2.OpenOptions{NoBacking: true})
		if err != nil {
			return fail(e, file, fmt.Errorf("Could not open '%s': %w", file, err))
		}
		cur, resize, closeFn = im.Size(), im.Resize, im.Close
	} else {
		f, err := os.OpenFile(file, os.O_RDWR, 0)
		if err != nil {
			return fail(e, file, err)
		}
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			return fail(e, file, err)
		}
		cur, closeFn = uint64(fi.Size()), f.Close
		resize = func(sz uint64) error { return f.Truncate(int64(sz)) }
	}
	target := n
	switch rel {
	case 1:
		target = cur + n
		if target < cur {
			err = errors.New("Image size too large")
		}
	case -1:
		if n > cur {
			err = errors.New("New image size must be positive")
		}
		target = cur - n
	}
	if err == nil && target < cur {
		switch {
		case format == fmtQcow2:
			err = fmt.Errorf("shrinking qcow2 images is not supported (current size %d, requested %d)", cur, target)
		case !shrinkOK:
			err = errors.New("Use the --shrink option to perform a shrink operation.")
		}
	}
	if err == nil {
		err = resize(target)
	}
	if cerr := closeFn(); err == nil {
		err = cerr
	}
	if err != nil {
		return fail(e, file, err)
	}
	if !quiet {
		fmt.Fprintln(e.Stdout, "Image resized.")
	}
	return 0
}

func isHelp(a string) bool { return a == "-h" || a == "--help" }
