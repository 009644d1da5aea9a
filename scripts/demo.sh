#!/usr/bin/env bash
# make demo: the driver's main job, end to end, in one process on this
# machine. `zq-csi serve --mode all --backend local` is driven through real
# CSI gRPC calls by `zq-csi csi` (the calls a kubelet and csi-provisioner
# make): CreateVolume with the example StorageClass's parameters,
# NodeStage/NodePublish to a block device, writes at the write pointer
# (accepted) and off it (EIO), the live zone report and its picture,
# CreateSnapshot, a volume restored from it (same data, same write
# pointers), and everything deleted again.
#
# Attacher (--attacher): as root, auto (nbd where the module is, else a
# loop device over a FUSE file); without root, or without /dev/fuse and
# /dev/loop-control, the file attacher (a stand-in file: no writes reach
# the zones), and the demo says which steps it skipped and why.
# Needs bin/zq-csi (make demo builds it), dd and cmp.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bin=$root/bin/zq-csi
[ -x "$bin" ] || { echo "demo: $bin missing: run make demo (it builds it)" >&2; exit 1; }
start=$(date +%s)
dir=$(mktemp -d /tmp/zq-demo.XXXXXX)
ep=unix://$dir/csi.sock
state=$dir/state
skipped=()
step=0
hdr() { step=$((step + 1)); printf '\n== %d. %s\n' "$step" "$*"; }
# show CMD...: print the command (as a user would type it), run it, indent its output.
show() {
  local shown=("$@")
  [ "$1" = zcsi ] && shown=(zq-csi csi "${@:2}")
  shown=("${shown[@]/#$bin/zq-csi}")
  printf '$ %s\n' "$(echo "${shown[*]}" | sed "s#$dir#\$DEMO#g; s/  */ /g")"
  "$@" 2>&1 | sed "s#$dir#\$DEMO#g; s/^/    /"
  return "${PIPESTATUS[0]}"
}
zcsi() { "$bin" csi --endpoint="$ep" "$@"; }
# The zone pictures in colour when the demo runs in a terminal (show pipes them).
[ -t 1 ] && [ -z "${NO_COLOR:-}" ] && export CLICOLOR_FORCE=1

# --- the attacher this machine allows
if [ "$(id -u)" = 0 ]; then
  for m in loop fuse; do modprobe -q "$m" 2>/dev/null || true; done
  if [ -e /sys/module/nbd ] || modprobe -q nbd 2>/dev/null || { [ -c /dev/fuse ] && [ -c /dev/loop-control ]; }; then
    attacher=auto
  else
    attacher=file
    skipped+=("the device steps: root, but no nbd module and no /dev/fuse + /dev/loop-control (modprobe nbd, or modprobe fuse loop)")
  fi
else
  attacher=file
  skipped+=("publishing, the writes and the restored data: not root (a block device and a bind mount need root: sudo make demo)")
fi

