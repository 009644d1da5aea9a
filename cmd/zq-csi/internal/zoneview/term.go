package zoneview

import (
	"io"
	"os"
)

// ColorFor says whether text written to w gets colours: w is a terminal
// and NO_COLOR (no-color.org) is unset or empty.
func ColorFor(w io.Writer, getenv func(string) string) bool {
	if getenv != nil && getenv("NO_COLOR") != "" {
		return false
	}
	f, ok := w.(*os.File)
	return ok && isTerminal(f.Fd())
}
