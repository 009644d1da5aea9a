//go:build !linux

package fuseloop

import (
	"errors"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
)

// Kind is what Attacher.Kind returns.
const Kind = "fuse-loop"

// Options configure an Attacher.
type Options struct {
	StateDir   string
	NoDirectIO bool
}

// Available reports why this host cannot run the attacher.
func Available() error { return errors.New("fuse-loop needs Linux") }

// New fails: the attacher needs Linux.
func New(Options) (nbdattach.Attacher, error) { return nil, Available() }
