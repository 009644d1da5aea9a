package interop

import (
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// seedCreate is the command line of the seed patch, verbatim.
var seedCreate = []string{"create", "-f", "qcow2", "zbc.qcow2",
	"-o", "size=768M", "-o", "zone.size=64M", "-o", "zone.capacity=64M",
	"-o", "zone.conventional_zones=0", "-o", "zone.max_append_bytes=4096",
	"-o", "zone.max_open_zones=6", "-o", "zone.max_active_zones=8",
	"-o", "zone.mode=host-managed"}

const (
	zonedExtMagic  = 0x007a6264
	incompatZoned  = 1 << 5
	seedZoneSize   = 64 << 20
	seedNrZones    = 12
	seedImageBytes = 768 << 20
)

// zonedHeader is the seed's 56-byte extension, decoded independently of
// pkg/qcow2 (specs/zoned-format.md §1, layout A).
type zonedHeader struct {
	zoned                             byte
	zoneSize, zoneCap                 uint64
	conv, nrZones, maxActive, maxOpen uint32
	maxAppend                         uint32
	metaSize, metaOffset              uint64
	incompat                          uint64
	clusterSize                       uint64
}

func readZonedHeader(t *testing.T, path string) zonedHeader {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) < 104 || string(b[:4]) != "QFI\xfb" {
		t.Fatalf("%s is not a qcow2 image", path)
	}
	be := binary.BigEndian
	var z zonedHeader
	z.incompat = be.Uint64(b[72:80])
	z.clusterSize = 1 << be.Uint32(b[20:24])
	hdrLen := uint64(be.Uint32(b[100:104]))
	for off := hdrLen; off+8 <= z.clusterSize && off+8 <= uint64(len(b)); {
		magic, n := be.Uint32(b[off:]), uint64(be.Uint32(b[off+4:]))
		if magic == 0 {
			break
		}
		if magic == zonedExtMagic {
			if n != 56 {
				t.Fatalf("zoned extension length %d, want 56 (layout A)", n)
			}
			e := b[off+8 : off+8+56]
			z.zoned = e[0]
			z.zoneSize, z.zoneCap = be.Uint64(e[4:]), be.Uint64(e[12:])
			z.conv, z.nrZones = be.Uint32(e[20:]), be.Uint32(e[24:])
			z.maxActive, z.maxOpen, z.maxAppend = be.Uint32(e[28:]), be.Uint32(e[32:]), be.Uint32(e[36:])
			z.metaSize, z.metaOffset = be.Uint64(e[40:]), be.Uint64(e[48:])
			return z
		}
		off += 8 + (n+7)/8*8
	}
	t.Fatalf("%s has no zoned header extension", path)
	return z
}

