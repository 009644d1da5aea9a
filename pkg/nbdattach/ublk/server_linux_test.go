//go:build linux

package ublk

import (
	"runtime"
	"testing"
)

func TestDefaultQueues(t *testing.T) {
	for _, c := range []struct{ cpus, want int }{{0, 1}, {1, 1}, {2, 2}, {4, 4}, {64, 4}} {
		if got := defaultQueues(c.cpus); got != c.want {
			t.Errorf("defaultQueues(%d) = %d, want %d", c.cpus, got, c.want)
		}
	}
	for _, c := range []struct {
		in, want Options
	}{
		{Options{Queues: 3, QueueDepth: 8, MaxIOBytes: 4096}, Options{Queues: 3, QueueDepth: 8, MaxIOBytes: 4096}},
		{Options{Queues: 1 << 20}, Options{Queues: maxQueues, QueueDepth: 64, MaxIOBytes: 512 << 10}},
		{Options{Queues: -1}, Options{Queues: defaultQueues(runtime.NumCPU()), QueueDepth: 64, MaxIOBytes: 512 << 10}},
	} {
		got := c.in
		got.defaults()
		if got.Queues != c.want.Queues || got.QueueDepth != c.want.QueueDepth || got.MaxIOBytes != c.want.MaxIOBytes {
			t.Errorf("%+v.defaults() = %+v, want %+v", c.in, got, c.want)
		}
	}
}

// A device gets a queue (with its own payload buffer) per hardware queue
// the kernel granted.
func TestNewDeviceQueues(t *testing.T) {
	h, err := newHandler(testDevice(t, 0, 0), 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	d := newDevice(DevInfo{NrHWQueues: 3, QueueDepth: 16, DevID: 7}, nil, h, nil)
	if len(d.queues) != 3 || d.running.Load() != 3 || d.depth != 16 || d.ID != 7 {
		t.Fatalf("queues %d running %d depth %d id %d", len(d.queues), d.running.Load(), d.depth, d.ID)
	}
	for i, q := range d.queues {
		if int(q.id) != i || len(q.rb.buf) != 64<<10 || cap(q.done) != 1 {
			t.Errorf("queue %d: id %d buf %d", i, q.id, len(q.rb.buf))
		}
		if i > 0 && &q.rb.buf[0] == &d.queues[0].rb.buf[0] {
			t.Errorf("queue %d shares queue 0's buffer", i)
		}
	}
}
