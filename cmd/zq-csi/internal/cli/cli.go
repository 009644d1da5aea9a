// Package cli holds the conventions every zq-csi command follows, so that
// they agree: help asked for goes to stdout with exit 0; a usage error (a
// command group run bare, an unknown command or flag, a bad flag value)
// goes to stderr as one line naming the problem, and a hint where to find
// the usage, with exit 2 — the flag package's and most Go and Kubernetes
// tools' code. `zq-csi img` subcommands keep qemu-img's own exit codes for
// their arguments (see imgcmd).
package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"regexp"
	"strings"
)

// Exit codes shared by the commands.
const (
	ExitOK    = 0
	ExitError = 1
	ExitUsage = 2
)

// Bare answers a command group run without a subcommand: its usage on
// stderr, ExitUsage.
func Bare(stderr io.Writer, usage string) int {
	fmt.Fprint(stderr, usage)
	return ExitUsage
}

// Help prints usage that was asked for on stdout: ExitOK.
func Help(stdout io.Writer, usage string) int {
	fmt.Fprint(stdout, usage)
	return ExitOK
}

// UnknownCommand reports an unknown subcommand of prog, suggesting the
// closest of known: ExitUsage.
func UnknownCommand(stderr io.Writer, prog, cmd string, known []string) int {
	fmt.Fprintf(stderr, "%s: unknown command %q%s\nRun '%s --help' for usage.\n", prog, cmd, didYouMean(cmd, known, ""), prog)
	return ExitUsage
}

// FlagError reports an error of fs.Parse (not flag.ErrHelp) in one line,
// suggesting the closest flag for a misspelt one, and a hint to helpCmd:
// ExitUsage. fs's own output should be io.Discard, so that the flag
// package does not print the whole usage after it.
func FlagError(stderr io.Writer, prog string, fs *flag.FlagSet, err error, helpCmd string) int {
	msg := err.Error()
	if name, ok := strings.CutPrefix(msg, "flag provided but not defined: "); ok {
		name = strings.TrimLeft(name, "-")
		var known []string
		fs.VisitAll(func(f *flag.Flag) { known = append(known, f.Name) })
		msg = "unknown flag --" + name + didYouMean(name, known, "--")
	}
	if m := invalidValue.FindStringSubmatch(msg); m != nil {
		rule := m[4]
		if rule == "parse error" || rule == "value out of range" || m[1] != "" {
			rule = "must be " + kindOf(fs.Lookup(m[3]))
			if m[4] == "value out of range" {
				rule = "out of range"
			}
		}
		msg = "--" + m[3] + "=" + m[2] + ": " + rule
	}
	fmt.Fprintf(stderr, "%s: %s\nRun '%s --help' for usage.\n", prog, msg, helpCmd)
	return ExitUsage
}

// kindOf says what values a standard flag takes.
func kindOf(f *flag.Flag) string {
	if f == nil {
		return "a valid value"
	}
	switch t := fmt.Sprintf("%T", f.Value); {
	case strings.Contains(t, "duration"):
		return "a duration such as 90s, 5m or 1h30m"
	case strings.Contains(t, "bool"):
		return "true or false"
	case strings.Contains(t, "float"):
		return "a number"
	case strings.Contains(t, "uint"):
		return "a whole number, 0 or more"
	case strings.Contains(t, "int"):
		return "a whole number"
	}
	return "a valid value"
}

// invalidValue is the flag package's message for a value Set refused.
var invalidValue = regexp.MustCompile(`^invalid (boolean )?value "(.*)" for (?:flag )?-{1,2}([^:]+): (.*)$`)

// IsHelp tells a parse error that is a request for help.
func IsHelp(err error) bool { return errors.Is(err, flag.ErrHelp) }

// didYouMean returns " (did you mean PREFIX+x?)" for the closest of known
// within two edits, or "".
func didYouMean(s string, known []string, prefix string) string {
	best, bestD := "", 3
	for _, k := range known {
		if d := editDistance(s, k); d < bestD {
			best, bestD = k, d
		}
	}
	if best == "" {
		return ""
	}
	return " (did you mean " + prefix + best + "?)"
}

// editDistance is the Levenshtein distance of a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// ParseError is an error of Parse, with the flag set it came from.
type ParseError struct {
	FS  *flag.FlagSet
	Err error
}

func (e *ParseError) Error() string { return e.Err.Error() }
func (e *ParseError) Unwrap() error { return e.Err }

// Parse is fs.Parse with the flag package's own printing off: its error
// (help asked for, or a usage error) comes back as a *ParseError for
// Report.
func Parse(fs *flag.FlagSet, args []string) error {
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		return &ParseError{FS: fs, Err: err}
	}
	return nil
}

// Report handles an error of Parse: help for the flag set goes to stdout
// (ExitOK), a usage error is one line on stderr (ExitUsage). ok is false
// for other errors.
func Report(stdout, stderr io.Writer, err error) (code int, ok bool) {
	var pe *ParseError
	if !errors.As(err, &pe) {
		return 0, false
	}
	if IsHelp(pe.Err) {
		fmt.Fprintf(stdout, "Usage of %s:\n", pe.FS.Name())
		pe.FS.SetOutput(stdout)
		pe.FS.PrintDefaults()
		pe.FS.SetOutput(io.Discard)
		return ExitOK, true
	}
	return FlagError(stderr, pe.FS.Name(), pe.FS, pe.Err, pe.FS.Name()), true
}
