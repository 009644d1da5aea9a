package imgcmd

// qemu-io's zone commands (qemu-io-cmds.c, QEMU 8.1+): zone_report (zrp),
// zone_open (zo), zone_close (zc), zone_finish (zf), zone_reset (zrs) and
// zone_append (zap), with its syntax and output, so tests and people can
// drive a zoned image without a VM. Addresses in the output are 512-byte
// sectors, as qemu-io prints them; failures print "<command> failed:
// <strerror>" with the errno a Linux zoned block device returns.

import (
	"bytes"
	"fmt"
	"io"
	"math"
	"math/bits"
	"strconv"
	"syscall"

	"github.com/zq-csi/zq-csi/pkg/zoned"
)

func init() {
	registerIOCommand(ioCommand{name: "zone_report", aliases: []string{"zrp"}, args: "offset number",
		oneline: "report zone information", nargs: 2, run: ioZoneReport})
	registerIOCommand(ioCommand{name: "zone_open", aliases: []string{"zo"}, args: "offset len",
		oneline: "explicit open a range of zones in zone block device", nargs: 2, write: true, run: zoneMgmt(zoned.OpOpen, "zone open")})
	registerIOCommand(ioCommand{name: "zone_close", aliases: []string{"zc"}, args: "offset len",
		oneline: "close a range of zones in zone block device", nargs: 2, write: true, run: zoneMgmt(zoned.OpClose, "zone close")})
	registerIOCommand(ioCommand{name: "zone_finish", aliases: []string{"zf"}, args: "offset len",
		oneline: "finish a range of zones in zone block device", nargs: 2, write: true, run: zoneMgmt(zoned.OpFinish, "zone finish")})
	registerIOCommand(ioCommand{name: "zone_reset", aliases: []string{"zrs"}, args: "offset len",
		oneline: "reset a zone write pointer in zone block device", nargs: 2, write: true, run: zoneMgmt(zoned.OpReset, "zone reset")})
	registerIOCommand(ioCommand{name: "zone_append", aliases: []string{"zap"}, args: "[-p] offset len [len..]",
		oneline: "append write a number of bytes at a specified offset", opts: "p", nargs: 2, maxArgs: maxAppendArgs,
		write: true, run: ioZoneAppend})
}

// maxAppendArgs bounds the lengths one zap accepts (qemu-io has no limit
// beyond its line length).
const maxAppendArgs = 1024

func sectors(b uint64) uint64 { return b >> 9 }

// zoned returns the zone engine, or prints qemu-io's answer for a device
// without zones (the block layer's ENOTSUP).
func (s *ioSession) zoned(what string) (*zoned.Device, error) {
	if s.zdev == nil {
		return nil, s.failed(what, syscall.ENOTSUP)
	}
	return s.zdev, nil
}

// ioZoneReport: zrp OFFSET NR_ZONES reports up to NR_ZONES zones from the
// one holding OFFSET; an offset past the end reports none.
func ioZoneReport(s *ioSession, _ []opt, args []string) error {
	off, err := s.num(args[0])
	if err != nil {
		return err
	}
	nr, err := s.num(args[1])
	if err != nil {
		return err
	}
	if nr > math.MaxUint32 {
		fmt.Fprintln(s.out, "Number of zones must be less than 2^32")
		return errFailed
	}
	d, err := s.zoned("zone report")
	if err != nil {
		return err
	}
	g := d.Geometry()
	if uint64(off) >= g.Size {
		return nil
	}
	// In slices, so a report of 2^20 zones needs neither a 2^20-entry
	// report nor its whole text in memory at once.
	first := g.ZoneIndex(uint64(off))
	left := int(min(nr, int64(g.NrZones)-int64(first)))
	for left > 0 {
		n := min(left, reportSlice)
		if err := WriteZoneReport(s.out, d.Report(first, n)); err != nil {
			return err
		}
		first, left = first+n, left-n
	}
	return nil
}

// reportSlice is the number of zones zrp reports and writes at a time.
const reportSlice = 8192

