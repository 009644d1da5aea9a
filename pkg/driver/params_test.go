package driver

import (
	"context"
	"fmt"
	"math"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	mount "k8s.io/mount-utils"
)

// newEventDriver is newTestDriver with an event recorder on Config.OnEvent
// and cfg changed by with.
func newEventDriver(t testing.TB, dir string, with func(*Config)) (*testDriver, *eventLog) {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	att, err := NewFileAttacher(filepath.Join(dir, "state", "fileattach"), 0)
	if err != nil {
		t.Fatal(err)
	}
	ev := &eventLog{}
	cfg := Config{NodeID: "n1", Mode: ModeAll, DataDir: filepath.Join(dir, "data"),
		StateDir: filepath.Join(dir, "state"), Attacher: att, Mounter: mount.NewFakeMounter(nil), OnEvent: ev.add}
	if with != nil {
		with(&cfg)
	}
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Recover(context.Background()); err != nil {
		t.Fatal(err)
	}
	return &testDriver{Driver: d, dir: dir, ctrl: &controllerServer{d: d}, node: &nodeServer{d: d}, grp: &groupControllerServer{d: d}}, ev
}

type eventLog struct {
	mu     sync.Mutex
	events []Event
}

func (l *eventLog) add(e Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, e)
}

func (l *eventLog) withReason(r string) []Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []Event
	for _, e := range l.events {
		if e.Reason == r {
			out = append(out, e)
		}
	}
	return out
}

// chartClass is the chart's example StorageClass zq-csi-zoned (the seed's
// geometry: 64 MiB zones, 6 open, 8 active).
var chartClass = map[string]string{"zone.mode": "host-managed", "zone.size": "64M", "zone.capacity": "64M",
	"zone.max_open_zones": "6", "zone.max_active_zones": "8", "zone.max_append_bytes": "4096"}

// Issue 14: a PVC under 8 zones on the chart's StorageClass could never be
// provisioned ("zone.max_active_zones=8: larger than the 1 zones"). The
// limits are clamped as qemu-img and the image tool clamp them; the volume
// context and the image carry the clamped values, an event says so.
func TestSmallVolumesClamp(t *testing.T) {
	td, ev := newEventDriver(t, "", nil)
	ctx := context.Background()
	for _, tc := range []struct {
		name                string
		size                int64
		params              map[string]string
		zones, open, active string
		clamped             string
	}{
		{"100Mi", 100 * mib, chartClass, "2", "2", "2", "zone.max_active_zones=8->2,zone.max_open_zones=6->2"},
		{"64Mi", 64 * mib, chartClass, "1", "1", "1", "zone.max_active_zones=8->1,zone.max_open_zones=6->1"},
		{"1Gi fits", 1 << 30, chartClass, "16", "6", "8", ""},
		{"conventional zones", 3 * 64 * mib, map[string]string{"zone.size": "64Mi", "zone.conventional_zones": "1",
			"zone.max_open_zones": "6", "zone.max_active_zones": "8"}, "3", "2", "3",
			"zone.max_active_zones=8->3,zone.max_open_zones=6->2"},
		{"open above active", 8 * mib, map[string]string{"zone.size": "1M", "zone.max_active_zones": "2", "zone.max_open_zones": "3"},
			"8", "2", "2", "zone.max_open_zones=3->2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := mustCreate(t, td, "small-"+strings.ReplaceAll(tc.name, " ", "-"), tc.size, tc.params)
			vc := v.GetVolumeContext()
			if vc["zone.nr_zones"] != tc.zones || vc["zone.max_open_zones"] != tc.open || vc["zone.max_active_zones"] != tc.active {
				t.Errorf("context zones/open/active = %s/%s/%s, want %s/%s/%s", vc["zone.nr_zones"], vc["zone.max_open_zones"],
					vc["zone.max_active_zones"], tc.zones, tc.open, tc.active)
			}
			if vc[volumeContextClampedKey] != tc.clamped {
				t.Errorf("context %s=%q, want %q", volumeContextClampedKey, vc[volumeContextClampedKey], tc.clamped)
			}
			g, err := td.images.Geometry(v.GetVolumeId())
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(g.MaxOpen) != tc.open || fmt.Sprint(g.MaxActive) != tc.active {
				t.Errorf("image limits open=%d active=%d, want %s/%s", g.MaxOpen, g.MaxActive, tc.open, tc.active)
			}
			found := false
			for _, e := range ev.withReason(ReasonZoneLimitsClamped) {
				found = found || e.VolumeID == v.GetVolumeId()
			}
			if found != (tc.clamped != "") {
				t.Errorf("ZoneLimitsClamped event for the volume: %v, want %v", found, tc.clamped != "")
			}
			// A repeat is the same volume.
			again := mustCreate(t, td, "small-"+strings.ReplaceAll(tc.name, " ", "-"), tc.size, tc.params)
			if again.GetVolumeId() != v.GetVolumeId() || again.GetVolumeContext()[volumeContextClampedKey] != tc.clamped {
				t.Errorf("repeat: %s %v", again.GetVolumeId(), again.GetVolumeContext())
			}
		})
	}

	// ModifyVolume lowers too-large limits the same way.
	v := mustCreate(t, td, "modify", 2*64*mib, map[string]string{"zone.size": "64Mi"})
	if _, err := td.ctrl.ControllerModifyVolume(ctx, &csi.ControllerModifyVolumeRequest{VolumeId: v.GetVolumeId(),
		MutableParameters: map[string]string{"zone.max_active_zones": "8", "zone.max_open_zones": "6"}}); err != nil {
		t.Fatalf("ModifyVolume with limits above the zones: %v", err)
	}
	got, err := td.ctrl.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: v.GetVolumeId()})
	if err != nil {
		t.Fatal(err)
	}
	vc := got.GetVolume().GetVolumeContext()
	if vc["zone.max_active_zones"] != "2" || vc["zone.max_open_zones"] != "2" ||
		vc[volumeContextClampedKey] != "zone.max_active_zones=8->2,zone.max_open_zones=6->2" {
		t.Errorf("after ModifyVolume: %v", vc)
	}
}

