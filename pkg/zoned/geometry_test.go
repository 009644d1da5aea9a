package zoned

import (
	"errors"
	"strings"
	"testing"
)

// base is a small valid geometry: 8 zones of 4 KiB, the first conventional.
func base() Geometry {
	return Geometry{
		Size: 8 * 4096, ZoneSize: 4096, ZoneCapacity: 4096,
		NrZones: 8, Conventional: 1, MaxAppendBytes: 1024,
	}
}

func TestGeometryValidate(t *testing.T) {
	tests := []struct {
		name  string
		edit  func(*Geometry)
		field string // "" = valid
	}{
		{"valid", func(*Geometry) {}, ""},
		{"valid runt", func(g *Geometry) { g.Size = 7*4096 + 512 }, ""},
		{"valid capacity below size", func(g *Geometry) { g.ZoneCapacity = 3072 }, ""},
		{"valid limits", func(g *Geometry) { g.MaxOpen, g.MaxActive = 7, 8 }, ""},
		{"valid open without active limit", func(g *Geometry) { g.MaxOpen = 7 }, ""},
		{"valid active without open limit", func(g *Geometry) { g.MaxActive = 3 }, ""},
		{"valid no append", func(g *Geometry) { g.MaxAppendBytes = 0 }, ""},
		{"valid zone larger than device", func(g *Geometry) {
			g.Size, g.NrZones, g.Conventional = 2048, 1, 0
		}, ""},
		{"size zero", func(g *Geometry) { g.Size = 0 }, "size"},
		{"size unaligned", func(g *Geometry) { g.Size = 8*4096 - 1 }, "size"},
		{"zone size zero", func(g *Geometry) { g.ZoneSize = 0 }, "zone_size"},
		{"zone size not power of two", func(g *Geometry) { g.ZoneSize = 3 * 1024 }, "zone_size"},
		{"zone size below 512", func(g *Geometry) { g.ZoneSize = 256 }, "zone_size"},
		{"capacity zero", func(g *Geometry) { g.ZoneCapacity = 0 }, "zone_capacity"},
		{"capacity above size", func(g *Geometry) { g.ZoneCapacity = 8192 }, "zone_capacity"},
		{"capacity unaligned", func(g *Geometry) { g.ZoneCapacity = 4000 }, "zone_capacity"},
		{"nr_zones wrong", func(g *Geometry) { g.NrZones = 9 }, "nr_zones"},
		{"nr_zones wrong for runt", func(g *Geometry) { g.Size += 512 }, "nr_zones"},
		{"nr_zones too many", func(g *Geometry) {
			g.Size, g.NrZones = (MaxZones+1)*4096, MaxZones+1
		}, "nr_zones"},
		{"all conventional", func(g *Geometry) { g.Conventional = 8 }, "conventional_zones"},
		{"append unaligned", func(g *Geometry) { g.MaxAppendBytes = 1000 }, "max_append_bytes"},
		{"append too close to capacity", func(g *Geometry) { g.MaxAppendBytes = 3584 }, "max_append_bytes"},
		{"append zero, capacity one sector", func(g *Geometry) {
			g.ZoneCapacity, g.MaxAppendBytes = 512, 0
		}, "max_append_bytes"},
		{"active above nr_zones", func(g *Geometry) { g.MaxActive = 9 }, "max_active_zones"},
		{"open above sequential", func(g *Geometry) { g.MaxOpen = 8 }, "max_open_zones"},
		{"open above active", func(g *Geometry) { g.MaxOpen, g.MaxActive = 4, 3 }, "max_open_zones"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := base()
			tt.edit(&g)
			err := g.Validate()
			if tt.field == "" {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			var ge *GeometryError
			if !errors.As(err, &ge) {
				t.Fatalf("Validate() = %v, want *GeometryError", err)
			}
			if ge.Field != tt.field {
				t.Errorf("Field = %q, want %q (%v)", ge.Field, tt.field, err)
			}
			if !errors.Is(err, ErrInvalidGeometry) {
				t.Errorf("%v does not wrap ErrInvalidGeometry", err)
			}
			if _, err := NewMachine(g, nil); !errors.As(err, &ge) {
				t.Errorf("NewMachine() = %v, want *GeometryError", err)
			}
		})
	}
}