// WriteZoneReport writes zones as qemu-io's zone_report prints them, one
// line per zone, addresses in 512-byte sectors:
//
//	start: 0x%x, len 0x%x, cap 0x%x, wptr 0x%x, zcond:%u, [type: %u]
//
// `zq-csi volume zones` prints a staged volume's report the same way, so
// one parser reads both. The lines are built with strconv into one buffer
// and written in writes of about 64 KiB (fmt would cost most of the time
// of a report of 2^20 zones).
func WriteZoneReport(w io.Writer, zones []zoned.ZoneReport) error {
	const chunk = 64 << 10
	b := make([]byte, 0, chunk+128)
	for _, z := range zones {
		b = append(b, "start: 0x"...)
		b = appendHex(b, sectors(z.Start))
		b = append(b, ", len 0x"...)
		b = appendHex(b, sectors(z.Len))
		b = append(b, ", cap 0x"...)
		b = appendHex(b, sectors(z.Cap))
		b = append(b, ", wptr 0x"...)
		b = appendHex(b, sectors(z.WP))
		b = append(b, ", zcond:"...)
		b = strconv.AppendUint(b, uint64(z.Cond), 10)
		b = append(b, ", [type: "...)
		b = strconv.AppendUint(b, uint64(z.Type), 10)
		b = append(b, "]\n"...)
		if len(b) >= chunk {
			if _, err := w.Write(b); err != nil {
				return err
			}
			b = b[:0]
		}
	}
	if len(b) == 0 {
		return nil
	}
	_, err := w.Write(b)
	return err
}

// appendHex appends v in lower-case hexadecimal without leading zeros, as
// %x prints it (strconv's general base conversion divides digit by digit).
func appendHex(b []byte, v uint64) []byte {
	n := max(1, (bits.Len64(v)+3)/4)
	b = append(b, make([]byte, n)...)
	for i := len(b) - 1; i >= len(b)-n; i-- {
		b[i] = "0123456789abcdef"[v&15]
		v >>= 4
	}
	return b
}

// zoneMgmt builds zo, zc, zf and zrs: OFFSET and LEN must cover whole
// zones; zrs 0 <device size> resets every zone.
func zoneMgmt(op zoned.Op, what string) func(*ioSession, []opt, []string) error {
	return func(s *ioSession, _ []opt, args []string) error {
		off, err := s.num(args[0])
		if err != nil {
			return err
		}
		n, err := s.num(args[1])
		if err != nil {
			return err
		}
		d, err := s.zoned(what)
		if err != nil {
			return err
		}
		if err := d.Mgmt(op, uint64(off), uint64(n)); err != nil {
			return s.failed(what, err)
		}
		return nil
	}
}

// ioZoneAppend: zap [-p] OFFSET LEN [LEN...] appends the sum of the lengths
// (pattern 0xcd, as qemu-io) to the zone holding OFFSET; -p prints the
// sector the data went to.
func ioZoneAppend(s *ioSession, opts []opt, args []string) error {
	printSector := len(opts) > 0
	off, err := s.num(args[0])
	if err != nil {
		return err
	}
	var total int64
	for _, a := range args[1:] {
		n, err := s.num(a)
		if err != nil {
			return err
		}
		if n > maxRequest {
			fmt.Fprintf(s.out, "Argument '%s' exceeds maximum size %d\n", a, maxRequest)
			return errFailed
		}
		if total > maxRequest-n {
			fmt.Fprintf(s.out, "The total number of bytes exceed the maximum size %d\n", maxRequest)
			return errFailed
		}
		total += n
	}
	d, err := s.zoned("zone append")
	if err != nil {
		return err
	}
	zone := -1 // beyond the device: the engine refuses it
	if g := d.Geometry(); uint64(off) < g.Size {
		zone = g.ZoneIndex(uint64(off))
	}
	at, err := d.Append(zone, bytes.Repeat([]byte{0xcd}, int(total)), false)
	if err != nil {
		return s.failed("zone append", err)
	}
	if printSector {
		fmt.Fprintf(s.out, "After zap done, the append sector is 0x%x\n", sectors(at))
	}
	return nil
}
