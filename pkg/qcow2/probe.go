package qcow2

import "encoding/binary"

// ProbeLen is how many leading bytes of a file Probe looks at: the fixed
// part of a version 3 header.
const ProbeLen = v3HeaderLength

// Probe tells a qcow2 image from a raw one by its first bytes, as qemu's
// format probing does, and is stricter in one case: bytes that carry a
// plausible qcow2 header under a damaged magic (a bit flip, a zeroed first
// sector tail, a partial overwrite) are refused with a *FormatError at
// offset 0 rather than guessed to be raw, because treating such a file as
// raw and writing it destroys what a repair could still save.
//
// "Plausible" is what no raw disk is likely to hold by chance: the magic
// off by one byte, or version 2 or 3 at offset 4 with cluster_bits 9..21 at
// 20, a cluster-aligned, non-zero refcount table offset at 48 and a
// cluster-aligned L1 table offset at 40 (and, for version 3, a header
// length of at least 104 at 100).
func Probe(first []byte) (isQcow2 bool, err error) {
	if len(first) >= 4 && binary.BigEndian.Uint32(first) == magic {
		return true, nil
	}
	if len(first) < 4 {
		return false, nil
	}
	same := 0
	var m [4]byte
	binary.BigEndian.PutUint32(m[:], magic)
	for i := range 4 {
		if first[i] == m[i] {
			same++
		}
	}
	if same == 3 {
		return false, corruptf(0, "the magic is % x, one byte off qcow2's % x: a damaged qcow2 header, not probed as raw (give -f raw to use the file as a raw image)", first[:4], m[:])
	}
	if len(first) < offRefcountOffset+8 {
		return false, nil
	}
	version := binary.BigEndian.Uint32(first[4:])
	cb := binary.BigEndian.Uint32(first[offClusterBits:])
	if version != 2 && version != 3 || cb < MinClusterBits || cb > MaxClusterBits {
		return false, nil
	}
	cs := uint64(1) << cb
	l1 := binary.BigEndian.Uint64(first[offL1Offset:])
	rt := binary.BigEndian.Uint64(first[offRefcountOffset:])
	if rt == 0 || rt%cs != 0 || l1%cs != 0 {
		return false, nil
	}
	if version == 3 {
		if len(first) < v3HeaderLength {
			return false, nil
		}
		if hl := binary.BigEndian.Uint32(first[offHeaderLength:]); hl < v3HeaderLength {
			return false, nil
		}
	}
	return false, corruptf(0, "the magic is % x, not qcow2's % x, but a qcow2 version %d header follows (cluster_bits %d, refcount table at %d): a damaged qcow2 header, not probed as raw (give -f raw to use the file as a raw image)",
		first[:4], m[:], version, cb, rt)
}
