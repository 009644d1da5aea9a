package imgcmd

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/zoneview"
	"github.com/zq-csi/zq-csi/pkg/qcow2"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

const infoUsage = `Usage: zq-csi img info [-f FMT] [--output=human|json|wide|svg] [-U] FILE

Show the format, sizes and qcow2 header information of an image, like
qemu-img info. Zoned images also show their zone configuration and how
many zones are in each condition; --output=json lists every zone.

  -f FMT           qcow2 or raw (detected from the magic when omitted)
  --output=FORMAT  human (default) or json; for zoned images also wide (human,
                   then a picture: a cell per zone, coloured by condition,
                   filled up to the write pointer) or svg (the picture as an
                   SVG file: --output=svg > zones.svg)
  -U               accepted for qemu-img compatibility (no locking is done)
`

// The JSON shapes follow qemu-img's ImageInfo; field order is the order
// qemu-img 7.2 happens to print.
type jsonSnapshot struct {
	ICount      *int64 `json:"icount,omitempty"`
	VMClockNsec uint64 `json:"vm-clock-nsec"`
	Name        string `json:"name"`
	DateSec     uint32 `json:"date-sec"`
	DateNsec    uint32 `json:"date-nsec"`
	VMClockSec  uint64 `json:"vm-clock-sec"`
	ID          string `json:"id"`
	VMStateSize uint64 `json:"vm-state-size"`
}

type jsonQcow2Data struct {
	Compat          string `json:"compat"`
	CompressionType string `json:"compression-type"`
	LazyRefcounts   *bool  `json:"lazy-refcounts,omitempty"`
	RefcountBits    uint32 `json:"refcount-bits"`
	Corrupt         *bool  `json:"corrupt,omitempty"`
	ExtendedL2      *bool  `json:"extended-l2,omitempty"`
}

type jsonFormatSpecific struct {
	Type string        `json:"type"`
	Data jsonQcow2Data `json:"data"`
}

type jsonZoned struct {
	Mode              string `json:"mode"`
	ZoneSize          uint64 `json:"zone-size"`
	ZoneCapacity      uint64 `json:"zone-capacity"`
	NrZones           uint32 `json:"nr-zones"`
	ConventionalZones uint32 `json:"conventional-zones"`
	MaxOpenZones      uint32 `json:"max-open-zones"`
	MaxActiveZones    uint32 `json:"max-active-zones"`
	MaxAppendBytes    uint32 `json:"max-append-bytes"`
	Layout            string `json:"layout"`
	WPTableOffset     uint64 `json:"wp-table-offset"`
	WPTableSize       uint64 `json:"wp-table-size"`
	// What the zone engine reports on opening the image: open zones live in
	// memory only, so a partially written zone shows as CLOSED (spec §4).
	Conditions *jsonZoneConds `json:"zone-conditions,omitempty"`
	Zones      []jsonZone     `json:"zones,omitempty"`

	layoutLong string // human output: qcow2.ZoneLayout.String()
}

// jsonZoneConds counts the zones in each condition.
type jsonZoneConds struct {
	Empty   uint32 `json:"empty"`
	ImpOpen uint32 `json:"imp-open"`
	ExpOpen uint32 `json:"exp-open"`
	Closed  uint32 `json:"closed"`
	Full    uint32 `json:"full"`
	NotWP   uint32 `json:"not-wp"`
}

// jsonZone is one zone as BLKREPORTZONE describes it, in bytes; the codes
// are Linux's (blkzoned.h), the names those of zoned.Cond and ZoneType.
type jsonZone struct {
	Start         uint64 `json:"start"`
	Length        uint64 `json:"length"`
	Capacity      uint64 `json:"capacity"`
	WP            uint64 `json:"wp"`
	Type          string `json:"type"`
	TypeCode      uint8  `json:"type-code"`
	Condition     string `json:"condition"`
	ConditionCode uint8  `json:"condition-code"`
}

