package imgcmd

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

func TestSizeToStr(t *testing.T) {
	// Expected strings are what qemu-img 7.2 prints for these sizes.
	tests := []struct {
		in   uint64
		want string
	}{
		{0, "0 B"},
		{512, "512 B"},
		{999, "999 B"},
		{1000, "0.977 KiB"},
		{1536, "1.5 KiB"},
		{4096, "4 KiB"},
		{396 << 10, "396 KiB"},
		{768 << 20, "768 MiB"},
		{1 << 30, "1 GiB"},
		{1610612736, "1.5 GiB"},
		{1 << 60, "1 EiB"},
	}
	for _, tc := range tests {
		if got := sizeToStr(tc.in); got != tc.want {
			t.Errorf("sizeToStr(%d) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestCvtstr(t *testing.T) {
	tests := []struct {
		in   float64
		want string
	}{
		{0, "0 bytes"},
		{100, "100 bytes"},
		{512, "512 bytes"},
		{1024, "1 KiB"},
		{1536, "1.500 KiB"},
		{65536, "64 KiB"},
		{30.28 * (1 << 20), "30.280 MiB"},
		{1 << 30, "1 GiB"},
	}
	for _, tc := range tests {
		if got := cvtstr(tc.in); got != tc.want {
			t.Errorf("cvtstr(%v) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestTimestr(t *testing.T) {
	tests := []struct {
		in   time.Duration
		want string
	}{
		{0, "00.00 sec"},
		{1234 * time.Microsecond, "00.00 sec"},
		{250 * time.Millisecond, "00.25 sec"},
		{1500 * time.Millisecond, "0:00:01.50"},
		{3725250 * time.Millisecond, "1:02:05.25"},
	}
	for _, tc := range tests {
		if got := timestr(tc.in); got != tc.want {
			t.Errorf("timestr(%v) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestIOReport(t *testing.T) {
	got := ioReport("wrote", 2*time.Millisecond, 0, 65536, 65536, 1)
	want := "wrote 65536/65536 bytes at offset 0\n64 KiB, 1 ops; 00.00 sec (31.250 MiB/sec and 500.0000 ops/sec)\n"
	if got != want {
		t.Errorf("ioReport:\n got %q\nwant %q", got, want)
	}
}

func TestHexDump(t *testing.T) {
	// qemu-io "read -v 0 20" on data "Hello, qemu!\0..." prints this.
	b := append([]byte("Hello, qemu!"), make([]byte, 8)...)
	want := "00000010:  48 65 6c 6c 6f 2c 20 71 65 6d 75 21 00 00 00 00  Hello..qemu.....\n" +
		"00000020:  00 00 00 00  ....\n"
	if got := hexDump(b, 16); got != want {
		t.Errorf("hexDump:\n got %q\nwant %q", got, want)
	}
}

func TestPathCombine(t *testing.T) {
	tests := []struct{ base, name, want string }{
		{"b.qcow2", "a.qcow2", "a.qcow2"},
		{"/tmp/x/b.qcow2", "a.qcow2", "/tmp/x/a.qcow2"},
		{"dir/b.qcow2", "../a.qcow2", "dir/../a.qcow2"},
		{"dir/b.qcow2", "/abs/a.qcow2", "/abs/a.qcow2"},
	}
	for _, tc := range tests {
		if got := pathCombine(tc.base, tc.name); got != tc.want {
			t.Errorf("pathCombine(%q, %q) = %q, want %q", tc.base, tc.name, got, tc.want)
		}
	}
}

func TestGetopt(t *testing.T) {
	spec := optSpec{short: "f:o:qu", long: map[string]bool{"output": true, "shrink": false}}
	tests := []struct {
		args    []string
		opts    []opt
		pos     []string
		wantErr string
	}{
		{
			args: []string{"-f", "qcow2", "zbc.qcow2", "-o", "size=768M", "-ozone.size=64M", "--output=json", "--output", "human", "1G"},
			opts: []opt{{"f", "qcow2"}, {"o", "size=768M"}, {"o", "zone.size=64M"}, {"output", "json"}, {"output", "human"}},
			pos:  []string{"zbc.qcow2", "1G"},
		},
		{args: []string{"-qu", "-fraw", "x"}, opts: []opt{{"q", ""}, {"u", ""}, {"f", "raw"}}, pos: []string{"x"}},
		{args: []string{"-q", "--", "-f", "x"}, opts: []opt{{"q", ""}}, pos: []string{"-f", "x"}},
		{args: []string{"-", "--shrink"}, opts: []opt{{"shrink", ""}}, pos: []string{"-"}},
		{args: []string{"-x"}, wantErr: "invalid option -- 'x'"},
		{args: []string{"-f"}, wantErr: "option requires an argument -- 'f'"},
		{args: []string{"--output"}, wantErr: "option '--output' requires an argument"},
		{args: []string{"--shrink=yes"}, wantErr: "option '--shrink' doesn't allow an argument"},
		{args: []string{"--bogus"}, wantErr: "unrecognized option '--bogus'"},
	}
	for _, tc := range tests {
		opts, pos, err := getopt(tc.args, spec)
		if tc.wantErr != "" {
			if err == nil || err.Error() != tc.wantErr {
				t.Errorf("getopt(%q) error %v, want %q", tc.args, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("getopt(%q): %v", tc.args, err)
			continue
		}
		if !reflect.DeepEqual(opts, tc.opts) || !reflect.DeepEqual(pos, tc.pos) {
			t.Errorf("getopt(%q) = %v, %q; want %v, %q", tc.args, opts, pos, tc.opts, tc.pos)
		}
	}
}

func TestWriteMap(t *testing.T) {
	exts := []qcow2.Extent{
		{Start: 0, Length: 65536, Present: true, Data: true, Offset: 327680, HasOffset: true, File: "b.qcow2"},
		// Contiguous on the host: merged with the previous one.
		{Start: 65536, Length: 65536, Present: true, Data: true, Offset: 393216, HasOffset: true, File: "b.qcow2"},
		{Start: 131072, Length: 65536, Depth: 1, Zero: true},
		{Start: 196608, Length: 65536, Depth: 1, Present: true, Zero: true},
		{Start: 262144, Length: 65536, Depth: 1, Present: true, Data: true, Offset: 65536, HasOffset: true, File: "a.qcow2"},
		{Start: 327680, Length: 1 << 20, Depth: 1, Zero: true},
	}
	var sb strings.Builder
	if err := writeMap(&sb, "json", exts); err != nil {
		t.Fatal(err)
	}
	want := `[{ "start": 0, "length": 131072, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},
{ "start": 131072, "length": 65536, "depth": 1, "present": false, "zero": true, "data": false},
{ "start": 196608, "length": 65536, "depth": 1, "present": true, "zero": true, "data": false},
{ "start": 262144, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true, "offset": 65536},
{ "start": 327680, "length": 1048576, "depth": 1, "present": false, "zero": true, "data": false}]
`
	if sb.String() != want {
		t.Errorf("json map:\n got %s\nwant %s", sb.String(), want)
	}
	sb.Reset()
	if err := writeMap(&sb, "human", exts); err != nil {
		t.Fatal(err)
	}
	want = "Offset          Length          Mapped to       File\n" +
		"0               0x20000         0x50000         b.qcow2\n" +
		"0x40000         0x10000         0x10000         a.qcow2\n"
	if sb.String() != want {
		t.Errorf("human map:\n got %s\nwant %s", sb.String(), want)
	}
	compressed := []qcow2.Extent{{Start: 0, Length: 65536, Present: true, Data: true, Compressed: true}}
	if err := writeMap(&sb, "human", compressed); err == nil {
		t.Error("human map of compressed clusters: want qemu-img's error")
	}
}

func TestFormattingLine(t *testing.T) {
	co, err := qcow2.ParseCreateOptions([]string{"size=768M", "zone.size=64M", "zone.capacity=64M",
		"zone.conventional_zones=0", "zone.max_append_bytes=4096", "zone.max_open_zones=6",
		"zone.max_active_zones=8", "zone.mode=host-managed"}, "")
	if err != nil {
		t.Fatal(err)
	}
	want := "Formatting 'zbc.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib " +
		"zone.mode=host-managed zone.size=67108864 zone.capacity=67108864 zone.conventional_zones=0 " +
		"zone.max_append_bytes=4096 zone.max_active_zones=8 zone.max_open_zones=6 size=805306368 " +
		"lazy_refcounts=off refcount_bits=16"
	if got := formattingLine("zbc.qcow2", co); got != want {
		t.Errorf("formattingLine:\n got %s\nwant %s", got, want)
	}
}
