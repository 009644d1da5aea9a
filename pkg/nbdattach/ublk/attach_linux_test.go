//go:build linux

package ublk

import (
	"context"
	"errors"
	"os"
	"testing"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
)

func TestBackendOf(t *testing.T) {
	d := testDevice(t, 0, 0)
	for _, b := range []nbdattach.Backend{nbdattach.ZonedBackend{D: d}, &nbdattach.ZonedBackend{D: d}} {
		if got, err := backendOf(b); err != nil || got != Backend(d) {
			t.Errorf("%T: %v, %v", b, got, err)
		}
	}
	if _, err := backendOf(nbdattach.ImageBackend{}); !errors.Is(err, ErrNotZoned) {
		t.Errorf("plain image backend: %v", err)
	}
	if volumeTag("a") == volumeTag("b") || volumeTag("a") != volumeTag("a") || volumeTag("") == 0 {
		t.Error("volume tags")
	}
}

// Without the driver, Attach fails naming the module, records nothing,
// and Detach of an unknown volume succeeds.
func TestAttacherWithoutUblk(t *testing.T) {
	if _, err := os.Stat(ControlPath); err == nil {
		t.Skip("this kernel has ublk: covered by the VM tests")
	}
	a, err := NewAttacher(AttacherOptions{StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	_, err = a.Attach(ctx, nbdattach.AttachRequest{VolumeID: "v", ImagePath: "x", Backend: nbdattach.ZonedBackend{D: testDevice(t, 0, 0)}})
	if !errors.Is(err, ErrNoUblk) {
		t.Fatalf("attach without ublk: %v", err)
	}
	if l, err := a.List(ctx); err != nil || len(l) != 0 {
		t.Fatalf("list: %v %v", l, err)
	}
	if err := a.Detach(ctx, "v"); err != nil {
		t.Fatalf("detach of nothing: %v", err)
	}
	if a.Kind() != "ublk" {
		t.Fatal(a.Kind())
	}
}
