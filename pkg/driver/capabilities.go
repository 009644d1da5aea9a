package driver

import (
	"github.com/container-storage-interface/spec/lib/go/csi"
)

// Access modes of a node-local volume (DESIGN.md point 8).
var supportedAccessModes = map[csi.VolumeCapability_AccessMode_Mode]bool{
	csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER:        true,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER: true,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:  true,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY:   true,
}

// checkCapability says why a capability is not supported, or nil.
func checkCapability(c *csi.VolumeCapability) error {
	if c == nil {
		return errorf(ErrInvalidArgument, "volume capability is missing")
	}
	switch c.GetAccessType().(type) {
	case *csi.VolumeCapability_Block:
	case *csi.VolumeCapability_Mount:
		return errorf(ErrInvalidArgument, "access type mount is not supported: zq-csi volumes are raw block devices (volumeMode: Block), because a file system on an NBD device cannot use its zones")
	default:
		return errorf(ErrInvalidArgument, "volume capability has no access type; zq-csi volumes need access type block")
	}
	m := c.GetAccessMode()
	if m == nil {
		return errorf(ErrInvalidArgument, "volume capability has no access mode")
	}
	if !supportedAccessModes[m.GetMode()] {
		return errorf(ErrInvalidArgument, "access mode %s is not supported: zq-csi volumes live on one node (SINGLE_NODE_WRITER, SINGLE_NODE_SINGLE_WRITER, SINGLE_NODE_MULTI_WRITER or SINGLE_NODE_READER_ONLY)", m.GetMode())
	}
	return nil
}

func checkCapabilities(cs []*csi.VolumeCapability) error {
	if len(cs) == 0 {
		return errorf(ErrInvalidArgument, "volume capabilities are missing")
	}
	for _, c := range cs {
		if err := checkCapability(c); err != nil {
			return err
		}
	}
	return nil
}