type jsonInfo struct {
	Snapshots             []jsonSnapshot      `json:"snapshots,omitempty"`
	BackingFilenameFormat string              `json:"backing-filename-format,omitempty"`
	VirtualSize           uint64              `json:"virtual-size"`
	Filename              string              `json:"filename"`
	ClusterSize           *uint32             `json:"cluster-size,omitempty"`
	Format                string              `json:"format"`
	ActualSize            int64               `json:"actual-size"`
	FormatSpecific        *jsonFormatSpecific `json:"format-specific,omitempty"`
	FullBackingFilename   string              `json:"full-backing-filename,omitempty"`
	BackingFilename       string              `json:"backing-filename,omitempty"`
	DirtyFlag             bool                `json:"dirty-flag"`
	Zoned                 *jsonZoned          `json:"zoned,omitempty"`
}

func runInfo(e Env, args []string) int {
	opts, pos, code, done := parseArgs(e, "info", args, optSpec{short: "f:U", long: map[string]bool{"output": true, "force-share": false}})
	if done {
		return code
	}
	want, output, share := "", "human", false
	for _, o := range opts {
		switch o.name {
		case "U", "force-share":
			share = true
		case "f":
			want = o.val
		case "output":
			if o.val == "wide" || o.val == "svg" { // zone pictures (zonePicture)
				output = o.val
				break
			}
			var err error
			if output, err = outputFormat(o.val); err != nil {
				return fail(e, "", err)
			}
		}
	}
	if len(pos) != 1 {
		return usageFail(e, "info", "Expecting one image file name")
	}
	file := pos[0]
	format, _, err := resolveFormat(file, want)
	if err != nil {
		return fail(e, file, err)
	}
	mode := openMode{format: format, readOnly: true, forceShare: share}
	fi, err := os.Stat(file)
	if err != nil {
		return fail(e, file, err)
	}
	ji := jsonInfo{Filename: file, Format: format, ActualSize: diskUsage(fi), VirtualSize: uint64(fi.Size())}
	if format == fmtQcow2 {
		o := mode.qcow2()
		o.NoBacking = true
		im, err := qcow2.Open(file, o)
		if err != nil {
			return fail(e, file, fmt.Errorf("Could not open '%s': %w", file, err))
		}
		info := im.Info()
		ji.VirtualSize = im.Size()
		_ = im.Close()
		fillQcow2Info(&ji, info)
		if ji.Zoned != nil {
			if err := fillZones(ji.Zoned, file, share, e.Stderr); err != nil {
				return fail(e, file, fmt.Errorf("Could not open '%s': %w", file, err))
			}
		}
	}
	if output == "wide" || output == "svg" {
		return zonePicture(e, ji, output)
	}
	if output == "json" {
		b, err := json.MarshalIndent(ji, "", "    ")
		if err != nil {
			return fail(e, file, err)
		}
		fmt.Fprintf(e.Stdout, "%s\n", b)
		return 0
	}
	printHumanInfo(e.Stdout, ji)
	return 0
}

// zonePicture is --output=wide (the human output, then a picture of the
// zones) and --output=svg (the picture as an SVG document), drawn by
// zoneview.
func zonePicture(e Env, ji jsonInfo, output string) int {
	if ji.Zoned == nil {
		return fail(e, ji.Filename, fmt.Errorf("--output=%s draws the zones of a zoned image; this %s image has no zones (use human or json)", output, ji.Format))
	}
	zs := make([]zoneview.Zone, len(ji.Zoned.Zones))
	for i, z := range ji.Zoned.Zones {
		zs[i] = zoneview.Zone{Start: z.Start, Len: z.Length, Cap: z.Capacity, WP: z.WP,
			Cond: zoned.Cond(z.ConditionCode), Type: zoned.ZoneType(z.TypeCode)}
	}
	o := zoneview.Options{Title: "image " + ji.Filename, Color: zoneview.ColorFor(e.Stdout, os.Getenv)}
	var err error
	if output == "svg" {
		err = zoneview.SVG(e.Stdout, zs, o)
	} else {
		printHumanInfo(e.Stdout, ji)
		fmt.Fprintln(e.Stdout)
		err = zoneview.Text(e.Stdout, zs, o)
	}
	if err != nil {
		return fail(e, ji.Filename, err)
	}
	return 0
}

