package imgcmd

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// runImg runs "zq-csi img ARGS..." in-process.
func runImg(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var o, e bytes.Buffer
	code = Main(args, Env{Stdin: strings.NewReader(""), Stdout: &o, Stderr: &e})
	return o.String(), e.String(), code
}

func TestHelp(t *testing.T) {
	for name := range commands {
		for _, flag := range []string{"--help", "-h"} {
			out, _, code := runImg(t, name, flag)
			if code != 0 || !strings.HasPrefix(out, "Usage: zq-csi img "+name) {
				t.Errorf("img %s %s: exit %d, output %q", name, flag, code, out)
			}
		}
	}
	if out, _, code := runImg(t, "--help"); code != 0 || !strings.Contains(out, "create") {
		t.Errorf("img --help: exit %d, %q", code, out)
	}
	if _, errOut, code := runImg(t, "frobnicate"); code != 1 || !strings.Contains(errOut, "frobnicate") {
		t.Errorf("unknown subcommand: exit %d, %q", code, errOut)
	}
}

// TestCreateRefusedLeavesNoFile: option errors are reported with the option
// and value, exit 1, and nothing is created.
func TestCreateRefusedLeavesNoFile(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"-o", "zone.mode=host-managed,zone.size=3M", "img.qcow2", "1G"}, "zone.size=3M"},
		{[]string{"img.qcow2", "-o", "size=768M", "-o", "zone.mode=host-managed", "-o", "zone.size=64M", "-o", "zone.capacity=128M"}, "zone.capacity=128M"},
		{[]string{"-o", "zone.mode=host-managed", "-o", "zone.max_append_bytes=1000", "img.qcow2", "1G"}, "zone.max_append_bytes=1000"},
		{[]string{"-o", "cluster_size=3k", "img.qcow2", "1G"}, "cluster_size=3k"},
		{[]string{"-o", "bogus=1", "img.qcow2", "1G"}, "bogus=1"},
		{[]string{"img.qcow2", "12Q"}, "size=12Q"},
		{[]string{"img.qcow2"}, "size"},
		{[]string{"-o", "size=1M", "img.qcow2", "2M"}, "specified only once"},
		{[]string{"-f", "vmdk", "img.qcow2", "1M"}, "Unknown file format 'vmdk'"},
		{[]string{"-f", "raw", "-o", "cluster_size=4k", "img.qcow2", "1M"}, "raw format takes only the size"},
		{[]string{"-b", "missing.qcow2", "img.qcow2"}, "missing.qcow2"},
		{[]string{"-u", "-b", "missing.qcow2", "img.qcow2"}, "needs a size"},
	}
	for _, tc := range tests {
		dir := t.TempDir()
		args := append([]string{"create"}, tc.args...)
		for i, a := range args {
			if a == "img.qcow2" || a == "missing.qcow2" {
				args[i] = filepath.Join(dir, a)
			}
		}
		_, errOut, code := runImg(t, args...)
		if code != 1 || !strings.Contains(errOut, tc.want) {
			t.Errorf("img %q: exit %d, stderr %q; want exit 1 mentioning %q", args, code, errOut, tc.want)
		}
		if ents, _ := os.ReadDir(dir); len(ents) != 0 {
			t.Errorf("img %q left %s behind", args, ents[0].Name())
		}
	}
}

func TestCreateOptionsHelp(t *testing.T) {
	out, _, code := runImg(t, "create", "-o", "help")
	if code != 0 || !strings.Contains(out, "zone.max_append_bytes") {
		t.Errorf("create -o help: exit %d, %q", code, out)
	}
	// The raw format lists only what it accepts (issue 13, from 14): the
	// size, as qemu-img create -f raw -o help does.
	for _, args := range [][]string{
		{"create", "-f", "raw", "-o", "help"},
		{"create", "-o", "help", "-f", "raw"},
		{"convert", "-O", "raw", "-o", "help"},
	} {
		out, _, code := runImg(t, args...)
		if code != 0 || out != rawOptionsHelp || strings.Contains(out, "cluster_size") || strings.Contains(out, "zone.") {
			t.Errorf("%q: exit %d, %q", args, code, out)
		}
		for _, l := range strings.Split(strings.TrimSpace(out), "\n")[1:] {
			name, _, _ := strings.Cut(strings.TrimSpace(l), "=")
			o := name + "=1M"
			if name != "size" {
				o = name + "=x"
			}
			if _, _, c := runImg(t, "create", "-f", "raw", "-o", o, filepath.Join(t.TempDir(), "r.raw")); c != 0 {
				t.Errorf("%q lists %s, which create -f raw refuses", args, name)
			}
		}
	}
	if out, _, _ := runImg(t, "convert", "-O", "qcow2", "-o", "help"); !strings.Contains(out, "zone.size") {
		t.Errorf("convert -O qcow2 -o help: %q", out)
	}
}

