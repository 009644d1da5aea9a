package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func mkImage(t *testing.T, o CreateOptions) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "h.qcow2")
	if _, err := Create(p, o); err != nil {
		t.Fatal(err)
	}
	return p
}

func patch(t *testing.T, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func be64(v uint64) []byte { b := make([]byte, 8); binary.BigEndian.PutUint64(b, v); return b }

func TestFeatureBits(t *testing.T) {
	// Unknown incompatible bit, named through the feature-name table.
	p := mkImage(t, CreateOptions{Size: 1 << 20})
	im, _ := Open(p, OpenOptions{})
	im.h.featureNames = append(im.h.featureNames, featureName{0, 9, "frobnication"})
	im.h.incompatible |= 1 << 9
	if err := im.writeHeader(); err != nil {
		t.Fatal(err)
	}
	im.Close()
	_, err := Open(p, OpenOptions{ReadOnly: true})
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "frobnication") {
		t.Fatalf("unknown incompatible bit: %v", err)
	}

	// Corrupt bit: read-only open works, read-write is refused.
	p = mkImage(t, CreateOptions{Size: 1 << 20})
	patch(t, p, offIncompatible, be64(incCorrupt))
	if _, err := Open(p, OpenOptions{}); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("corrupt bit, read-write: %v", err)
	}
	im, err = Open(p, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("corrupt bit, read-only: %v", err)
	}
	im.Close()

	// header_length > 112: extra header bytes are kept.
	p = mkImage(t, CreateOptions{Size: 1 << 20})
	im, _ = Open(p, OpenOptions{})
	im.h.headerLength = 128
	im.h.tail = append(make([]byte, 7), bytes.Repeat([]byte{0xab}, 16)...)
	im.writeHeader()
	im.Close()
	im, err = Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if im.h.headerLength != 128 || !bytes.Equal(im.h.tail[7:], bytes.Repeat([]byte{0xab}, 16)) {
		t.Fatalf("header tail lost: len %d", im.h.headerLength)
	}
	im.WriteAt(make([]byte, 512), 0)
	im.Close()
	if res, err := Check(p, CheckOptions{}); err != nil || res.ExitCode() != 0 {
		t.Fatalf("check: %+v %v", res, err)
	}
}

func TestExternalDataFileRefused(t *testing.T) {
	qimg := needTool(t, "qemu-img", "qemu-utils")
	dir := t.TempDir()
	p := filepath.Join(dir, "ext.qcow2")
	run(t, qimg, "create", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "ext.data"), p, "1M")
	_, err := Open(p, OpenOptions{ReadOnly: true})
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "external data file") {
		t.Fatalf("want a clear refusal of the external data file, got %v", err)
	}
}

