// Package interop holds tests that drive the zq-csi binary against the
// reference tools qemu-img and qemu-io (Debian/Ubuntu package qemu-utils)
// and libnbd's nbdinfo and nbdcopy (libnbd-bin):
//
//   - images zq-csi writes (random write/zero/discard sequences over every
//     cluster size and refcount width, with and without a backing file) must
//     pass "qemu-img check" and "qemu-img compare" against a raw reference;
//   - images qemu-img writes (compressed with zlib and zstd, snapshots,
//     backing chains, odd cluster sizes and refcount widths, a dirty
//     lazy-refcounts image) must read back through zq-csi byte for byte;
//   - the seed's zoned image must be refused by qemu-img by the feature's
//     name, and look consistent to it once the feature bit is cleared, apart
//     from the write-pointer table clusters;
//   - "img info", "img map" and "img check" must print what qemu-img prints;
//   - "img io"'s zone commands print what qemu-io's print on a zoned device
//     (zone reports, append sectors, Linux errnos as glibc words them), and
//     "img info" lists the zones;
//   - "img serve" works with libnbd's nbdinfo and nbdcopy and with qemu-io
//     over NBD, also when libnbd starts it by socket activation, and leaves
//     an image that zq-csi and qemu-img check clean after SIGTERM.
//
// The binary is built once in TestMain. Without the qemu tools the tests
// skip loudly; ZQ_REQUIRE_PEERS=1 turns that into a failure (for CI).
// ZQ_SEED replays a random sequence.
package interop
