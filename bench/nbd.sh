#!/usr/bin/env bash
# bench/nbd.sh — `zq-csi img serve` against qemu-nbd serving the same qcow2
# image (identical copies), with nbdkit's file plugin on the raw data as an
# upper bound, measured with the same clients in one run: nbdcopy (write,
# read) and fio's nbd engine (1 MiB sequential read and write qd4, 4 KiB
# random read qd32).
#
# A shared machine makes single figures noisy, so the three servers are
# measured ROUNDS times (default 3), the order rotated each round (zq-csi
# first, then qemu-nbd first, then nbdkit first, ...), so that a burst of
# load elsewhere does not always hit the same server. Each line prints the
# median and the min-max of the rounds per server, and the ratio of the
# medians of zq-csi and qemu-nbd. A second table gives the CPU time each
# server spent per GiB moved (from /proc/PID/stat): on a busy machine it
# varies far less than throughput, so it tells a slow server from a slow
# round.
#
# Needs: go, qemu-utils (qemu-img, qemu-nbd), libnbd-bin (nbdcopy, nbdinfo),
# fio, nbdkit, python3. Files live in /dev/shm when possible, so the
# figures are the servers' cost rather than the disk's. SIZE_MB (default
# 512) sets the image size, FIO_SECONDS (default 5) the length of each fio
# run, ROUNDS (default 3) the number of rounds; ZQ_CSI=PATH measures that
# zq-csi binary instead of building one from this tree.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MB=${SIZE_MB:-512}
FIO_SECONDS=${FIO_SECONDS:-5}
ROUNDS=${ROUNDS:-3}
for tool in qemu-img qemu-nbd nbdcopy nbdinfo fio nbdkit python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install qemu-utils libnbd-bin fio nbdkit)" >&2; exit 1; }
done

DIR=$(mktemp -d /dev/shm/nbdbench.XXXXXX 2>/dev/null || mktemp -d)
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$DIR"
}
trap cleanup EXIT

if [ -n "${ZQ_CSI:-}" ]; then
  cp "$ZQ_CSI" "$DIR/zq-csi" # a prebuilt binary, to compare two versions
else
  go build -o "$DIR/zq-csi" ./cmd/zq-csi
fi
head -c "${SIZE_MB}M" /dev/urandom >"$DIR/src.raw"
qemu-img convert -f raw -O qcow2 "$DIR/src.raw" "$DIR/base.qcow2"

wait_socket() {
  for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
  echo "server did not create $1" >&2; exit 1
}

start_server() { # name
  rm -f "$DIR/sock" "$DIR/disk.qcow2" "$DIR/disk.raw"
  case $1 in
    zq-csi) cp --sparse=always "$DIR/base.qcow2" "$DIR/disk.qcow2"
      "$DIR/zq-csi" img serve -k "$DIR/sock" -t --shared 8 "$DIR/disk.qcow2" & ;;
    qemu-nbd) cp --sparse=always "$DIR/base.qcow2" "$DIR/disk.qcow2"
      qemu-nbd -f qcow2 -t --shared=8 --cache=writeback -k "$DIR/sock" "$DIR/disk.qcow2" & ;;
    nbdkit-raw) cp --sparse=always "$DIR/src.raw" "$DIR/disk.raw"
      nbdkit -f -U "$DIR/sock" file "$DIR/disk.raw" & ;;
  esac
  SERVER_PID=$!
  wait_socket "$DIR/sock"
}

stop_server() { kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""; }

# cpu_ticks: user+system CPU time of the server so far, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$SERVER_PID/stat"; }
TICK=$(getconf CLK_TCK)

mibps_copy() { # args to nbdcopy: prints "MiB/s server-CPU-ms-per-GiB client-CPU-ms-per-GiB"
  local c0 c1 out
  c0=$(cpu_ticks)
  # python3 times nbdcopy and reads its CPU time from the child's rusage.
  out=$(python3 -c '
import resource, subprocess, sys, time
t0 = time.monotonic(); subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); t1 = time.monotonic()
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(t1 - t0, (r.ru_utime + r.ru_stime) * 1000)' nbdcopy "$@")
  c1=$(cpu_ticks)
  python3 -c "
sec, client = map(float, '$out'.split()); gib = $SIZE_MB / 1024
print(f'{$SIZE_MB / sec:.0f} {($c1 - $c0) * 1000 / $TICK / gib:.0f} {client / gib:.0f}')"
}

