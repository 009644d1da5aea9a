// Package volumecmd is `zq-csi volume list|describe|zones`: the client of
// the node plugin's debug socket (pkg/driver/debug.go). It runs where the
// socket is, inside the node plugin's container or on its node; `kubectl
// zq` runs it there through the exec subresource.
package volumecmd

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/imgcmd"
	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/zoneview"
	"github.com/zq-csi/zq-csi/pkg/driver"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// Exit codes. ExitNotStaged lets a caller that only sees the exit status
// (kubectl zq, through exec) tell "this node does not have the volume
// staged" from other failures.
const (
	ExitOK        = 0
	ExitError     = 1
	ExitUsage     = 2
	ExitNotStaged = 3
)

// DefaultStateDir is the node plugin's default --state-dir (the chart's
// stateDir).
const DefaultStateDir = "/var/lib/zq-csi/state"

// Env is what the command needs from its process.
type Env struct {
	Stdout, Stderr io.Writer
	Getenv         func(string) string // nil: os.Getenv
}

const usage = `Usage: zq-csi volume <command> [flags] [VOLUME-ID]

Shows what the node plugin holds for the volumes staged on its node, read
from its debug socket: run it inside the node plugin's container (kubectl zq
does that for you) or on the node.

Commands:
  list                 the staged volumes: attachment, device, geometry, zone counts
  describe VOLUME-ID   one staged volume in full
  zones VOLUME-ID      its live zone report, in the format of
                       'zq-csi img io -c "zrp 0 N"' (512-byte sectors)

Flags:
  --socket PATH    the debug socket (default $ZQ_CSI_STATE_DIR/debug.sock, else
                   ` + DefaultStateDir + `/debug.sock)
  -o FORMAT        text (default) or json; zones also wide (a picture: a cell per
                   zone, coloured by condition, filled up to the write pointer)
                   or svg (the picture as an SVG file: -o svg > zones.svg)
  --start N        zones: the first zone to report (a zone index; default 0)
  --count N        zones: at most N zones (default: to the last zone)

Exit status: 0 success, 1 error, 2 usage, 3 the volume is not staged here.
`

type options struct {
	socket, output string
	start, count   int
	color          bool // -o wide: ANSI colours (stdout is a terminal, NO_COLOR unset)
}

// Main runs `zq-csi volume ARGS...` and returns the exit status.
func Main(args []string, env Env) int {
	if env.Getenv == nil {
		env.Getenv = os.Getenv
	}
	if len(args) == 0 {
		fmt.Fprint(env.Stderr, usage)
		return ExitUsage
	}
	cmd := args[0]
	switch cmd {
	case "-h", "--help", "help":
		fmt.Fprint(env.Stdout, usage)
		return ExitOK
	case "list", "ls", "describe", "zones":
	default:
		fmt.Fprintf(env.Stderr, "zq-csi volume: unknown command %q\n\n%s", cmd, usage)
		return ExitUsage
	}
	fs := flag.NewFlagSet("zq-csi volume "+cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var o options
	fs.StringVar(&o.socket, "socket", "", "")
	fs.StringVar(&o.output, "o", "text", "")
	fs.StringVar(&o.output, "output", "text", "")
	fs.IntVar(&o.start, "start", 0, "")
	fs.IntVar(&o.count, "count", -1, "")
	pos, err := ParseInterspersed(fs, args[1:])
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(env.Stdout, usage)
		return ExitOK
	}
	if err == nil {
		err = checkArgs(cmd, pos, o)
	}
	if err != nil {
		fmt.Fprintf(env.Stderr, "zq-csi volume %s: %v\nRun 'zq-csi volume --help' for usage.\n", cmd, err)
		return ExitUsage
	}
	if o.socket == "" {
		o.socket = DefaultSocket(env.Getenv)
	}
	o.color = zoneview.ColorFor(env.Stdout, env.Getenv)
	c := NewClient(o.socket)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	switch cmd {
	case "list", "ls":
		err = runList(ctx, c, o, env.Stdout)
	case "describe":
		err = runDescribe(ctx, c, o, pos[0], env.Stdout)
	case "zones":
		err = runZones(ctx, c, o, pos[0], env.Stdout)
	}
	if err != nil {
		fmt.Fprintf(env.Stderr, "zq-csi volume %s: %v\n", cmd, err)
		var de *driver.DebugError
		if errors.As(err, &de) && de.Reason == "NotFound" && len(pos) > 0 {
			return ExitNotStaged
		}
		return ExitError
	}
	return ExitOK
}

