package driver

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// Images manages the image files of one node's data directory: volume
// images under volumes/, snapshot images under snapshots/. The controller's
// local backend and the node service of the same process share one Images,
// so that an operation on a volume that is attached here (snapshot,
// expansion, limit change) goes through the handle that serves it, with its
// I/O frozen, instead of opening the file a second time: two handles on one
// qcow2 file would both allocate clusters and corrupt it.
type Images struct {
	dataDir string

	mu    sync.Mutex
	slots map[string]*imageSlot
	// onServe, when set, hears of a volume whose device was opened for
	// serving or closed (the node agent refreshes its zone summary).
	onServe func(id string)
}

// notifyServe tells onServe that volume id was staged or unstaged.
func (m *Images) notifyServe(id string) {
	m.mu.Lock()
	f := m.onServe
	m.mu.Unlock()
	if f != nil {
		f(id)
	}
}

// setOnServe sets the callback notifyServe calls.
func (m *Images) setOnServe(f func(id string)) {
	m.mu.Lock()
	m.onServe = f
	m.mu.Unlock()
}

// Served returns the volumes whose devices are open for serving.
func (m *Images) Served() []string {
	m.mu.Lock()
	slots := make(map[string]*imageSlot, len(m.slots))
	maps.Copy(slots, m.slots)
	m.mu.Unlock()
	var ids []string
	for id, s := range slots {
		s.mu.Lock()
		if s.dev != nil {
			ids = append(ids, id)
		}
		s.mu.Unlock()
	}
	slices.Sort(ids)
	return ids
}

// imageSlot serializes everything done to one volume image in this process.
type imageSlot struct {
	path string
	mu   sync.Mutex    // held by each operation and by acquire/release
	gate sync.RWMutex  // guest I/O holds it shared; freeze holds it exclusively
	dev  *zoned.Device // open while the volume is staged here
	// health is the last full check of the unstaged image, with the
	// identity of the file it checked; every operation of this process
	// that writes the image clears it (under mu), and a change from
	// elsewhere shows in the identity.
	health *healthEntry
}

// NewImages returns the manager of dataDir, creating its layout.
func NewImages(dataDir string) (*Images, error) {
	for _, d := range []string{"volumes", "snapshots"} {
		if err := os.MkdirAll(filepath.Join(dataDir, d), 0o750); err != nil {
			return nil, err
		}
	}
	return &Images{dataDir: dataDir, slots: map[string]*imageSlot{}}, nil
}

// VolumePath is where the image of volume id lives.
func (m *Images) VolumePath(id string) string {
	return filepath.Join(m.dataDir, "volumes", id+".qcow2")
}

func (m *Images) snapshotPath(id string) string {
	return filepath.Join(m.dataDir, "snapshots", id+".qcow2")
}

func (m *Images) slot(id string) *imageSlot {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.slots[id]
	if !ok {
		s = &imageSlot{path: m.VolumePath(id)}
		m.slots[id] = s
	}
	return s
}

