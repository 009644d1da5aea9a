package zoneview

import (
	"io"
	"os"
)

// ColorFor says whether text written to w gets colours: NO_COLOR
// (no-color.org) set and not empty says no; CLICOLOR_FORCE set and not "0"
// says yes (for pipes, such as make demo's); else when w is a terminal.
func ColorFor(w io.Writer, getenv func(string) string) bool {
	if getenv != nil && getenv("NO_COLOR") != "" {
		return false
	}
	if getenv != nil && getenv("CLICOLOR_FORCE") != "" && getenv("CLICOLOR_FORCE") != "0" {
		return true
	}
	f, ok := w.(*os.File)
	return ok && isTerminal(f.Fd())
}