func checkArgs(cmd string, pos []string, o options) error {
	want := 1
	if cmd == "list" || cmd == "ls" {
		want = 0
	}
	switch {
	case len(pos) < want:
		return errors.New("missing VOLUME-ID")
	case len(pos) > want:
		return fmt.Errorf("unexpected argument %q", pos[want])
	case (o.output == "wide" || o.output == "svg") && cmd != "zones":
		return fmt.Errorf("-o %s: a picture of the zones, for zones only; %s takes text or json", o.output, cmd)
	case o.output != "text" && o.output != "json" && o.output != "wide" && o.output != "svg":
		return fmt.Errorf("-o %s: must be text, json, or for zones wide or svg (a picture)", o.output)
	case o.start < 0:
		return fmt.Errorf("--start=%d: must be 0 or more", o.start)
	case o.count < -1:
		return fmt.Errorf("--count=%d: must be 0 or more", o.count)
	case cmd != "zones" && (o.start != 0 || o.count != -1):
		return errors.New("--start and --count apply to zones only")
	}
	return nil
}

// DefaultSocket is the debug socket of a node plugin run with the default
// state directory, or with the one in $ZQ_CSI_STATE_DIR.
func DefaultSocket(getenv func(string) string) string {
	dir := getenv("ZQ_CSI_STATE_DIR")
	if dir == "" {
		dir = DefaultStateDir
	}
	return filepath.Join(dir, driver.DebugSocketName)
}

// ParseInterspersed parses fs's flags wherever they stand among the
// positional arguments (`zones ID -o json` as well as `zones -o json ID`),
// as kubectl does, and returns the positional ones. Everything after "--"
// is positional.
func ParseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// Client reads one node plugin's debug socket.
type Client struct {
	socket string
	hc     *http.Client
}

// NewClient returns a client of the debug socket at path.
func NewClient(path string) *Client {
	return &Client{socket: path, hc: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		},
	}}}
}

// List returns the staged volumes.
func (c *Client) List(ctx context.Context) (*driver.DebugVolumeList, error) {
	var out driver.DebugVolumeList
	return &out, c.get(ctx, "/v1/volumes", &out)
}

// Describe returns one staged volume.
func (c *Client) Describe(ctx context.Context, id string) (*driver.DebugVolume, error) {
	var out driver.DebugVolume
	return &out, c.get(ctx, "/v1/volumes/"+url.PathEscape(id), &out)
}

// Zones returns count zones (-1: all) of volume id from zone index start.
func (c *Client) Zones(ctx context.Context, id string, start, count int) (*driver.DebugZoneReport, error) {
	q := url.Values{}
	if start > 0 {
		q.Set("start", strconv.Itoa(start))
	}
	if count >= 0 {
		q.Set("count", strconv.Itoa(count))
	}
	p := "/v1/volumes/" + url.PathEscape(id) + "/zones"
	if len(q) > 0 {
		p += "?" + q.Encode()
	}
	var out driver.DebugZoneReport
	return &out, c.get(ctx, p, &out)
}

