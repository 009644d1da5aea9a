package ublk

import "encoding/binary"

// The ublk UAPI (include/uapi/linux/ublk_cmd.h) and the parts of
// include/uapi/linux/blkzoned.h that are ublk UAPI too (struct blk_zone).
// Structures are encoded by hand, little-endian, at the kernel's offsets.

var le = binary.LittleEndian

// ioctl-style command encodings (_IOR/_IOWR('u', nr, struct)); the kernel
// accepts them whatever UBLK_F_CMD_IOCTL_ENCODE says, and the legacy plain
// numbers only with CONFIG_BLKDEV_UBLK_LEGACY_OPCODES.
func iowr(nr, size uint32) uint32 { return 3<<30 | size<<16 | 'u'<<8 | nr }
func ior(nr, size uint32) uint32  { return 2<<30 | size<<16 | 'u'<<8 | nr }

const (
	ctrlCmdSize = 32 // struct ublksrv_ctrl_cmd
	ioCmdSize   = 16 // struct ublksrv_io_cmd
	devInfoSize = 64 // struct ublksrv_ctrl_dev_info
	ioDescSize  = 24 // struct ublksrv_io_desc
	blkZoneSize = 64 // struct blk_zone
)

var (
	cmdGetDevInfo        = ior(0x02, ctrlCmdSize)
	cmdAddDev            = iowr(0x04, ctrlCmdSize)
	cmdDelDev            = iowr(0x05, ctrlCmdSize)
	cmdStartDev          = iowr(0x06, ctrlCmdSize)
	cmdStopDev           = iowr(0x07, ctrlCmdSize)
	cmdSetParams         = iowr(0x08, ctrlCmdSize)
	cmdGetParams         = ior(0x09, ctrlCmdSize)
	cmdStartUserRecovery = iowr(0x10, ctrlCmdSize)
	cmdEndUserRecovery   = iowr(0x11, ctrlCmdSize)
	cmdGetFeatures       = ior(0x13, ctrlCmdSize)
	cmdDelDevAsync       = ior(0x14, ctrlCmdSize)

	ioFetchReq          = iowr(0x20, ioCmdSize)
	ioCommitAndFetchReq = iowr(0x21, ioCmdSize)
)

// Device feature flags (UBLK_F_*).
const (
	FlagUserRecovery        = 1 << 3
	FlagUserRecoveryReissue = 1 << 4
	FlagCmdIoctlEncode      = 1 << 6
	FlagUserCopy            = 1 << 7
	FlagZoned               = 1 << 8
	FlagUserRecoveryFailIO  = 1 << 9
)

// Device states (UBLK_S_DEV_*).
const (
	StateDead     = 0
	StateLive     = 1
	StateQuiesced = 2
	StateFailIO   = 3
)

// I/O operations (UBLK_IO_OP_*), the low 8 bits of op_flags.
const (
	opRead         = 0
	opWrite        = 1
	opFlush        = 2
	opDiscard      = 3
	opWriteSame    = 4
	opWriteZeroes  = 5
	opZoneOpen     = 10
	opZoneClose    = 11
	opZoneFinish   = 12
	opZoneAppend   = 13
	opZoneResetAll = 14
	opZoneReset    = 15
	opReportZones  = 18
)

// I/O flags (UBLK_IO_F_*), bits of op_flags.
const (
	ioFlagFUA     = 1 << 13
	ioFlagNoUnmap = 1 << 15
)

// ioResAbort is UBLK_IO_RES_ABORT (-ENODEV): the device is going away and
// the command will not be fetched again.
const ioResAbort = -19

// User-copy offsets on /dev/ublkcN: UBLKSRV_IO_BUF_OFFSET + qid << 41 +
// tag << 25 + byte offset in the request.
const (
	ioBufOffset = 0x80000000
	tagOff      = 25
	qidOff      = tagOff + 16
)

func userCopyPos(q, tag uint16, off int64) int64 {
	return ioBufOffset + int64(q)<<qidOff + int64(tag)<<tagOff + off
}

// maxQueueDepth is UBLK_MAX_QUEUE_DEPTH; the io descriptor area of every
// queue is sized for it when computing mmap offsets.
const maxQueueDepth = 4096

// maxQueues is UBLK_MAX_NR_QUEUES, the most hardware queues ADD_DEV takes.
const maxQueues = 4096

// cmdBufSize is the mmap size of a queue's descriptor array:
// round_up(depth * sizeof(ublksrv_io_desc), PAGE_SIZE).
func cmdBufSize(depth, pageSize int) int {
	n := depth * ioDescSize
	return (n + pageSize - 1) / pageSize * pageSize
}

