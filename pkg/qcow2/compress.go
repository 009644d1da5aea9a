package qcow2

import (
	"bytes"
	"compress/flate"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// Compressed clusters are read only: a write to one moves it to a new,
// uncompressed cluster. qemu stores zlib clusters as raw deflate streams
// (no zlib header) and zstd clusters as one zstd frame; both may be followed
// by padding up to the sector end, so decoding stops once a whole cluster
// has come out.

var zstdDecoders = sync.Pool{New: func() any {
	d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
		// A hostile frame header may claim a huge window; a cluster is at most 2 MiB.
		zstd.WithDecoderMaxMemory(64<<20), zstd.WithDecoderMaxWindow(8<<20))
	if err != nil {
		panic(err) // only on invalid options
	}
	return d
}}

// readCompressed decompresses the cluster described by e into c (one cluster).
func (im *Image) readCompressed(e l2Entry, c []byte) error {
	off, size := im.compressedRange(e)
	if end := im.fileEnd; off+size > end {
		size = end - off // the last compressed cluster may end at the file end
	}
	src := make([]byte, size)
	n, err := im.f.ReadAt(src, int64(off))
	if err != nil && err != io.EOF {
		return err
	}
	src = src[:n]
	if im.h.compressionType == 1 {
		d := zstdDecoders.Get().(*zstd.Decoder)
		defer zstdDecoders.Put(d)
		if err := d.Reset(bytes.NewReader(src)); err != nil {
			return corruptf(int64(off), "zstd compressed cluster: %v", err)
		}
		if _, err := io.ReadFull(d, c); err != nil {
			return corruptf(int64(off), "zstd compressed cluster: %v", err)
		}
		return nil
	}
	r := flate.NewReader(bytes.NewReader(src))
	defer r.Close()
	if _, err := io.ReadFull(r, c); err != nil {
		return corruptf(int64(off), "zlib compressed cluster (%d bytes): %v", len(src), fmt.Errorf("%w", err))
	}
	return nil
}
