package zoned

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/zq-csi/zq-csi/pkg/qcow2"
)

// The kill -9 test (issue: "a child process runs a random zone workload and
// is killed with SIGKILL at random moments"). The child prints a line for
// everything the device acknowledged; the parent kills it after a random
// number of acknowledgements, reopens the image as the product does and
// checks it against what was acknowledged.

const (
	crashChildEnv = "ZQ_ZONED_CRASH_CHILD"
	crashSeqEnv   = "ZQ_ZONED_CRASH_SEQ"
	crashWorkers  = 4
	// appendTag marks the sectors of a zone append: their address field
	// holds the sector's index in the append (the offset is chosen by the
	// device), not its device offset.
	appendTag = 1 << 63
)

// pattern fills b with the content of write seq: every 512-byte sector
// carries an address (tag plus the sector's distance from the start of b)
// and seq, and the rest of the sector is derived from both, so that zeros,
// stale data, a torn sector or a sector of another write never match.
func pattern(b []byte, tag, seq uint64) {
	for s := 0; s+SectorSize <= len(b); s += SectorSize {
		sectorPattern(b[s:s+SectorSize], tag+uint64(s), seq)
	}
}

func sectorPattern(sec []byte, addr, seq uint64) {
	binary.LittleEndian.PutUint64(sec, addr)
	binary.LittleEndian.PutUint64(sec[8:], seq)
	x := addr*0x9e3779b97f4a7c15 ^ seq*0xc2b2ae3d27d4eb4f | 1
	for k := 16; k < SectorSize; k += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(sec[k:], x)
	}
}

// sectorStamp returns the address and seq a sector claims and whether the
// rest of it matches them (it is a whole sector of one workload write).
func sectorStamp(sec []byte) (addr, seq uint64, ok bool) {
	addr, seq = binary.LittleEndian.Uint64(sec), binary.LittleEndian.Uint64(sec[8:])
	var want [SectorSize]byte
	sectorPattern(want[:], addr, seq)
	return addr, seq, string(want[:]) == string(sec)
}

// crashChild is the workload: crashWorkers goroutines pick random zones and
// run writes at the WP, appends (several at once on one zone), finishes,
// resets, explicit opens and closes, flushes and writes to conventional
// zones. Each zone has a lock: writes and management take it exclusively,
// appends shared, and an operation's line is printed before the lock is
// released, so the lines of one zone are in the order the device did them
// and seq numbers (taken under the lock) order writes against resets.
type crashChild struct {
	d     *Device
	g     Geometry
	locks []sync.RWMutex
	seq   atomic.Uint64
	outMu sync.Mutex
}

func (c *crashChild) say(format string, args ...any) {
	line := fmt.Sprintf(format+"\n", args...)
	c.outMu.Lock()
	os.Stdout.WriteString(line) // one write(2) per line: in the pipe before the next operation
	c.outMu.Unlock()
}

// TestCrashChild is the child of TestKill9ZoneWorkload.
func TestCrashChild(t *testing.T) {
	path := os.Getenv(crashChildEnv)
	if path == "" {
		t.Skip("helper process for TestKill9ZoneWorkload; runs only when that test starts it")
	}
	seq0, err := strconv.ParseUint(os.Getenv(crashSeqEnv), 10, 64)
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	d, err := Open(path, OpenOptions{})
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	c := &crashChild{d: d, g: d.Geometry(), locks: make([]sync.RWMutex, d.Geometry().NrZones)}
	c.seq.Store(seq0)
	c.say("READY")
	for i := 0; i < crashWorkers; i++ {
		go c.run(rand.New(rand.NewSource(time.Now().UnixNano() + int64(i))))
	}
	// The parent kills us long before this; it is a bound in case the
	// parent died first.
	time.Sleep(60 * time.Second)
	fmt.Println("ERR not killed")
	os.Exit(1)
}

func (c *crashChild) run(rng *rand.Rand) {
	buf := make([]byte, 64<<10)
	for {
		z := int(c.g.Conventional) + rng.Intn(int(c.g.SequentialZones()))
		var err error
		switch k := rng.Intn(100); {
		case k < 5:
			err = c.convWrite(rng, buf)
		case k < 50:
			err = c.write(z, rng, buf)
		case k < 75:
			err = c.append(z, rng, buf)
		case k < 80:
			err = c.mgmt(z, OpFinish)
		case k < 85:
			err = c.mgmt(z, OpReset)
		case k < 90:
			err = c.mgmt(z, OpOpen)
		case k < 95:
			err = c.mgmt(z, OpClose)
		default:
			if err = c.d.Flush(); err == nil {
				c.say("FLUSH")
			}
		}
		c.relieve(err, rng)
	}
}

