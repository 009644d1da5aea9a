#!/usr/bin/env bash
# bench/nbd.sh — `zq-csi img serve` against qemu-nbd serving the same qcow2
# image (identical copies), with nbdkit's file plugin on the raw data as an
# upper bound, measured with the same clients in one run: nbdcopy (write,
# read) and fio's nbd engine (1 MiB sequential read and write qd4, 4 KiB
# random read qd32). Prints each figure and the ratio to qemu-nbd.
#
# Needs: go, qemu-utils (qemu-img, qemu-nbd), libnbd-bin (nbdcopy), fio,
# nbdkit, python3. Files live in /dev/shm when possible, so the figures are
# the servers' cost rather than the disk's. SIZE_MB (default 512) sets the
# image size, FIO_SECONDS (default 5) the length of each fio run.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MB=${SIZE_MB:-512}
FIO_SECONDS=${FIO_SECONDS:-5}
for tool in qemu-img qemu-nbd nbdcopy fio nbdkit python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install qemu-utils libnbd-bin fio nbdkit)" >&2; exit 1; }
done

DIR=$(mktemp -d /dev/shm/nbdbench.XXXXXX 2>/dev/null || mktemp -d)
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$DIR"
}
trap cleanup EXIT

go build -o "$DIR/zq-csi" ./cmd/zq-csi
head -c "${SIZE_MB}M" /dev/urandom >"$DIR/src.raw"
qemu-img convert -f raw -O qcow2 "$DIR/src.raw" "$DIR/base.qcow2"

wait_socket() {
  for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
  echo "server did not create $1" >&2; exit 1
}

start_server() { # name
  rm -f "$DIR/sock"
  cp --sparse=always "$DIR/base.qcow2" "$DIR/disk.qcow2"
  case $1 in
    zq-csi) "$DIR/zq-csi" img serve -k "$DIR/sock" -t --shared 8 "$DIR/disk.qcow2" & ;;
    qemu-nbd) qemu-nbd -f qcow2 -t --shared=8 --cache=writeback -k "$DIR/sock" "$DIR/disk.qcow2" & ;;
    nbdkit-raw) cp --sparse=always "$DIR/src.raw" "$DIR/disk.raw"
      nbdkit -f -U "$DIR/sock" file "$DIR/disk.raw" & ;;
  esac
  SERVER_PID=$!
  wait_socket "$DIR/sock"
}

stop_server() { kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""; }

mibps_copy() { # args to nbdcopy: prints MiB/s
  local t0 t1
  t0=$(date +%s.%N); nbdcopy "$@" >/dev/null; t1=$(date +%s.%N)
  python3 -c "print(f'{$SIZE_MB / ($t1 - $t0):.0f}')"
}

fio_run() { # rw bs depth -> MiB/s
  fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$DIR/sock" --rw="$1" --bs="$2" \
    --iodepth="$3" --size="${SIZE_MB}m" --time_based --runtime="$FIO_SECONDS" \
    --output-format=json --output="$DIR/fio.json" >/dev/null
  python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
d = j["read"] if j["read"]["io_bytes"] else j["write"]
print("%.0f" % (d["bw"] / 1024))' "$DIR/fio.json"
}

tests=("nbdcopy write ${SIZE_MB} MiB" "nbdcopy read ${SIZE_MB} MiB" "fio write 1M qd4" "fio read 1M qd4" "fio randread 4k qd32")
declare -A R
for server in zq-csi qemu-nbd nbdkit-raw; do
  start_server "$server"
  uri="nbd+unix:///?socket=$DIR/sock"
  R[$server,0]=$(mibps_copy --flush "$DIR/src.raw" "$uri")
  R[$server,1]=$(mibps_copy "$uri" null:)
  R[$server,2]=$(fio_run write 1m 4)
  R[$server,3]=$(fio_run read 1m 4)
  R[$server,4]=$(fio_run randread 4k 32)
  stop_server
done

printf '%-24s %12s %12s %14s %10s\n' "test (MiB/s)" zq-csi qemu-nbd "nbdkit (raw)" "zq/qemu"
for i in "${!tests[@]}"; do
  printf '%-24s %12s %12s %14s %9sx\n' "${tests[$i]}" "${R[zq-csi,$i]}" "${R[qemu-nbd,$i]}" "${R[nbdkit-raw,$i]}" \
    "$(python3 -c "print(f'{${R[zq-csi,$i]} / max(${R[qemu-nbd,$i]}, 1):.2f}')")"
done
