// Package zoneview draws a picture of a zoned volume's zones, for people
// who would rather look than read a thousand lines of zone report: one
// character cell per zone, coloured by the zone's condition and filled, from
// the bottom, as far as its write pointer has come (eighths of the zone's
// capacity: ▁ to █). Text goes to a terminal (ANSI colours, or a second
// line of condition letters when colours are off); SVG is a file a browser
// shows, with each zone's details on hover.
//
// `kubectl zq zones -o wide|svg`, `zq-csi volume zones -o wide|svg` and
// `zq-csi img info --output=wide|svg` use it; the qemu-io text report stays
// what it was.
package zoneview

import (
	"fmt"
	"io"
	"strings"

	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// Zone is one zone as a zone report gives it, in bytes.
type Zone struct {
	Start, Len, Cap, WP uint64
	Cond                zoned.Cond
	Type                zoned.ZoneType
}

// FromReport converts the zone engine's report.
func FromReport(rs []zoned.ZoneReport) []Zone {
	zs := make([]Zone, len(rs))
	for i, r := range rs {
		zs[i] = Zone{Start: r.Start, Len: r.Len, Cap: r.Cap, WP: r.WP, Cond: r.Cond, Type: r.Type}
	}
	return zs
}

// Options say what to draw around the zones.
type Options struct {
	// Title heads the picture (the volume ID, the image file).
	Title string
	// First is the index of zones[0] in the volume (a report from --start).
	First int
	// Columns is the number of zones per row (default 64).
	Columns int
	// Color: ANSI colours in text. Off, each row gets a second line with a
	// letter per zone naming its condition.
	Color bool
}

func (o Options) columns() int {
	if o.Columns <= 0 {
		return 64
	}
	return o.Columns
}

// style is how one condition is drawn.
type style struct {
	name   string // the legend's word
	letter byte   // the condition line without colours
	ansi   string // SGR foreground
	light  string // SVG: the zone's background (its unwritten part)
	dark   string // SVG: the written part
}

var styles = map[zoned.Cond]style{
	zoned.CondNotWP:    {"conventional", '=', "90", "#d9d9d9", "#8c8c8c"},
	zoned.CondEmpty:    {"empty", '.', "37", "#f2f2f2", "#b3b3b3"}, // dark: its outline only
	zoned.CondImpOpen:  {"implicitly open", 'o', "32", "#d5f0d5", "#2ca02c"},
	zoned.CondExpOpen:  {"explicitly open", 'O', "36", "#cdeef2", "#17a2b8"},
	zoned.CondClosed:   {"closed", 'c', "33", "#fbe7c6", "#e08a00"},
	zoned.CondFull:     {"full", 'F', "34", "#cfdcf5", "#1f5fbf"},
	zoned.CondReadOnly: {"read-only", 'R', "35", "#ecd5f2", "#9b3fb5"},
	zoned.CondOffline:  {"offline", 'X', "31", "#f5cccc", "#c62828"},
}

// order is the legend's order.
var order = []zoned.Cond{zoned.CondNotWP, zoned.CondEmpty, zoned.CondImpOpen, zoned.CondExpOpen,
	zoned.CondClosed, zoned.CondFull, zoned.CondReadOnly, zoned.CondOffline}

func styleOf(c zoned.Cond) style {
	if s, ok := styles[c]; ok {
		return s
	}
	return style{fmt.Sprintf("condition %#x", uint8(c)), '?', "31", "#ffffff", "#000000"}
}

// eighths is how far the write pointer has come, in eighths of the zone's
// capacity, rounded up so that any written byte shows (0: nothing written,
// 8: all of the capacity).
func eighths(z Zone) int {
	switch z.Cond {
	case zoned.CondFull:
		return 8
	case zoned.CondNotWP, zoned.CondEmpty, zoned.CondOffline:
		return 0
	}
	if z.Cap == 0 || z.WP <= z.Start {
		return 0
	}
	w := z.WP - z.Start
	if w >= z.Cap {
		return 8
	}
	return int((w*8 + z.Cap - 1) / z.Cap)
}

// glyph is the zone's cell: its fill level, or the mark of a condition
// that has none.
func glyph(z Zone) string {
	switch z.Cond {
	case zoned.CondNotWP:
		return "▒"
	case zoned.CondEmpty:
		return "·"
	case zoned.CondOffline:
		return "X"
	case zoned.CondReadOnly:
		return "R"
	}
	e := eighths(z)
	if e == 0 {
		return "_" // open or closed, nothing written (an explicitly opened empty zone)
	}
	return string([]rune(" ▁▂▃▄▅▆▇█")[e])
}

// Counts is the number of zones in each condition, in the legend's order,
// as "empty 6, implicitly open 1, full 1".
func Counts(zs []Zone) string {
	n := map[zoned.Cond]int{}
	for _, z := range zs {
		n[z.Cond]++
	}
	var parts []string
	for _, c := range order {
		if n[c] > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", styleOf(c).name, n[c]))
		}
		delete(n, c)
	}
	for c, k := range n {
		parts = append(parts, fmt.Sprintf("%s %d", styleOf(c).name, k))
	}
	return strings.Join(parts, ", ")
}