func TestGeometryHelpers(t *testing.T) {
	g := base()
	g.Size = 7*4096 + 2048 // zone 7 is a 2 KiB runt
	g.ZoneCapacity = 3072
	if err := g.Validate(); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		zone                     int
		start, length, cap, wend uint64
		conventional             bool
	}{
		{0, 0, 4096, 4096, 4096, true}, // conventional: capacity = length
		{1, 4096, 4096, 3072, 4096 + 3072, false},
		{6, 6 * 4096, 4096, 3072, 6*4096 + 3072, false},
		{7, 7 * 4096, 2048, 2048, 7*4096 + 2048, false}, // runt: min(start+cap, size)
	}
	for _, tt := range tests {
		if got := g.ZoneStart(tt.zone); got != tt.start {
			t.Errorf("ZoneStart(%d) = %d, want %d", tt.zone, got, tt.start)
		}
		if got := g.ZoneLen(tt.zone); got != tt.length {
			t.Errorf("ZoneLen(%d) = %d, want %d", tt.zone, got, tt.length)
		}
		if got := g.ZoneCap(tt.zone); got != tt.cap {
			t.Errorf("ZoneCap(%d) = %d, want %d", tt.zone, got, tt.cap)
		}
		if got := g.WritableEnd(tt.zone); got != tt.wend {
			t.Errorf("WritableEnd(%d) = %d, want %d", tt.zone, got, tt.wend)
		}
		if got := g.IsConventional(tt.zone); got != tt.conventional {
			t.Errorf("IsConventional(%d) = %v", tt.zone, got)
		}
		if got := g.ZoneIndex(tt.start + tt.length - 1); got != tt.zone {
			t.Errorf("ZoneIndex(last byte of %d) = %d", tt.zone, got)
		}
	}
	if got := g.ZoneIndex(g.Size); got != -1 {
		t.Errorf("ZoneIndex(size) = %d, want -1", got)
	}
	if got := g.SequentialZones(); got != 7 {
		t.Errorf("SequentialZones() = %d, want 7", got)
	}
	for _, c := range []struct{ size, zs, want uint64 }{{0, 4096, 0}, {1, 4096, 1}, {4096, 4096, 1}, {4097, 4096, 2}, {^uint64(0), 1 << 63, 2}, {5, 0, 0}} {
		if got := ZoneCount(c.size, c.zs); got != c.want {
			t.Errorf("ZoneCount(%d, %d) = %d, want %d", c.size, c.zs, got, c.want)
		}
	}
}

// TestGeometryClamp: limits that are too large are lowered with one warning
// per change (spec §2), in the seed's order; limits that fit are kept.
func TestGeometryClamp(t *testing.T) {
	for _, tc := range []struct {
		name           string
		open, active   uint32
		wOpen, wActive uint32
		warnings       []string
	}{
		{"fit", 3, 5, 3, 5, nil},
		{"no limits", 0, 0, 0, 0, nil},
		{"active above nr_zones", 0, 100, 0, 8, []string{"zone.max_active_zones=100 exceeds the number of zones 8; using 8"}},
		{"open above sequential", 9, 0, 7, 0, []string{"zone.max_open_zones=9 exceeds the number of sequential zones 7; using 7"}},
		{"open above active", 4, 3, 3, 3, []string{"zone.max_open_zones=4 exceeds zone.max_active_zones=3; using 3"}},
		{"all three", 100, 100, 7, 8, []string{
			"zone.max_active_zones=100 exceeds the number of zones 8; using 8",
			"zone.max_open_zones=100 exceeds the number of sequential zones 7; using 7",
		}},
		{"open above both", 9, 6, 6, 6, []string{
			"zone.max_open_zones=9 exceeds the number of sequential zones 7; using 7",
			"zone.max_open_zones=7 exceeds zone.max_active_zones=6; using 6",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := base()
			g.MaxOpen, g.MaxActive = tc.open, tc.active
			c, w := g.Clamp()
			if c.MaxOpen != tc.wOpen || c.MaxActive != tc.wActive || strings.Join(w, "\n") != strings.Join(tc.warnings, "\n") {
				t.Fatalf("Clamp() = open %d active %d warnings %q, want %d %d %q", c.MaxOpen, c.MaxActive, w, tc.wOpen, tc.wActive, tc.warnings)
			}
			if err := c.Validate(); err != nil {
				t.Fatalf("clamped geometry invalid: %v", err)
			}
		})
	}
}