// Issue 14: "zone.size: 64Mi" was refused. Sizes take qemu-img suffixes
// and Kubernetes quantities, exactly (parseBytes has the rule).
func TestParseBytes(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64
		err  string
	}{
		{"67108864", 64 << 20, ""},
		{"64M", 64 << 20, ""},  // qemu-img: powers of 1024
		{"64Mi", 64 << 20, ""}, // Kubernetes binary
		{"1Gi", 1 << 30, ""},
		{"0.5Gi", 512 << 20, ""},
		{"1.5M", 3 << 19, ""},
		{"4K", 4096, ""},
		{"4Ki", 4096, ""},
		{"1g", 1 << 30, ""},
		{"1E", 1 << 60, ""},
		{"500k", 500000, ""}, // Kubernetes decimal
		{"1e6", 1000000, ""}, // Kubernetes exponent
		{"2048000m", 0, "ambiguous suffix m"},
		{"64m", 0, "ambiguous suffix m"},
		{"0.5", 0, "not a whole number of bytes"},
		{"0.3K", 0, "not a whole number of bytes"},
		{"1.5", 0, "not a whole number of bytes"},
		{"-1Mi", 0, "must not be negative"},
		{"lots", 0, "must be a whole number of bytes"},
		{"64 Mi", 0, "must be a whole number of bytes"},
		{"16E", 0, "too large"},
		{"9Ei", 0, "too large"},
	} {
		got, err := parseBytes("zone.size", tc.in)
		switch {
		case tc.err == "" && (err != nil || got != tc.want):
			t.Errorf("parseBytes(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		case tc.err != "" && (err == nil || code(err) != codes.InvalidArgument):
			t.Errorf("parseBytes(%q) = %d, %v; want InvalidArgument %q", tc.in, got, err, tc.err)
		case tc.err != "" && !strings.Contains(err.Error(), "parameter zone.size="+tc.in+": ") || tc.err != "" && !strings.Contains(err.Error(), tc.err):
			t.Errorf("parseBytes(%q): %q does not name the parameter, the value and %q", tc.in, err, tc.err)
		}
	}

	// Through CreateVolume: each size parameter, both spellings.
	td := newTestDriver(t, "")
	v := mustCreate(t, td, "k8s-units", 4*mib, map[string]string{"zone.size": "1Mi", "zone.capacity": "512Ki",
		"zone.max_append_bytes": "64Ki", "clusterSize": "16Ki"})
	vc := v.GetVolumeContext()
	if vc["zone.size"] != "1048576" || vc["zone.capacity"] != "524288" || vc["zone.max_append_bytes"] != "65536" {
		t.Errorf("context %v", vc)
	}
	g, err := td.images.Geometry(v.GetVolumeId())
	if err != nil || g.ClusterSize != 16384 || g.ZoneCapacity != 512<<10 {
		t.Errorf("image geometry %+v, %v", g, err)
	}
	for params, want := range map[string]string{
		"zone.size=1e6":     "parameter zone.size=1e6: must be a power of two of at least 512 bytes (1e6 is 1000000 bytes)",
		"zone.capacity=2Mi": "parameter zone.capacity=2Mi (2097152 bytes): zone capacity exceeds zone size",
		"clusterSize=3Ki":   "parameter clusterSize=3Ki (3072 bytes)",
		"zone.size=64m":     "parameter zone.size=64m: ambiguous suffix m",
	} {
		k, val, _ := strings.Cut(params, "=")
		p := map[string]string{"zone.size": "1Mi", k: val}
		_, err := td.ctrl.CreateVolume(context.Background(), createReq("bad-"+k, 8*mib, p))
		if code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want InvalidArgument with %q", params, err, want)
		}
	}
}

