package driver

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// StateLockName is the lock file in the state directory: one serving
// process per state directory. Two processes on one state directory would
// both recover the same attachments, both write the same records and both
// own the same sockets (the second one removing the first one's CSI socket
// as "stale"), so the second must not start at all.
const StateLockName = "zq-csi.lock"

// ErrStateDirLocked is returned by LockStateDir when another process holds
// the state directory.
var ErrStateDirLocked = errors.New("state directory in use")

// StateLock is a held lock on a state directory.
type StateLock struct {
	f *os.File
}

// LockStateDir takes an exclusive lock on dir (creating it), or fails with
// ErrStateDirLocked naming the holder's pid. The lock is flock(2) on
// dir/zq-csi.lock: the kernel drops it when the holder exits, kill -9
// included, so a crashed plugin never leaves a stale lock behind. The
// holder's pid is written into the file for the message of the next one.
func LockStateDir(dir string) (*StateLock, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, StateLockName)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("state directory lock %s: %w", path, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s is locked by %s; stop it or give this one another --state-dir",
				ErrStateDirLocked, dir, lockHolder(path))
		}
		return nil, fmt.Errorf("state directory lock %s: %w", path, err)
	}
	// Ours now: record who holds it (best effort; the lock is what counts).
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return &StateLock{f: f}, nil
}

// lockHolder describes the process named in a lock file.
func lockHolder(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "another process"
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return "another process (pid not yet recorded)"
	}
	desc := "another process, pid " + strconv.Itoa(pid)
	if cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && len(cmd) > 0 {
		desc += " (" + strings.TrimSpace(strings.ReplaceAll(string(cmd), "\x00", " ")) + ")"
	}
	return desc
}

// Unlock releases the lock. The file stays: removing it would let a third
// process lock a new inode while a second still waits on the old one.
func (l *StateLock) Unlock() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close()
	l.f = nil
	return err
}
