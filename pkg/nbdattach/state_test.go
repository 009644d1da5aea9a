package nbdattach

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestStateStore(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	s, err := NewStateStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	recs := []Attachment{
		{VolumeID: "b/../x", DevicePath: "/dev/nbd1", Index: 1, ImagePath: "/i/b", BackendID: "b/../x", Generation: 3, Kind: "nbd"},
		{VolumeID: "a", DevicePath: "/dev/nbd0", Index: 0, ImagePath: "/i/a", BackendID: "a", Generation: 1, ReadOnly: true, Kind: "nbd"},
		{VolumeID: "..", Index: 2, Kind: "nbd"},
	}
	for _, r := range recs {
		if err := s.Save(r); err != nil {
			t.Fatal(err)
		}
	}
	// Overwrite one: the newer record wins, no temp file stays behind.
	recs[1].Generation = 2
	if err := s.Save(recs[1]); err != nil {
		t.Fatal(err)
	}
	got, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	want := []Attachment{recs[2], recs[1], recs[0]}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("list\n got %+v\nwant %+v", got, want)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 3 {
		t.Fatalf("%d files in the state dir, want 3", len(ents))
	}
	if a, err := s.Get("a"); err != nil || a != recs[1] {
		t.Fatalf("get: %+v %v", a, err)
	}
	if _, err := s.Get("missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("get missing: %v", err)
	}

	// A corrupt record, one whose id does not match its name, and an old
	// temporary file: the good records are still listed, the bad reported.
	os.WriteFile(filepath.Join(dir, "junk.json"), []byte("{"), 0o600)
	os.WriteFile(filepath.Join(dir, "moved.json"), []byte(`{"version":1,"volumeID":"a"}`), 0o600)
	os.WriteFile(filepath.Join(dir, ".tmp-123"), []byte("{"), 0o600)
	got, err = s.List()
	if err == nil || len(got) != 3 {
		t.Fatalf("list with bad records: %d records, err %v", len(got), err)
	}

	for _, r := range recs {
		if err := s.Remove(r.VolumeID); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Remove("a"); err != nil {
		t.Fatalf("remove twice: %v", err)
	}
	if err := s.Save(Attachment{}); err == nil {
		t.Fatal("record without volume id saved")
	}
}
