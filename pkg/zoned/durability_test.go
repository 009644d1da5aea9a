package zoned

import (
	"bytes"
	"os"
	"testing"
)

// abandon drops d the way a killed process does: no flush of write
// pointers, the live table left behind. (The image's own close makes its
// data and metadata durable; what matters here is which write pointers the
// next open believes.)
func (d *Device) abandon(t *testing.T) {
	t.Helper()
	d.live.close()
	if err := d.img.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestRebootDurability: after a crash on the same boot the live write
// pointers are taken (every acknowledged write is in the page cache); after
// a reboot (a live table of another boot, or none at all) only the durable
// table counts, so a write that was never flushed is not under a WP, a
// flushed or FUA write is, and a reset is durable as soon as it returns.
func TestRebootDurability(t *testing.T) {
	const zs = 1 << 20
	for _, tc := range []struct {
		name   string
		crash  func(t *testing.T, path string) // what happens between the crash and the reopen
		reboot bool
	}{
		{"same boot", func(*testing.T, string) {}, false},
		{"another boot", func(t *testing.T, _ string) {
			old := bootID
			bootID = func() string { return "00000000-0000-0000-0000-000000000000" }
			t.Cleanup(func() { bootID = old })
		}, true},
		{"live table lost", func(t *testing.T, path string) {
			if err := os.Remove(path + liveSuffix); err != nil {
				t.Fatal(err)
			}
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := mkZoned(t, 8, 1, zs, zs, 0, 0)
			d, err := Open(path, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			write := func(off int64, b byte, n int, fua bool) {
				t.Helper()
				if _, err := d.WriteAt(fill(b, n), off, fua); err != nil {
					t.Fatal(err)
				}
			}
			// Resets, finishes and FUA writes flush everything before them,
			// so the writes that must not survive a reboot come last.
			write(3*zs, 4, 4096, false) // zone 3: flushed, then reset
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			if err := d.Mgmt(OpReset, 3*zs, zs); err != nil {
				t.Fatal(err)
			}
			write(4*zs, 5, 4096, false) // zone 4: FUA after an unflushed write
			write(4*zs+4096, 6, 4096, true)
			write(5*zs, 7, 4096, false) // zone 5: finished without a flush
			if err := d.Mgmt(OpFinish, 5*zs, zs); err != nil {
				t.Fatal(err)
			}
			write(1*zs, 1, 8192, false) // zone 1: flushed, then more that is not
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			write(1*zs+8192, 2, 4096, false)
			write(2*zs, 3, 4096, false) // zone 2: never flushed
			d.abandon(t)
			tc.crash(t, path)

			d, err = Open(path, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer func() { d.Close() }()
			wantWP := map[int]uint64{1: zs + 12288, 2: 2*zs + 4096, 3: 3 * zs, 4: 4*zs + 8192, 5: 6 * zs}
			if tc.reboot {
				wantWP[1], wantWP[2] = zs+8192, 2*zs // the unflushed writes are not claimed
			}
			r := d.Report(0, 8)
			for z, want := range wantWP {
				got := r[z].WP
				if r[z].Cond == CondFull {
					got = r[z].Start + r[z].Cap
				}
				if got != want {
					t.Errorf("zone %d: WP %d (%v), want %d", z, got, r[z].Cond, want)
				}
			}
			buf := make([]byte, 16384)
			for _, c := range []struct {
				off  int64
				want []byte
			}{
				{zs, append(fill(1, 8192), fill(2, 4096)...)},
				{2 * zs, fill(3, 4096)},
				{3 * zs, make([]byte, 4096)},
				{4 * zs, append(fill(5, 4096), fill(6, 4096)...)},
				{5 * zs, fill(7, 4096)},
			} {
				want := c.want
				if tc.reboot && c.off == zs {
					want = append(fill(1, 8192), make([]byte, 4096)...)
				}
				if tc.reboot && c.off == 2*zs {
					want = make([]byte, 4096)
				}
				b := buf[:len(want)]
				if _, err := d.ReadAt(b, c.off); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(b, want) {
					t.Errorf("data at %d: got %x..., want %x...", c.off, b[:16], want[:16])
				}
			}
			// The next open must not revive the pointers we rejected: the
			// reopen made the table it trusted the durable one.
			if tc.reboot {
				d.abandon(t)
				d, err = Open(path, OpenOptions{})
				if err != nil {
					t.Fatal(err)
				}
				if wp := d.Report(1, 1)[0].WP; wp != zs+8192 {
					t.Errorf("zone 1 after a second reopen: WP %d, want %d", wp, zs+8192)
				}
			}
		})
	}
}

// TestMgmtDurableBeforeReturn: a reset and a finish are durable when Mgmt
// returns: a reboot right after them (nothing flushed since) keeps them.
func TestMgmtDurableBeforeReturn(t *testing.T) {
	const zs = 1 << 20
	path := mkZoned(t, 4, 0, zs, zs, 0, 0)
	d, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, zs} {
		if _, err := d.WriteAt(fill(9, 8192), off, true); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Mgmt(OpReset, 0, zs); err != nil {
		t.Fatal(err)
	}
	if err := d.Mgmt(OpFinish, zs, zs); err != nil {
		t.Fatal(err)
	}
	d.abandon(t)
	old := bootID
	bootID = func() string { return "00000000-0000-0000-0000-000000000000" }
	defer func() { bootID = old }()
	if d, err = Open(path, OpenOptions{}); err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	r := d.Report(0, 2)
	if r[0].Cond != CondEmpty || r[0].WP != 0 || r[1].Cond != CondFull {
		t.Fatalf("after a reboot right after reset and finish: %+v", r)
	}
	buf := make([]byte, 8192)
	if _, err := d.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, make([]byte, 8192)) {
		t.Fatalf("reset zone reads %x... (%v), want zeros", buf[:8], err)
	}
}