fio_run() { # rw bs depth -> "MiB/s server-CPU-ms-per-GiB client-CPU-ms-per-GiB"
  local c0 c1
  c0=$(cpu_ticks)
  fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$DIR/sock" --rw="$1" --bs="$2" \
    --iodepth="$3" --size="${SIZE_MB}m" --time_based --runtime="$FIO_SECONDS" \
    --output-format=json --output="$DIR/fio.json" >/dev/null
  c1=$(cpu_ticks)
  python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
d = j["read"] if j["read"]["io_bytes"] else j["write"]
ms = (int(sys.argv[3]) - int(sys.argv[2])) * 1000 / int(sys.argv[4])
gib = d["io_bytes"] / 2**30
client = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"]  # fio: percent of the run, ms
print("%.0f %.0f %.0f" % (d["bw"] / 1024, ms / gib, client / gib))' "$DIR/fio.json" "$c0" "$c1" "$TICK"
}

servers=(zq-csi qemu-nbd nbdkit-raw)
tests=("nbdcopy write ${SIZE_MB} MiB" "nbdcopy read ${SIZE_MB} MiB" "fio write 1M qd4" "fio read 1M qd4" "fio randread 4k qd32")
: >"$DIR/results"
for ((round = 0; round < ROUNDS; round++)); do
  for ((k = 0; k < ${#servers[@]}; k++)); do
    server=${servers[$(((round + k) % ${#servers[@]}))]}
    start_server "$server"
    uri="nbd+unix:///?socket=$DIR/sock"
    if [ "$round" = 0 ]; then
      # What the clients negotiate decides how they drive the server: nbdcopy
      # opens several connections only if the export can multi-conn.
      echo "# $server: $(nbdinfo --json "$uri" | python3 -c '
import json, sys
e = json.load(sys.stdin)["exports"][0]
print("multi-conn", e.get("can_multi_conn"), "block sizes", e.get("block_size_minimum"),
      e.get("block_size_preferred"), e.get("block_size_maximum"))')"
    fi
    {
      echo "$server 0 $(mibps_copy --flush "$DIR/src.raw" "$uri")"
      echo "$server 1 $(mibps_copy "$uri" null:)"
      echo "$server 2 $(fio_run write 1m 4)"
      echo "$server 3 $(fio_run read 1m 4)"
      echo "$server 4 $(fio_run randread 4k 32)"
    } >>"$DIR/results"
    stop_server
  done
done

python3 - "$DIR/results" "$ROUNDS" "${tests[@]}" <<'EOF'
import statistics, sys
path, rounds, tests = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
bw, cpu, ccpu = {}, {}, {}
for line in open(path):
    server, test, mibps, ms, cms = line.split()
    bw.setdefault((server, int(test)), []).append(float(mibps))
    cpu.setdefault((server, int(test)), []).append(float(ms))
    ccpu.setdefault((server, int(test)), []).append(float(cms))
def cell(vs):
    return f"{statistics.median(vs):.0f} ({min(vs):.0f}-{max(vs):.0f})"
servers = ("zq-csi", "qemu-nbd", "nbdkit-raw")
for title, res, ratio_name in (
        (f"throughput, MiB/s: median (min-max) of {rounds} rounds", bw, "zq/qemu"),
        (f"server CPU time per GiB moved, ms: median (min-max) of {rounds} rounds", cpu, "qemu/zq"),
        # The client's side of the same runs: a server that hands the
        # kernel page-cache pages (sendfile) leaves the copy to the client.
        (f"client CPU time per GiB moved, ms: median (min-max) of {rounds} rounds", ccpu, "qemu/zq")):
    print(title)
    print(f"{'test':<24} {'zq-csi':>17} {'qemu-nbd':>17} {'nbdkit (raw)':>17} {ratio_name:>8}")
    for i, name in enumerate(tests):
        zq, qemu, kit = (res[(s, i)] for s in servers)
        a, b = statistics.median(zq), statistics.median(qemu)
        # Both ratios read "higher is better for zq-csi".
        ratio = a / max(b, 1) if res is bw else b / max(a, 1)
        print(f"{name:<24} {cell(zq):>17} {cell(qemu):>17} {cell(kit):>17} {ratio:>7.2f}x")
EOF
