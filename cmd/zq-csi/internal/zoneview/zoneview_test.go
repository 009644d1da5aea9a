package zoneview

import (
	"bytes"
	"encoding/xml"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/zq-csi/zq-csi/pkg/zoned"
)

const mib = 1 << 20

// sample: 2 conventional zones, then sequential 64 MiB zones in every
// condition the engine produces, with write pointers at known fractions.
func sample() []Zone {
	zs := []Zone{}
	add := func(cond zoned.Cond, typ zoned.ZoneType, written uint64) {
		start := uint64(len(zs)) * 64 * mib
		wp := start + written
		if cond == zoned.CondNotWP {
			wp = start + 64*mib
		}
		zs = append(zs, Zone{Start: start, Len: 64 * mib, Cap: 64 * mib, WP: wp, Cond: cond, Type: typ})
	}
	add(zoned.CondNotWP, zoned.TypeConventional, 0)
	add(zoned.CondNotWP, zoned.TypeConventional, 0)
	add(zoned.CondImpOpen, zoned.TypeSeqWriteRequired, 4096)   // a little: 1/8
	add(zoned.CondImpOpen, zoned.TypeSeqWriteRequired, 32*mib) // half: 4/8
	add(zoned.CondExpOpen, zoned.TypeSeqWriteRequired, 0)      // opened, nothing written
	add(zoned.CondClosed, zoned.TypeSeqWriteRequired, 60*mib)  // 7.5/8 -> 8/8 rounded up... but not full
	add(zoned.CondFull, zoned.TypeSeqWriteRequired, 64*mib)
	for i := 0; i < 5; i++ {
		add(zoned.CondEmpty, zoned.TypeSeqWriteRequired, 0)
	}
	return zs
}

func TestEighths(t *testing.T) {
	z := func(cond zoned.Cond, w, c uint64) Zone {
		return Zone{Start: 100, Len: c, Cap: c, WP: 100 + w, Cond: cond}
	}
	for _, tc := range []struct {
		z    Zone
		want int
		g    string
	}{
		{z(zoned.CondEmpty, 0, 64), 0, "·"},
		{z(zoned.CondImpOpen, 1, 64), 1, "▁"}, // any written byte shows
		{z(zoned.CondImpOpen, 8, 64), 1, "▁"},
		{z(zoned.CondImpOpen, 9, 64), 2, "▂"},
		{z(zoned.CondImpOpen, 32, 64), 4, "▄"},
		{z(zoned.CondClosed, 63, 64), 8, "█"}, // rounded up: the zone is not full, its cell is
		{z(zoned.CondExpOpen, 0, 64), 0, "_"},
		{z(zoned.CondFull, 10, 64), 8, "█"}, // finished early: full regardless of the WP
		{z(zoned.CondNotWP, 0, 64), 0, "▒"},
		{z(zoned.CondOffline, 0, 64), 0, "X"},
		{z(zoned.CondReadOnly, 5, 64), 1, "R"},
		{Zone{Cond: zoned.CondImpOpen, Start: 100, WP: 50, Cap: 64}, 0, "_"}, // WP below start: nothing
	} {
		if got := eighths(tc.z); got != tc.want {
			t.Errorf("eighths(%+v) = %d, want %d", tc.z, got, tc.want)
		}
		if got := glyph(tc.z); got != tc.g {
			t.Errorf("glyph(%+v) = %q, want %q", tc.z, got, tc.g)
		}
	}
}

func TestTextNoColor(t *testing.T) {
	var b bytes.Buffer
	if err := Text(&b, sample(), Options{Title: "volume zqv-1", Columns: 8}); err != nil {
		t.Fatal(err)
	}
	want := `volume zqv-1
12 zones of 64 MiB: conventional 2, empty 5, implicitly open 2, explicitly open 1, closed 1, full 1
 0 ▒▒▁▄_██·
   ==ooOcF.
 8 ····
   ....
legend: ▒ = conventional  · . empty  ▁▄▇ o implicitly open  ▁▄▇ O explicitly open  ▁▄▇ c closed  █ F full  (height: written up to the write pointer)
`
	if b.String() != want {
		t.Errorf("Text:\n%s\nwant:\n%s", b.String(), want)
	}
}