// TestRawImage exercises the format-independent plumbing on a raw file.
func TestRawImage(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.raw")
	out, errOut, code := runImg(t, "create", "-f", "raw", img, "1M")
	if code != 0 || out != "Formatting '"+img+"', fmt=raw size=1048576\n" {
		t.Fatalf("create raw: exit %d, %q %q", code, out, errOut)
	}

	out, errOut, code = runImg(t, "io", "-c", "write -P 0xab 4096 8k", "-c", "read -P 0xab 4096 8k",
		"-c", "write -z 4096 512", "-c", "discard 8192 4096", "-c", "flush", "-c", "read -P 0 8192 4096", img)
	if code != 0 {
		t.Fatalf("io: exit %d\n%s%s", code, out, errOut)
	}
	for _, want := range []string{
		"wrote 8192/8192 bytes at offset 4096\n8 KiB, 1 ops; ",
		"read 8192/8192 bytes at offset 4096\n",
		"wrote 512/512 bytes at offset 4096\n512 bytes, 1 ops; ",
		"discard 4096/4096 bytes at offset 8192\n4 KiB, 1 ops; ",
		"read 4096/4096 bytes at offset 8192\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("io output lacks %q:\n%s", want, out)
		}
	}
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if b[4095] != 0 || b[4096] != 0 || b[4607] != 0 || b[4608] != 0xab || b[8191] != 0xab || b[8192] != 0 {
		t.Errorf("raw content wrong around the writes")
	}

	// A failing command makes the exit status 1 but later commands run.
	out, _, code = runImg(t, "io", "-c", "read -P 0x12 4096 512", "-c", "write 2M 512", "-c", "read 0 1x", "-c", "length", img)
	if code != 1 {
		t.Errorf("failed pattern check: exit %d, want 1", code)
	}
	for _, want := range []string{
		"Pattern verification failed at offset 4096, 512 bytes\nread 512/512 bytes at offset 4096\n",
		"write failed: Input/output error\n",
		"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1x\n",
		"1 MiB\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("io output lacks %q:\n%s", want, out)
		}
	}
	if _, errOut, code := runImg(t, "io", "-c", "frob", img); code != 1 || !strings.Contains(errOut, `command "frob" not found`) {
		t.Errorf("unknown io command: exit %d, %q", code, errOut)
	}
	if _, errOut, code := runImg(t, "io", "-r", "-c", "write 0 512", img); code != 1 || !strings.Contains(errOut, "read-only") {
		t.Errorf("write on -r: exit %d, %q", code, errOut)
	}
	var stdin bytes.Buffer
	stdin.WriteString("read -P 0xab 4608 512\nquit\nwrite 0 512\n")
	var o, e bytes.Buffer
	if code := Main([]string{"io", img}, Env{Stdin: &stdin, Stdout: &o, Stderr: &e}); code != 0 || strings.Contains(o.String(), "wrote") {
		t.Errorf("io from stdin: exit %d, %q %q", code, o.String(), e.String())
	}

	out, _, code = runImg(t, "info", "--output=json", img)
	var info map[string]any
	if err := json.Unmarshal([]byte(out), &info); code != 0 || err != nil {
		t.Fatalf("info json: exit %d, %v\n%s", code, err, out)
	}
	if info["format"] != "raw" || info["virtual-size"] != float64(1<<20) {
		t.Errorf("info json: %v", info)
	}
	out, _, _ = runImg(t, "info", img)
	if !strings.Contains(out, "file format: raw\nvirtual size: 1 MiB (1048576 bytes)\n") {
		t.Errorf("info: %q", out)
	}

	out, _, code = runImg(t, "map", "--output=json", img)
	if code != 0 || !strings.HasPrefix(out, `[{ "start": 0, `) || !strings.HasSuffix(out, "}]\n") {
		t.Errorf("map json: exit %d, %q", code, out)
	}

	dst := filepath.Join(dir, "copy.raw")
	if _, errOut, code := runImg(t, "convert", "-f", "raw", img, dst); code != 0 {
		t.Fatalf("convert: exit %d %s", code, errOut)
	}
	c, _ := os.ReadFile(dst)
	if !bytes.Equal(b, c) {
		t.Error("convert raw -> raw changed the data")
	}

	if out, errOut, code := runImg(t, "resize", img, "+1M"); code != 0 || out != "Image resized.\n" {
		t.Errorf("resize +1M: exit %d, %q %q", code, out, errOut)
	}
	if _, errOut, code := runImg(t, "resize", img, "-1M"); code != 1 || !strings.Contains(errOut, "--shrink") {
		t.Errorf("resize -1M without --shrink: exit %d, %q", code, errOut)
	}
	if _, _, code := runImg(t, "resize", "--shrink", img, "-1M"); code != 0 {
		t.Errorf("resize --shrink -1M: exit %d", code)
	}
	if fi, _ := os.Stat(img); fi.Size() != 1<<20 {
		t.Errorf("size after resizes: %d", fi.Size())
	}
	if _, errOut, code := runImg(t, "check", img); code != 63 || !strings.Contains(errOut, "does not support checks") {
		t.Errorf("check raw: exit %d, %q", code, errOut)
	}
}

// TestCreateTwoSpellings: two spellings of one option with different
// values are refused naming both, and nothing is created (issue 13, from 14).
func TestCreateTwoSpellings(t *testing.T) {
	img := filepath.Join(t.TempDir(), "z.qcow2")
	_, errOut, code := runImg(t, "create", "-f", "qcow2", "-o", "zone.mode=host-managed,zone.max_open_zones=4,zone.max-open-zones=6", img, "1G")
	if code != 1 || !strings.Contains(errOut, "zone.max_open_zones=4") || !strings.Contains(errOut, "zone.max-open-zones=6") {
		t.Errorf("exit %d, %q", code, errOut)
	}
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Errorf("the refused create left %s: %v", img, err)
	}
}
