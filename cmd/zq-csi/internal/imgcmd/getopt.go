package imgcmd

import (
	"fmt"
	"strings"
)

// qemu-img parses its arguments with getopt_long, which permutes them: an
// option may follow the file name ("img create FILE -o size=1G" works). Go's
// flag package stops at the first non-flag, so this is a small getopt.

// optSpec describes the options of one subcommand. short lists the short
// option letters, a letter followed by ':' taking an argument (getopt
// syntax); long maps long option names to whether they take an argument.
type optSpec struct {
	short string
	long  map[string]bool
}

// opt is one parsed option; name is the letter or the long name.
type opt struct {
	name, val string
}

// usageError is a command-line error; the caller prints the usage hint.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func (s optSpec) shortArg(c byte) (known, hasArg bool) {
	i := strings.IndexByte(s.short, c)
	if i < 0 || c == ':' {
		return false, false
	}
	return true, i+1 < len(s.short) && s.short[i+1] == ':'
}

// getopt splits args into options and positional arguments. "--" ends the
// options. A lone "-" is positional.
func getopt(args []string, spec optSpec) (opts []opt, pos []string, err error) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			return opts, append(pos, args[i+1:]...), nil
		case strings.HasPrefix(a, "--"):
			name, val, hasVal := strings.Cut(a[2:], "=")
			takes, ok := spec.long[name]
			if !ok {
				return nil, nil, &usageError{fmt.Sprintf("unrecognized option '--%s'", name)}
			}
			switch {
			case takes && !hasVal:
				if i+1 >= len(args) {
					return nil, nil, &usageError{fmt.Sprintf("option '--%s' requires an argument", name)}
				}
				i++
				val = args[i]
			case !takes && hasVal:
				return nil, nil, &usageError{fmt.Sprintf("option '--%s' doesn't allow an argument", name)}
			}
			opts = append(opts, opt{name, val})
		case len(a) > 1 && a[0] == '-':
			for j := 1; j < len(a); j++ {
				c := a[j]
				known, hasArg := spec.shortArg(c)
				if !known {
					return nil, nil, &usageError{fmt.Sprintf("invalid option -- '%c'", c)}
				}
				if !hasArg {
					opts = append(opts, opt{string(c), ""})
					continue
				}
				val := a[j+1:]
				if val == "" {
					if i+1 >= len(args) {
						return nil, nil, &usageError{fmt.Sprintf("option requires an argument -- '%c'", c)}
					}
					i++
					val = args[i]
				}
				opts = append(opts, opt{string(c), val})
				break
			}
		default:
			pos = append(pos, a)
		}
	}
	return opts, pos, nil
}
