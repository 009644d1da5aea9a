package nbdattach

import "context"

// The attach contract between the node plugin (pkg/driver) and the ways a
// volume can reach the kernel. The netlink NBD attacher implements it on
// nodes with the nbd module; other attachers (FUSE + loop, ublk, or a
// regular-file attacher for conformance runs on machines without nbd)
// implement the same interface, so the driver never talks to the kernel
// directly.

// Attacher exposes backends as device nodes on this host.
type Attacher interface {
	// Attach exposes req.Backend and returns where. Attaching a volume
	// that is already attached with the same image returns the existing
	// attachment (idempotent).
	Attach(ctx context.Context, req AttachRequest) (*Attachment, error)
	// Detach flushes and removes the attachment of volumeID. Detaching a
	// volume that is not attached succeeds.
	Detach(ctx context.Context, volumeID string) error
	// List returns the current attachments.
	List(ctx context.Context) ([]Attachment, error)
	// Recover re-establishes the attachments recorded before a restart,
	// calling open to get each record's backend, before anything else is
	// served. Records whose device is gone are removed.
	Recover(ctx context.Context, open func(Attachment) (Backend, error)) ([]Attachment, error)
	// Kind names the mechanism ("nbd", "file", "fuse-loop", "ublk") for
	// NodeGetInfo, volume context and logs.
	Kind() string
}

// AttachRequest describes one volume to attach.
type AttachRequest struct {
	VolumeID  string  // CSI volume id; also the backend identifier given to the kernel
	ImagePath string  // the image file, recorded so Recover can reopen it
	Backend   Backend // the zoned device (or plain image) to serve
	ReadOnly  bool
	BlockSize uint32 // logical block size; 0 = 512
}

// Attachment is a live (or recorded) attachment.
type Attachment struct {
	VolumeID   string `json:"volumeID"`
	DevicePath string `json:"devicePath"` // e.g. /dev/nbd3, or a regular file for the file attacher
	Index      int    `json:"index"`      // nbd index, -1 when not applicable
	ImagePath  string `json:"imagePath"`
	BackendID  string `json:"backendID"`
	Generation uint64 `json:"generation"` // bumped on every reattach
	ReadOnly   bool   `json:"readOnly"`
	Kind       string `json:"kind"`
}
