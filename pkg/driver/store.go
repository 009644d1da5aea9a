package driver

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"
)

// Record states. A record is written in stateCreating before its image is
// made and in stateReady after, so a crash in between leaves a record that
// the retried CreateVolume (same name) finishes.
const (
	stateCreating = "creating"
	stateReady    = "ready"
)

// VolumeRecord is what the controller knows of a volume.
type VolumeRecord struct {
	ID       string            `json:"id"`
	Name     string            `json:"name"`
	Node     string            `json:"node"`
	State    string            `json:"state"`
	Geometry Geometry          `json:"geometry"`
	Params   map[string]string `json:"params"` // canonical creation parameters, mutable ones merged
	// Mutable holds the mutable parameters in force (after ModifyVolume).
	Mutable map[string]string `json:"mutable,omitempty"`
	Source  *ContentSource    `json:"source,omitempty"`
	Created time.Time         `json:"created"`
}

// ContentSource is what a volume was made from.
type ContentSource struct {
	SnapshotID string `json:"snapshotID,omitempty"`
	VolumeID   string `json:"volumeID,omitempty"`
}

// SnapshotRecord is an immutable copy of a volume's image.
type SnapshotRecord struct {
	ID             string    `json:"id"`
	Name           string    `json:"name"`
	SourceVolumeID string    `json:"sourceVolumeID"`
	Node           string    `json:"node"`
	GroupID        string    `json:"groupID,omitempty"`
	State          string    `json:"state"`
	Geometry       Geometry  `json:"geometry"`
	Created        time.Time `json:"created"`
}

// GroupSnapshotRecord is a crash-consistent set of snapshots.
type GroupSnapshotRecord struct {
	ID              string    `json:"id"`
	Name            string    `json:"name"`
	SourceVolumeIDs []string  `json:"sourceVolumeIDs"`
	SnapshotIDs     []string  `json:"snapshotIDs"`
	State           string    `json:"state"`
	Created         time.Time `json:"created"`
}

func (r *VolumeRecord) key() (string, string)        { return r.ID, r.Name }
func (r *SnapshotRecord) key() (string, string)      { return r.ID, r.Name }
func (r *GroupSnapshotRecord) key() (string, string) { return r.ID, r.Name }

// ID prefixes. IDs name files, so they are generated here and every ID
// that comes in a request is checked against idPattern before it reaches
// a path: a malformed ID is simply not found.
const (
	volumePrefix   = "zqv-"
	snapshotPrefix = "zqs-"
	groupPrefix    = "zqg-"
)

var idPattern = regexp.MustCompile(`^zq[vsg]-[0-9a-f]{20}$`)

func newID(prefix string) string {
	var b [10]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return prefix + hex.EncodeToString(b[:])
}

func validID(prefix, id string) bool {
	return strings.HasPrefix(id, prefix) && idPattern.MatchString(id)
}

// Store persists the controller's records. The local backend keeps them as
// JSON files; the cluster backend keeps them in ZonedVolume resources. All
// methods are safe for concurrent use. Get methods return a copy to change
// and Put back; List methods return the records sorted by ID (the order
// pagination tokens refer to), which callers must not modify.
type Store interface {
	GetVolume(id string) (*VolumeRecord, error) // ErrNotFound
	VolumeByName(name string) (*VolumeRecord, error)
	PutVolume(r *VolumeRecord) error
	DeleteVolume(id string) error // a missing record is not an error
	ListVolumes() ([]*VolumeRecord, error)

	GetSnapshot(id string) (*SnapshotRecord, error)
	SnapshotByName(name string) (*SnapshotRecord, error)
	PutSnapshot(r *SnapshotRecord) error
	DeleteSnapshot(id string) error
	ListSnapshots() ([]*SnapshotRecord, error)

	GetGroup(id string) (*GroupSnapshotRecord, error)
	GroupByName(name string) (*GroupSnapshotRecord, error)
	PutGroup(r *GroupSnapshotRecord) error
	DeleteGroup(id string) error
}

// keyed is a record with an ID and a name.
type keyed interface{ key() (id, name string) }

// recordDir is one kind of record: a directory of <id>.json files with an
// in-memory index by ID and name, loaded once.
type recordDir[T keyed] struct {
	dir    string
	mu     sync.RWMutex
	byID   map[string]T
	byName map[string]string
	// quarantined are the record files of this directory that could not
	// be loaded, moved aside (at this start or an earlier one).
	quarantined []QuarantinedRecord
}