// descOffset is the mmap offset of queue q's descriptor array on
// /dev/ublkcN. ublk_ch_mmap finds the queue as (offset -
// UBLKSRV_CMD_BUF_OFFSET) / ublk_max_cmd_buf_size(), the latter being the
// array's size for UBLK_MAX_QUEUE_DEPTH tags, whatever the device's depth;
// UBLKSRV_CMD_BUF_OFFSET is 0. The mapping's length must be the array's
// size for the device's depth (cmdBufSize).
func descOffset(q uint16, pageSize int) int64 {
	return int64(q) * int64(cmdBufSize(maxQueueDepth, pageSize))
}

// ctrlCmd is struct ublksrv_ctrl_cmd.
type ctrlCmd struct {
	DevID   uint32
	QueueID uint16
	Len     uint16
	Addr    uint64
	Data    uint64
	// dev_path_len, pad, reserved: unused (privileged devices only)
}

func (c ctrlCmd) encode(b []byte) {
	clear(b[:ctrlCmdSize])
	le.PutUint32(b[0:], c.DevID)
	le.PutUint16(b[4:], c.QueueID)
	le.PutUint16(b[6:], c.Len)
	le.PutUint64(b[8:], c.Addr)
	le.PutUint64(b[16:], c.Data)
}

// DevInfo is struct ublksrv_ctrl_dev_info.
type DevInfo struct {
	NrHWQueues    uint16
	QueueDepth    uint16
	State         uint16
	MaxIOBufBytes uint32
	DevID         uint32
	ServerPID     int32
	Flags         uint64
	ServerFlags   uint64 // ublksrv_flags: ours, the kernel keeps it
	OwnerUID      uint32
	OwnerGID      uint32
}

func (d DevInfo) encode(b []byte) {
	clear(b[:devInfoSize])
	le.PutUint16(b[0:], d.NrHWQueues)
	le.PutUint16(b[2:], d.QueueDepth)
	le.PutUint16(b[4:], d.State)
	le.PutUint32(b[8:], d.MaxIOBufBytes)
	le.PutUint32(b[12:], d.DevID)
	le.PutUint32(b[16:], uint32(d.ServerPID))
	le.PutUint64(b[24:], d.Flags)
	le.PutUint64(b[32:], d.ServerFlags)
	le.PutUint32(b[40:], d.OwnerUID)
	le.PutUint32(b[44:], d.OwnerGID)
}

func decodeDevInfo(b []byte) DevInfo {
	return DevInfo{
		NrHWQueues: le.Uint16(b[0:]), QueueDepth: le.Uint16(b[2:]), State: le.Uint16(b[4:]),
		MaxIOBufBytes: le.Uint32(b[8:]), DevID: le.Uint32(b[12:]), ServerPID: int32(le.Uint32(b[16:])),
		Flags: le.Uint64(b[24:]), ServerFlags: le.Uint64(b[32:]), OwnerUID: le.Uint32(b[40:]), OwnerGID: le.Uint32(b[44:]),
	}
}

// Parameter types (UBLK_PARAM_TYPE_*) and attributes (UBLK_ATTR_*).
const (
	paramTypeBasic   = 1 << 0
	paramTypeDiscard = 1 << 1
	paramTypeDevt    = 1 << 2
	paramTypeZoned   = 1 << 3

	attrReadOnly      = 1 << 0
	attrRotational    = 1 << 1
	attrVolatileCache = 1 << 2
	attrFUA           = 1 << 3
)

// Params is the subset of struct ublk_params we set: basic, discard and
// zoned (devt is read-only and returned by GET_PARAMS).
type Params struct {
	Types uint32
	// basic
	Attrs                                       uint32
	LogicalBSShift, PhysicalBSShift, IOOptShift uint8
	IOMinShift                                  uint8
	MaxSectors, ChunkSectors                    uint32
	DevSectors                                  uint64
	// discard
	DiscardAlignment, DiscardGranularity, MaxDiscardSectors, MaxWriteZeroesSectors uint32
	MaxDiscardSegments                                                             uint16
	// devt (GET_PARAMS only)
	CharMajor, CharMinor, DiskMajor, DiskMinor uint32
	// zoned
	MaxOpenZones, MaxActiveZones, MaxZoneAppendSectors uint32
}

// paramsLen covers header, basic, discard, devt and zoned: the layout
// every zoned-capable kernel (6.6+) knows. Later members (dma_align,
// segment, ...) are left out, so older kernels accept the length.
const paramsLen = 108

