#!/usr/bin/env bash
# make demo-img: create a zoned qcow2 image with the options of the zoned-format
# seed patch and show what it holds. Needs only Go (and qemu-img if present,
# to show that tools without zoned support refuse it by name).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=./bin/zq-csi
dir=$(mktemp -d /tmp/zq-demo.XXXXXX)
img=$dir/zbc.qcow2
echo "== zq-csi img create (the seed's command line)"
$bin img create -f qcow2 "$img" -o size=768M -o zone.size=64M -o zone.capacity=64M \
  -o zone.conventional_zones=0 -o zone.max_append_bytes=4096 -o zone.max_open_zones=6 \
  -o zone.max_active_zones=8 -o zone.mode=host-managed
echo; echo "== zq-csi img info"
$bin img info "$img"
echo; echo "== zone commands (qemu-io syntax): write at the write pointer, append, a write off the WP is refused"
$bin img io -c 'write -P 0x5a 0 1M' -c 'zap -p 0 4k' -c 'zo 64M 64M' -c 'write -P 0x11 128M 4k' \
  -c 'zf 192M 64M' -c 'write -P 0x22 300M 4k' -c 'zrp 0 5' "$img" || true
echo; echo "== after reopen: open zones are not persisted, partially written zones are CLOSED"
$bin img io -c 'zrp 0 5' "$img"
$bin img check "$img"
if command -v nbdinfo >/dev/null; then
  echo; echo "== served over NBD (zq-csi img serve, started by nbdinfo): the zq:zones map"
  nbdinfo --map=zq:zones -- [ "$bin" img serve "$img" ] | head -8
else
  echo; echo "== (apt-get install libnbd-bin to see the image served over NBD here: nbdinfo --map=zq:zones)"
fi
if command -v qemu-img >/dev/null; then
  echo; echo "== qemu-img without zoned support refuses the image by name:"
  qemu-img info "$img" 2>&1 | sed 's/^/   /' || true
fi
echo; echo "image left at $img"