// QuarantinedRecord is a record file whose content could not be loaded
// (empty, not JSON, or not the record its name says). It is renamed aside
// (<name>.quarantined-<UTC time>) instead of stopping the process: one bad
// file must not cost a node every other volume. Nothing is deleted; an
// operator inspects it, and renames it back once repaired.
type QuarantinedRecord struct {
	// Path is where the file is now; Original where it was.
	Path     string    `json:"path"`
	Original string    `json:"original"`
	Reason   string    `json:"reason"`
	Time     time.Time `json:"time"`
	// Earlier: moved aside by an earlier start of the plugin (Reason is
	// then what that start logged, which this one does not know).
	Earlier bool `json:"earlier,omitempty"`
}

// quarantineSuffix marks a record file moved aside.
const quarantineSuffix = ".quarantined-"

// maxRecordBytes bounds a record file: ours are a few hundred bytes.
const maxRecordBytes = 1 << 20

func openRecordDir[T keyed](dir string) (*recordDir[T], error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, err
	}
	d := &recordDir[T]{dir: dir, byID: map[string]T{}, byName: map[string]string{}}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	for _, e := range ents {
		name := e.Name()
		if strings.HasPrefix(name, ".tmp-") {
			// An interrupted atomic write (temp file, fsync, rename): the
			// record it was replacing, if any, is intact under its own
			// name. The caller holds the state directory's lock, so no
			// writer of this directory is running.
			os.Remove(filepath.Join(dir, name))
			continue
		}
		if i := strings.Index(name, quarantineSuffix); i > 0 {
			d.quarantined = append(d.quarantined, earlierQuarantine(dir, name, i))
			continue
		}
		if !strings.HasSuffix(name, ".json") {
			continue
		}
		path := filepath.Join(dir, name)
		r, bad, err := loadRecord[T](path, name)
		if err != nil {
			return nil, err
		}
		if bad != "" {
			q, err := quarantineFile(path, bad)
			if err != nil {
				return nil, err
			}
			d.quarantined = append(d.quarantined, q)
			continue
		}
		id, n := r.key()
		d.byID[id] = r
		d.byName[n] = id
	}
	return d, nil
}