// relieve frees a zone resource after a command failed for lack of one.
func (c *crashChild) relieve(err error, rng *rand.Rand) {
	var want func(Cond) bool
	switch {
	case errors.Is(err, ErrTooManyOpenZones):
		want = func(cd Cond) bool { return cd == CondImpOpen || cd == CondExpOpen }
	case errors.Is(err, ErrTooManyActiveZones):
		want = func(cd Cond) bool { return cd == CondImpOpen || cd == CondExpOpen || cd == CondClosed }
	default:
		return
	}
	var cands []int
	for i, r := range c.d.Report(0, int(c.g.NrZones)) {
		if want(r.Cond) {
			cands = append(cands, i)
		}
	}
	if len(cands) > 0 {
		z := cands[rng.Intn(len(cands))]
		c.mgmt(z, []Op{OpClose, OpFinish, OpReset}[rng.Intn(3)])
	}
}

func (c *crashChild) write(z int, rng *rand.Rand, buf []byte) error {
	c.locks[z].Lock()
	r := c.d.Report(z, 1)[0]
	if r.Cond == CondFull {
		c.locks[z].Unlock()
		return c.mgmt(z, OpReset)
	}
	defer c.locks[z].Unlock()
	n := min(uint64(1+rng.Intn(64))*SectorSize, r.Start+r.Cap-r.WP)
	seq := c.seq.Add(1)
	b := buf[:n]
	pattern(b, r.WP, seq)
	if _, err := c.d.WriteAt(b, int64(r.WP), rng.Intn(20) == 0); err != nil {
		return err
	}
	c.say("ACK W %d %d %d %d", z, r.WP, n, seq)
	return nil
}

func (c *crashChild) append(z int, rng *rand.Rand, buf []byte) error {
	c.locks[z].RLock()
	defer c.locks[z].RUnlock()
	n := uint64(1+rng.Intn(int(c.g.MaxAppendBytes/SectorSize))) * SectorSize
	seq := c.seq.Add(1)
	b := buf[:n]
	pattern(b, appendTag, seq)
	off, err := c.d.Append(z, b, rng.Intn(20) == 0)
	if err != nil {
		return err
	}
	c.say("ACK A %d %d %d %d", z, off, n, seq)
	return nil
}

func (c *crashChild) convWrite(rng *rand.Rand, buf []byte) error {
	z := rng.Intn(int(c.g.Conventional))
	c.locks[z].Lock()
	defer c.locks[z].Unlock()
	off := c.g.ZoneStart(z) + uint64(rng.Intn(int(c.g.ZoneLen(z)/SectorSize)))*SectorSize
	n := min(uint64(1+rng.Intn(64))*SectorSize, c.g.ZoneEnd(z)-off)
	seq := c.seq.Add(1)
	b := buf[:n]
	pattern(b, off, seq)
	if _, err := c.d.WriteAt(b, int64(off), rng.Intn(20) == 0); err != nil {
		return err
	}
	c.say("ACK C %d %d %d %d", z, off, n, seq)
	return nil
}

// mgmt runs a management command on zone z. Resets and finishes are
// announced first: one cut short by the kill may or may not have happened.
func (c *crashChild) mgmt(z int, op Op) error {
	c.locks[z].Lock()
	defer c.locks[z].Unlock()
	name := map[Op]string{OpOpen: "OPEN", OpClose: "CLOSE", OpFinish: "FINISH", OpReset: "RESET"}[op]
	seq := c.seq.Add(1)
	if op == OpReset || op == OpFinish {
		c.say("TRY-%s %d %d", name, z, seq)
	}
	if err := c.d.Mgmt(op, c.g.ZoneStart(z), c.g.ZoneLen(z)); err != nil {
		return err
	}
	c.say("%s %d %d", name, z, seq)
	return nil
}

// crashZone is what the parent knows of a zone from the child's lines,
// over all rounds (the image carries over from round to round).
type crashZone struct {
	recs      []crashRec // writes and appends acknowledged since the last reset
	resetSeq  uint64     // seq of the last reset that happened: older data must not be under the WP
	tryReset  uint64     // seq of a reset the kill may have cut short
	finished  bool       // a finish was acknowledged since the last reset
	mayFinish bool       // a finish was attempted since the last reset
	conv      map[uint64]uint64
}

type crashRec struct {
	kind        string // W, A or C
	off, n, seq uint64
}