// TestLazyRefcountsDirtyRepaired: qemu killed with lazy refcounts leaves the
// dirty bit and stale refcounts; we read it as is, and a read-write open
// repairs it so that qemu-img check is clean.
func TestLazyRefcountsDirtyRepaired(t *testing.T) {
	qimg := needTool(t, "qemu-img", "qemu-utils")
	qio := needTool(t, "qemu-io", "qemu-utils")
	p := filepath.Join(t.TempDir(), "lazy.qcow2")
	run(t, qimg, "create", "-f", "qcow2", "-o", "lazy_refcounts=on", p, "8M")
	exec.Command(qio, "-f", "qcow2", "-c", "write -P 0x42 0 1M", "-c", "write -P 0x43 3M 512k", "-c", "sigraise 9", p).Run()
	im, err := Open(p, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if !im.Info().Dirty {
		t.Fatal("qemu-io killed with lazy refcounts should leave the dirty bit set")
	}
	im.Close()
	want := readAll(t, p)
	if want[0] != 0x42 || want[3<<20] != 0x43 {
		t.Fatal("data written before the kill is not visible")
	}
	im, err = Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if im.Info().Dirty {
		t.Fatal("dirty bit still set after a repairing open")
	}
	im.Close()
	run(t, qimg, "check", p)
	if !bytes.Equal(readAll(t, p), want) {
		t.Fatal("repair changed the data")
	}
}

func TestResizeGrow(t *testing.T) {
	var grown []string // checked by qemu-img at the end
	for _, cs := range []uint32{512, 65536} {
		p := mkImage(t, CreateOptions{Size: 1 << 20, ClusterSize: cs})
		im, _ := Open(p, OpenOptions{})
		im.WriteAt(bytes.Repeat([]byte{9}, 4096), 1<<20-4096)
		if err := im.Resize(64 << 20); err != nil {
			t.Fatal(err)
		}
		if _, err := im.WriteAt(bytes.Repeat([]byte{7}, 4096), 60<<20); err != nil {
			t.Fatal(err)
		}
		if err := im.Resize(1 << 10); !errors.Is(err, ErrUnsupported) {
			t.Fatalf("shrink: %v", err)
		}
		im.Close()
		got := readAll(t, p)
		if len(got) != 64<<20 || got[1<<20-1] != 9 || got[60<<20] != 7 || got[2<<20] != 0 {
			t.Fatalf("cs %d: contents after resize wrong", cs)
		}
		if res, err := Check(p, CheckOptions{}); err != nil || res.ExitCode() != 0 {
			t.Fatalf("check: %+v %v", res, err)
		}
		grown = append(grown, p)
	}
	q := needTool(t, "qemu-img", "qemu-utils")
	for _, p := range grown {
		run(t, q, "check", p)
	}
}

// TestCheckFindsAndRepairsLeaks: a leaked cluster is reported with exit
// code 3 and repaired with RepairLeaks; a refcount that is too low is a
// corruption (exit 2).
func TestCheckFindsAndRepairsLeaks(t *testing.T) {
	p := mkImage(t, CreateOptions{Size: 1 << 20, ClusterSize: 4096})
	im, _ := Open(p, OpenOptions{})
	im.WriteAt(make([]byte, 8192), 0)
	im.meta.Lock()
	c, _ := im.allocClusters(2) // allocated, referenced by nothing
	im.meta.Unlock()
	im.f.WriteAt(make([]byte, 8192), int64(c<<im.clusterBits)) // inside the file, as qemu counts
	im.Close()
	res, err := Check(p, CheckOptions{})
	if err != nil || res.Leaks != 2 || res.ExitCode() != 3 {
		t.Fatalf("leak check: %+v %v", res, err)
	}
	// A copy with the leaks is checked by qemu-img at the end.
	leaky := filepath.Join(t.TempDir(), "leaky.qcow2")
	if b, err := os.ReadFile(p); err != nil || os.WriteFile(leaky, b, 0o644) != nil {
		t.Fatalf("copying the leaky image: %v", err)
	}
	res, err = Check(p, CheckOptions{RepairLeaks: true})
	if err != nil || res.LeaksFixed != 2 {
		t.Fatalf("repair: %+v %v", res, err)
	}
	if res, _ := Check(p, CheckOptions{}); res.ExitCode() != 0 {
		t.Fatalf("after repair: %+v", res)
	}
	// Refcount too low: clear the refcount of a data cluster.
	im, _ = Open(p, OpenOptions{})
	ents, _ := im.entriesFor(0, 0, 4096)
	im.meta.Lock()
	im.addRefcount(ents[0].offset()>>im.clusterBits, 1, -1)
	im.meta.Unlock()
	im.Close()
	res, _ = Check(p, CheckOptions{})
	if res.ExitCode() != 2 {
		t.Fatalf("refcount too low should be a corruption: %+v (cluster %d)", res, c)
	}
	if res, _ := Check(p, CheckOptions{RepairAll: true}); res.CorruptionsFixed == 0 {
		t.Fatalf("repair all: %+v", res)
	}
	if res, _ := Check(p, CheckOptions{}); res.ExitCode() != 0 {
		t.Fatalf("after repair all: %+v", res)
	}
	q := needTool(t, "qemu-img", "qemu-utils")
	out, err := exec.Command(q, "check", leaky).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 3 {
		t.Fatalf("qemu-img check on the leaky image: want exit 3 (leaks), got %v\n%s", err, out)
	}
	if !bytes.Contains(out, []byte("2 leaked clusters")) {
		t.Fatalf("qemu-img check should count the 2 leaked clusters:\n%s", out)
	}
}
