package qcow2

import (
	"encoding/binary"
	"strconv"
)

// Internal snapshots are read (for info, check, and the refcounts they hold)
// but not created here: their clusters are shared through refcounts > 1,
// and writes copy shared L2 tables and data clusters away first.

type snapshot struct {
	info     SnapshotInfo
	l1Offset uint64
	l1Size   uint32
}

const maxSnapshots = 65536

func (im *Image) loadSnapshots(fileSize uint64) error {
	h := im.h
	if h.nbSnapshots == 0 {
		return nil
	}
	if h.nbSnapshots > maxSnapshots {
		return corruptf(offNbSnapshots, "%d snapshots exceed the limit %d", h.nbSnapshots, maxSnapshots)
	}
	if h.snapshotsOffset%im.clusterSize != 0 || h.snapshotsOffset == 0 || h.snapshotsOffset >= fileSize {
		return corruptf(offSnapshotsOffset, "snapshot table offset %d invalid (file size %d)", h.snapshotsOffset, fileSize)
	}
	be := binary.BigEndian
	off := h.snapshotsOffset
	read := func(n uint64) ([]byte, error) {
		if off+n > fileSize || off+n < off {
			return nil, corruptf(int64(off), "snapshot table runs past the end of the file (%d)", fileSize)
		}
		b := make([]byte, n)
		if _, err := im.f.ReadAt(b, int64(off)); err != nil {
			return nil, err
		}
		off += n
		return b, nil
	}
	for i := uint32(0); i < h.nbSnapshots; i++ {
		at := off
		b, err := read(40)
		if err != nil {
			return err
		}
		s := snapshot{l1Offset: be.Uint64(b[0:]), l1Size: be.Uint32(b[8:])}
		idLen, nameLen := uint64(be.Uint16(b[12:])), uint64(be.Uint16(b[14:]))
		s.info.DateSec = be.Uint32(b[16:])
		s.info.DateNsec = be.Uint32(b[20:])
		s.info.VMClockNsec = be.Uint64(b[24:])
		s.info.VMStateSize = uint64(be.Uint32(b[32:]))
		extra := uint64(be.Uint32(b[36:]))
		if extra > 1024 {
			return corruptf(int64(at)+36, "snapshot %d extra data size %d too large", i, extra)
		}
		ex, err := read(extra)
		if err != nil {
			return err
		}
		s.info.ICount = -1
		if len(ex) >= 8 {
			s.info.VMStateSize = be.Uint64(ex[0:])
		}
		s.info.DiskSize = h.size
		if len(ex) >= 16 {
			s.info.DiskSize = be.Uint64(ex[8:])
		}
		if len(ex) >= 24 {
			s.info.ICount = int64(be.Uint64(ex[16:]))
		}
		id, err := read(idLen)
		if err != nil {
			return err
		}
		name, err := read(nameLen)
		if err != nil {
			return err
		}
		s.info.ID, s.info.Name = string(id), string(name)
		if s.info.ID == "" {
			s.info.ID = strconv.Itoa(int(i) + 1)
		}
		off = alignUp(off, 8)
		if s.l1Size > 32<<20/8 {
			return corruptf(int64(at)+8, "snapshot %q L1 size %d too large", s.info.Name, s.l1Size)
		}
		if err := im.checkTable(int64(at), "snapshot L1 table", s.l1Offset, uint64(s.l1Size)*8, fileSize); err != nil {
			return err
		}
		im.snapshots = append(im.snapshots, s)
	}
	im.snapTableSize = off - h.snapshotsOffset
	return nil
}
