// Package fuseloop is the "fuse-loop" attacher for nodes without the nbd
// kernel module: each volume's backend (a nbdattach.ZonedBackend or a plain
// image) is served by this process as the single file "disk" of a FUSE
// filesystem mounted at <state>/fuse/<volume>/, opened with direct_io so the
// page cache neither merges nor reorders writes, and a loop device
// (/dev/loopN, direct I/O when the kernel accepts it) is bound on top.
//
// FUSE writes go to Backend.WriteAt (fua=false), fsync to Flush, fallocate
// PUNCH_HOLE (loop discard, BLKDISCARD) to Trim and ZERO_RANGE to
// WriteZeroes; a backend error returns the syscall.Errno it wraps, so zone
// violations fail with EIO as on a zoned block device.
//
// Limitations: the loop device is not a zoned block device (no
// BLKREPORTZONE; the backend enforces the zone rules and failed writes
// return EIO). One zone's writes stay in order because the loop worker
// sends them to the server one at a time (go-fuse does not negotiate
// FUSE_ASYNC_DIO) and max_background is 1; writers in different cgroups get
// different loop workers, which nothing orders. The FUSE server lives in the
// node plugin, so an attachment does not survive a plugin restart: the loop
// device (LO_FLAGS_AUTOCLEAR) is unbound at its last close, or, while a pod
// holds it open, fails I/O until the pod reopens it; Recover then attaches
// the volume again (the same /dev/loopN when it is free). nbd and ublk
// attachments survive restarts.
package fuseloop
