// Package ublk presents a zoned image to the kernel as a true host-managed
// zoned block device, /dev/ublkbN, through the ublk driver (Linux >= 6.6
// for zoned devices; ublk_drv): BLKREPORTZONE, zone append, the zone
// ioctls, /sys/block/ublkbN/queue/zoned = host-managed, zoned file
// systems. The NBD device (DESIGN point 6) enforces zones but is never
// zoned; this exporter sits behind the same nbdattach.Attacher interface.
//
// Model. A device has several hardware queues (Options.Queues, by default
// one per CPU up to four; blk-mq maps each submitting CPU to one), each
// served by its own locked OS thread with its own io_uring (128-byte SQEs,
// IORING_OP_URING_CMD): the driver binds every tag to the task that
// fetched it. Control commands (ADD_DEV, SET_PARAMS, START_DEV, STOP_DEV,
// DEL_DEV, GET_DEV_INFO, the user-recovery pair) go through a ring on
// /dev/ublk-control. A queue thread fetches every tag of its queue, reads
// each request's descriptor from its queue's read-only mmap of
// /dev/ublkcN, moves the payload with pread/pwrite on /dev/ublkcN at the
// user-copy offset of (queue, tag) (UBLK_F_USER_COPY, which UBLK_F_ZONED
// requires), runs it on the zoned engine and commits the result with
// COMMIT_AND_FETCH_REQ; a ZONE_APPEND commits the sector it wrote at in
// zone_append_lba. Within a queue requests are served one at a time, in
// arrival order; queues run in parallel, as the engine allows (writes to
// different zones, reads). Since Linux 6.10 the block layer's zone write
// plugging keeps one write per sequential zone in flight, whatever the
// queue, so one zone's writes stay ordered.
//
// Parameters come from the image: chunk_sectors = zone size, the image's
// max open/active zones and max append size, 512-byte logical and 4 KiB
// physical blocks, and a volatile write cache with FUA so that the kernel
// sends FLUSH and FUA, which the durability contract (DESIGN point 3)
// needs. The kernel counts zones as dev_sectors / chunk_sectors, so only
// whole zones are exposed; it refuses max_zone_append_sectors = 0, so an
// image with zone append disabled advertises the request size and the
// engine refuses the appends (EIO). Engine errors become the errno a real
// zoned drive gives (zoned.Errno), which the driver turns back into the
// block status: EIO for writes off the write pointer or into a FULL zone,
// ETOOMANYREFS / EOVERFLOW for the open / active zone limits.
//
// Recovery. The Attacher creates devices with UBLK_F_USER_RECOVERY |
// UBLK_F_USER_RECOVERY_REISSUE: when the serving process dies the kernel
// keeps /dev/ublkbN (state QUIESCED), queues new I/O and requeues what the
// dead process held; Recover (START_USER_RECOVERY, fetch, END_USER_RECOVERY)
// in the next process serves it all. The kernel keeps a tag of the volume
// id in the device's ublksrv_flags, so a device is never recovered onto
// another volume's image. A reissued write the dead process had already
// applied finds the write pointer past it and fails (EIO); the window is
// the time between the engine's write and the commit.
package ublk
