package driver

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestSameBlockDevice: the kubelet's own node of a published device (its
// global map path) is accepted as the volume's path; other devices,
// regular files and missing paths are not.
func TestSameBlockDevice(t *testing.T) {
	var st unix.Stat_t
	if err := unix.Stat("/dev/loop0", &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
		t.Skip("SKIPPED: needs the block device node /dev/loop0 (modprobe loop)")
	}
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: mknod of a block device node needs root")
	}
	dir := t.TempDir()
	alias := filepath.Join(dir, "map")
	if err := unix.Mknod(alias, unix.S_IFBLK|0o600, int(st.Rdev)); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(dir, "other")
	if err := unix.Mknod(other, unix.S_IFBLK|0o600, int(unix.Mkdev(unix.Major(st.Rdev), unix.Minor(st.Rdev)+1))); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o600)
	for _, tc := range []struct {
		path, dev string
		want      bool
	}{
		{alias, "/dev/loop0", true},
		{"/dev/loop0", alias, true},
		{other, "/dev/loop0", false},
		{file, "/dev/loop0", false},
		{file, file, false},
		{filepath.Join(dir, "missing"), "/dev/loop0", false},
		{alias, "", false},
	} {
		if got := sameBlockDevice(tc.path, tc.dev); got != tc.want {
			t.Errorf("sameBlockDevice(%s, %s) = %v, want %v", tc.path, tc.dev, got, tc.want)
		}
	}
}
