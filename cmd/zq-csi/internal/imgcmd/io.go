package imgcmd

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

const ioUsage = `Usage: zq-csi img io [-r] [-f FMT] [-c COMMAND]... FILE

Run qemu-io style commands on an image. Each -c gives one command; without
-c, commands are read from standard input, one per line. The exit status is
1 if any command failed.

  -r          open the image read-only
  -U          force shared permissions (with -r): read an image someone else writes
  -f FMT      qcow2 or raw (detected when omitted)
  -c COMMAND  a command, e.g. -c 'write -P 0xab 0 64k'

A zoned image is opened through the zone engine: writes must start at a
zone's write pointer (else "write failed: Input/output error"), reads past
it return zeros, and a discard of whole sequential zones resets them. The
zone commands are qemu-io's: zrp OFFSET NR_ZONES, zo/zc/zf/zrs OFFSET LEN
(zrs 0 SIZE resets all zones) and zap [-p] OFFSET LEN [LEN...]. All -c
commands run on one open image, so open zones stay open between them.

Numbers are decimal, hex (0x...) or have a K, M, G, T, P or E suffix.
Run -c help for the list of commands.
`

// maxRequest is qemu's BDRV_REQUEST_MAX_BYTES: the largest single request.
const maxRequest = (1<<31 - 1) >> 9 << 9

// ioCommand is one entry of the qemu-io command table. New commands (the
// zone commands of zone.go) are added with registerIOCommand.
type ioCommand struct {
	name    string
	aliases []string
	args    string // usage synopsis after the name
	oneline string
	opts    string // getopt letters, ':' after a letter taking an argument
	nargs   int    // positional arguments after the options
	maxArgs int    // if > nargs, up to maxArgs positional arguments
	write   bool   // needs a writable image
	run     func(s *ioSession, opts []opt, args []string) error
}

var ioCommands = map[string]*ioCommand{}

func registerIOCommand(c ioCommand) {
	cc := c
	ioCommands[c.name] = &cc
	for _, a := range c.aliases {
		ioCommands[a] = &cc
	}
}

func init() {
	registerIOCommand(ioCommand{name: "read", aliases: []string{"r"}, args: "[-qv] [-P pattern] off len",
		oneline: "reads a number of bytes at a specified offset", opts: "P:qv", nargs: 2, run: ioRead})
	registerIOCommand(ioCommand{name: "write", aliases: []string{"w"}, args: "[-fqu] [-P pattern | -s file | -z] off len",
		oneline: "writes a number of bytes at a specified offset", opts: "P:s:zufq", nargs: 2, write: true, run: ioWrite})
	registerIOCommand(ioCommand{name: "discard", aliases: []string{"d"}, args: "[-q] off len",
		oneline: "discards a number of bytes at a specified offset", opts: "q", nargs: 2, write: true, run: ioDiscard})
	registerIOCommand(ioCommand{name: "flush", aliases: []string{"f"},
		oneline: "flush all in-core file state to disk", run: ioFlush})
	registerIOCommand(ioCommand{name: "aio_flush",
		oneline: "completes all outstanding aio requests", run: ioFlush})
	registerIOCommand(ioCommand{name: "length", aliases: []string{"l"},
		oneline: "gets the length of the current file", run: ioLength})
	registerIOCommand(ioCommand{name: "help", aliases: []string{"?"}, args: "[command]",
		oneline: "help for one or all commands", maxArgs: 1, run: ioHelp})
	registerIOCommand(ioCommand{name: "quit", aliases: []string{"q"},
		oneline: "exit the program", run: func(s *ioSession, _ []opt, _ []string) error { s.quit = true; return nil }})
}

// ioSession is an open image and the output streams of one "img io" run.
type ioSession struct {
	dev      device
	zdev     *zoned.Device // the same image through the zone engine; nil if not zoned
	file     string
	readOnly bool
	out      io.Writer
	errOut   io.Writer
	quit     bool
}

// errFailed marks a command that failed after printing its own message.
var errFailed = errors.New("command failed")

func runIO(e Env, args []string) int {
	opts, pos, code, done := parseArgs(e, "io", args, optSpec{short: "rf:c:nUt:d:"})
	if done {
		return code
	}
	var cmds []string
	want, readOnly, share := "", false, false
	for _, o := range opts {
		switch o.name {
		case "U":
			share = true
		case "r":
			readOnly = true
		case "f":
			want = o.val
		case "c":
			cmds = append(cmds, o.val)
		}
	}
	if len(pos) != 1 {
		return usageFail(e, "io", "Expecting one image file name")
	}
	file := pos[0]
	dev, zdev, err := openIODevice(file, openMode{format: want, readOnly: readOnly, forceShare: share, warn: e.Stderr})
	if err != nil {
		fmt.Fprintf(e.Stderr, "%s io: can't open device %s: %v\n", prog, file, err)
		return 1
	}
	if zdev != nil {
		warnClamped(e.Stderr, zdev)
	}
	s := &ioSession{dev: dev, zdev: zdev, file: file, readOnly: readOnly, out: e.Stdout, errOut: e.Stderr}
	failed := false
	if cmds != nil {
		for _, c := range cmds {
			if s.command(c) != nil {
				failed = true
			}
			if s.quit {
				break
			}
		}
	} else if e.Stdin != nil {
		sc := bufio.NewScanner(e.Stdin)
		for !s.quit && sc.Scan() {
			if s.command(sc.Text()) != nil {
				failed = true
			}
		}
	}
	if err := dev.Close(); err != nil {
		fmt.Fprintf(e.Stderr, "%s io: %s: %v\n", prog, file, err)
		failed = true
	}
	if failed {
		return 1
	}
	return 0
}

