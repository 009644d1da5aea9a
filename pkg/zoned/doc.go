// Package zoned is the zone engine of zq-csi: the state machine of an
// emulated host-managed zoned block device, following the Linux ZBC/ZNS
// model (include/uapi/linux/blkzoned.h) with drivers/block/null_blk/zoned.c
// as the reference for behaviour the standards leave open. It does no I/O
// and knows nothing of qcow2: the image layer stores the data and persists
// the write pointers that this package hands it.
//
// A device of Geometry.Size bytes is cut into NrZones zones of ZoneSize
// bytes; the last one may be shorter (a runt). The first Conventional zones
// accept any write. The others are sequential-write-required: each has a
// write pointer (WP) and can be written only at it, up to its writable end
// (start + capacity, or the device end for a runt). Their conditions are
// EMPTY, IMP_OPEN (opened by a write), EXP_OPEN (opened by the user),
// CLOSED and FULL. Open zones count against max_open_zones; open and closed
// zones are "active" and count against max_active_zones. When a write needs
// an open slot and none is free, the least recently written implicitly open
// zone is closed to make one; explicitly open zones are never closed behind
// the user's back. A command that cannot get its resources fails and
// changes nothing.
//
// Every command is a two-step transaction, because the device accepts a
// command before its data reaches the disk. BeginWrite, BeginAppend,
// BeginMgmt and BeginResetAll check the command against the zone state and
// apply what acceptance does (the implicit open, the LRU close, the
// management transition), then return a *Pending that claims the zones it
// covers: other commands on those zones wait, which serializes the writes
// of a zone and gives concurrent appends distinct offsets. The caller then
// performs the I/O and calls Commit, which for a write advances the WP (and
// makes the zone FULL at its writable end), or Abort, which returns the
// zone to its earlier condition so a failed write leaves no trace. Write,
// Append, Open, Close, Finish, Reset, ResetAll and Mgmt are the one-step
// forms, for callers with no I/O to do.
//
// Because the WP moves only at Commit, WritePointers never shows a WP past
// data that was not written; the caller persists that snapshot after the
// data (spec §5). Open zones are not persisted: NewMachine rebuilds the
// state from persisted WPs, each partially written zone coming back CLOSED.
// Data at or past a WP, and between a zone's capacity and its end, reads as
// zeros (DataLimit, ReadExtents); reads are never refused.
//
// Errors are *ZoneError or *GeometryError values wrapping one sentinel;
// Errno maps them to the errno Linux returns in the same case.
//
// Resources and pending writes. A device that stores each write as it is
// dispatched (null_blk) has made a zone FULL by the time it sees the next
// command; here a zone-filling write is accepted first and committed after
// its I/O. So a command that finds no open or active slot while such a
// write is pending waits for it (waitForFill) instead of failing: when it
// commits, the slot is free; if it aborts, the command fails as it would
// have. The transition rules, in one table:
//
//	write/append  EMPTY    → IMP_OPEN (needs active + open slot; LRU close of an IMP_OPEN zone if no open slot)
//	write/append  CLOSED   → IMP_OPEN (needs an open slot, LRU close as above)
//	write/append  *_OPEN   → same; FULL when the WP reaches the writable end (frees both slots)
//	open          EMPTY/CLOSED → EXP_OPEN (slots as for a write); IMP_OPEN → EXP_OPEN; FULL → EINVAL
//	close         *_OPEN   → EMPTY if nothing written, else CLOSED; EMPTY/FULL → EINVAL
//	finish        any      → FULL (EMPTY needs an active slot, as null_blk and ZNS)
//	reset         any      → EMPTY
//
// A failed write returns its zone to the condition it had.
package zoned