func (p Params) encode(b []byte) {
	clear(b[:paramsLen])
	le.PutUint32(b[0:], paramsLen)
	le.PutUint32(b[4:], p.Types)
	// struct ublk_param_basic at 8
	le.PutUint32(b[8:], p.Attrs)
	b[12], b[13], b[14], b[15] = p.LogicalBSShift, p.PhysicalBSShift, p.IOOptShift, p.IOMinShift
	le.PutUint32(b[16:], p.MaxSectors)
	le.PutUint32(b[20:], p.ChunkSectors)
	le.PutUint64(b[24:], p.DevSectors)
	// virt_boundary_mask at 32: 0
	// struct ublk_param_discard at 40
	le.PutUint32(b[40:], p.DiscardAlignment)
	le.PutUint32(b[44:], p.DiscardGranularity)
	le.PutUint32(b[48:], p.MaxDiscardSectors)
	le.PutUint32(b[52:], p.MaxWriteZeroesSectors)
	le.PutUint16(b[56:], p.MaxDiscardSegments)
	// struct ublk_param_devt at 60 (read-only)
	// struct ublk_param_zoned at 76
	le.PutUint32(b[76:], p.MaxOpenZones)
	le.PutUint32(b[80:], p.MaxActiveZones)
	le.PutUint32(b[84:], p.MaxZoneAppendSectors)
}

func decodeParams(b []byte) Params {
	return Params{
		Types: le.Uint32(b[4:]), Attrs: le.Uint32(b[8:]),
		LogicalBSShift: b[12], PhysicalBSShift: b[13], IOOptShift: b[14], IOMinShift: b[15],
		MaxSectors: le.Uint32(b[16:]), ChunkSectors: le.Uint32(b[20:]), DevSectors: le.Uint64(b[24:]),
		DiscardAlignment: le.Uint32(b[40:]), DiscardGranularity: le.Uint32(b[44:]),
		MaxDiscardSectors: le.Uint32(b[48:]), MaxWriteZeroesSectors: le.Uint32(b[52:]), MaxDiscardSegments: le.Uint16(b[56:]),
		CharMajor: le.Uint32(b[60:]), CharMinor: le.Uint32(b[64:]), DiskMajor: le.Uint32(b[68:]), DiskMinor: le.Uint32(b[72:]),
		MaxOpenZones: le.Uint32(b[76:]), MaxActiveZones: le.Uint32(b[80:]), MaxZoneAppendSectors: le.Uint32(b[84:]),
	}
}

// ioDesc is struct ublksrv_io_desc, read from the queue's mmapped area.
type ioDesc struct {
	OpFlags     uint32
	NrSectors   uint32 // nr_zones for REPORT_ZONES
	StartSector uint64
	Addr        uint64
}

func decodeIODesc(b []byte) ioDesc {
	return ioDesc{OpFlags: le.Uint32(b[0:]), NrSectors: le.Uint32(b[4:]), StartSector: le.Uint64(b[8:]), Addr: le.Uint64(b[16:])}
}

func (d ioDesc) op() uint8 { return uint8(d.OpFlags) }

// ioCmd is struct ublksrv_io_cmd; Addr carries zone_append_lba (in
// sectors) when committing a ZONE_APPEND.
type ioCmd struct {
	QID    uint16
	Tag    uint16
	Result int32
	Addr   uint64
}

func (c ioCmd) encode(b []byte) {
	clear(b[:ioCmdSize])
	le.PutUint16(b[0:], c.QID)
	le.PutUint16(b[2:], c.Tag)
	le.PutUint32(b[4:], uint32(c.Result))
	le.PutUint64(b[8:], c.Addr)
}

// blkZone is struct blk_zone; every field in 512-byte sectors.
type blkZone struct {
	Start, Len, WP uint64
	Type, Cond     uint8
	NonSeq, Reset  uint8
	Capacity       uint64
}

func (z blkZone) encode(b []byte) {
	clear(b[:blkZoneSize])
	le.PutUint64(b[0:], z.Start)
	le.PutUint64(b[8:], z.Len)
	le.PutUint64(b[16:], z.WP)
	b[24], b[25], b[26], b[27] = z.Type, z.Cond, z.NonSeq, z.Reset
	le.PutUint64(b[32:], z.Capacity)
}

func decodeBlkZone(b []byte) blkZone {
	return blkZone{
		Start: le.Uint64(b[0:]), Len: le.Uint64(b[8:]), WP: le.Uint64(b[16:]),
		Type: b[24], Cond: b[25], NonSeq: b[26], Reset: b[27], Capacity: le.Uint64(b[32:]),
	}
}
