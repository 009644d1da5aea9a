package nbdattach

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// StateStore keeps one attachment record per volume in a directory (a
// hostPath for the node plugin), so the next process can find and recover
// the devices this one attached. Each record is written atomically: a
// temporary file in the same directory, fsync, rename over the old record,
// fsync of the directory. A crash leaves either the old or the new record,
// never a torn one.
type StateStore struct {
	dir string
}

const (
	recordSuffix  = ".json"
	recordVersion = 1
	// maxRecordSize bounds what Load reads: a record is a few hundred
	// bytes, and a stray large file in the directory must not be slurped.
	maxRecordSize = 64 << 10
)

// record is the file format: the Attachment plus a format version.
type record struct {
	Version int `json:"version"`
	Attachment
}

// NewStateStore creates dir if needed.
func NewStateStore(dir string) (*StateStore, error) {
	if dir == "" {
		return nil, errors.New("nbd: state directory not set")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("nbd: state directory: %w", err)
	}
	return &StateStore{dir: dir}, nil
}

// Dir is the state directory.
func (s *StateStore) Dir() string { return s.dir }

// recordPath maps a volume id to a file name. Volume ids are opaque CSI
// strings and may hold '/', so they are path-escaped; the suffix keeps
// "." and ".." harmless.
func (s *StateStore) recordPath(volumeID string) string {
	return filepath.Join(s.dir, url.PathEscape(volumeID)+recordSuffix)
}

// Save writes the record of a.VolumeID atomically.
func (s *StateStore) Save(a Attachment) error {
	if a.VolumeID == "" {
		return errors.New("nbd: record without volume id")
	}
	b, err := json.MarshalIndent(record{Version: recordVersion, Attachment: a}, "", "  ")
	if err != nil {
		return err
	}
	b = append(b, '\n')
	f, err := os.CreateTemp(s.dir, ".tmp-*")
	if err != nil {
		return fmt.Errorf("nbd: saving record of %q: %w", a.VolumeID, err)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err := f.Write(b); err != nil {
		return fmt.Errorf("nbd: saving record of %q: %w", a.VolumeID, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("nbd: saving record of %q: %w", a.VolumeID, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("nbd: saving record of %q: %w", a.VolumeID, err)
	}
	if err := os.Rename(tmp, s.recordPath(a.VolumeID)); err != nil {
		return fmt.Errorf("nbd: saving record of %q: %w", a.VolumeID, err)
	}
	ok = true
	return s.syncDir()
}

func (s *StateStore) syncDir() error {
	d, err := os.Open(s.dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("nbd: syncing state directory: %w", err)
	}
	return nil
}

// Get returns the record of volumeID; fs.ErrNotExist (wrapped) if none.
func (s *StateStore) Get(volumeID string) (Attachment, error) {
	return s.load(s.recordPath(volumeID))
}

func (s *StateStore) load(path string) (Attachment, error) {
	f, err := os.Open(path)
	if err != nil {
		return Attachment{}, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return Attachment{}, err
	}
	if !st.Mode().IsRegular() || st.Size() > maxRecordSize {
		return Attachment{}, fmt.Errorf("nbd: record %s: not a regular file of at most %d bytes", path, maxRecordSize)
	}
	var r record
	dec := json.NewDecoder(f)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return Attachment{}, fmt.Errorf("nbd: record %s: %w", path, err)
	}
	if r.Version != recordVersion {
		return Attachment{}, fmt.Errorf("nbd: record %s: version %d, want %d", path, r.Version, recordVersion)
	}
	if r.VolumeID == "" || s.recordPath(r.VolumeID) != path {
		return Attachment{}, fmt.Errorf("nbd: record %s: volume id %q does not match the file name", path, r.VolumeID)
	}
	return r.Attachment, nil
}

// List returns every record, sorted by volume id. Unreadable records are
// reported in the joined error and left in place for an operator to see;
// the readable ones are still returned.
func (s *StateStore) List() ([]Attachment, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("nbd: reading state directory: %w", err)
	}
	var out []Attachment
	var errs []error
	for _, e := range ents {
		name := e.Name()
		if strings.HasPrefix(name, ".tmp-") || !strings.HasSuffix(name, recordSuffix) {
			continue
		}
		a, err := s.load(filepath.Join(s.dir, name))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, a)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VolumeID < out[j].VolumeID })
	return out, errors.Join(errs...)
}

// Remove deletes the record of volumeID; a missing record is not an error.
func (s *StateStore) Remove(volumeID string) error {
	if err := os.Remove(s.recordPath(volumeID)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("nbd: removing record of %q: %w", volumeID, err)
	}
	return s.syncDir()
}
