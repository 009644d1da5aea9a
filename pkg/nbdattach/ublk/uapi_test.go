package ublk

import (
	"testing"

	"github.com/zq-csi/zq-csi/pkg/zoned"
)

// The command numbers as the kernel headers' _IOR/_IOWR macros compute
// them (checked against a C build of linux/ublk_cmd.h).
func TestCommandEncoding(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uint32
	}{
		{"UBLK_U_CMD_ADD_DEV", cmdAddDev, 0xc0207504},
		{"UBLK_U_CMD_GET_DEV_INFO", cmdGetDevInfo, 0x80207502},
		{"UBLK_U_CMD_DEL_DEV", cmdDelDev, 0xc0207505},
		{"UBLK_U_CMD_START_DEV", cmdStartDev, 0xc0207506},
		{"UBLK_U_CMD_STOP_DEV", cmdStopDev, 0xc0207507},
		{"UBLK_U_CMD_SET_PARAMS", cmdSetParams, 0xc0207508},
		{"UBLK_U_CMD_GET_PARAMS", cmdGetParams, 0x80207509},
		{"UBLK_U_CMD_START_USER_RECOVERY", cmdStartUserRecovery, 0xc0207510},
		{"UBLK_U_CMD_END_USER_RECOVERY", cmdEndUserRecovery, 0xc0207511},
		{"UBLK_U_CMD_GET_FEATURES", cmdGetFeatures, 0x80207513},
		{"UBLK_U_IO_FETCH_REQ", ioFetchReq, 0xc0107520},
		{"UBLK_U_IO_COMMIT_AND_FETCH_REQ", ioCommitAndFetchReq, 0xc0107521},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
	if p := userCopyPos(1, 3, 512); p != 0x80000000+1<<41+3<<25+512 {
		t.Errorf("user copy offset %#x", p)
	}
	if n := cmdBufSize(64, 4096); n != 4096 {
		t.Errorf("descriptor area of 64 tags: %d", n)
	}
	if n := cmdBufSize(4096, 4096); n != 24*4096 {
		t.Errorf("descriptor area of 4096 tags: %d", n)
	}
}

// Queue q's descriptors are mapped at q times the area of
// UBLK_MAX_QUEUE_DEPTH descriptors (ublk_ch_mmap), whatever the depth;
// user-copy offsets carry the queue in bits 41 and up.
func TestQueueOffsets(t *testing.T) {
	for _, c := range []struct {
		q        uint16
		pageSize int
		want     int64
	}{
		{0, 4096, 0},
		{1, 4096, 98304},
		{3, 4096, 3 * 98304},
		{2, 65536, 2 * 131072}, // 96 KiB rounded up to 64 KiB pages
	} {
		if got := descOffset(c.q, c.pageSize); got != c.want {
			t.Errorf("descOffset(%d, %d) = %d, want %d", c.q, c.pageSize, got, c.want)
		}
		if got := descOffset(c.q, c.pageSize); got%int64(c.pageSize) != 0 {
			t.Errorf("descOffset(%d, %d) = %d is not page aligned", c.q, c.pageSize, got)
		}
	}
	for _, c := range []struct {
		q, tag uint16
		off    int64
		want   int64
	}{
		{0, 0, 0, 0x80000000},
		{1, 0, 0, 0x80000000 + 1<<41},
		{3, 63, 4096, 0x80000000 + 3<<41 + 63<<25 + 4096},
	} {
		if got := userCopyPos(c.q, c.tag, c.off); got != c.want {
			t.Errorf("userCopyPos(%d, %d, %d) = %#x, want %#x", c.q, c.tag, c.off, got, c.want)
		}
	}
}

func TestParamsLayout(t *testing.T) {
	g := zoned.Geometry{Size: 64 << 20, ZoneSize: 4 << 20, NrZones: 16, MaxOpen: 4, MaxActive: 40, MaxAppendBytes: 128 << 10}
	p := ParamsFor(g, 512<<10)
	b := make([]byte, paramsLen)
	p.encode(b)
	for _, c := range []struct {
		name      string
		off       int
		got, want uint64
	}{
		{"len", 0, uint64(le.Uint32(b[0:])), 108},
		{"types basic|zoned", 4, uint64(le.Uint32(b[4:])), 1 | 8},
		{"attrs volatile cache|fua", 8, uint64(le.Uint32(b[8:])), 4 | 8},
		{"logical_bs_shift", 12, uint64(b[12]), 9},
		{"physical_bs_shift", 13, uint64(b[13]), 12},
		{"max_sectors", 16, uint64(le.Uint32(b[16:])), 1024},
		{"chunk_sectors", 20, uint64(le.Uint32(b[20:])), 8192},
		{"dev_sectors", 24, le.Uint64(b[24:]), 131072},
		{"max_open_zones", 76, uint64(le.Uint32(b[76:])), 4},
		{"max_active_zones (clamped to nr_zones)", 80, uint64(le.Uint32(b[80:])), 16},
		{"max_zone_append_sectors", 84, uint64(le.Uint32(b[84:])), 256},
	} {
		if c.got != c.want {
			t.Errorf("%s at %d = %d, want %d", c.name, c.off, c.got, c.want)
		}
	}
	if d := decodeParams(b); d != p {
		t.Errorf("round trip: %+v != %+v", d, p)
	}
	// Zone append disabled in the image: the kernel needs a non-zero
	// limit, the engine refuses the appends.
	g.MaxAppendBytes = 0
	if p := ParamsFor(g, 512<<10); p.MaxZoneAppendSectors != 1024 {
		t.Errorf("append disabled: max_zone_append_sectors %d", p.MaxZoneAppendSectors)
	}
}

func TestDevInfoRoundTrip(t *testing.T) {
	in := DevInfo{NrHWQueues: 1, QueueDepth: 64, State: StateLive, MaxIOBufBytes: 512 << 10, DevID: 3, ServerPID: 42,
		Flags: FlagUserCopy | FlagZoned, ServerFlags: 7, OwnerUID: 1, OwnerGID: 2}
	b := make([]byte, devInfoSize)
	in.encode(b)
	if le.Uint64(b[24:]) != FlagUserCopy|FlagZoned || le.Uint32(b[16:]) != 42 {
		t.Fatalf("flags or pid at the wrong offset: % x", b)
	}
	if out := decodeDevInfo(b); out != in {
		t.Fatalf("%+v != %+v", out, in)
	}
	z := blkZone{Start: 8, Len: 8, WP: 12, Type: 2, Cond: 2, Capacity: 6}
	zb := make([]byte, blkZoneSize)
	z.encode(zb)
	if zb[24] != 2 || le.Uint64(zb[32:]) != 6 || decodeBlkZone(zb) != z {
		t.Fatalf("blk_zone layout: % x", zb)
	}
}
