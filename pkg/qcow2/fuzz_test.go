package qcow2

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// FuzzOpen feeds arbitrary bytes to the image parser and, when they open,
// through reads, map and check. Nothing may panic or hang; errors are fine.
// Seeds: images made by qemu-img (testdata/) and a zoned image of ours.
func FuzzOpen(f *testing.F) {
	seeds, _ := filepath.Glob("testdata/*.qcow2")
	for _, s := range seeds {
		b, err := os.ReadFile(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	zp := filepath.Join(f.TempDir(), "z.qcow2")
	o := seedOptions()
	o.Size, o.ClusterSize = 1<<20, 4096
	o.Zoned.ZoneSize, o.Zoned.ZoneCapacity = u64(64<<10), u64(32<<10)
	o.Zoned.ConventionalZones = u32(2)
	if _, err := Create(zp, o); err != nil {
		f.Fatal(err)
	}
	zb, _ := os.ReadFile(zp)
	f.Add(zb)

	syncFile = func(interface{ Sync() error }) error { return nil }
	f.Cleanup(func() { syncFile = func(f interface{ Sync() error }) error { return f.Sync() } })
	f.Fuzz(fuzzOpenOne)
}

// fuzzOpenOne is the body of FuzzOpen.
func fuzzOpenOne(t *testing.T, data []byte) {
	if len(data) > 4<<20 {
		return
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "f.qcow2")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	// Probing agrees with the parser: what it calls qcow2 has the magic
	// (Open then succeeds or says why), what it calls raw never opens as
	// qcow2, and a refusal is a FormatError at offset 0.
	isQ, perr := Probe(data[:min(len(data), ProbeLen)])
	var fe *FormatError
	if perr != nil && (isQ || !errors.As(perr, &fe) || fe.Offset != 0) {
		t.Fatalf("Probe = %v, %v: want a FormatError at offset 0 alone", isQ, perr)
	}
	im, err := Open(p, OpenOptions{ReadOnly: true, NoBacking: true})
	if !isQ && err == nil {
		im.Close()
		t.Fatalf("Probe says not qcow2 (%v), but Open opened it", perr)
	}
	if err != nil {
		return
	}
	n := min(im.Size(), 4<<20)
	buf := make([]byte, n)
	im.ReadAt(buf, 0)
	im.Map(0, n)
	im.WritePointers()
	im.Close()
	Check(p, CheckOptions{})
	// A writable open may repair (dirty bit) and then take writes, which
	// may fail on a damaged image but must never destroy the header.
	im, err = Open(p, OpenOptions{NoBacking: true})
	if err != nil {
		return
	}
	if sz := im.Size(); sz >= 4096 {
		w := bytes.Repeat([]byte{0xa5}, 4096)
		im.WriteAt(w, 0)
		im.Discard(0, 4096)
		im.WriteAt(w, int64(sz/2)&^4095)
		im.WriteAt(w[:512], int64(sz-512))
		im.WriteZeroes(int64(sz/4)&^511, 4096, false)
	}
	im.Close()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var m [4]byte
	if _, err := f.ReadAt(m[:], 0); err != nil || string(m[:]) != "QFI\xfb" {
		t.Fatalf("the image lost its magic after writes: % x %v", m, err)
	}
}