func TestTextColorAndGroups(t *testing.T) {
	zs := sample()
	for len(zs) < 20 {
		zs = append(zs, Zone{Start: uint64(len(zs)) * 64 * mib, Len: 64 * mib, Cap: 64 * mib, WP: uint64(len(zs)) * 64 * mib, Cond: zoned.CondEmpty, Type: zoned.TypeSeqWriteRequired})
	}
	var b bytes.Buffer
	if err := Text(&b, zs, Options{Color: true, First: 100}); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	lines := strings.Split(out, "\n")
	if lines[0] != "zones 100-119 of 64 MiB: conventional 2, empty 13, implicitly open 2, explicitly open 1, closed 1, full 1" {
		t.Errorf("summary %q", lines[0])
	}
	plain := regexp.MustCompile("\x1b\\[[0-9;]*m").ReplaceAllString(lines[1], "")
	if plain != "100 ▒▒▁▄_██· ········ ····" {
		t.Errorf("row %q: want the index, then groups of 8", plain)
	}
	// The full zone is blue, the closed one yellow (ANSI 34, 33).
	if !strings.Contains(lines[1], "\x1b[33m█\x1b[0m\x1b[34m█\x1b[0m") {
		t.Errorf("row %q: closed then full zone not coloured 33, 34", lines[1])
	}
	if strings.Contains(out, "==ooOcF") {
		t.Error("condition letters printed although colours are on")
	}
}

func TestSVG(t *testing.T) {
	var b bytes.Buffer
	if err := SVG(&b, sample(), Options{Title: "volume <zqv-1> & co", Columns: 8}); err != nil {
		t.Fatal(err)
	}
	if dir := os.Getenv("ZQ_ZONEVIEW_OUT"); dir != "" { // to look at it: ZQ_ZONEVIEW_OUT=/tmp go test
		os.WriteFile(dir+"/zones-test.svg", b.Bytes(), 0o644)
	}
	// Well-formed XML whose root is an svg element.
	d := xml.NewDecoder(bytes.NewReader(b.Bytes()))
	var root string
	var titles []string
	var rects []map[string]string
	inTitle := false
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("not well-formed XML: %v", err)
		}
		switch e := tok.(type) {
		case xml.StartElement:
			if root == "" {
				root = e.Name.Local
			}
			inTitle = e.Name.Local == "title"
			if e.Name.Local == "rect" {
				m := map[string]string{}
				for _, a := range e.Attr {
					m[a.Name.Local] = a.Value
				}
				rects = append(rects, m)
			}
		case xml.CharData:
			if inTitle {
				titles = append(titles, string(e))
			}
		case xml.EndElement:
			inTitle = false
		}
	}
	if root != "svg" {
		t.Fatalf("root element %q", root)
	}
	if !strings.Contains(b.String(), "volume &lt;zqv-1&gt; &amp; co") {
		t.Error("title not escaped")
	}
	if len(titles) != 12 {
		t.Fatalf("%d tooltips, want one per zone (12)", len(titles))
	}
	if titles[3] != "zone 3: IMP_OPEN, start 201326592, write pointer 234881024, capacity 64 MiB, 32 MiB written (50.0%)" {
		t.Errorf("tooltip of zone 3: %q", titles[3])
	}
	// Zone 3's written part is half its square, drawn from the bottom.
	var fill map[string]string
	for _, r := range rects {
		if r["fill"] == "#2ca02c" {
			if h, _ := strconv.ParseFloat(r["height"], 64); h == cell/2 {
				fill = r
			}
		}
	}
	if fill == nil {
		t.Fatal("no half-height written part in the implicitly-open colour")
	}
}

func TestCountsAndBytes(t *testing.T) {
	if got := Counts(sample()); got != "conventional 2, empty 5, implicitly open 2, explicitly open 1, closed 1, full 1" {
		t.Errorf("Counts = %q", got)
	}
	for n, want := range map[uint64]string{64 * mib: "64 MiB", 1 << 30: "1 GiB", 4096: "4 KiB", 1000: "1000 B", 3 * mib / 2: "1536 KiB"} {
		if got := Bytes(n); got != want {
			t.Errorf("Bytes(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestColorFor(t *testing.T) {
	env := func(kv ...string) func(string) string {
		return func(k string) string {
			for i := 0; i+1 < len(kv); i += 2 {
				if kv[i] == k {
					return kv[i+1]
				}
			}
			return ""
		}
	}
	var buf bytes.Buffer // not a terminal
	for i, tc := range []struct {
		getenv func(string) string
		want   bool
	}{
		{env(), false},
		{env("CLICOLOR_FORCE", "1"), true},
		{env("CLICOLOR_FORCE", "0"), false},
		{env("CLICOLOR_FORCE", "1", "NO_COLOR", "1"), false}, // NO_COLOR wins
	} {
		if got := ColorFor(&buf, tc.getenv); got != tc.want {
			t.Errorf("case %d: ColorFor(buffer) = %v, want %v", i, got, tc.want)
		}
	}
	if f, err := os.Open(os.DevNull); err == nil {
		defer f.Close()
		if ColorFor(f, env()) {
			t.Error("ColorFor(/dev/null): a terminal?")
		}
	}
}