func fillQcow2Info(ji *jsonInfo, info qcow2.Info) {
	cs := info.ClusterSize
	ji.ClusterSize = &cs
	ji.DirtyFlag = info.Dirty
	if info.BackingFile != "" {
		ji.BackingFilename = info.BackingFile
		ji.FullBackingFilename = pathCombine(ji.Filename, info.BackingFile)
		ji.BackingFilenameFormat = info.BackingFormat
	}
	comp := info.Compression
	if comp == "" {
		comp = "zlib"
	}
	d := jsonQcow2Data{Compat: "1.1", CompressionType: comp, RefcountBits: info.RefcountBits}
	if info.Version == 2 {
		d.Compat = "0.10"
	} else {
		lazy, corrupt, ext := info.LazyRefcounts, info.Corrupt, info.ExtendedL2
		d.LazyRefcounts, d.Corrupt, d.ExtendedL2 = &lazy, &corrupt, &ext
	}
	ji.FormatSpecific = &jsonFormatSpecific{Type: "qcow2", Data: d}
	for _, s := range info.Snapshots {
		js := jsonSnapshot{
			VMClockNsec: s.VMClockNsec % 1e9, VMClockSec: s.VMClockNsec / 1e9,
			Name: s.Name, DateSec: s.DateSec, DateNsec: s.DateNsec, ID: s.ID, VMStateSize: s.VMStateSize,
		}
		if s.ICount != -1 {
			ic := s.ICount
			js.ICount = &ic
		}
		ji.Snapshots = append(ji.Snapshots, js)
	}
	if z := info.Zoned; z != nil {
		ji.Zoned = &jsonZoned{
			Mode: zoneModel(z.Model), ZoneSize: z.ZoneSize, ZoneCapacity: z.ZoneCapacity,
			NrZones: z.NrZones, ConventionalZones: z.ConventionalZones,
			MaxOpenZones: z.MaxOpenZones, MaxActiveZones: z.MaxActiveZones,
			MaxAppendBytes: z.MaxAppendBytes, Layout: layoutName(z.Layout), layoutLong: z.Layout.String(),
			WPTableOffset: z.MetaOffset, WPTableSize: z.MetaSize,
		}
	}
}

// fillZones reports every zone through the zone engine, opened read-only
// so that info never changes the image.
func fillZones(z *jsonZoned, file string, share bool, warn io.Writer) error {
	d, err := zoned.Open(file, zoned.OpenOptions{ReadOnly: true, ForceShare: share})
	if err != nil {
		return err
	}
	defer d.Close()
	warnClamped(warn, d)
	var c jsonZoneConds
	reps := d.Report(0, int(d.Geometry().NrZones))
	z.Zones = make([]jsonZone, 0, len(reps))
	for _, r := range reps {
		switch r.Cond {
		case zoned.CondEmpty:
			c.Empty++
		case zoned.CondImpOpen:
			c.ImpOpen++
		case zoned.CondExpOpen:
			c.ExpOpen++
		case zoned.CondClosed:
			c.Closed++
		case zoned.CondFull:
			c.Full++
		case zoned.CondNotWP:
			c.NotWP++
		}
		z.Zones = append(z.Zones, jsonZone{Start: r.Start, Length: r.Len, Capacity: r.Cap, WP: r.WP,
			Type: r.Type.String(), TypeCode: uint8(r.Type), Condition: r.Cond.String(), ConditionCode: uint8(r.Cond)})
	}
	z.Conditions = &c
	return nil
}

func zoneModel(m uint8) string {
	if m == 1 {
		return "host-managed"
	}
	return fmt.Sprintf("unknown (%d)", m)
}

func layoutName(l qcow2.ZoneLayout) string {
	switch l {
	case qcow2.LayoutA:
		return "A"
	case qcow2.LayoutB:
		return "B"
	case qcow2.LayoutC:
		return "C"
	}
	return l.String()
}

