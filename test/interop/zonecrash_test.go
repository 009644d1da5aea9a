package interop

import (
	"bufio"
	"fmt"
	"io"
	"math/rand"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The kill -9 test again, with the real command line: `zq-csi img io` runs
// a planned zone workload read from its standard input (writes at the WP,
// zone appends, finishes, resets, explicit opens, flushes) and is killed
// with SIGKILL after a random number of completed commands. Every command
// is followed by a one-zone `zrp`, whose line says the command before it
// completed. Commands run one after another, so after the kill at most one
// command was in flight. Then, in new processes:
// `img io -c "zrp 0 N"` opens the image read-write as the product does,
// `img check` must be clean, every zone's write pointer must be exactly
// where the acknowledged commands put it (or where the one command in
// flight would have put it, for its zone), and `img io -r` must find every
// acknowledged write's pattern (and zeros after a finished zone's data).

const (
	zcZones = 16
	zcZone  = 256 << 10
	zcCap   = 248 << 10
	zcConv  = 1
)

type zcRec struct {
	off, n  int64
	pattern int
}

type zcZoneModel struct {
	wp   int64 // absolute byte offset; the writable end when FULL
	recs []zcRec
	full bool // finished (zeros from the data to the writable end)
}

type zcOp struct {
	cmd      string
	zone     int
	before   zcZoneModel // the zone before the command
	after    zcZoneModel // and after it
	mutating bool
}

func zcStart(z int) int64 { return int64(z) * zcZone }
func zcEnd(z int) int64   { return zcStart(z) + zcCap }

// zcPlan plans n commands from the state zones, which it advances.
func zcPlan(rng *rand.Rand, zones []zcZoneModel, n int, pattern *int) []zcOp {
	var ops []zcOp
	clone := func(m zcZoneModel) zcZoneModel { m.recs = append([]zcRec(nil), m.recs...); return m }
	for len(ops) < n {
		z := zcConv + rng.Intn(zcZones-zcConv)
		m := &zones[z]
		op := zcOp{zone: z, before: clone(*m), mutating: true}
		left := zcEnd(z) - m.wp
		switch k := rng.Intn(100); {
		case left == 0 || k < 8:
			op.cmd = fmt.Sprintf("zrs %d %d", zcStart(z), zcZone)
			*m = zcZoneModel{wp: zcStart(z)}
		case k < 55:
			*pattern = *pattern%250 + 1
			if *pattern == 0xcd { // zap's pattern
				*pattern++
			}
			n := min(int64(1+rng.Intn(32))*512, left)
			op.cmd = fmt.Sprintf("write -P 0x%x %d %d", *pattern, m.wp, n)
			m.recs = append(m.recs, zcRec{m.wp, n, *pattern})
			m.wp += n
		case k < 85:
			n := min(int64(1+rng.Intn(16))*512, left)
			op.cmd = fmt.Sprintf("zap -p %d %d", zcStart(z), n)
			m.recs = append(m.recs, zcRec{m.wp, n, 0xcd})
			m.wp += n
		case k < 90:
			op.cmd = fmt.Sprintf("zf %d %d", zcStart(z), zcZone)
			m.wp, m.full = zcEnd(z), true
		case k < 95:
			op.cmd, op.mutating = fmt.Sprintf("zo %d %d", zcStart(z), zcZone), false
		default:
			op.cmd, op.mutating = "flush", false
		}
		op.after = clone(*m)
		ops = append(ops, op)
	}
	return ops
}

var zcZrpLine = regexp.MustCompile(`^start: 0x([0-9a-f]+), len 0x[0-9a-f]+, cap 0x[0-9a-f]+, wptr 0x([0-9a-f]+), zcond:(\d+), \[type: \d+\]$`)

func TestZoneKill9ImgIO(t *testing.T) {
	rounds := 12
	if testing.Short() {
		rounds = 3
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "crash.qcow2")
	mustZq(t, dir, "create", "-f", "qcow2", "-o", fmt.Sprintf("zone.mode=host-managed,zone.size=%d,zone.capacity=%d,zone.conventional_zones=%d", zcZone, zcCap, zcConv), img, strconv.Itoa(zcZones*zcZone))
	zones := make([]zcZoneModel, zcZones)
	for z := range zones {
		zones[z].wp = zcStart(z)
	}
	rng := rand.New(rand.NewSource(int64(seedFor(t, 9))))
	pattern := 0
	for round := 0; round < rounds; round++ {
		start := append([]zcZoneModel(nil), zones...)
		ops := zcPlan(rng, zones, 300, &pattern)
		target := 1 + rng.Intn(len(ops)-1)
		delay := time.Duration(rng.Intn(2000)) * time.Microsecond
		acked, out := zcRun(t, img, ops, target, delay)
		if i := strings.Index(out, " failed: "); i >= 0 {
			t.Fatalf("round %d: a planned command failed (the plan and the device disagree): %s\noutput:\n%s", round, out[strings.LastIndex(out[:i], "\n")+1:i+40], out)
		}
		if acked < target {
			t.Fatalf("round %d: %d commands completed before the kill, want %d; output:\n%s", round, acked, target, out)
		}
		// The state every acknowledged command left; the command after
		// them may or may not have run.
		copy(zones, start)
		for _, op := range ops[:acked] {
			zones[op.zone] = op.after
		}
		var inflight *zcOp
		if acked < len(ops) && ops[acked].mutating {
			inflight = &ops[acked]
		}
		// Open read-write as the product does (recovery), and report.
		r := mustZq(t, dir, "io", "-c", fmt.Sprintf("zrp 0 %d", zcZones), img)
		lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
		if len(lines) != zcZones {
			t.Fatalf("round %d: zrp printed %d lines:\n%s", round, len(lines), r.stdout)
		}
		for z := zcConv; z < zcZones; z++ {
			m := zcZrpLine.FindStringSubmatch(lines[z])
			if m == nil {
				t.Fatalf("round %d: unexpected zrp line %q", round, lines[z])
			}
			wp, _ := strconv.ParseInt(m[2], 16, 64)
			wp *= 512
			if m[3] == "14" {
				wp = zcEnd(z)
			}
			want := zones[z].wp
			if inflight != nil && inflight.zone == z && wp == inflight.after.wp && wp != want {
				zones[z] = inflight.after // the command in flight took effect
				want = wp
			}
			if wp != want {
				t.Fatalf("round %d (killed after %d commands + %v): zone %d: WP %d, the acknowledged commands put it at %d (in flight: %+v)\n%s", round, acked, delay, z, wp, want, inflight, lines[z])
			}
			wantCond := "4" // partially written zones come back CLOSED
			switch wp {
			case zcStart(z):
				wantCond = "1"
			case zcEnd(z):
				wantCond = "14"
			}
			if m[3] != wantCond {
				t.Fatalf("round %d: zone %d reopened with zcond %s at WP %d, want %s", round, z, m[3], wp, wantCond)
			}
		}
		if r := zq(t, dir, "check", img); r.code != 0 || !strings.Contains(r.stdout, "No errors were found on the image.") {
			t.Fatalf("round %d: img check after the reopen: %v", round, r)
		}
		// Every acknowledged write reads back; a finished zone reads zeros
		// after its data.
		args := []string{"io", "-r"}
		nrec := 0
		for z := zcConv; z < zcZones; z++ {
			end := zcStart(z)
			for _, rec := range zones[z].recs {
				args = append(args, "-c", fmt.Sprintf("read -P 0x%x %d %d", rec.pattern, rec.off, rec.n))
				end = rec.off + rec.n
				nrec++
			}
			if zones[z].full && end < zcEnd(z) {
				args = append(args, "-c", fmt.Sprintf("read -P 0 %d %d", end, zcEnd(z)-end))
			}
		}
		args = append(args, img)
		if r := zq(t, dir, args...); r.code != 0 || strings.Contains(r.stdout, "Pattern verification failed") {
			t.Fatalf("round %d: reading back %d acknowledged writes: %v", round, nrec, r)
		}
	}
}

// zcRun feeds ops to `zq-csi img io` and kills it with SIGKILL delay after
// the target-th command completed. It returns how many completed.
func zcRun(t *testing.T, img string, ops []zcOp, target int, delay time.Duration) (int, string) {
	cmd := exec.Command(zqBin, "img", "io", img)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	kill := func() { once.Do(func() { cmd.Process.Signal(syscall.SIGKILL) }) }
	watchdog := time.AfterFunc(30*time.Second, kill)
	defer watchdog.Stop()
	go func() {
		w := bufio.NewWriter(stdin)
		for _, op := range ops {
			fmt.Fprintf(w, "%s\nzrp %d 1\n", op.cmd, zcStart(op.zone))
		}
		w.Flush()
		// Keep stdin open: at its end the command would exit cleanly.
	}()
	var out strings.Builder
	acked := 0
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		fmt.Fprintln(&out, sc.Text())
		if strings.HasPrefix(sc.Text(), "start: ") {
			if acked++; acked == target {
				time.AfterFunc(delay, kill)
			}
		}
	}
	io.Copy(io.Discard, stdout)
	kill()
	cmd.Wait()
	stdin.Close()
	return acked, out.String()
}