// Bytes prints n exactly in the largest binary unit that divides it: "4 MiB".
func Bytes(n uint64) string { return bytesIn(n, " ") }

// BytesCompact is Bytes without the space, for tables: "4MiB".
func BytesCompact(n uint64) string { return bytesIn(n, "") }

func bytesIn(n uint64, sep string) string {
	for _, u := range []struct {
		name  string
		shift uint
	}{{"TiB", 40}, {"GiB", 30}, {"MiB", 20}, {"KiB", 10}} {
		if n >= 1<<u.shift && n%(1<<u.shift) == 0 {
			return fmt.Sprintf("%d%s%s", n>>u.shift, sep, u.name)
		}
	}
	return fmt.Sprintf("%d%sB", n, sep)
}

// summary is the line under the title: which zones, their size, and how
// many are in each condition.
func summary(zs []Zone, first int) string {
	if len(zs) == 0 {
		return "no zones"
	}
	s := fmt.Sprintf("%d zones", len(zs))
	if first > 0 {
		s = fmt.Sprintf("zones %d-%d", first, first+len(zs)-1)
	}
	// The geometry's zone: the first sequential one (the last may be smaller).
	z := zs[0]
	for _, x := range zs {
		if x.Type == zoned.TypeSeqWriteRequired {
			z = x
			break
		}
	}
	s += " of " + Bytes(z.Len)
	if z.Cap != z.Len && z.Type == zoned.TypeSeqWriteRequired {
		s += " (capacity " + Bytes(z.Cap) + ")"
	}
	return s + ": " + Counts(zs)
}

// Text writes the picture for a terminal: a title, rows of cells (groups
// of eight, each row headed by the index of its first zone), and a legend
// of the conditions present.
func Text(w io.Writer, zs []Zone, o Options) error {
	var b strings.Builder
	if o.Title != "" {
		b.WriteString(o.Title + "\n")
	}
	b.WriteString(summary(zs, o.First) + "\n")
	cols := o.columns()
	width := len(fmt.Sprint(o.First + len(zs)))
	for row := 0; row < len(zs); row += cols {
		end := min(row+cols, len(zs))
		fmt.Fprintf(&b, "%*d ", width, o.First+row)
		for i := row; i < end; i++ {
			if i > row && (i-row)%8 == 0 {
				b.WriteByte(' ')
			}
			g := glyph(zs[i])
			if o.Color {
				g = "\x1b[" + styleOf(zs[i].Cond).ansi + "m" + g + "\x1b[0m"
			}
			b.WriteString(g)
		}
		b.WriteByte('\n')
		if !o.Color {
			fmt.Fprintf(&b, "%*s ", width, "")
			for i := row; i < end; i++ {
				if i > row && (i-row)%8 == 0 {
					b.WriteByte(' ')
				}
				b.WriteByte(styleOf(zs[i].Cond).letter)
			}
			b.WriteByte('\n')
		}
	}
	b.WriteString(legend(zs, o.Color) + "\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// legend names the marks of the conditions present.
func legend(zs []Zone, color bool) string {
	present := map[zoned.Cond]bool{}
	for _, z := range zs {
		present[z.Cond] = true
	}
	var parts []string
	for _, c := range order {
		if !present[c] {
			continue
		}
		s := styleOf(c)
		var mark string
		switch c {
		case zoned.CondNotWP, zoned.CondEmpty, zoned.CondReadOnly, zoned.CondOffline:
			mark = glyph(Zone{Cond: c})
		case zoned.CondFull:
			mark = "█"
		default:
			mark = "▁▄▇"
		}
		if color {
			mark = "\x1b[" + s.ansi + "m" + mark + "\x1b[0m"
		} else {
			mark += " " + string(s.letter)
		}
		parts = append(parts, mark+" "+s.name)
	}
	return "legend: " + strings.Join(parts, "  ") + "  (height: written up to the write pointer)"
}