// printHumanInfo follows qemu's bdrv_image_info_dump.
func printHumanInfo(w io.Writer, ji jsonInfo) {
	fmt.Fprintf(w, "image: %s\nfile format: %s\nvirtual size: %s (%d bytes)\ndisk size: %s\n",
		ji.Filename, ji.Format, sizeToStr(ji.VirtualSize), ji.VirtualSize, sizeToStr(uint64(ji.ActualSize)))
	if ji.ClusterSize != nil {
		fmt.Fprintf(w, "cluster_size: %d\n", *ji.ClusterSize)
	}
	if ji.DirtyFlag {
		fmt.Fprintln(w, "cleanly shut down: no")
	}
	if ji.BackingFilename != "" {
		fmt.Fprintf(w, "backing file: %s", ji.BackingFilename)
		if ji.FullBackingFilename != ji.BackingFilename {
			fmt.Fprintf(w, " (actual path: %s)", ji.FullBackingFilename)
		}
		fmt.Fprintln(w)
		if ji.BackingFilenameFormat != "" {
			fmt.Fprintf(w, "backing file format: %s\n", ji.BackingFilenameFormat)
		}
	}
	if len(ji.Snapshots) > 0 {
		fmt.Fprintln(w, "Snapshot list:")
		fmt.Fprintf(w, "%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
		for _, s := range ji.Snapshots {
			date := time.Unix(int64(s.DateSec), 0).Local().Format("2006-01-02 15:04:05")
			secs := s.VMClockSec
			clock := fmt.Sprintf("%02d:%02d:%02d.%03d", secs/3600, (secs/60)%60, secs%60, s.VMClockNsec/1e6)
			icount := ""
			if s.ICount != nil {
				icount = fmt.Sprint(*s.ICount)
			}
			fmt.Fprintf(w, "%-9s %-16s %8s%20s%13s%11s\n", s.ID, s.Name, sizeToStr(s.VMStateSize), date, clock, icount)
		}
	}
	if fs := ji.FormatSpecific; fs != nil {
		d := fs.Data
		fmt.Fprintln(w, "Format specific information:")
		fmt.Fprintf(w, "    compat: %s\n    compression type: %s\n", d.Compat, d.CompressionType)
		if d.LazyRefcounts != nil {
			fmt.Fprintf(w, "    lazy refcounts: %t\n", *d.LazyRefcounts)
		}
		fmt.Fprintf(w, "    refcount bits: %d\n", d.RefcountBits)
		if d.Corrupt != nil {
			fmt.Fprintf(w, "    corrupt: %t\n", *d.Corrupt)
		}
		if d.ExtendedL2 != nil {
			fmt.Fprintf(w, "    extended l2: %t\n", *d.ExtendedL2)
		}
		if z := ji.Zoned; z != nil {
			lines := []string{
				"mode: " + z.Mode,
				fmt.Sprintf("zone size: %d", z.ZoneSize),
				fmt.Sprintf("zone capacity: %d", z.ZoneCapacity),
				fmt.Sprintf("nr zones: %d", z.NrZones),
				fmt.Sprintf("conventional zones: %d", z.ConventionalZones),
				fmt.Sprintf("max open zones: %d", z.MaxOpenZones),
				fmt.Sprintf("max active zones: %d", z.MaxActiveZones),
				fmt.Sprintf("max append bytes: %d", z.MaxAppendBytes),
				"layout: " + z.layoutLong,
				fmt.Sprintf("wp table offset: %d", z.WPTableOffset),
				fmt.Sprintf("wp table size: %d", z.WPTableSize),
			}
			if c := z.Conditions; c != nil {
				lines = append(lines, "zone conditions:",
					fmt.Sprintf("    EMPTY: %d", c.Empty),
					fmt.Sprintf("    IMP_OPEN: %d", c.ImpOpen),
					fmt.Sprintf("    EXP_OPEN: %d", c.ExpOpen),
					fmt.Sprintf("    CLOSED: %d", c.Closed),
					fmt.Sprintf("    FULL: %d", c.Full),
					fmt.Sprintf("    NOT_WP: %d", c.NotWP))
			}
			fmt.Fprintf(w, "    zoned:\n        %s\n", strings.Join(lines, "\n        "))
		}
	}
}