// get returns a *driver.DebugError for the API's own error answers.
func (c *Client) get(ctx context.Context, path string, out any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://zq-csi"+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the node plugin's debug socket %s (is the node plugin running, with this state directory?): %w", c.socket, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 256<<20))
	if err != nil {
		return fmt.Errorf("read answer from %s: %w", c.socket, err)
	}
	if resp.StatusCode != http.StatusOK {
		var de driver.DebugError
		if json.Unmarshal(body, &de) == nil && de.Message != "" {
			return &de
		}
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, strings.TrimSpace(string(body)))
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("GET %s: decode answer: %w", path, err)
	}
	return nil
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func runList(ctx context.Context, c *Client, o options, w io.Writer) error {
	l, err := c.List(ctx)
	if err != nil {
		return err
	}
	if o.output == "json" {
		return writeJSON(w, l)
	}
	if err := writeQuarantined(w, l.Quarantined); err != nil {
		return err
	}
	if len(l.Volumes) == 0 {
		_, err := fmt.Fprintf(w, "No volumes are staged on node %s.\n", l.Node)
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "VOLUME\tATTACHER\tGEN\tDEVICE\tSIZE\tZONES\tZONE STATES\tPUBLISHED")
	for _, v := range l.Volumes {
		att := "-"
		if v.Attached {
			att = v.Attacher
		}
		if v.Lost {
			att = "lost"
		}
		gen := "-"
		if v.Attached {
			gen = strconv.FormatUint(v.Generation, 10)
		}
		zones, states := "-", "-"
		if v.Geometry != nil {
			zones = fmt.Sprintf("%d x %s", v.Geometry.NrZones, Bytes(v.Geometry.ZoneSize))
		}
		if v.Zones != nil {
			states = v.Zones.String()
		}
		size := "-"
		if v.Geometry != nil {
			size = Bytes(v.Geometry.Size)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n", v.ID, att, gen, v.DevicePath, size, zones, states, len(v.Targets))
	}
	return tw.Flush()
}

// writeQuarantined lists the state records the plugin moved aside, first,
// so that nobody reads the volume list as complete without seeing them.
func writeQuarantined(w io.Writer, q []driver.QuarantinedRecord) error {
	if len(q) == 0 {
		return nil
	}
	fmt.Fprintf(w, "WARNING: %d state record file(s) could not be loaded and were moved aside; the volumes they held are missing below:\n", len(q))
	for _, r := range q {
		when := ""
		if !r.Time.IsZero() {
			when = " at " + r.Time.UTC().Format(time.RFC3339)
		}
		fmt.Fprintf(w, "  %s%s: %s\n", r.Path, when, r.Reason)
	}
	_, err := fmt.Fprintln(w, "  (inspect each file; rename it back to its original name once repaired, or remove it)")
	return err
}

func runDescribe(ctx context.Context, c *Client, o options, id string, w io.Writer) error {
	v, err := c.Describe(ctx, id)
	if err != nil {
		return err
	}
	if o.output == "json" {
		return writeJSON(w, v)
	}
	return WriteDescribe(w, v)
}

// WriteDescribe prints a staged volume for people.
func WriteDescribe(w io.Writer, v *driver.DebugVolume) error {
	tw := tabwriter.NewWriter(w, 0, 8, 1, ' ', 0)
	line := func(k, f string, a ...any) { fmt.Fprintf(tw, "%s:\t"+f+"\n", append([]any{k}, a...)...) }
	line("Volume", "%s", v.ID)
	line("Node", "%s", v.Node)
	line("Image", "%s", v.ImagePath)
	line("Device", "%s", v.DevicePath)
	switch {
	case v.Lost:
		line("Attachment", "lost: a restart of the node plugin found no attachment for it")
	case v.Attached:
		line("Attachment", "%s, generation %d", v.Attacher, v.Generation)
	default:
		line("Attachment", "none: the %s attacher does not list the volume", v.Attacher)
	}
	if v.ExporterReason != "" {
		line("Exporter", "%s", v.ExporterReason)
	}
	rw := "read-write"
	if v.ReadOnly {
		rw = "read-only"
	}
	line("Access mode", "%s (%s)", v.AccessMode, rw)
	line("Staging path", "%s", v.StagingPath)
	key := "Published at:"
	if len(v.Targets) == 0 {
		fmt.Fprintf(tw, "%s\tnowhere\n", key)
	}
	for _, t := range slices.Sorted(maps.Keys(v.Targets)) {
		mode := "rw"
		if v.Targets[t] {
			mode = "ro"
		}
		fmt.Fprintf(tw, "%s\t%s (%s)\n", key, t, mode)
		key = ""
	}
	open := "no"
	if v.Open {
		open = "yes"
	}
	line("Device open", "%s", open)
	if g := v.Geometry; g != nil {
		line("Size", "%s (%d bytes)", Bytes(g.Size), g.Size)
		line("Zones", "%d x %s (capacity %s), %d conventional", g.NrZones, Bytes(g.ZoneSize), Bytes(g.ZoneCapacity), g.Conventional)
		line("Zone limits", "max open %s, max active %s, max append %s", limit(uint64(g.MaxOpen)), limit(uint64(g.MaxActive)), appendLimit(g.MaxAppend))
		if g.ClusterSize > 0 {
			line("Cluster size", "%s", Bytes(uint64(g.ClusterSize)))
		}
	}
	if v.Zones != nil {
		line("Zone states", "%s", v.Zones.String())
	}
	if v.Problem != "" {
		line("Problem", "%s", v.Problem)
	}
	return tw.Flush()
}

func limit(n uint64) string {
	if n == 0 {
		return "unlimited"
	}
	return strconv.FormatUint(n, 10)
}

func appendLimit(n uint64) string {
	if n == 0 {
		return "off"
	}
	return Bytes(n)
}

func runZones(ctx context.Context, c *Client, o options, id string, w io.Writer) error {
	rep, err := c.Zones(ctx, id, o.start, o.count)
	if err != nil {
		return err
	}
	if o.output == "json" {
		return writeJSON(w, rep)
	}
	if o.output == "wide" || o.output == "svg" {
		return ZonePicture(w, rep, o.output, o.color)
	}
	zs := make([]zoned.ZoneReport, len(rep.Zones))
	for i, z := range rep.Zones {
		zs[i] = z.Report()
	}
	return imgcmd.WriteZoneReport(w, zs)
}

// ZonePicture draws rep's zones (zoneview): output wide for a terminal
// (in colour when color), svg for a browser.
func ZonePicture(w io.Writer, rep *driver.DebugZoneReport, output string, color bool) error {
	zs := make([]zoneview.Zone, len(rep.Zones))
	for i, z := range rep.Zones {
		zs[i] = zoneview.Zone{Start: z.Start, Len: z.Len, Cap: z.Cap, WP: z.WP, Cond: zoned.Cond(z.Cond), Type: zoned.ZoneType(z.Type)}
	}
	o := zoneview.Options{Title: fmt.Sprintf("volume %s on node %s", rep.VolumeID, rep.Node), First: rep.Start, Color: color}
	if output == "svg" {
		return zoneview.SVG(w, zs, o)
	}
	return zoneview.Text(w, zs, o)
}

// Bytes prints n exactly, in the largest binary unit that divides it.
func Bytes(n uint64) string { return zoneview.BytesCompact(n) }
