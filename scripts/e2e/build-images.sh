#!/usr/bin/env bash
# Builds the e2e lane's container images as docker-archive tarballs, without
# a container engine (test/e2e/tools/imgpack: one layer from static
# binaries), into OUTDIR (default $ZQ_CACHE/images):
#   localhost/zq-csi:<appVersion>                     this work tree's zq-csi, built by
#                                                     `make image` (scripts/image.sh): the
#                                                     chart's default image
#   registry.k8s.io/sig-storage/csi-{provisioner,resizer,snapshotter}:<pinned>
#                                                     from build-sidecars.sh
#   registry.k8s.io/pause:3.10                        test/e2e/tools/pause
#   docker.io/zq-csi/e2e-tools:e2e                    Debian's static busybox
# Sidecar, pause and tools tarballs are cached (keyed on their versions, or
# the tools' source hash); zq-csi's is rebuilt every time, by the same
# script as `make image` (an engine where one works and its base images can
# be had, else the in-repo packer; ZQ_IMAGE_ENGINE chooses). No registrar
# image: the node plugin registers itself with the kubelet (values-e2e.yaml).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
. "$here/versions.sh"
export PATH=/usr/local/go/bin:$PATH CGO_ENABLED=0 GOFLAGS=-buildvcs=false
out=${1:-$ZQ_CACHE/images}
mkdir -p "$out"

# The helper tools, keyed on their source.
thash=$(cd "$root/test/e2e/tools" && find . -type f \( -name '*.go' -o -name 'go.*' \) -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
tools=$ZQ_CACHE/tools/e2e-$thash
if [ ! -x "$tools/imgpack" ] || [ ! -x "$tools/pause" ]; then
  mkdir -p "$tools"
  (cd "$root/test/e2e/tools" && GOFLAGS="-buildvcs=false -mod=mod" go build -trimpath -ldflags "-s -w" -o "$tools/" ./...)
fi
pack() { "$tools/imgpack" "$@"; }
# Tarballs of earlier tool versions would be imported too: drop them.
find "$out" -maxdepth 1 \( -name 'e2e-*.tar' -o -name 'pause-*.tar' \) ! -name "*$thash.tar" -delete

# Sidecars from their module source.
bash "$here/build-sidecars.sh"
for s in csi-provisioner:$PROVISIONER_VERSION csi-resizer:$RESIZER_VERSION csi-snapshotter:$SNAPSHOTTER_VERSION; do
  n=${s%%:*} v=${s#*:}
  t=$out/$n-$v.tar
  [ -f "$t" ] || pack -o "$t" -t "registry.k8s.io/sig-storage/$n:$v" -entrypoint "/$n" -add "$ZQ_CACHE/sidecars/$n-$v/$n:/$n"
done
t=$out/pause-$thash.tar
[ -f "$t" ] || pack -o "$t" -t registry.k8s.io/pause:3.10 -entrypoint /pause -add "$tools/pause:/pause"

# The test tools: busybox (static, from Debian's busybox-static) and its applets.
bb=""
for b in /bin/busybox /usr/bin/busybox; do
  if [ -x "$b" ] && ! ldd "$b" >/dev/null 2>&1; then bb=$b; break; fi
done
[ -n "$bb" ] || { echo "no static busybox: apt-get install busybox-static" >&2; exit 1; }
bbsum=$(sha256sum "$bb" | cut -c1-16)
t=$out/e2e-tools-$bbsum-$thash.tar
if [ ! -f "$t" ]; then
  links=()
  for a in sh ash cat cmp dd echo head hexdump ls od sleep stat sync test true false wc blockdev blkdiscard grep sed awk printf seq cut tr xxd md5sum sha256sum mount; do
    links+=(-link "/bin/$a=busybox")
  done
  pack -o "$t" -t docker.io/zq-csi/e2e-tools:e2e -entrypoint /bin/sh -add "$bb:/bin/busybox" "${links[@]}"
fi

# zq-csi from this work tree: make image, for this machine's platform.
rm -f "$out/zq-csi-e2e.tar" "$out"/zq-csi-[0-9]*.tar   # earlier tags would be imported too
PLATFORMS=linux/$(go env GOARCH) bash "$root/scripts/image.sh" --out "$out/zq-csi-image" | grep -v '^  '
ln -f "$out/zq-csi-image/zq-csi-$(bash "$root/scripts/image.sh" --print-ref | sed 's/.*://')-linux-$(go env GOARCH).tar" "$out/zq-csi-image.tar"
rm -rf "$out/zq-csi-image"
# kubectl zq runs on the host, as a user installs it.
mkdir -p "$out/zq-csi-bin"
(cd "$root" && go build -trimpath -ldflags "-s -w" -o "$out/zq-csi-bin/zq-csi" ./cmd/zq-csi)
echo "[build-images] images in $out"