// TestZonedImage creates the seed's image and checks it against qemu-img:
// qemu-img must refuse it by the feature's name, and with the feature bit
// cleared it must see a consistent image whose only "leaks" are the
// write-pointer table clusters qemu-img knows nothing about.
func TestZonedImage(t *testing.T) {
	peer(t, "qemu-img")
	dir := t.TempDir()
	r := mustZq(t, dir, seedCreate...)
	if !strings.HasPrefix(r.stdout, "Formatting 'zbc.qcow2', fmt=qcow2 ") || !strings.Contains(r.stdout, " size=805306368") {
		t.Errorf("unexpected create output: %q", r.stdout)
	}
	img := filepath.Join(dir, "zbc.qcow2")

	z := readZonedHeader(t, img)
	if z.incompat&incompatZoned == 0 {
		t.Errorf("incompatible feature bit 5 not set (%#x)", z.incompat)
	}
	want := zonedHeader{zoned: 1, zoneSize: seedZoneSize, zoneCap: seedZoneSize, conv: 0, nrZones: seedNrZones,
		maxActive: 8, maxOpen: 6, maxAppend: 4096, metaSize: 8 * seedNrZones,
		metaOffset: z.metaOffset, incompat: z.incompat, clusterSize: 65536}
	if z != want {
		t.Errorf("zoned extension\n got %+v\nwant %+v", z, want)
	}
	if z.metaOffset == 0 || z.metaOffset%z.clusterSize != 0 {
		t.Errorf("write-pointer table offset %d is not cluster aligned", z.metaOffset)
	}
	// Every write pointer starts at its zone's start (little-endian entries
	// in layout A; no conventional zones here).
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	for i := uint64(0); i < seedNrZones && z.metaOffset+8*i+8 <= uint64(len(b)); i++ {
		if wp := binary.LittleEndian.Uint64(b[z.metaOffset+8*i:]); wp != i*seedZoneSize {
			t.Errorf("zone %d write pointer %#x, want %#x", i, wp, i*seedZoneSize)
		}
	}

	// img info reports the same configuration.
	var info struct {
		VirtualSize uint64 `json:"virtual-size"`
		Zoned       *struct {
			Mode              string `json:"mode"`
			ZoneSize          uint64 `json:"zone-size"`
			ZoneCapacity      uint64 `json:"zone-capacity"`
			NrZones           uint32 `json:"nr-zones"`
			ConventionalZones uint32 `json:"conventional-zones"`
			MaxOpenZones      uint32 `json:"max-open-zones"`
			MaxActiveZones    uint32 `json:"max-active-zones"`
			MaxAppendBytes    uint32 `json:"max-append-bytes"`
			WPTableOffset     uint64 `json:"wp-table-offset"`
		} `json:"zoned"`
	}
	ij := mustZq(t, dir, "info", "--output=json", "zbc.qcow2")
	if err := json.Unmarshal([]byte(ij.stdout), &info); err != nil {
		t.Fatalf("img info --output=json: %v\n%s", err, ij.stdout)
	}
	if info.VirtualSize != seedImageBytes || info.Zoned == nil {
		t.Fatalf("img info: virtual size %d, zoned %v\n%s", info.VirtualSize, info.Zoned, ij.stdout)
	}
	zi := *info.Zoned
	if zi.Mode != "host-managed" || zi.ZoneSize != seedZoneSize || zi.ZoneCapacity != seedZoneSize ||
		zi.NrZones != seedNrZones || zi.ConventionalZones != 0 || zi.MaxOpenZones != 6 ||
		zi.MaxActiveZones != 8 || zi.MaxAppendBytes != 4096 || zi.WPTableOffset != z.metaOffset {
		t.Errorf("img info zoned object %+v does not match the header %+v", zi, z)
	}
	hi := mustZq(t, dir, "info", "zbc.qcow2").stdout
	for _, s := range []string{"virtual size: 768 MiB (805306368 bytes)", "zoned:", "mode: host-managed", "nr zones: 12"} {
		if !strings.Contains(hi, s) {
			t.Errorf("img info lacks %q:\n%s", s, hi)
		}
	}

	// qemu-img (no zoned support) refuses the image by the feature's name.
	r = run(t, dir, "qemu-img", "info", "zbc.qcow2")
	if r.code == 0 || !strings.Contains(r.stdout+r.stderr, "Unsupported qcow2 feature(s): zoned format") {
		t.Errorf("qemu-img info on the zoned image: want failure naming \"zoned format\", got %v", r)
	}

	if r := zq(t, dir, "check", "zbc.qcow2"); r.code != 0 || !strings.Contains(r.stdout, "No errors were found on the image.") {
		t.Errorf("zq-csi img check on the zoned image: %v", r)
	}

	checkUnzonedCopy(t, dir, "zbc.qcow2")
}

