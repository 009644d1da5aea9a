//go:build !linux

package servecmd

import (
	"errors"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
)

func newFuseLoopAttacher(string) (nbdattach.Attacher, error) {
	return nil, errors.New("the fuse-loop attacher needs Linux; use --attacher=file")
}

func chooseAttacher() (kind, reason string) {
	return "fuse-loop", "not Linux"
}
