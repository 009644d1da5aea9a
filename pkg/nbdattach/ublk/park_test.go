package ublk

import (
	"testing"
	"time"
)

// A parked request is retried only after other requests were answered,
// in the order it was parked, and answered with its error (final) once
// nothing was answered for parkIdle.
func TestParkingRetriesAfterProgress(t *testing.T) {
	var p parking
	p.add(1, ioDesc{}, 10)
	p.add(2, ioDesc{}, 10)
	var tried []uint16
	free := 0 // slots that free up
	try := func(tag uint16, _ ioDesc, final bool) bool {
		tried = append(tried, tag)
		if free > 0 {
			free--
			return true
		}
		return final
	}
	p.retry(10, false, try)
	if len(tried) != 0 || p.len() != 2 {
		t.Fatalf("retried %v with no progress; %d parked", tried, p.len())
	}
	free = 1
	p.retry(11, false, try) // one request answered elsewhere: both retried, the first gets the slot
	if len(tried) != 2 || tried[0] != 1 || p.len() != 1 || p.reqs[0].tag != 2 {
		t.Fatalf("after progress: tried %v, parked %v", tried, p.reqs)
	}
	tried = nil
	p.reqs[0].lastProgress = time.Now().Add(-parkIdle)
	p.retry(11, false, try) // idle: the last try is final and answers
	if len(tried) != 1 || p.len() != 0 {
		t.Fatalf("idle: tried %v, %d parked", tried, p.len())
	}
	p.add(3, ioDesc{}, 11)
	p.retry(11, true, try) // stopping: answered at once
	if p.len() != 0 {
		t.Fatal("a parked request outlived the device's stop")
	}
}