// withImage runs fn on volume id's image file with nothing else using it.
// When the volume is attached here, its guest I/O is frozen and its zoned
// device closed first (which makes every acknowledged write and its write
// pointer durable in the image), and the device is reopened afterwards on
// whatever fn left at the path: an image grown in place, or a rebuilt one
// renamed over it (fn's returned image, closed here).
func (m *Images) withImage(id string, fn func(im *qcow2.Image) (*qcow2.Image, error)) error {
	s := m.slot(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.health = nil
	if s.dev != nil {
		s.gate.Lock()
		defer s.gate.Unlock()
		if err := s.dev.Close(); err != nil {
			return fmt.Errorf("quiesce volume %s: %w", id, err)
		}
		s.dev = nil
		err := m.onFile(s.path, fn)
		dev, oerr := zoned.Open(s.path, zoned.OpenOptions{})
		if oerr != nil {
			return errors.Join(err, fmt.Errorf("reopen volume %s after the operation: %w", id, oerr))
		}
		s.dev = dev
		return err
	}
	return m.onFile(s.path, fn)
}

func (m *Images) onFile(path string, fn func(im *qcow2.Image) (*qcow2.Image, error)) error {
	im, err := openVolumeImage(path, false)
	if err != nil {
		return err
	}
	repl, err := fn(im)
	if repl != nil && repl != im {
		im.Close()
		im = repl
	}
	if cerr := im.Close(); err == nil {
		err = cerr
	}
	return err
}

// peek runs fn on volume id's image without freezing guest I/O: for reads
// of metadata (size, geometry) that do not need a quiet image.
func (m *Images) peek(id string, fn func(im *qcow2.Image) error) error {
	s := m.slot(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dev != nil {
		s.gate.RLock()
		defer s.gate.RUnlock()
		return fn(s.dev.Image())
	}
	im, err := openVolumeImage(s.path, true)
	if err != nil {
		return err
	}
	defer im.Close()
	return fn(im)
}

func openVolumeImage(path string, readOnly bool) (*qcow2.Image, error) {
	// Read-only opens only peek at metadata: shared, like qemu-img info -U.
	im, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: readOnly, ForceShare: readOnly, NoBacking: true})
	if errors.Is(err, os.ErrNotExist) {
		return nil, errorf(ErrNotFound, "image %s does not exist", path)
	}
	if err != nil {
		return nil, fmt.Errorf("open image %s: %w", path, err)
	}
	if im.Info().Zoned == nil {
		im.Close()
		return nil, errorf(ErrFailedPrecondition, "image %s is not a zoned image", path)
	}
	return im, nil
}

// Exists reports whether volume id's image is complete on disk.
func (m *Images) Exists(id string) bool {
	_, err := os.Stat(m.VolumePath(id))
	return err == nil
}