// checkUnzonedCopy copies a zoned image with incompatible feature bit 5
// cleared, so that qemu-img opens it. The WP table is refcounted but
// unknown to qemu: "qemu-img check" must find exactly its clusters leaked,
// and nothing else wrong.
func checkUnzonedCopy(t *testing.T, dir, name string) {
	t.Helper()
	z := readZonedHeader(t, filepath.Join(dir, name))
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	plain := filepath.Join(dir, "plain.qcow2")
	b[79] &^= incompatZoned // incompatible_features is a big-endian u64 at 72..79
	if err := os.WriteFile(plain, b, 0o644); err != nil {
		t.Fatal(err)
	}
	wpClusters := (8*uint64(z.nrZones) + z.clusterSize - 1) / z.clusterSize
	r := run(t, dir, "qemu-img", "check", "--output=json", "plain.qcow2")
	var check map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &check); err != nil {
		t.Fatalf("qemu-img check --output=json: %v\n%v", err, r)
	}
	if r.code != 3 || check["leaks"] != float64(wpClusters) || check["corruptions"] != nil || check["check-errors"] != float64(0) {
		t.Errorf("qemu-img check of the unzoned copy: want exit 3 and exactly %d leaks, no corruptions: %v", wpClusters, r)
	}
	r = run(t, dir, "qemu-img", "check", "plain.qcow2")
	var leaked []uint64
	for _, m := range regexp.MustCompile(`Leaked cluster (\d+) refcount=1 reference=0`).FindAllStringSubmatch(r.stderr, -1) {
		n, _ := strconv.ParseUint(m[1], 10, 64)
		leaked = append(leaked, n)
	}
	sort.Slice(leaked, func(i, j int) bool { return leaked[i] < leaked[j] })
	var wantLeaked []uint64
	for i := uint64(0); i < wpClusters; i++ {
		wantLeaked = append(wantLeaked, z.metaOffset/z.clusterSize+i)
	}
	if !equalU64(leaked, wantLeaked) {
		t.Errorf("qemu-img lists leaked clusters %v, want the write-pointer table clusters %v\n%v", leaked, wantLeaked, r)
	}
}

func equalU64(a, b []uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestZonedCreateRejectsBadOptions: refused zone options exit 1 with a
// message naming the option and its value, and leave no file behind.
func TestZonedCreateRejectsBadOptions(t *testing.T) {
	base := []string{"create", "-f", "qcow2", "zbc.qcow2", "-o", "size=768M", "-o", "zone.mode=host-managed"}
	cases := []struct {
		opt, name, value string
	}{
		{"zone.size=64M,zone.capacity=128M", "zone.capacity", "128M"},
		{"zone.size=3M", "zone.size", "3M"},
		{"zone.max_append_bytes=1000", "zone.max_append_bytes", "1000"},
		{"zone.size=64M,zone.conventional_zones=12", "zone.conventional_zones", "12"},
		{"zone.capacity=0", "zone.capacity", "0"},
		{"zone.size=64M,zone.max-append-bytes=64M", "zone.max_append_bytes", "64M"},
	}
	for _, tc := range cases {
		t.Run(tc.opt, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			r := zq(t, dir, append(base, "-o", tc.opt)...)
			if r.code != 1 {
				t.Errorf("exit %d, want 1: %v", r.code, r)
			}
			if !strings.Contains(r.stderr, tc.name) || !strings.Contains(r.stderr, tc.value) {
				t.Errorf("message does not name %s=%s: %q", tc.name, tc.value, r.stderr)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Errorf("a refused create left %v behind", ents[0].Name())
			}
		})
	}
	t.Run("zone option without zone.mode", func(t *testing.T) {
		dir := t.TempDir()
		r := zq(t, dir, "create", "-f", "qcow2", "img.qcow2", "1G", "-o", "zone.size=64M")
		if r.code != 1 || !strings.Contains(r.stderr, "zone.size=64M") {
			t.Errorf("want exit 1 naming zone.size=64M: %v", r)
		}
		if ents, _ := os.ReadDir(dir); len(ents) != 0 {
			t.Errorf("a refused create left %v behind", ents[0].Name())
		}
	})
}
