//go:build !linux

package servecmd

import (
	"errors"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
)

func newNBDAttacher(string) (nbdattach.Attacher, error) {
	return nil, errors.New("the nbd attacher needs Linux; use --attacher=file")
}
