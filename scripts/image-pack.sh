#!/usr/bin/env bash
# The Dockerfile's image without a container engine (called by
# scripts/image.sh): zq-csi cross-compiled for ARCH, Debian's static busybox
# for ARCH, one layer written by test/e2e/tools/imgpack. The layout is the
# Dockerfile's: /zq-csi, /bin/busybox, /bin/{sh,mount,umount,modprobe} ->
# busybox, /tmp (1777); entrypoint /zq-csi. scripts/image-check.sh builds
# both and compares them.
#   image-pack.sh REF ARCH VERSION REVISION OUT.tar
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PATH=/usr/local/go/bin:$PATH
ref=$1 arch=$2 version=$3 rev=$4 out=$5
work=$root/bin/image/.pack-$arch
mkdir -p "$work" "$root/bin/tools"
(cd "$root/test/e2e/tools" && CGO_ENABLED=0 GOFLAGS="-buildvcs=false -mod=mod" go build -trimpath -o "$root/bin/tools/imgpack" ./imgpack)

# Debian's architecture names for the GOARCH ones.
declare -A debarch=([amd64]=amd64 [arm64]=arm64 [arm]=armhf [ppc64le]=ppc64el [s390x]=s390x [riscv64]=riscv64)
goarm=""; [ "$arch" = arm ] && goarm=7
var=ZQ_BUSYBOX_$arch
bb=${!var:-}
if [ -z "$bb" ] && [ "$arch" = "$(go env GOARCH)" ]; then
  for b in /bin/busybox /usr/bin/busybox; do
    if [ -x "$b" ] && ! ldd "$b" >/dev/null 2>&1; then bb=$b; break; fi
  done
  [ -n "$bb" ] || { echo "image-pack: no static busybox for $arch: apt-get install busybox-static (or set $var=PATH)" >&2; exit 1; }
elif [ -z "$bb" ]; then
  d=${debarch[$arch]}
  if dpkg --print-foreign-architectures 2>/dev/null | grep -qx "$d"; then
    (cd "$work" && rm -f busybox-static_*.deb && apt-get download -q "busybox-static:$d" >/dev/null)
    rm -rf "$work/deb"; dpkg-deb -x "$work"/busybox-static_*.deb "$work/deb"
    bb=$work/deb/bin/busybox
  else
    echo "image-pack: no static busybox for $arch. Either set $var=PATH to one, or let apt fetch Debian's:" >&2
    echo "  dpkg --add-architecture $d && apt-get update    (then make image again)" >&2
    echo "or build with an engine (docker buildx, podman), which takes busybox from the target's busybox image." >&2
    exit 1
  fi
fi
[ -f "$bb" ] || { echo "image-pack: $var=$bb: no such file" >&2; exit 1; }

(cd "$root" && CGO_ENABLED=0 GOOS=linux GOARCH=$arch GOARM=$goarm go build -trimpath -buildvcs=false \
  -ldflags "-s -w -X main.version=$version" -o "$work/zq-csi" ./cmd/zq-csi)
"$root/bin/tools/imgpack" -o "$out" -t "$ref" -arch "$arch" -entrypoint /zq-csi \
  -add "$work/zq-csi:/zq-csi" -add "$bb:/bin/busybox" \
  -link /bin/sh=busybox -link /bin/mount=busybox -link /bin/umount=busybox -link /bin/modprobe=busybox \
  -label org.opencontainers.image.title=zq-csi \
  -label "org.opencontainers.image.description=CSI driver for zoned qcow2 volumes" \
  -label org.opencontainers.image.source=https://github.com/zq-csi/zq-csi \
  -label "org.opencontainers.image.version=$version" -label "org.opencontainers.image.revision=$rev"
