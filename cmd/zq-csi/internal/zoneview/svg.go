package zoneview

import (
	"fmt"
	"html"
	"io"
	"strings"

	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// SVG cell geometry, in px.
const (
	cell   = 14 // a zone's square
	gap    = 2  // between cells
	group  = 6  // extra space after every eighth cell
	margin = 12
	labelW = 56 // the row labels (zone index)
	lineH  = 18 // a text line
)

// SVG writes the picture as a standalone SVG document: the title and the
// counts, rows of squares (each zone's light background is its capacity,
// the dark part from the bottom what lies below its write pointer; a
// conventional zone is hatched), the legend, and a tooltip per zone with
// its index, condition, start, write pointer and fill.
func SVG(w io.Writer, zs []Zone, o Options) error {
	cols := o.columns()
	rows := (len(zs) + cols - 1) / cols
	shown := min(cols, len(zs))
	gridW := shown*(cell+gap) + ((shown-1)/8)*group
	legendItems := presentConds(zs)
	width := max(margin*2+labelW+gridW, margin*2+legendWidth(legendItems), margin*2+textWidth(summary(zs, o.First)), 420)
	top := margin + lineH*2
	if o.Title != "" {
		top += lineH
	}
	gridH := rows * (cell + gap)
	height := top + gridH + lineH*2 + margin

	var b strings.Builder
	fmt.Fprintf(&b, `<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">
<defs><pattern id="conv" width="4" height="4" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="4" height="4" fill="#d9d9d9"/><rect width="2" height="4" fill="#8c8c8c"/></pattern></defs>
<rect width="100%%" height="100%%" fill="#ffffff"/>
`, width, height, width, height)
	y := margin + 12
	if o.Title != "" {
		fmt.Fprintf(&b, "<text x=\"%d\" y=\"%d\" font-size=\"14\" font-weight=\"bold\">%s</text>\n", margin, y, esc(o.Title))
		y += lineH
	}
	fmt.Fprintf(&b, "<text x=\"%d\" y=\"%d\" fill=\"#333333\">%s</text>\n", margin, y, esc(summary(zs, o.First)))
	for i, z := range zs {
		r, c := i/cols, i%cols
		x := margin + labelW + c*(cell+gap) + (c/8)*group
		yy := top + r*(cell+gap)
		if c == 0 {
			fmt.Fprintf(&b, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\" fill=\"#666666\">%d</text>\n", margin+labelW-6, yy+cell-2, o.First+i)
		}
		b.WriteString(zoneRect(z, o.First+i, x, yy))
	}
	ly := top + gridH + lineH
	x := margin
	for _, c := range legendItems {
		s := styleOf(c)
		b.WriteString(sampleRect(c, x, ly-cell+3))
		fmt.Fprintf(&b, "<text x=\"%d\" y=\"%d\">%s</text>\n", x+cell+4, ly, esc(s.name))
		x += cell + 4 + textWidth(s.name) + 14
	}
	fmt.Fprintf(&b, "<text x=\"%d\" y=\"%d\" fill=\"#666666\">dark part: written, up to the write pointer; hover a zone for its details</text>\n", margin, ly+lineH)
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// zoneRect is one zone's square with its tooltip.
func zoneRect(z Zone, index, x, y int) string {
	s := styleOf(z.Cond)
	tip := fmt.Sprintf("zone %d: %s, start %d, write pointer %d, capacity %s", index, z.Cond, z.Start, z.WP, Bytes(z.Cap))
	if z.Cond != zoned.CondNotWP && z.Cap > 0 {
		w := uint64(0)
		if z.WP > z.Start {
			w = min(z.WP-z.Start, z.Cap)
		}
		if z.Cond == zoned.CondFull {
			w = z.Cap
		}
		tip += fmt.Sprintf(", %s written (%.1f%%)", Bytes(w), 100*float64(w)/float64(z.Cap))
	}
	var b strings.Builder
	fmt.Fprintf(&b, "<g><title>%s</title>", esc(tip))
	if z.Cond == zoned.CondNotWP {
		fmt.Fprintf(&b, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"url(#conv)\" stroke=\"#8c8c8c\"/>", x, y, cell, cell)
	} else {
		fmt.Fprintf(&b, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"%s\" stroke=\"%s\"/>", x, y, cell, cell, s.light, s.dark)
		if h := fillHeight(z); h > 0 {
			fmt.Fprintf(&b, "<rect x=\"%d\" y=\"%.2f\" width=\"%d\" height=\"%.2f\" fill=\"%s\"/>", x, float64(y+cell)-h, cell, h, s.dark)
		}
		if z.Cond == zoned.CondOffline || z.Cond == zoned.CondReadOnly {
			fmt.Fprintf(&b, "<text x=\"%d\" y=\"%d\" font-size=\"10\" text-anchor=\"middle\" fill=\"%s\">%c</text>", x+cell/2, y+cell-3, s.dark, s.letter)
		}
	}
	b.WriteString("</g>\n")
	return b.String()
}

// fillHeight is the written part's height: exact, not in eighths.
func fillHeight(z Zone) float64 {
	switch {
	case z.Cond == zoned.CondFull:
		return cell
	case z.Cond == zoned.CondEmpty || z.Cap == 0 || z.WP <= z.Start:
		return 0
	}
	f := float64(z.WP-z.Start) / float64(z.Cap)
	// Exact, but at least a pixel: one written block shows.
	return max(cell*min(f, 1), 1)
}

// sampleRect is a legend square: half written for the conditions that
// have a write pointer in the middle of the zone.
func sampleRect(c zoned.Cond, x, y int) string {
	z := Zone{Cond: c, Cap: 2, Start: 0, WP: 1, Len: 2}
	if c == zoned.CondNotWP {
		z.Type = zoned.TypeConventional
	}
	r := zoneRect(z, 0, x, y)
	// No tooltip on the legend.
	i := strings.Index(r, "</title>")
	return "<g>" + r[i+len("</title>"):]
}

func presentConds(zs []Zone) []zoned.Cond {
	present := map[zoned.Cond]bool{}
	for _, z := range zs {
		present[z.Cond] = true
	}
	var out []zoned.Cond
	for _, c := range order {
		if present[c] {
			out = append(out, c)
		}
	}
	return out
}

// textWidth estimates a 12px sans-serif string's width (generously: the
// picture must not cut text off).
func textWidth(s string) int { return len(s) * 7 }

func legendWidth(cs []zoned.Cond) int {
	w := 0
	for _, c := range cs {
		w += cell + 4 + textWidth(styleOf(c).name) + 14
	}
	return w
}

func esc(s string) string { return html.EscapeString(s) }