// loadRecord reads the record file path (named name). A file whose content
// is not a record returns why in bad; err is for failures to read it at
// all (permissions, I/O), which quarantining would only hide: those stop
// the start as before.
func loadRecord[T keyed](path, name string) (r T, bad string, err error) {
	f, err := os.Open(path)
	if err != nil {
		return r, "", fmt.Errorf("state record %s: %w", path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return r, "", fmt.Errorf("state record %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		return r, "not a regular file", nil
	}
	if st.Size() > maxRecordBytes {
		return r, fmt.Sprintf("%d bytes, more than a record can be (%d)", st.Size(), maxRecordBytes), nil
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return r, "", fmt.Errorf("state record %s: %w", path, err)
	}
	b = bytes.TrimSpace(b)
	switch {
	case len(b) == 0:
		return r, "empty file", nil
	case b[0] != '{':
		return r, "not a JSON object", nil
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return r, "not a valid record: " + err.Error(), nil
	}
	if id, _ := r.key(); id == "" || id+".json" != name {
		return r, fmt.Sprintf("holds id %q, not the one its name says", id), nil
	}
	return r, "", nil
}

// quarantineFile renames a bad record file aside, durably.
func quarantineFile(path, reason string) (QuarantinedRecord, error) {
	now := time.Now().UTC()
	dst := path + quarantineSuffix + now.Format("20060102T150405.000000000Z")
	if err := os.Rename(path, dst); err != nil {
		return QuarantinedRecord{}, fmt.Errorf("state record %s is bad (%s) and could not be moved aside: %w", path, reason, err)
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		return QuarantinedRecord{}, err
	}
	return QuarantinedRecord{Path: dst, Original: path, Reason: reason, Time: now}, nil
}

// earlierQuarantine describes a file an earlier start moved aside.
func earlierQuarantine(dir, name string, i int) QuarantinedRecord {
	q := QuarantinedRecord{Path: filepath.Join(dir, name), Original: filepath.Join(dir, name[:i]),
		Reason: "moved aside by an earlier start (its log says why)", Earlier: true}
	if t, err := time.Parse("20060102T150405.000000000Z", name[i+len(quarantineSuffix):]); err == nil {
		q.Time = t
	}
	return q
}

func (d *recordDir[T]) get(id string) (T, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	r, ok := d.byID[id]
	if !ok {
		var zero T
		return zero, errorf(ErrNotFound, "%s not found", id)
	}
	return clone(r), nil
}

func (d *recordDir[T]) byNameGet(name string) (T, error) {
	d.mu.RLock()
	id, ok := d.byName[name]
	d.mu.RUnlock()
	if !ok {
		var zero T
		return zero, errorf(ErrNotFound, "name %q not found", name)
	}
	return d.get(id)
}

func (d *recordDir[T]) put(r T) error {
	id, name := r.key()
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	// The file is written outside the index lock, so puts of different
	// records overlap their fsyncs; puts of one record are serialized by
	// the callers' per-ID locks.
	if err := writeFileAtomic(filepath.Join(d.dir, id+".json"), b); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.byID[id] = clone(r)
	d.byName[name] = id
	return nil
}

func (d *recordDir[T]) remove(id string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	r, ok := d.byID[id]
	if !ok {
		return nil
	}
	if err := os.Remove(filepath.Join(d.dir, id+".json")); err != nil && !os.IsNotExist(err) {
		return err
	}
	if err := syncDir(d.dir); err != nil {
		return err
	}
	_, name := r.key()
	delete(d.byID, id)
	if d.byName[name] == id {
		delete(d.byName, name)
	}
	return nil
}

// list returns the records sorted by ID. They are the index's own: put
// stores a fresh copy and never changes a stored record, so they are
// immutable, and callers must not modify them.
func (d *recordDir[T]) list() []T {
	d.mu.RLock()
	defer d.mu.RUnlock()
	ids := slices.Sorted(maps.Keys(d.byID))
	out := make([]T, 0, len(ids))
	for _, id := range ids {
		out = append(out, d.byID[id])
	}
	return out
}

// clone deep-copies a record through JSON, so callers never share maps
// with the index.
func clone[T any](r T) T {
	b, err := json.Marshal(r)
	if err != nil {
		panic(err)
	}
	var out T
	if err := json.Unmarshal(b, &out); err != nil {
		panic(err)
	}
	return out
}

// fileStore is the local backend's Store: JSON records under a state
// directory, each written atomically (temp file, fsync, rename, fsync of
// the directory: DESIGN.md point 12).
type fileStore struct {
	vols   *recordDir[*VolumeRecord]
	snaps  *recordDir[*SnapshotRecord]
	groups *recordDir[*GroupSnapshotRecord]
}

// NewFileStore opens (creating) the records under dir.
func NewFileStore(dir string) (Store, error) {
	s := &fileStore{}
	var err error
	if s.vols, err = openRecordDir[*VolumeRecord](filepath.Join(dir, "volumes")); err != nil {
		return nil, err
	}
	if s.snaps, err = openRecordDir[*SnapshotRecord](filepath.Join(dir, "snapshots")); err != nil {
		return nil, err
	}
	if s.groups, err = openRecordDir[*GroupSnapshotRecord](filepath.Join(dir, "groupsnapshots")); err != nil {
		return nil, err
	}
	return s, nil
}

// Quarantined lists the record files that could not be loaded.
func (s *fileStore) Quarantined() []QuarantinedRecord {
	return slices.Concat(s.vols.quarantined, s.snaps.quarantined, s.groups.quarantined)
}

func (s *fileStore) GetVolume(id string) (*VolumeRecord, error)       { return s.vols.get(id) }
func (s *fileStore) VolumeByName(n string) (*VolumeRecord, error)     { return s.vols.byNameGet(n) }
func (s *fileStore) PutVolume(r *VolumeRecord) error                  { return s.vols.put(r) }
func (s *fileStore) DeleteVolume(id string) error                     { return s.vols.remove(id) }
func (s *fileStore) ListVolumes() ([]*VolumeRecord, error)            { return s.vols.list(), nil }
func (s *fileStore) GetSnapshot(id string) (*SnapshotRecord, error)   { return s.snaps.get(id) }
func (s *fileStore) SnapshotByName(n string) (*SnapshotRecord, error) { return s.snaps.byNameGet(n) }
func (s *fileStore) PutSnapshot(r *SnapshotRecord) error              { return s.snaps.put(r) }
func (s *fileStore) DeleteSnapshot(id string) error                   { return s.snaps.remove(id) }
func (s *fileStore) ListSnapshots() ([]*SnapshotRecord, error)        { return s.snaps.list(), nil }
func (s *fileStore) GetGroup(id string) (*GroupSnapshotRecord, error) { return s.groups.get(id) }
func (s *fileStore) GroupByName(n string) (*GroupSnapshotRecord, error) {
	return s.groups.byNameGet(n)
}
func (s *fileStore) PutGroup(r *GroupSnapshotRecord) error { return s.groups.put(r) }
func (s *fileStore) DeleteGroup(id string) error           { return s.groups.remove(id) }

// writeFileAtomic replaces path with data so that a crash leaves either the
// old or the new content.
func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, ".tmp-"+filepath.Base(path)+"-")
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	ok = true
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
