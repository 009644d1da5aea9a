// Package imgcmd implements "zq-csi img", an image tool whose subcommands,
// options and output mirror qemu-img (create, info, check, convert, resize,
// map) and qemu-io (io), so that people who know those tools feel at home and
// tests can compare our output with theirs. serve exports an image over NBD
// the way qemu-nbd does.
package imgcmd

import (
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"syscall"

	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/cli"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// Env carries the standard streams, so the commands can run in-process in
// tests.
type Env struct {
	Stdin          io.Reader
	Stdout, Stderr io.Writer
}

const prog = "zq-csi img"

type command struct {
	run     func(e Env, args []string) int
	summary string
	usage   string // full --help text
}

var commands map[string]command

func init() {
	commands = map[string]command{
		"create":  {runCreate, "create a new image", createUsage},
		"info":    {runInfo, "show information about an image", infoUsage},
		"check":   {runCheck, "check (and repair) the consistency of an image", checkUsage},
		"convert": {runConvert, "convert an image to raw or qcow2", convertUsage},
		"compare": {runCompare, "compare the contents of two images", compareUsage},
		"resize":  {runResize, "change the virtual size of an image", resizeUsage},
		"map":     {runMap, "dump the allocation map of an image", mapUsage},
		"io":      {runIO, "run qemu-io style commands on an image", ioUsage},
		"serve":   {runServe, "export an image over NBD (like qemu-nbd)", serveUsage},
	}
}

func mainUsage() string {
	var sb strings.Builder
	sb.WriteString("Usage: zq-csi img <command> [options] FILE ...\n\nCommands:\n")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(&sb, "  %-8s %s\n", n, commands[n].summary)
	}
	sb.WriteString("\nRun 'zq-csi img <command> --help' for the options of a command.\n")
	return sb.String()
}

// Main runs "zq-csi img ARGS..." and returns the exit status.
func Main(args []string, e Env) int {
	if len(args) == 0 {
		return cli.Bare(e.Stderr, mainUsage()) // exit 2, as every zq-csi command group run bare
	}
	switch args[0] {
	case "-h", "--help", "help":
		fmt.Fprint(e.Stdout, mainUsage())
		return 0
	}
	c, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(e.Stderr, "%s: Command not found: %s\n", prog, args[0])
		return 1
	}
	return c.run(e, args[1:])
}

// parseArgs runs getopt for a subcommand and handles -h/--help and usage
// errors. done reports that the command should return code.
func parseArgs(e Env, name string, args []string, spec optSpec) (opts []opt, pos []string, code int, done bool) {
	spec.short += "h"
	if spec.long == nil {
		spec.long = map[string]bool{}
	}
	spec.long["help"] = false
	opts, pos, err := getopt(args, spec)
	if err != nil {
		fmt.Fprintf(e.Stderr, "%s %s: %v\nTry '%s %s --help' for more information.\n", prog, name, err, prog, name)
		return nil, nil, 1, true
	}
	for _, o := range opts {
		if o.name == "h" || o.name == "help" {
			fmt.Fprint(e.Stdout, commands[name].usage)
			return nil, nil, 0, true
		}
	}
	return opts, pos, 0, false
}

func usageFail(e Env, name, msg string) int {
	fmt.Fprintf(e.Stderr, "%s %s: %s\nTry '%s %s --help' for more information.\n", prog, name, msg, prog, name)
	return 1
}

// fail prints "zq-csi img: FILE: error" the way qemu-img does.
func fail(e Env, file string, err error) int {
	if file != "" {
		fmt.Fprintf(e.Stderr, "%s: %s: %v\n", prog, file, err)
	} else {
		fmt.Fprintf(e.Stderr, "%s: %v\n", prog, err)
	}
	return 1
}

func outputFormat(v string) (string, error) {
	switch v {
	case "human", "json":
		return v, nil
	}
	return "", fmt.Errorf("--output must be used with human or json as argument")
}

// strerror renders an error the way qemu's strerror() would for errnos
// ("Input/output error") and keeps other errors as they are. A zone engine
// error is shown as the errno a Linux zoned block device returns for it,
// which is what qemu-io prints on such a device. Go's errno texts are
// glibc's, lower-cased ("too many references: cannot splice").
func strerror(err error) string {
	var errno syscall.Errno
	var ze *zoned.ZoneError
	if errors.As(err, &ze) {
		errno = zoned.Errno(err)
	}
	if errno != 0 || errors.As(err, &errno) {
		s := errno.Error()
		if s != "" {
			s = strings.ToUpper(s[:1]) + s[1:]
			// The errno is what qemu-io would print; what limit was hit
			// follows, since "Too many references: cannot splice" alone
			// tells a user nothing.
			if ze != nil && ze.Limit != "" {
				s += " (" + ze.Limit + ")"
			}
			return s
		}
	}
	return err.Error()
}