// command runs one command line.
func (s *ioSession) command(line string) error {
	argv := strings.Fields(line)
	if len(argv) == 0 {
		return nil
	}
	c, ok := ioCommands[argv[0]]
	if !ok {
		fmt.Fprintf(s.errOut, "command \"%s\" not found\n", argv[0])
		return errFailed
	}
	if c.write && s.readOnly {
		fmt.Fprintf(s.errOut, "%s io: Block node is read-only\n", prog)
		return errFailed
	}
	opts, args, err := getopt(argv[1:], optSpec{short: c.opts})
	if err != nil {
		fmt.Fprintf(s.out, "%s: %v\n", c.name, err)
		s.usage(c)
		return errFailed
	}
	if len(args) < c.nargs || len(args) > max(c.nargs, c.maxArgs) {
		s.usage(c)
		return errFailed
	}
	return c.run(s, opts, args)
}

func (s *ioSession) usage(c *ioCommand) {
	if c.args != "" {
		fmt.Fprintf(s.out, "%s %s -- %s\n", c.name, c.args, c.oneline)
	} else {
		fmt.Fprintf(s.out, "%s -- %s\n", c.name, c.oneline)
	}
}

// num parses an offset or a length like qemu-io's cvtnum.
func (s *ioSession) num(arg string) (int64, error) {
	v, err := qcow2.ParseSize(arg)
	if err != nil {
		if qcow2.IsSizeTooLarge(err) {
			fmt.Fprintf(s.out, "Parsing error: argument too large -- %s\n", arg)
		} else {
			fmt.Fprintf(s.out, "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- %s\n", arg)
		}
		return 0, errFailed
	}
	return int64(v), nil
}

// offLen parses "off len" and checks them against the request limit.
func (s *ioSession) offLen(args []string) (int64, int64, error) {
	off, err := s.num(args[0])
	if err != nil {
		return 0, 0, err
	}
	n, err := s.num(args[1])
	if err != nil {
		return 0, 0, err
	}
	if n > maxRequest {
		fmt.Fprintf(s.out, "length cannot exceed %d, given %s\n", maxRequest, args[1])
		return 0, 0, errFailed
	}
	return off, n, nil
}

// inBounds is the block layer's request check: out-of-range I/O is EIO.
func (s *ioSession) inBounds(op string, off, n int64) error {
	size := int64(s.dev.Size())
	if off > size || n > size-off {
		fmt.Fprintf(s.out, "%s failed: %s\n", op, strerror(syscall.EIO))
		return errFailed
	}
	return nil
}

func (s *ioSession) failed(op string, err error) error {
	fmt.Fprintf(s.out, "%s failed: %s\n", op, strerror(err))
	return errFailed
}

func parsePattern(s string) (byte, bool) {
	if strings.Contains(s, "_") {
		return 0, false
	}
	v, err := strconv.ParseInt(s, 0, 64)
	if err != nil || v < 0 || v > 255 {
		return 0, false
	}
	return byte(v), true
}

func ioRead(s *ioSession, opts []opt, args []string) error {
	verify, verbose, quiet := -1, false, false
	for _, o := range opts {
		switch o.name {
		case "P":
			p, ok := parsePattern(o.val)
			if !ok {
				fmt.Fprintf(s.out, "%s is not a valid pattern byte\n", o.val)
				return errFailed
			}
			verify = int(p)
		case "v":
			verbose = true
		case "q":
			quiet = true
		}
	}
	off, n, err := s.offLen(args)
	if err != nil {
		return err
	}
	if err := s.inBounds("read", off, n); err != nil {
		return err
	}
	var dump strings.Builder
	mismatch := false
	buf := make([]byte, min(n, copyChunk))
	var want []byte
	if verify >= 0 {
		want = bytes.Repeat([]byte{byte(verify)}, len(buf))
	}
	var elapsed time.Duration
	for done := int64(0); done < n; {
		c := min(n-done, int64(len(buf)))
		t := time.Now()
		if _, err := s.dev.ReadAt(buf[:c], off+done); err != nil {
			return s.failed("read", err)
		}
		elapsed += time.Since(t)
		if want != nil && !bytes.Equal(buf[:c], want[:c]) {
			mismatch = true
		}
		if verbose {
			dump.WriteString(hexDump(buf[:c], off+done))
		}
		done += c
	}
	if mismatch {
		fmt.Fprintf(s.out, "Pattern verification failed at offset %d, %d bytes\n", off, n)
	}
	if !quiet {
		io.WriteString(s.out, dump.String())
		io.WriteString(s.out, ioReport("read", elapsed, off, n, n, 1))
	}
	if mismatch {
		return errFailed
	}
	return nil
}

