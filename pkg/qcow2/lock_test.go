package qcow2

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestLock: who may open an image that someone has open (lock.go). The
// second open is a second open file description, so it conflicts even in
// one process, as two processes would; qemu's side of the same protocol is
// proven in test/interop (lock_test.go).
func TestLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l.qcow2")
	if _, err := Create(path, CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	rw := OpenOptions{}
	ro := OpenOptions{ReadOnly: true}
	share := OpenOptions{ReadOnly: true, ForceShare: true}
	tests := []struct {
		name        string
		first, then OpenOptions
		want        string // "" succeeds, else the LockError text's first line
	}{
		{"writer, writer", rw, rw, `Failed to get "write" lock`},
		{"writer, reader", rw, ro, `Failed to get shared "write" lock`},
		{"writer, shared reader", rw, share, ""},
		{"reader, writer", ro, rw, `Failed to get "write" lock`},
		{"reader, reader", ro, ro, ""},
		{"shared reader, writer", share, rw, ""},
		{"shared reader, reader", share, ro, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a, err := Open(path, tc.first)
			if err != nil {
				t.Fatal(err)
			}
			b, err := Open(path, tc.then)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("second open: %v", err)
				}
				b.Close()
			} else {
				var le *LockError
				if !errors.As(err, &le) || !errors.Is(err, ErrLocked) {
					t.Fatalf("second open: %v, want a *LockError wrapping ErrLocked", err)
				}
				if got := err.Error(); !bytes.HasPrefix([]byte(got), []byte(tc.want+"\nIs another process using the image ["+path+"]?")) {
					t.Errorf("error %q, want %q and qemu's hint", got, tc.want)
				}
			}
			if err := a.Close(); err != nil {
				t.Fatal(err)
			}
			// Close gives the lock back at once.
			c, err := Open(path, rw)
			if err != nil {
				t.Fatalf("open after Close: %v", err)
			}
			c.Close()
		})
	}
	if _, err := Open(path, OpenOptions{ForceShare: true}); !errors.Is(err, ErrInvalidOption) {
		t.Errorf("writable ForceShare open: %v, want ErrInvalidOption", err)
	}
}

// TestLockCreate: Create over an image someone has open is refused before
// the file is touched (it used to truncate first).
func TestLockCreate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.qcow2")
	if _, err := Create(path, CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	im, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if _, err := im.WriteAt([]byte("keep me"), 0); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(path)
	if _, err := Create(path, CreateOptions{Size: 2 << 20}); !errors.Is(err, ErrLocked) {
		t.Fatalf("Create over an open image: %v, want ErrLocked", err)
	}
	after, _ := os.ReadFile(path)
	if !bytes.Equal(before, after) {
		t.Fatalf("Create changed the image it refused (%d bytes before, %d after)", len(before), len(after))
	}
	buf := make([]byte, 7)
	if _, err := im.ReadAt(buf, 0); err != nil || string(buf) != "keep me" {
		t.Errorf("image after the refused Create: %q %v", buf, err)
	}
}

// TestLockBacking: a backing file is held as a reader while the image on
// top is open, so nobody can write under it.
func TestLockBacking(t *testing.T) {
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	if _, err := Create(base, CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if _, err := Create(top, CreateOptions{BackingFile: "base.qcow2", BackingFormat: "qcow2"}); err != nil {
		t.Fatal(err)
	}
	im, err := Open(top, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(base, OpenOptions{}); !errors.Is(err, ErrLocked) {
		t.Errorf("writable open of the backing file of an open image: %v, want ErrLocked", err)
	}
	im.Close()
	b, err := Open(base, OpenOptions{})
	if err != nil {
		t.Fatalf("backing file after the top image closed: %v", err)
	}
	b.Close()
}
