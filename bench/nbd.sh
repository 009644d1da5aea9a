#!/usr/bin/env bash
# bench/nbd.sh — pkg/nbdattach's NBD server against qemu-nbd, both serving the
# same raw file, measured with the same clients (nbdcopy, fio's nbd engine).
#
# Needs: go, qemu-utils (qemu-nbd), libnbd-bin (nbdcopy), fio, python3.
# The file lives in /dev/shm when possible, so the figures are the servers'
# overhead rather than the disk's. SIZE_MB (default 512) sets the file size,
# FIO_SECONDS (default 5) the length of each fio run.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MB=${SIZE_MB:-512}
FIO_SECONDS=${FIO_SECONDS:-5}
for tool in qemu-nbd nbdcopy fio python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install qemu-utils libnbd-bin fio)" >&2; exit 1; }
done

DIR=$(mktemp -d /dev/shm/nbdbench.XXXXXX 2>/dev/null || mktemp -d)
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$DIR"
}
trap cleanup EXIT

echo "building the server (test binary in serve mode)..." >&2
go test -c -o "$DIR/nbdattach.test" ./pkg/nbdattach
head -c "${SIZE_MB}M" /dev/urandom >"$DIR/src"

wait_socket() {
  for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.05; done
  echo "server did not create $1" >&2; exit 1
}

start_server() { # name
  rm -f "$DIR/sock" "$DIR/disk"
  truncate -s "${SIZE_MB}M" "$DIR/disk"
  case $1 in
    nbdattach)
      ZQ_NBDATTACH_SERVE_SOCKET="$DIR/sock" ZQ_NBDATTACH_SERVE_FILE="$DIR/disk" "$DIR/nbdattach.test" &
      ;;
    qemu-nbd)
      # --shared lets nbdcopy open its several connections, as ours allows.
      qemu-nbd -f raw -t --shared=8 --cache=writeback -k "$DIR/sock" "$DIR/disk" &
      ;;
  esac
  SERVER_PID=$!
  wait_socket "$DIR/sock"
}

stop_server() {
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
}

seconds() { # command...: prints wall-clock seconds
  local t0 t1
  t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N)
  python3 -c "print(f'{$t1 - $t0:.3f}')"
}

fio_run() { # rw bs depth -> "MiB/s kIOPS"
  fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$DIR/sock" --rw="$1" --bs="$2" \
    --iodepth="$3" --size="${SIZE_MB}m" --time_based --runtime="$FIO_SECONDS" \
    --output-format=json --output="$DIR/fio.json" >/dev/null
  python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
d = j["read"] if j["read"]["io_bytes"] else j["write"]
print("%8.1f MiB/s %7.1f kIOPS" % (d["bw"] / 1024, d["iops"] / 1000))' "$DIR/fio.json"
}

printf '%-10s %-34s %s\n' server test result
for server in nbdattach qemu-nbd; do
  start_server "$server"
  uri="nbd+unix:///?socket=$DIR/sock"
  w=$(seconds nbdcopy --flush "$DIR/src" "$uri")
  r=$(seconds nbdcopy "$uri" null:)
  printf '%-10s %-34s %s s (%s MiB/s)\n' "$server" "nbdcopy write ${SIZE_MB} MiB" "$w" "$(python3 -c "print(f'{$SIZE_MB / $w:.0f}')")"
  printf '%-10s %-34s %s s (%s MiB/s)\n' "$server" "nbdcopy read ${SIZE_MB} MiB" "$r" "$(python3 -c "print(f'{$SIZE_MB / $r:.0f}')")"
  printf '%-10s %-34s %s\n' "$server" "fio randread 4k qd16" "$(fio_run randread 4k 16)"
  printf '%-10s %-34s %s\n' "$server" "fio randwrite 4k qd16" "$(fio_run randwrite 4k 16)"
  printf '%-10s %-34s %s\n' "$server" "fio read 1M qd4" "$(fio_run read 1m 4)"
  printf '%-10s %-34s %s\n' "$server" "fio write 1M qd4" "$(fio_run write 1m 4)"
  stop_server
done