func ioWrite(s *ioSession, opts []opt, args []string) error {
	pattern, haveP, zero, unmap, fua, quiet := byte(0xcd), false, false, false, false, false
	var patFile []byte // -s: the buffer is this file's content, repeated (qemu-io's -s)
	for _, o := range opts {
		switch o.name {
		case "s":
			b, err := os.ReadFile(o.val)
			if err != nil || len(b) == 0 {
				fmt.Fprintf(s.out, "cannot use %s as a pattern file: %v\n", o.val, cmpErr(err, "it is empty"))
				return errFailed
			}
			patFile = b
		case "P":
			p, ok := parsePattern(o.val)
			if !ok {
				fmt.Fprintf(s.out, "%s is not a valid pattern byte\n", o.val)
				return errFailed
			}
			pattern, haveP = p, true
		case "z":
			zero = true
		case "u":
			unmap = true
		case "f":
			fua = true
		case "q":
			quiet = true
		}
	}
	for _, c := range []struct {
		both bool
		msg  string
	}{{zero && haveP, "-P and -z"}, {zero && patFile != nil, "-s and -z"}, {haveP && patFile != nil, "-P and -s"}} {
		if c.both {
			fmt.Fprintln(s.out, c.msg+" cannot be specified at the same time")
			return errFailed
		}
	}
	if unmap && !zero {
		fmt.Fprintln(s.out, "-u requires -z to be specified")
		return errFailed
	}
	off, n, err := s.offLen(args)
	if err != nil {
		return err
	}
	if err := s.inBounds("write", off, n); err != nil {
		return err
	}
	start := time.Now()
	if zero {
		if err := s.dev.WriteZeroes(off, n, unmap); err != nil {
			return s.failed("write", err)
		}
	} else {
		// A zoned device gets the request whole, as qemu-io hands it to the
		// block layer: the engine accepts or refuses it all (a write off the
		// write pointer or past the capacity writes nothing).
		chunk := int64(copyChunk)
		if s.zdev != nil {
			chunk = max(n, 1)
		}
		buf := bytes.Repeat([]byte{pattern}, int(min(n, chunk)))
		if patFile != nil {
			buf = bytes.Repeat(patFile, int(n)/len(patFile)+1)[:n]
		}
		for done := int64(0); done < n; {
			c := min(n-done, int64(len(buf)))
			if _, err := s.dev.WriteAt(buf[:c], off+done); err != nil {
				return s.failed("write", err)
			}
			done += c
		}
	}
	if fua {
		// Forced unit access: the data is durable before we report.
		if err := s.dev.Flush(); err != nil {
			return s.failed("write", err)
		}
	}
	elapsed := time.Since(start)
	if !quiet {
		io.WriteString(s.out, ioReport("wrote", elapsed, off, n, n, 1))
	}
	return nil
}

func ioDiscard(s *ioSession, opts []opt, args []string) error {
	quiet := false
	for _, o := range opts {
		if o.name == "q" {
			quiet = true
		}
	}
	off, n, err := s.offLen(args)
	if err != nil {
		return err
	}
	if err := s.inBounds("discard", off, n); err != nil {
		return err
	}
	start := time.Now()
	if err := s.dev.Discard(off, n); err != nil {
		return s.failed("discard", err)
	}
	elapsed := time.Since(start)
	if !quiet {
		io.WriteString(s.out, ioReport("discard", elapsed, off, n, n, 1))
	}
	return nil
}

func ioFlush(s *ioSession, _ []opt, _ []string) error {
	if err := s.dev.Flush(); err != nil {
		return s.failed("flush", err)
	}
	return nil
}

func ioLength(s *ioSession, _ []opt, _ []string) error {
	fmt.Fprintln(s.out, cvtstr(float64(s.dev.Size())))
	return nil
}

func ioHelp(s *ioSession, _ []opt, args []string) error {
	if len(args) == 1 {
		c, ok := ioCommands[args[0]]
		if !ok {
			fmt.Fprintf(s.out, "command %s not found\n", args[0])
			return errFailed
		}
		s.usage(c)
		return nil
	}
	seen := map[*ioCommand]bool{}
	var list []*ioCommand
	for _, c := range ioCommands {
		if !seen[c] {
			seen[c] = true
			list = append(list, c)
		}
	}
	sort.Slice(list, func(i, j int) bool { return list[i].name < list[j].name })
	for _, c := range list {
		s.usage(c)
	}
	fmt.Fprintln(s.out, "\nUse 'help commandname' for extended help.")
	return nil
}

// cmpErr is err, or a new error saying why when err is nil.
func cmpErr(err error, why string) error {
	if err != nil {
		return err
	}
	return errors.New(why)
}
