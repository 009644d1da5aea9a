package nbdattach

import (
	"math/bits"
	"sync"
)

// Payload buffers come from power-of-two size classes, 4 KiB to 32 MiB, each
// with its own sync.Pool, so a 4 KiB read does not pin a 32 MiB buffer.
// Larger requests (a MaxPayload above 32 MiB) allocate and are not pooled.
const (
	minBufShift = 12
	maxBufShift = 25
)

var bufPools [maxBufShift - minBufShift + 1]sync.Pool

// buffer is what the pools hold; pooling a pointer avoids an allocation per
// Put that pooling a slice header would cost.
type buffer struct {
	b []byte
}

func bufClass(n int) int {
	shift := bits.Len(uint(n - 1))
	if shift < minBufShift {
		shift = minBufShift
	}
	return shift - minBufShift
}

// getBuffer returns a buffer whose b has length n. Its contents are stale.
func getBuffer(n int) *buffer {
	if n <= 0 {
		return &buffer{}
	}
	c := bufClass(n)
	if c >= len(bufPools) {
		return &buffer{b: make([]byte, n)}
	}
	if v := bufPools[c].Get(); v != nil {
		buf := v.(*buffer)
		buf.b = buf.b[:n]
		return buf
	}
	return &buffer{b: make([]byte, n, 1<<(c+minBufShift))}
}

// release returns the buffer to its pool; the caller must not use it again.
func (buf *buffer) release() {
	if buf == nil || cap(buf.b) == 0 {
		return
	}
	c := bufClass(cap(buf.b))
	if c >= len(bufPools) || cap(buf.b) != 1<<(c+minBufShift) {
		return
	}
	bufPools[c].Put(buf)
}
