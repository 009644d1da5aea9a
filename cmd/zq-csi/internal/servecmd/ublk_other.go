//go:build !linux

package servecmd

import "errors"

func probeZonedUblk() error {
	return errors.New("no zoned ublk: ublk is a Linux driver")
}

func newUblkAttacher(string, int) (zonedAttacher, error) {
	return nil, errors.New("the ublk attacher needs Linux")
}