// TestKill9ZoneWorkload kills the zone workload of TestCrashChild with
// SIGKILL at random moments (after READY and a random number of
// acknowledgements, plus a random delay, so the kill lands inside
// operations), then opens the image read-write as the product does and
// requires: every zone's condition follows from its WP (partially written
// zones come back CLOSED); every WP is at or beyond the end of every write
// and append acknowledged since the zone's last reset, and an acknowledged
// finish left the zone FULL; every acknowledged write reads back whole
// (each sector carries its seq and address); every sector under a WP holds
// data of a workload write issued after the zone's last reset (or, in a
// finished zone, zeros after the data); the latest acknowledged data of
// conventional zones is there. After closing, the consistency check that
// `zq-csi img check` runs (qcow2.Check; its exit code is the command's)
// must find nothing: no corruption and no leak.
func TestKill9ZoneWorkload(t *testing.T) {
	rounds := 60
	if testing.Short() {
		rounds = 10
	}
	const zs = 256 << 10
	path := mkZoned(t, 16, 2, zs, zs-8192, 6, 8)
	g := Geometry{}
	if d, err := Open(path, OpenOptions{ReadOnly: true}); err != nil {
		t.Fatal(err)
	} else {
		g = d.Geometry()
		d.Close()
	}
	zones := make([]crashZone, g.NrZones)
	for z := range zones {
		zones[z].conv = map[uint64]uint64{}
	}
	rng := rand.New(rand.NewSource(1))
	totalAcks := 0
	for round := 0; round < rounds; round++ {
		target := 1 + rng.Intn(300)
		delay := time.Duration(rng.Intn(3000)) * time.Microsecond
		acks, lines := crashRound(t, round, path, uint64(round+1)<<40, target, delay, zones)
		if acks < target {
			t.Fatalf("round %d: the child acknowledged %d operations before it was killed, want %d; its last lines:\n%s", round, acks, target, tail(lines, 20))
		}
		totalAcks += acks
		if err := crashVerify(path, g, zones); err != nil {
			t.Fatalf("round %d (killed after %d acknowledgements + %v): %v\nthe child's last lines:\n%s", round, acks, delay, err, tail(lines, 40))
		}
		res, err := qcow2.Check(path, qcow2.CheckOptions{})
		if err != nil || res.ExitCode() != 0 || res.Leaks != 0 || res.Corruptions != 0 {
			t.Fatalf("round %d: check after the reopen: %+v %v", round, res, err)
		}
	}
	t.Logf("%d rounds, %d acknowledged operations checked", rounds, totalAcks)
}

// crashRound runs the child until it has printed target acknowledgements,
// waits delay, kills it with SIGKILL and folds its lines into zones.
func crashRound(t *testing.T, round int, path string, seq0 uint64, target int, delay time.Duration, zones []crashZone) (int, []string) {
	cmd := exec.Command(os.Args[0], "-test.run", "^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+path, crashSeqEnv+"="+strconv.FormatUint(seq0, 10))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var killOnce sync.Once
	kill := func() { killOnce.Do(func() { cmd.Process.Signal(syscall.SIGKILL) }) }
	watchdog := time.AfterFunc(20*time.Second, kill)
	defer watchdog.Stop()
	var lines []string
	acks := 0
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		line := sc.Text()
		lines = append(lines, line)
		f := strings.Fields(line)
		num := func(i int) uint64 {
			v, err := strconv.ParseUint(f[i], 10, 64)
			if err != nil {
				t.Fatalf("round %d: bad line from the child %q: %v", round, line, err)
			}
			return v
		}
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "ACK":
			z := &zones[num(2)]
			r := crashRec{kind: f[1], off: num(3), n: num(4), seq: num(5)}
			if r.kind == "C" {
				for s := uint64(0); s < r.n; s += SectorSize {
					z.conv[r.off+s] = r.seq
				}
			} else {
				z.recs = append(z.recs, r)
			}
		case "TRY-RESET":
			zones[num(1)].tryReset = num(2)
		case "RESET":
			zones[num(1)] = crashZone{resetSeq: num(2), conv: zones[num(1)].conv}
		case "TRY-FINISH":
			zones[num(1)].mayFinish = true
		case "FINISH":
			zones[num(1)].finished = true
		}
		if f[0] == "ACK" || f[0] == "RESET" || f[0] == "FINISH" || f[0] == "OPEN" || f[0] == "CLOSE" || f[0] == "FLUSH" {
			if acks++; acks == target {
				time.AfterFunc(delay, kill)
			}
		}
	}
	kill()
	cmd.Wait()
	return acks, lines
}

