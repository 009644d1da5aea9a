package imgcmd

// Number formatting copied from qemu so that our output reads like
// qemu-img's and qemu-io's (util/cutils.c size_to_str, qemu-io-cmds.c
// cvtstr/timestr/print_report).

import (
	"fmt"
	"math"
	"strings"
	"time"
)

// sizeToStr is qemu's size_to_str: "%0.3g" of the value in the largest
// binary unit whose integer part stays below 1000 ("768 MiB", "396 KiB").
func sizeToStr(v uint64) string {
	suffixes := []string{"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}
	_, e := math.Frexp(float64(v) / (1000.0 / 1024.0))
	i := (e - 1) / 10 // C division truncates toward zero, as Go's does
	if i < 0 {
		i = 0
	}
	if i >= len(suffixes) {
		i = len(suffixes) - 1
	}
	div := uint64(1) << (10 * i)
	return fmt.Sprintf("%0.3g %sB", float64(v)/float64(div), suffixes[i])
}

// cvtstr is qemu-io's cvtstr: "64 KiB", "1.500 KiB", "512 bytes".
func cvtstr(v float64) string {
	var s, suffix string
	switch {
	case v >= 1<<60:
		s, suffix = fmt.Sprintf("%.3f", v/(1<<60)), " EiB"
	case v >= 1<<50:
		s, suffix = fmt.Sprintf("%.3f", v/(1<<50)), " PiB"
	case v >= 1<<40:
		s, suffix = fmt.Sprintf("%.3f", v/(1<<40)), " TiB"
	case v >= 1<<30:
		s, suffix = fmt.Sprintf("%.3f", v/(1<<30)), " GiB"
	case v >= 1<<20:
		s, suffix = fmt.Sprintf("%.3f", v/(1<<20)), " MiB"
	case v >= 1<<10:
		s, suffix = fmt.Sprintf("%.3f", v/(1<<10)), " KiB"
	default:
		s, suffix = fmt.Sprintf("%f", v), " bytes"
	}
	if i := strings.Index(s, ".000"); i >= 0 {
		return s[:i] + suffix
	}
	return s + suffix
}

// timestr is qemu-io's timestr without the fixed-time flags:
// "00.00 sec" below one second, "H:MM:SS.ss" above.
func timestr(d time.Duration) string {
	sec := int64(d / time.Second)
	frac := float64(d%time.Second) / 1e9
	if sec == 0 {
		return fmt.Sprintf("%05.2f sec", frac)
	}
	return fmt.Sprintf("%d:%02d:%05.2f", sec/3600, (sec/60)%60, float64(sec%60)+frac)
}

// ioReport is qemu-io's print_report for one command.
func ioReport(op string, d time.Duration, offset, count, total int64, ops int) string {
	if d <= 0 {
		d = time.Nanosecond
	}
	secs := d.Seconds()
	return fmt.Sprintf("%s %d/%d bytes at offset %d\n%s, %d ops; %s (%s/sec and %.4f ops/sec)\n",
		op, total, count, offset,
		cvtstr(float64(total)), ops, timestr(d), cvtstr(float64(total)/secs), float64(ops)/secs)
}

// pathCombine is qemu's path_combine: a relative backing file name is
// relative to the directory of the image that names it.
func pathCombine(base, name string) string {
	if name == "" || strings.HasPrefix(name, "/") {
		return name
	}
	i := strings.LastIndexByte(base, '/')
	if i < 0 {
		return name
	}
	return base[:i+1] + name
}

// hexDump is qemu-io's dump_buffer (read -v).
func hexDump(b []byte, offset int64) string {
	var sb strings.Builder
	for i := 0; i < len(b); i += 16 {
		end := min(i+16, len(b))
		fmt.Fprintf(&sb, "%08x:  ", offset+int64(i))
		for _, c := range b[i:end] {
			fmt.Fprintf(&sb, "%02x ", c)
		}
		sb.WriteByte(' ')
		for _, c := range b[i:end] {
			if isAlnum(c) {
				sb.WriteByte(c)
			} else {
				sb.WriteByte('.')
			}
		}
		sb.WriteByte('\n')
	}
	return sb.String()
}

func isAlnum(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
}
