package qcow2

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestProbe: qcow2 by its magic, raw for what no qcow2 header looks like,
// and a refusal (not raw) for a qcow2 header under a damaged magic.
func TestProbe(t *testing.T) {
	path := filepath.Join(t.TempDir(), "p.qcow2")
	if _, err := Create(path, CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	head := img[:ProbeLen]
	with := func(off int, b ...byte) []byte {
		c := bytes.Clone(head)
		copy(c[off:], b)
		return c
	}
	patch := func(b []byte, off int, v ...byte) []byte {
		copy(b[off:], v)
		return b
	}
	mbr := make([]byte, 512)
	mbr[510], mbr[511] = 0x55, 0xaa
	tests := []struct {
		name    string
		b       []byte
		qcow2   bool
		refused string // a word of the refusal, "" if none
	}{
		{"qemu-img's header", head, true, ""},
		{"one magic byte off", with(3, 0xfa), false, "one byte off"},
		{"magic zeroed", with(0, 0, 0, 0, 0), false, "a qcow2 version 3 header follows"},
		{"magic overwritten by text", with(0, 'a', 'b', 'c', 'd'), false, "damaged qcow2 header"},
		{"zeros", make([]byte, ProbeLen), false, ""},
		{"text", []byte(strings.Repeat("hello, world\n", 10)), false, ""},
		{"an MBR", mbr, false, ""},
		{"two bytes", []byte("QF"), false, ""},
		{"empty", nil, false, ""},
		{"magic gone, version 7", patch(with(0, 0, 0, 0, 0), 4, 0, 0, 0, 7), false, ""},
		{"magic gone, cluster_bits 30", patch(with(0, 0, 0, 0, 0), offClusterBits, 0, 0, 0, 30), false, ""},
		{"magic gone, refcount table unaligned", patch(with(0, 0, 0, 0, 0), offRefcountOffset+7, 1), false, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			q, err := Probe(tc.b)
			if q != tc.qcow2 {
				t.Errorf("qcow2 = %v, want %v", q, tc.qcow2)
			}
			var fe *FormatError
			switch {
			case tc.refused == "" && err != nil:
				t.Errorf("refused: %v", err)
			case tc.refused != "" && (!errors.As(err, &fe) || fe.Offset != 0 || !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), tc.refused)):
				t.Errorf("error %v, want a FormatError at offset 0 saying %q", err, tc.refused)
			}
		})
	}
}