// crashVerify opens the image read-write (recovering the write pointers as
// the product does), checks it against zones, and closes it.
func crashVerify(path string, g Geometry, zones []crashZone) error {
	d, err := Open(path, OpenOptions{})
	if err != nil {
		return fmt.Errorf("reopen: %w", err)
	}
	err = crashCheckZones(d, g, zones)
	if cerr := d.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close: %w", cerr)
	}
	return err
}

func crashCheckZones(d *Device, g Geometry, zones []crashZone) error {
	read := func(off, n uint64) ([]byte, error) {
		b := make([]byte, n)
		_, err := d.ReadAt(b, int64(off))
		return b, err
	}
	for zi := range zones {
		z := &zones[zi]
		r := d.Report(zi, 1)[0]
		if g.IsConventional(zi) {
			for off, seq := range z.conv {
				sec, err := read(off, SectorSize)
				if err != nil {
					return err
				}
				// The acknowledged write, or a later one the kill cut short.
				if addr, got, ok := sectorStamp(sec); !ok || addr != off || got < seq {
					return fmt.Errorf("conventional zone %d: sector %d should hold write seq %d or a later one, holds addr %d seq %d (whole sector matches: %v)", zi, off, seq, addr, got, ok)
				}
			}
			continue
		}
		wp := r.WP
		if r.Cond == CondFull {
			wp = g.WritableEnd(zi)
		}
		if z.tryReset != 0 && wp == r.Start {
			// The reset the kill interrupted happened.
			*z = crashZone{resetSeq: z.tryReset, conv: z.conv}
		}
		z.tryReset = 0
		want := CondClosed
		switch wp {
		case r.Start:
			want = CondEmpty
		case g.WritableEnd(zi):
			want = CondFull
		}
		if r.Cond != want {
			return fmt.Errorf("zone %d: condition %v with WP %d after reopen, want %v", zi, r.Cond, wp, want)
		}
		if z.finished && r.Cond != CondFull {
			return fmt.Errorf("zone %d: an acknowledged finish was lost: %v WP %d", zi, r.Cond, wp)
		}
		if z.mayFinish && r.Cond == CondFull {
			z.finished = true
		}
		z.mayFinish = false
		for _, rec := range z.recs {
			if rec.off < r.Start || rec.off+rec.n > g.WritableEnd(zi) {
				return fmt.Errorf("zone %d: acknowledged %s [%d,+%d) seq %d lies outside the zone", zi, rec.kind, rec.off, rec.n, rec.seq)
			}
			if wp < rec.off+rec.n {
				return fmt.Errorf("zone %d: WP %d is behind the acknowledged %s [%d,+%d) seq %d", zi, wp, rec.kind, rec.off, rec.n, rec.seq)
			}
			got, err := read(rec.off, rec.n)
			if err != nil {
				return err
			}
			tag := rec.off
			if rec.kind == "A" {
				tag = appendTag
			}
			want := make([]byte, rec.n)
			pattern(want, tag, rec.seq)
			for s := uint64(0); s < rec.n; s += SectorSize {
				if string(got[s:s+SectorSize]) != string(want[s:s+SectorSize]) {
					addr, seq, ok := sectorStamp(got[s : s+SectorSize])
					return fmt.Errorf("zone %d: acknowledged %s [%d,+%d) seq %d: sector %d reads back wrong (it holds addr %#x seq %d, whole: %v)", zi, rec.kind, rec.off, rec.n, rec.seq, rec.off+s, addr, seq, ok)
				}
			}
		}
		// Nothing under the WP that no write put there.
		data, err := read(r.Start, wp-r.Start)
		if err != nil {
			return err
		}
		zeros := false
		for s := uint64(0); s < uint64(len(data)); s += SectorSize {
			sec := data[s : s+SectorSize]
			if !zeros && z.finished && allZero(sec) {
				zeros = true // a finish filled the rest of the zone with zeros
			}
			if zeros {
				if !allZero(sec) {
					return fmt.Errorf("zone %d: sector %d after the finished zone's data is not zero", zi, r.Start+s)
				}
				continue
			}
			addr, seq, ok := sectorStamp(sec)
			switch {
			case !ok:
				return fmt.Errorf("zone %d: the WP %d covers sector %d, which holds no whole sector of any write", zi, wp, r.Start+s)
			case addr&appendTag == 0 && addr != r.Start+s:
				return fmt.Errorf("zone %d: sector %d holds the data of sector %d", zi, r.Start+s, addr)
			case seq <= z.resetSeq:
				return fmt.Errorf("zone %d: the WP %d covers sector %d written by seq %d, before the zone's reset (seq %d)", zi, wp, r.Start+s, seq, z.resetSeq)
			}
		}
	}
	return nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func tail(lines []string, n int) string {
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