// Issue 14: 1 EiB was InvalidArgument blaming zone.size, 8 EiB−1 was
// OutOfRange. One rule now: above the largest volume of the geometry is
// OUT_OF_RANGE naming the size and the limit (CSI spec, CreateVolume:
// unsupported capacity); a size the node has no room for is
// RESOURCE_EXHAUSTED.
func TestCapacityLimitOneRule(t *testing.T) {
	td := newTestDriver(t, "")
	ctx := context.Background()
	const ei = int64(1) << 60
	for _, tc := range []struct {
		name     string
		params   map[string]string
		size     int64
		code     codes.Code
		contains []string
	}{
		{"1 EiB", nil, ei, codes.OutOfRange, []string{"required_bytes=1152921504606846976 (1E)", "largest volume of this StorageClass, 281474976710656 (256T)", "1048576 zones", "zone.size=256M"}},
		{"8 EiB-1", nil, math.MaxInt64, codes.OutOfRange, []string{"required_bytes=9223372036854775807 bytes is above", "(256T)"}},
		{"above the zones of 1M", map[string]string{"zone.size": "1M"}, 2 << 40, codes.OutOfRange, []string{"(1T)", "zone.size=1M"}},
		{"above the L1 of 512-byte clusters", map[string]string{"zone.size": "1M", "clusterSize": "512"}, 200 << 30, codes.OutOfRange, []string{"(128G)", "clusterSize=512"}},
		{"largest, but no room", map[string]string{"zone.size": "1M"}, 1 << 40, codes.ResourceExhausted, []string{"does not fit on node n1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := td.ctrl.CreateVolume(ctx, createReq("big-"+strings.ReplaceAll(tc.name, " ", "-"), tc.size, tc.params))
			if code(err) != tc.code {
				t.Fatalf("code %v (%v), want %v", code(err), err, tc.code)
			}
			for _, c := range tc.contains {
				if !strings.Contains(err.Error(), c) {
					t.Errorf("%q does not contain %q", err, c)
				}
			}
		})
	}
	// GetCapacity's maximum volume size is bounded by the same rule.
	resp, err := td.ctrl.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: map[string]string{"zone.size": "1M", "clusterSize": "512"}})
	if err != nil {
		t.Fatal(err)
	}
	if m := resp.GetMaximumVolumeSize().GetValue(); m > 128<<30 {
		t.Errorf("GetCapacity maximum_volume_size=%d, above the largest volume (128G)", m)
	}
	// Expansion follows it too.
	v := mustCreate(t, td, "grow", 4*mib, map[string]string{"zone.size": "1M"})
	_, err = td.ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.GetVolumeId(),
		CapacityRange: &csi.CapacityRange{RequiredBytes: ei}})
	if code(err) != codes.OutOfRange || !strings.Contains(err.Error(), "(1T)") {
		t.Errorf("expand to 1 EiB: %v, want OutOfRange naming 1T", err)
	}
}
