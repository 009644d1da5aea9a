package driver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
)

// FileAttacher is the attacher for machines without the nbd module, such
// as the conformance runs in CI (issue #6: "an attacher that exposes the
// image as a regular file"). Attach makes a sparse regular file of the
// volume's size that stands where the device node would stand, and
// NodePublishVolume bind-mounts it onto the target exactly as it would bind
// /dev/nbdX.
//
// The file is a stand-in: guest data written to it does NOT reach the
// image. The attacher holds the volume's backend like a real one (the image
// stays open, frozen for snapshots, grown in place), so every CSI call sees
// a staged volume as it would with the kernel, but the data path itself is
// tested elsewhere (pkg/nbdattach against real NBD clients, and the VM
// tests with /dev/nbd*). Never use it for real workloads.
type FileAttacher struct {
	dir        string
	maxDevices int

	mu   sync.Mutex
	atts map[string]*fileAttachment
	// quarantined: records Recover could not load and moved aside.
	quarantined []QuarantinedRecord
}

// Quarantined lists the records Recover moved aside.
func (a *FileAttacher) Quarantined() []QuarantinedRecord {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.quarantined)
}

type fileAttachment struct {
	att     nbdattach.Attachment
	backend nbdattach.Backend
}

var _ nbdattach.Attacher = (*FileAttacher)(nil)

// NewFileAttacher keeps its files and records under dir and admits at most
// maxDevices attachments (0: 64).
func NewFileAttacher(dir string, maxDevices int) (*FileAttacher, error) {
	if maxDevices <= 0 {
		maxDevices = 64
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, err
	}
	return &FileAttacher{dir: dir, maxDevices: maxDevices, atts: map[string]*fileAttachment{}}, nil
}

func (a *FileAttacher) Kind() string { return "file" }

// MaxDevices is the number of volumes this attacher can expose at once.
func (a *FileAttacher) MaxDevices() int { return a.maxDevices }

func (a *FileAttacher) paths(volumeID string) (dev, rec string, err error) {
	if volumeID == "" || strings.ContainsAny(volumeID, "/\x00") || volumeID == "." || volumeID == ".." {
		return "", "", fmt.Errorf("file attacher: invalid volume id %q", volumeID)
	}
	return filepath.Join(a.dir, volumeID+".dev"), filepath.Join(a.dir, volumeID+".json"), nil
}

func (a *FileAttacher) Attach(ctx context.Context, req nbdattach.AttachRequest) (*nbdattach.Attachment, error) {
	dev, rec, err := a.paths(req.VolumeID)
	if err != nil {
		return nil, err
	}
	if req.Backend == nil {
		return nil, errors.New("file attacher: no backend")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if fa, ok := a.atts[req.VolumeID]; ok {
		if fa.att.ImagePath != req.ImagePath {
			return nil, errorf(ErrAlreadyExists, "volume %s is attached with image %s, not %s", req.VolumeID, fa.att.ImagePath, req.ImagePath)
		}
		fa.backend = req.Backend
		att := fa.att
		return &att, nil
	}
	if len(a.atts) >= a.maxDevices {
		return nil, errorf(ErrResourceExhausted, "all %d file devices are in use", a.maxDevices)
	}
	f, err := os.OpenFile(dev, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	err = f.Truncate(req.Backend.Size())
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dev)
		return nil, err
	}
	att := nbdattach.Attachment{VolumeID: req.VolumeID, DevicePath: dev, Index: -1, ImagePath: req.ImagePath,
		BackendID: req.VolumeID, Generation: 1, ReadOnly: req.ReadOnly, Kind: a.Kind()}
	b, _ := json.Marshal(att)
	if err := writeFileAtomic(rec, b); err != nil {
		os.Remove(dev)
		return nil, err
	}
	a.atts[req.VolumeID] = &fileAttachment{att: att, backend: req.Backend}
	out := att
	return &out, nil
}

func (a *FileAttacher) Detach(ctx context.Context, volumeID string) error {
	dev, rec, err := a.paths(volumeID)
	if err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if fa, ok := a.atts[volumeID]; ok && fa.backend != nil {
		if err := fa.backend.Flush(); err != nil {
			return fmt.Errorf("file attacher: flush %s: %w", volumeID, err)
		}
	}
	for _, p := range []string{rec, dev} {
		if err := os.Remove(p); err != nil && !os.IsNotExist(err) {
			return err
		}
	}
	delete(a.atts, volumeID)
	return syncDir(a.dir)
}

func (a *FileAttacher) List(ctx context.Context) ([]nbdattach.Attachment, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]nbdattach.Attachment, 0, len(a.atts))
	for _, id := range slices.Sorted(maps.Keys(a.atts)) {
		out = append(out, a.atts[id].att)
	}
	return out, nil
}

// Recover reloads the records of an earlier run; a record whose file is gone
// is dropped, the others get their backend from open.
func (a *FileAttacher) Recover(ctx context.Context, open func(nbdattach.Attachment) (nbdattach.Backend, error)) ([]nbdattach.Attachment, error) {
	ents, err := os.ReadDir(a.dir)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	var errs []error
	var out []nbdattach.Attachment
	a.quarantined = nil
	for _, e := range ents {
		if i := strings.Index(e.Name(), quarantineSuffix); i > 0 {
			a.quarantined = append(a.quarantined, earlierQuarantine(a.dir, e.Name(), i))
			continue
		}
		if !strings.HasSuffix(e.Name(), ".json") || strings.HasPrefix(e.Name(), ".tmp-") {
			continue
		}
		rec := filepath.Join(a.dir, e.Name())
		b, err := os.ReadFile(rec)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var att nbdattach.Attachment
		bad := ""
		if err := json.Unmarshal(b, &att); err != nil {
			bad = "not a valid record: " + err.Error()
		} else if att.VolumeID == "" || att.VolumeID+".json" != e.Name() {
			bad = fmt.Sprintf("holds volume id %q, not the one its name says", att.VolumeID)
		}
		if bad != "" {
			// One bad record must not stop the node (see QuarantinedRecord).
			q, err := quarantineFile(rec, bad)
			if err != nil {
				errs = append(errs, err)
			} else {
				a.quarantined = append(a.quarantined, q)
			}
			continue
		}
		if _, err := os.Stat(att.DevicePath); err != nil {
			os.Remove(rec)
			continue
		}
		be, err := open(att)
		if err != nil {
			errs = append(errs, fmt.Errorf("reopen %s: %w", att.VolumeID, err))
			continue
		}
		att.Generation++
		nb, _ := json.Marshal(att)
		if err := writeFileAtomic(rec, nb); err != nil {
			errs = append(errs, err)
		}
		a.atts[att.VolumeID] = &fileAttachment{att: att, backend: be}
		out = append(out, att)
	}
	return out, errors.Join(errs...)
}

// Resize sets the stand-in file to the backend's new size, as the netlink
// attacher reconfigures the device size.
func (a *FileAttacher) Resize(ctx context.Context, volumeID string, size int64) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	fa, ok := a.atts[volumeID]
	if !ok {
		return errorf(ErrNotFound, "volume %s is not attached", volumeID)
	}
	return os.Truncate(fa.att.DevicePath, size)
}
