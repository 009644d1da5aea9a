package ublk

import "time"

// Parking (issue 12). A zoned consumer such as f2fs writes back many zones
// at once: the block layer's zone write plugging dispatches the first
// write of a new zone while the zones before it still have writes queued
// behind their plugs. A device that stores each write the moment it is
// dispatched (zoned null_blk, memory-backed) has filled those zones by the
// time the new zone's write arrives; ours takes longer per write, so the
// new zone can find max_active_zones (or max_open_zones) reached by zones
// that are about to become FULL, and failing it with EOVERFLOW makes the
// kernel abort every BIO plugged for the zone: data the file system then
// loses. So a WRITE or ZONE_APPEND refused for lack of zone resources is
// kept ("parked") and tried again whenever other requests have been
// answered, as the device would have processed it after them. It is
// answered with the engine's errno when no request was answered for
// parkIdle (nothing is draining: the consumer really exceeds the limit,
// and gets the error a device gives) or after parkMax in all. While
// requests are parked the queue polls every parkPoll.
const (
	parkPoll = 5 * time.Millisecond
	parkIdle = 200 * time.Millisecond
	parkMax  = 10 * time.Second
)

type parkedReq struct {
	tag          uint16
	desc         ioDesc
	since        time.Time // parked
	seen         uint64    // the device's progress count at the last try
	lastProgress time.Time // when that count last moved
}

// parking is one queue's parked requests, oldest first; used only by the
// queue's thread.
type parking struct{ reqs []parkedReq }

func (p *parking) len() int { return len(p.reqs) }

func (p *parking) add(tag uint16, desc ioDesc, progress uint64) {
	now := time.Now()
	p.reqs = append(p.reqs, parkedReq{tag: tag, desc: desc, since: now, seen: progress, lastProgress: now})
}

// retry tries the parked requests in order. try(tag, desc, final) serves
// one and reports whether it was answered; final is true when the request
// must be answered now (idle, too old, or the device is stopping). The
// progress count moves as retries are answered, so a retry that frees a
// slot lets the next parked request through in the same pass.
func (p *parking) retry(progress uint64, stopping bool, try func(tag uint16, desc ioDesc, final bool) bool) {
	if len(p.reqs) == 0 {
		return
	}
	now := time.Now()
	kept := p.reqs[:0]
	for _, r := range p.reqs {
		if progress != r.seen {
			r.seen, r.lastProgress = progress, now
		} else if !stopping && now.Sub(r.lastProgress) < parkIdle && now.Sub(r.since) < parkMax {
			kept = append(kept, r)
			continue
		}
		final := stopping || now.Sub(r.lastProgress) >= parkIdle || now.Sub(r.since) >= parkMax
		if !try(r.tag, r.desc, final) {
			kept = append(kept, r)
		}
	}
	p.reqs = kept
}