serve_pid=""
vols=() snaps=() published=() staged=()
cleanup() {
  local rc=$?
  set +e
  for t in "${published[@]}"; do zcsi unpublish "${t%%=*}" --target-path "${t#*=}" >/dev/null 2>&1; done
  for s in "${staged[@]}"; do zcsi unstage "${s%%=*}" --staging-path "${s#*=}" >/dev/null 2>&1; done
  for v in "${vols[@]}"; do zcsi delete "$v" >/dev/null 2>&1; done
  for s in "${snaps[@]}"; do zcsi delete-snapshot "$s" >/dev/null 2>&1; done
  if [ -n "$serve_pid" ]; then
    kill "$serve_pid" 2>/dev/null
    wait "$serve_pid" 2>/dev/null
  fi
  # Bind mounts the driver could not remove (it died): never leave one.
  awk -v d="$dir/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo 2>/dev/null | sort -r | xargs -r umount 2>/dev/null
  if [ "$rc" != 0 ]; then
    echo; echo "demo FAILED (exit $rc); the driver's log:"; tail -25 "$dir/serve.log" 2>/dev/null | sed 's/^/    /'
  fi
  rm -rf "$dir"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== zq-csi demo: one driver process, driven through CSI calls (zq-csi csi), in \$DEMO=$dir"
"$bin" serve --endpoint "$ep" --mode all --backend local --node-id demo-node \
  --data-dir "$dir/data" --state-dir "$state" --attacher "$attacher" --v 2 > "$dir/serve.log" 2>&1 &
serve_pid=$!
echo "\$ zq-csi serve --mode all --backend local --attacher $attacher --endpoint unix://\$DEMO/csi.sock --data-dir \$DEMO/data --node-id demo-node &"
for i in $(seq 1 100); do
  zcsi info >/dev/null 2>&1 && break
  kill -0 "$serve_pid" 2>/dev/null || { echo "demo: zq-csi serve exited"; exit 1; }
  sleep 0.1
done
show zcsi info

# The chart's example StorageClass zq-csi-zoned (charts/zq-csi/values.yaml): the seed's geometry.
params=(--param zone.size=64M --param zone.capacity=64M --param zone.max_open_zones=6
        --param zone.max_active_zones=8 --param zone.max_append_bytes=4096 --param exporter=auto)
hdr "CreateVolume: 512Mi with the parameters of the StorageClass zq-csi-zoned (64 MiB zones, 6 open / 8 active)"
show zcsi create demo-volume --size 512Mi "${params[@]}" | tee "$dir/create.out"
vol=$(sed -n 's/^    volume \(zqv-[0-9a-f]*\):.*/\1/p' "$dir/create.out")
[ -n "$vol" ] || { echo "demo: no volume ID in CreateVolume's answer"; exit 1; }
vols+=("$vol")
ctx=(); while read -r kv; do ctx+=(--context "$kv"); done < <(sed -n 's/^        \([a-z._]*=.*\)/\1/p' "$dir/create.out")
echo "A bad parameter is refused, named, with the rule:"
show zcsi create bad-volume --size 512Mi --param zone.size=64M --param zone.capacity=128M || true

# stage_publish VOL NAME: NodeStageVolume + NodePublishVolume (as the kubelet does for a pod).
stage_publish() {
  local v=$1 sp=$dir/kubelet/staging/$1 tp=$dir/kubelet/pods/$2/dev
  show zcsi stage "$v" --staging-path "$sp" "${ctx[@]}"
  staged+=("$v=$sp")
  if [ "$attacher" = file ]; then return 0; fi
  show zcsi publish "$v" --staging-path "$sp" --target-path "$tp"
  published+=("$v=$tp")
  local dev; dev=$("$bin" volume describe --socket "$state/debug.sock" "$v" | sed -n 's/^Device: *//p')
  local mm; mm=$(stat -c '%t %T' "$tp")
  printf '    %s is now the block device %s (%d:%d), %s bytes\n' "\$DEMO${tp#"$dir"}" "$dev" "0x${mm% *}" "0x${mm#* }" \
    "$(blockdev --getsize64 "$tp" 2>/dev/null || echo '?')"
}
hdr "NodeStageVolume + NodePublishVolume: the volume becomes a block device at the pod's path"
stage_publish "$vol" pod-a
dev=$dir/kubelet/pods/pod-a/dev

# write AT WHAT: dd of 4 KiB at byte offset AT (O_DIRECT), printed as a user would type it.
write() {
  local at=$1 what=$2 f=$dir/blk-$1
  head -c 4096 /dev/urandom > "$f"
  printf '$ dd if=%s of=%s bs=4k seek=%d oflag=direct   # %s\n' "4k-of-random" "\$DEMO${3#"$dir"}" $((at / 4096)) "$what"
  if out=$(dd if="$f" of="$3" bs=4096 seek=$((at / 4096)) count=1 oflag=direct conv=notrunc 2>&1); then
    echo "    ok: 4096 bytes written"; return 0
  fi
  echo "$out" | grep -v -e records -e copied | sed "s#$dir#\$DEMO#g; s/^/    /"
  return 1
}
MiB=$((1 << 20))
if [ "$attacher" != file ]; then
  hdr "Writes: at zone 0's write pointer they succeed; anywhere else the zone rules refuse them (EIO)"
  write 0 "at the write pointer of the empty zone 0" "$dev"; cp "$dir/blk-0" "$dir/z0"
  if write $MiB "1 MiB into zone 0: ahead of its write pointer (4 KiB)" "$dev"; then echo "demo: a write ahead of the write pointer succeeded"; exit 1; fi
  if write 0 "at 0 again: behind the write pointer, over written data" "$dev"; then echo "demo: a write behind the write pointer succeeded"; exit 1; fi
  write 4096 "at the advanced write pointer (4 KiB)" "$dev"; cat "$dir/blk-4096" >> "$dir/z0"
  write $((64 * MiB)) "zone 1 from its start" "$dev"
else
  hdr "Writes at and off the write pointer: SKIPPED (the file attacher's stand-in is no device; why: at the end)"
fi

hdr "The zone report: live state from the node plugin (its debug socket), as qemu-io's zrp prints it, and as a picture"
show "$bin" volume zones --socket "$state/debug.sock" --count 3 "$vol"
show "$bin" volume zones --socket "$state/debug.sock" -o wide "$vol"
svg=${ZQ_DEMO_SVG:-$root/bin/demo-zones.svg}
if "$bin" volume zones --socket "$state/debug.sock" -o svg "$vol" > "$svg.tmp" 2>/dev/null && mv "$svg.tmp" "$svg"; then
  echo "    (the same picture as SVG, for a browser: ${svg#"$root/"}, from zq-csi volume zones -o svg)"
else
  rm -f "$svg.tmp" 2>/dev/null
  skipped+=("the SVG picture: cannot write $svg (set ZQ_DEMO_SVG=PATH)")
fi

hdr "CreateSnapshot of the volume (its data and its write pointers)"
show zcsi snapshot demo-snapshot --source "$vol" | tee "$dir/snap.out"
snap=$(sed -n 's/^    snapshot \(zqs-[0-9a-f]*\) .*/\1/p' "$dir/snap.out")
[ -n "$snap" ] || { echo "demo: no snapshot ID in CreateSnapshot's answer"; exit 1; }
snaps+=("$snap")

hdr "Restore: CreateVolume from the snapshot, staged and published for a second pod"
show zcsi create demo-restored --size 512Mi --from-snapshot "$snap" "${params[@]}" | tee "$dir/restore.out" | grep -E '^\$|volume zqv|from snapshot' || true
vol2=$(sed -n 's/^    volume \(zqv-[0-9a-f]*\):.*/\1/p' "$dir/restore.out")
[ -n "$vol2" ] || { echo "demo: no volume ID in the restore's answer"; exit 1; }
vols+=("$vol2")
stage_publish "$vol2" pod-b
if [ "$attacher" != file ]; then
  dev2=$dir/kubelet/pods/pod-b/dev
  dd if="$dev2" of="$dir/got" bs=4096 count=2 iflag=direct status=none
  cmp "$dir/z0" "$dir/got" && echo "    zone 0 of the restored volume holds the 8 KiB written before the snapshot (cmp: same)"
  if write 0 "restored zone 0 at 0: behind the write pointer that came with the snapshot" "$dev2"; then echo "demo: the restored volume lost its write pointer"; exit 1; fi
  write 8192 "restored zone 0 at its write pointer (8 KiB)" "$dev2"
  show "$bin" volume zones --socket "$state/debug.sock" -o wide --count 8 "$vol2"
fi

hdr "Clean-up: NodeUnpublish, NodeUnstage, DeleteVolume, DeleteSnapshot"
for t in "${published[@]}"; do show zcsi unpublish "${t%%=*}" --target-path "${t#*=}"; done; published=()
for s in "${staged[@]}"; do show zcsi unstage "${s%%=*}" --staging-path "${s#*=}"; done; staged=()
for v in "${vols[@]}"; do show zcsi delete "$v"; done; vols=()
for s in "${snaps[@]}"; do show zcsi delete-snapshot "$s"; done; snaps=()
show zcsi list
left=$(find "$dir/data" -name '*.qcow2' 2>/dev/null)
[ -z "$left" ] || { echo "demo: images left behind: $left"; exit 1; }
echo "    no images left under \$DEMO/data"

echo
if [ "$attacher" != file ]; then
  echo "== done in $(( $(date +%s) - start ))s: a zoned volume created, staged, written at its write pointer, refused off it, snapshotted, restored and deleted through CSI"
  echo "   (attacher: $(grep -o 'Staged volume.*attacher="[a-z-]*"' "$dir/serve.log" | head -1 | sed 's/.*attacher="\([a-z-]*\)".*/\1/'), chosen by --attacher=auto)"
else
  echo "== done in $(( $(date +%s) - start ))s: a zoned volume created, staged, snapshotted, restored and deleted through CSI; its zones reported"
fi
for s in "${skipped[@]}"; do echo "   SKIPPED $s"; done
echo "   More: make demo-img (the image tool), make e2e (the same on a one-node Kubernetes), README.md"