// Create makes an empty zoned image for volume id. The image is made under
// a temporary name and renamed, so an existing image is always complete.
func (m *Images) Create(id string, spec *volumeSpec) error {
	s := m.slot(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.health = nil
	path := m.VolumePath(id)
	tmp := path + ".tmp"
	co := spec.create
	co.Size = spec.geo.Size
	warnings, err := qcow2.Create(tmp, co)
	if err != nil {
		return err
	}
	if len(warnings) > 0 { // buildSpec clamps what qcow2 would; this is a backstop
		os.Remove(tmp)
		return errorf(ErrInvalidArgument, "parameters would be clamped: %v", warnings)
	}
	if testHookTempImage != nil {
		testHookTempImage(tmp)
	}
	return renameDurable(tmp, path)
}

// CreateFromSnapshot makes volume id's image as a copy of snapshot snapID,
// grown to size (whole zones) when that is larger.
func (m *Images) CreateFromSnapshot(id, snapID string, size uint64) error {
	return m.createCopy(id, m.snapshotPath(snapID), size)
}

// CreateFromVolume clones volume srcID (frozen while copied if attached).
func (m *Images) CreateFromVolume(id, srcID string, size uint64) error {
	var copyErr error
	err := m.withImage(srcID, func(*qcow2.Image) (*qcow2.Image, error) {
		copyErr = m.createCopy(id, m.VolumePath(srcID), size)
		return nil, nil
	})
	if err != nil {
		return err
	}
	return copyErr
}

func (m *Images) createCopy(id, src string, size uint64) error {
	s := m.slot(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.health = nil
	path := m.VolumePath(id)
	tmp := path + ".tmp"
	os.Remove(tmp)
	if err := copyFile(src, tmp); err != nil {
		os.Remove(tmp)
		if errors.Is(err, os.ErrNotExist) {
			return errorf(ErrNotFound, "source image %s does not exist", src)
		}
		return err
	}
	im, err := openVolumeImage(tmp, false)
	if err != nil {
		os.Remove(tmp)
		return err
	}
	if size > im.Size() {
		repl, err := grow(im, size)
		if repl != nil {
			im.Close()
			im = repl
		}
		if err != nil {
			im.Close()
			os.Remove(tmp)
			return err
		}
	}
	if err := im.Close(); err != nil {
		os.Remove(tmp)
		return err
	}
	return renameDurable(tmp, path)
}

// Delete removes volume id's image. A volume attached here is refused: the
// CO unstages before it deletes.
func (m *Images) Delete(id string) error {
	s := m.slot(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dev != nil {
		return errorf(ErrFailedPrecondition, "volume %s is still staged on this node; unstage it first", id)
	}
	path := m.VolumePath(id)
	for _, p := range []string{path + ".tmp", path + ".rebuild", path + ".wplive", path} {
		if err := os.Remove(p); err != nil && !os.IsNotExist(err) {
			return err
		}
	}
	m.mu.Lock()
	delete(m.slots, id)
	m.mu.Unlock()
	return syncDir(filepath.Dir(path))
}

// Snapshot copies the images of volIDs to snapshot images snapIDs (same
// order) as one crash-consistent set: every attached volume of the set is
// frozen (in ID order, so two group snapshots cannot deadlock) and flushed
// before the first copy and thawed after the last. The copy is a reflink
// where the file system has one, else a sparse copy; the write-pointer
// table is part of the file, so write pointers travel with the data.
func (m *Images) Snapshot(volIDs, snapIDs []string) error {
	order := make([]int, len(volIDs))
	for i := range order {
		order[i] = i
	}
	sort.Slice(order, func(a, b int) bool { return volIDs[order[a]] < volIDs[order[b]] })
	var copyAll func(k int) error
	copyAll = func(k int) error {
		if k == len(order) {
			for i, v := range volIDs {
				dst := m.snapshotPath(snapIDs[i])
				tmp := dst + ".tmp"
				os.Remove(tmp)
				if err := copyFile(m.VolumePath(v), tmp); err != nil {
					os.Remove(tmp)
					return err
				}
				if err := renameDurable(tmp, dst); err != nil {
					return err
				}
			}
			return nil
		}
		var inner error
		err := m.withImage(volIDs[order[k]], func(*qcow2.Image) (*qcow2.Image, error) {
			inner = copyAll(k + 1)
			return nil, nil
		})
		if err != nil {
			return err
		}
		return inner
	}
	return copyAll(0)
}

// DeleteSnapshot removes a snapshot image.
func (m *Images) DeleteSnapshot(id string) error {
	p := m.snapshotPath(id)
	for _, f := range []string{p + ".tmp", p} {
		if err := os.Remove(f); err != nil && !os.IsNotExist(err) {
			return err
		}
	}
	return nil
}

// SnapshotExists reports whether a snapshot image is complete on disk.
func (m *Images) SnapshotExists(id string) bool {
	_, err := os.Stat(m.snapshotPath(id))
	return err == nil
}

// Geometry reads volume id's zone geometry from its image.
func (m *Images) Geometry(id string) (Geometry, error) {
	var g Geometry
	err := m.peek(id, func(im *qcow2.Image) error {
		inf := im.Info()
		g = geometryFromExt(inf.VirtualSize, inf.ClusterSize, inf.Zoned)
		return nil
	})
	return g, err
}

// Expand grows volume id to size bytes (whole zones; the new zones are
// EMPTY). It returns the geometry after the change. A smaller or equal
// size changes nothing.
func (m *Images) Expand(id string, size uint64) (Geometry, error) {
	var g Geometry
	err := m.withImage(id, func(im *qcow2.Image) (*qcow2.Image, error) {
		var repl *qcow2.Image
		if size > im.Size() {
			r, err := growInPlace(im, m.VolumePath(id), size)
			if err != nil {
				return r, err
			}
			repl = r
		}
		cur := im
		if repl != nil {
			cur = repl
		}
		inf := cur.Info()
		g = geometryFromExt(inf.VirtualSize, inf.ClusterSize, inf.Zoned)
		return repl, nil
	})
	return g, err
}

// SetLimits changes the open/active zone limits of volume id.
func (m *Images) SetLimits(id string, maxOpen, maxActive uint32) (Geometry, error) {
	var g Geometry
	err := m.withImage(id, func(im *qcow2.Image) (*qcow2.Image, error) {
		inf := im.Info()
		z := inf.Zoned
		if z.MaxOpenZones == maxOpen && z.MaxActiveZones == maxActive {
			g = geometryFromExt(inf.VirtualSize, inf.ClusterSize, z)
			return nil, nil
		}
		// In place: only the header changes (the parameters were validated
		// against the geometry before we got here).
		if err := im.SetZoneLimits(maxOpen, maxActive); err != nil {
			return nil, err
		}
		ri := im.Info()
		g = geometryFromExt(ri.VirtualSize, ri.ClusterSize, ri.Zoned)
		return nil, nil
	})
	return g, err
}

// HealthProblem is one adverse condition of a volume image.
type HealthProblem struct {
	Kind    string // "inaccessible", "data-loss", "degraded"
	Reason  string // CamelCase, for machines
	Message string
}

// Health checks volume id's image: present, openable, not marked corrupt,
// and (when not attached, so that the check sees a quiet file) consistent
// by qcow2.Check.
//
// The full check reads all of the image's metadata, and the node agent
// asks on every resync for every volume, so its verdict is kept per image
// with the file's identity (device, inode, size, mtime and ctime in ns):
// an image nobody touched since is not read again. Any write changes
// mtime, a replacement the inode; and the operations of this process that
// write an image (create, expand, limits, stage) drop the verdict
// outright, since two writes within one tick of the file system's coarse
// clock can leave mtime as it was. Verdicts from an error that may pass
// (an image that could not be opened or read) are not kept.
func (m *Images) Health(id string) []HealthProblem {
	path := m.VolumePath(id)
	if _, err := os.Stat(path); err != nil {
		return []HealthProblem{{"inaccessible", "ImageMissing", fmt.Sprintf("image %s: %v", path, err)}}
	}
	s := m.slot(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dev != nil {
		if s.dev.Image().Info().Corrupt {
			return []HealthProblem{{"data-loss", "ImageCorrupt", "the image's corrupt bit is set"}}
		}
		return nil
	}
	key, err := fileIdentityOf(path)
	if err != nil {
		return []HealthProblem{{"inaccessible", "ImageMissing", fmt.Sprintf("image %s: %v", path, err)}}
	}
	if h := s.health; h != nil && h.key == key {
		return slices.Clone(h.problems)
	}
	probs, keep := checkHealth(path)
	s.health = nil
	if keep {
		// key was taken before the check: a change during it makes the
		// next call check again.
		s.health = &healthEntry{key: key, problems: probs}
	}
	return slices.Clone(probs)
}

// healthEntry is a kept verdict of Health.
type healthEntry struct {
	key      fileIdentity
	problems []HealthProblem
}

// fileIdentity is what changes when an image file is written or replaced.
type fileIdentity struct {
	dev, ino     uint64
	size         int64
	mtime, ctime int64 // ns
}

func fileIdentityOf(path string) (fileIdentity, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return fileIdentity{}, err
	}
	return fileIdentity{dev: uint64(st.Dev), ino: uint64(st.Ino), size: st.Size,
		mtime: st.Mtim.Nano(), ctime: st.Ctim.Nano()}, nil
}

// testHookTempImage, when set, runs once Create has made a volume's
// temporary image, before the rename: tests stop a CreateVolume there, the
// point where a kill -9 leaves a "creating" record and a *.qcow2.tmp.
var testHookTempImage func(tmp string)

// checkImage is qcow2.Check; a variable so tests can count the checks.
var checkImage = qcow2.Check

// checkHealth runs the full check of an unstaged image; keep tells
// whether the verdict follows from the file's content alone.
func checkHealth(path string) (probs []HealthProblem, keep bool) {
	res, err := checkImage(path, qcow2.CheckOptions{})
	switch {
	case errors.Is(err, qcow2.ErrCorrupt) || errors.Is(err, qcow2.ErrNotQcow2):
		return []HealthProblem{{"data-loss", "ImageCorrupt", err.Error()}}, true
	case err != nil:
		return []HealthProblem{{"inaccessible", "ImageUnreadable", err.Error()}}, false
	case res.Corruptions > 0:
		msg := fmt.Sprintf("%d corruptions found by check", res.Corruptions)
		if len(res.Messages) > 0 {
			msg += ": " + res.Messages[0]
		}
		return []HealthProblem{{"data-loss", "ImageCorrupt", msg}}, true
	case res.CheckErrors > 0:
		// Failures to read metadata (qemu-img's "check errors"): these
		// may pass.
		return []HealthProblem{{"degraded", "CheckFailed", fmt.Sprintf("%d errors while checking the image", res.CheckErrors)}}, false
	}
	return nil, true
}

// Usage returns the virtual size of volume id and the bytes its image file
// occupies on disk.
func (m *Images) Usage(id string) (size, used uint64, err error) {
	var st unix.Stat_t
	if err := unix.Stat(m.VolumePath(id), &st); err != nil {
		return 0, 0, errorf(ErrNotFound, "volume %s has no image on this node: %w", id, err)
	}
	used = uint64(st.Blocks) * 512
	err = m.peek(id, func(im *qcow2.Image) error {
		size = im.Size()
		return nil
	})
	return size, used, err
}

// Capacity returns the bytes available to new images and the size of the
// file system holding the data directory.
func (m *Images) Capacity() (avail, total uint64, err error) {
	var st unix.Statfs_t
	if err := unix.Statfs(m.dataDir, &st); err != nil {
		return 0, 0, err
	}
	return st.Bavail * uint64(st.Bsize), st.Blocks * uint64(st.Bsize), nil
}

// acquire opens volume id's zoned device for serving and returns its
// slot. A volume is staged once per node, so a second acquire (a retried
// stage, or one after Recover reopened it) shares the open device.
func (m *Images) acquire(id string) (*imageSlot, error) {
	s := m.slot(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.health = nil
	if s.dev == nil {
		defer m.notifyServe(id)
		if _, err := os.Stat(s.path); err != nil {
			return nil, errorf(ErrNotFound, "volume %s has no image on this node: %w", id, err)
		}
		dev, err := zoned.Open(s.path, zoned.OpenOptions{})
		if err != nil {
			return nil, fmt.Errorf("open zoned device %s: %w", s.path, err)
		}
		s.dev = dev
	}
	return s, nil
}

// release closes the device opened by acquire, making everything durable.
func (m *Images) release(id string) error {
	s := m.slot(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.health = nil // the guest wrote it while staged
	if s.dev == nil {
		return nil
	}
	s.gate.Lock()
	dev := s.dev
	s.dev = nil
	s.gate.Unlock()
	defer m.notifyServe(id)
	return dev.Close()
}

// growInPlace grows an image, through (*qcow2.Image).Resize when the engine
// can (it adds EMPTY zones to a zoned image), else by rebuilding the image
// at the larger size and renaming it over path.
func growInPlace(im *qcow2.Image, path string, size uint64) (*qcow2.Image, error) {
	err := im.Resize(size)
	if err == nil || !errors.Is(err, qcow2.ErrUnsupported) || im.Info().Zoned == nil {
		return nil, err
	}
	return rebuildTo(im, path, size, nil, nil)
}

// grow is growInPlace for an image that is its own file (a fresh copy).
func grow(im *qcow2.Image, size uint64) (*qcow2.Image, error) {
	return growInPlace(im, im.Path(), size)
}

// rebuildTo writes a new zoned image of size bytes with src's geometry
// (and the given limits, when not nil), copies src's allocated data and
// write pointers into it, makes it durable and renames it over path. The
// zones beyond src's end are EMPTY. It returns the new image, open.
//
// This stands in for operations pkg/qcow2 does not do in place yet
// (growing a zoned image, changing its limits); it costs a copy of the
// allocated data.
func rebuildTo(src *qcow2.Image, path string, size uint64, maxOpen, maxActive *uint32) (*qcow2.Image, error) {
	inf := src.Info()
	z := inf.Zoned
	mo, ma := z.MaxOpenZones, z.MaxActiveZones
	if maxOpen != nil {
		mo = *maxOpen
	}
	if maxActive != nil {
		ma = *maxActive
	}
	appendBytes := uint64(z.MaxAppendBytes)
	co := qcow2.CreateOptions{
		Size:         size,
		ClusterSize:  inf.ClusterSize,
		RefcountBits: inf.RefcountBits,
		Zoned: &qcow2.ZonedOptions{ZoneSize: &z.ZoneSize, ZoneCapacity: &z.ZoneCapacity,
			ConventionalZones: &z.ConventionalZones, MaxOpenZones: &mo, MaxActiveZones: &ma,
			MaxAppendBytes: &appendBytes},
	}
	tmp := path + ".rebuild"
	os.Remove(tmp)
	warnings, err := qcow2.Create(tmp, co)
	if err != nil {
		return nil, err
	}
	if len(warnings) > 0 {
		os.Remove(tmp)
		return nil, errorf(ErrInvalidArgument, "zone limits would be clamped: %v", warnings)
	}
	dst, err := qcow2.Open(tmp, qcow2.OpenOptions{NoBacking: true})
	if err != nil {
		os.Remove(tmp)
		return nil, err
	}
	fail := func(err error) (*qcow2.Image, error) {
		dst.Close()
		os.Remove(tmp)
		return nil, err
	}
	exts, err := src.Map(0, src.Size())
	if err != nil {
		return fail(err)
	}
	buf := make([]byte, 1<<20)
	for _, e := range exts {
		if !e.Data || e.Depth != 0 {
			continue
		}
		for off := e.Start; off < e.Start+e.Length; {
			n := min(uint64(len(buf)), e.Start+e.Length-off)
			if _, err := src.ReadAt(buf[:n], int64(off)); err != nil {
				return fail(err)
			}
			if _, err := dst.WriteAt(buf[:n], int64(off)); err != nil {
				return fail(err)
			}
			off += n
		}
	}
	wps, conv, err := src.WritePointers()
	if err != nil {
		return fail(err)
	}
	for i, wp := range wps {
		if !conv[i] && wp != uint64(i)*z.ZoneSize {
			if err := dst.SetWritePointer(uint32(i), wp); err != nil {
				return fail(err)
			}
		}
	}
	if err := dst.Close(); err != nil {
		os.Remove(tmp)
		return nil, err
	}
	if err := renameDurable(tmp, path); err != nil {
		return nil, err
	}
	return qcow2.Open(path, qcow2.OpenOptions{NoBacking: true})
}

func renameDurable(from, to string) error {
	if err := os.Rename(from, to); err != nil {
		return err
	}
	return syncDir(filepath.Dir(to))
}

// copyFile copies an image file to a new file dst: a reflink (FICLONE)
// where the file system shares extents, else a copy of the data regions
// only (SEEK_DATA/SEEK_HOLE), so holes stay holes.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o640)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := unix.IoctlFileClone(int(out.Fd()), int(in.Fd())); err != nil {
		if err := sparseCopy(in, out, st.Size()); err != nil {
			return err
		}
	}
	if err := out.Sync(); err != nil {
		return err
	}
	return out.Close()
}

func sparseCopy(in, out *os.File, size int64) error {
	if err := out.Truncate(0); err != nil {
		return err
	}
	ifd := int(in.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(ifd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole remains
		}
		if err != nil {
			return fmt.Errorf("seek data in %s: %w", in.Name(), err)
		}
		hole, err := unix.Seek(ifd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("seek hole in %s: %w", in.Name(), err)
		}
		if err := copyRange(in, out, data, hole-data); err != nil {
			return err
		}
		off = hole
	}
	return out.Truncate(size)
}

func copyRange(in, out *os.File, off, n int64) error {
	roff, woff := off, off
	for n > 0 {
		c, err := unix.CopyFileRange(int(in.Fd()), &roff, int(out.Fd()), &woff, int(min(n, 1<<30)), 0)
		if err != nil {
			if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
				return copyRangeRW(in, out, roff, n)
			}
			return fmt.Errorf("copy %s: %w", in.Name(), err)
		}
		if c == 0 {
			return fmt.Errorf("copy %s: unexpected end of file at %d", in.Name(), roff)
		}
		n -= int64(c)
	}
	return nil
}

func copyRangeRW(in, out *os.File, off, n int64) error {
	buf := make([]byte, 1<<20)
	for n > 0 {
		c := min(n, int64(len(buf)))
		r, err := in.ReadAt(buf[:c], off)
		if err != nil && r == 0 {
			return err
		}
		if _, err := out.WriteAt(buf[:r], off); err != nil {
			return err
		}
		off += int64(r)
		n -= int64(r)
	}
	return nil
}
