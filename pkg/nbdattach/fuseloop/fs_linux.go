package fuseloop

import (
	"context"
	"errors"
	"sync/atomic"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/pkg/nbdattach"
)

// diskName is the one file of each volume's FUSE filesystem.
const diskName = "disk"

// errno maps a backend error to what the FUSE request returns: the
// syscall.Errno the error wraps (zone violations carry EIO through
// nbdattach.ZonedBackend), else nbdattach's NBD mapping, else EIO.
func errno(err error) syscall.Errno {
	if err == nil {
		return 0
	}
	var se syscall.Errno
	if errors.As(err, &se) && se != 0 {
		return se
	}
	if e := nbdattach.DefaultErrorMapper(err); e != 0 {
		return syscall.Errno(e)
	}
	return syscall.EIO
}

// rootNode is the filesystem's root directory; it holds diskNode.
type rootNode struct {
	fs.Inode
	disk *diskNode
}

var _ fs.NodeOnAdder = (*rootNode)(nil)

func (r *rootNode) OnAdd(ctx context.Context) {
	ch := r.NewPersistentInode(ctx, r.disk, fs.StableAttr{Mode: syscall.S_IFREG, Ino: 2})
	r.AddChild(diskName, ch, false)
}

// diskNode is the regular file whose contents are the backend. Every
// request goes straight to the backend: the file is opened with
// FOPEN_DIRECT_IO so the page cache neither merges nor reorders writes.
type diskNode struct {
	fs.Inode
	b        nbdattach.Backend
	readOnly bool
	lastErr  atomic.Value // error: the last backend failure, for logs
	writes   atomic.Int64
}

var (
	_ fs.NodeGetattrer = (*diskNode)(nil)
	_ fs.NodeSetattrer = (*diskNode)(nil)
	_ fs.NodeOpener    = (*diskNode)(nil)
	_ fs.NodeReader    = (*diskNode)(nil)
	_ fs.NodeWriter    = (*diskNode)(nil)
	_ fs.NodeFsyncer   = (*diskNode)(nil)
	_ fs.NodeFlusher   = (*diskNode)(nil)
	_ fs.NodeAllocater = (*diskNode)(nil)
)

func (n *diskNode) fill(out *fuse.Attr) {
	size := uint64(n.b.Size())
	out.Mode = syscall.S_IFREG | 0o600
	if n.readOnly {
		out.Mode = syscall.S_IFREG | 0o400
	}
	out.Size = size
	out.Blocks = (size + 511) / 512
	out.Blksize = 4096
	out.Nlink = 1
}

func (n *diskNode) Getattr(_ context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.fill(&out.Attr)
	return 0
}

// Setattr accepts everything but a size change (the size is the volume's).
func (n *diskNode) Setattr(_ context.Context, _ fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && int64(sz) != n.b.Size() {
		return syscall.EPERM
	}
	n.fill(&out.Attr)
	return 0
}

func (n *diskNode) Open(_ context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if n.readOnly && flags&(syscall.O_WRONLY|syscall.O_RDWR) != 0 {
		return nil, 0, syscall.EROFS
	}
	return nil, fuse.FOPEN_DIRECT_IO, 0
}

func (n *diskNode) fail(err error) syscall.Errno {
	n.lastErr.Store(err)
	return errno(err)
}

func (n *diskNode) Read(_ context.Context, _ fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	size := n.b.Size()
	if off >= size {
		return fuse.ReadResultData(nil), 0
	}
	if int64(len(dest)) > size-off {
		dest = dest[:size-off]
	}
	got, err := n.b.ReadAt(dest, off)
	if err != nil && got < len(dest) {
		return nil, n.fail(err)
	}
	return fuse.ReadResultData(dest), 0
}

func (n *diskNode) Write(_ context.Context, _ fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if n.readOnly {
		return 0, syscall.EROFS
	}
	if off < 0 || off+int64(len(data)) > n.b.Size() {
		return 0, syscall.ENOSPC
	}
	n.writes.Add(1)
	got, err := n.b.WriteAt(data, off, false)
	if err != nil {
		return uint32(got), n.fail(err)
	}
	return uint32(got), 0
}

func (n *diskNode) Fsync(context.Context, fs.FileHandle, uint32) syscall.Errno {
	if err := n.b.Flush(); err != nil {
		return n.fail(err)
	}
	return 0
}

// Flush (close(2)) does nothing: durability is fsync's.
func (n *diskNode) Flush(context.Context, fs.FileHandle) syscall.Errno { return 0 }

// Allocate maps fallocate(2), which is how the loop driver passes discard
// (PUNCH_HOLE) and write-zeroes (ZERO_RANGE, or PUNCH_HOLE without
// REQ_NOUNMAP) to its backing file.
func (n *diskNode) Allocate(_ context.Context, _ fs.FileHandle, off, size uint64, mode uint32) syscall.Errno {
	if n.readOnly {
		return syscall.EROFS
	}
	if off+size > uint64(n.b.Size()) {
		return syscall.EINVAL
	}
	var err error
	switch {
	case mode&unix.FALLOC_FL_PUNCH_HOLE != 0:
		err = n.b.Trim(int64(off), int64(size))
	case mode&unix.FALLOC_FL_ZERO_RANGE != 0:
		err = n.b.WriteZeroes(int64(off), int64(size), true)
	case mode&^uint32(unix.FALLOC_FL_KEEP_SIZE) == 0:
		return 0 // plain allocation: the range already exists
	default:
		return syscall.EOPNOTSUPP
	}
	if err != nil {
		return n.fail(err)
	}
	return 0
}
