#!/usr/bin/env bash
# make image: builds the zq-csi container image (the Dockerfile) and writes
# it as a docker-archive tarball per platform, which kind, minikube, k3s,
# containerd and skopeo all load:
#
#   bin/image/zq-csi-<tag>-linux-<arch>.tar     tagged IMAGE_REPO:IMAGE_TAG
#
# The tag is what the chart installs by default (values.yaml image.repository,
# tag = the chart's appVersion), so `helm install` finds the image once it is
# on the nodes.
#
# Engine (ZQ_IMAGE_ENGINE, default auto): docker, podman or buildah, the
# first one that answers; the Dockerfile's base images (GO_IMAGE,
# BUSYBOX_IMAGE) must then be present or pullable. When there is no engine,
# or auto finds that the base images cannot be had (no registry), the image
# is packed without an engine by test/e2e/tools/imgpack from the same
# ingredients: zq-csi built here (CGO_ENABLED=0, GOARCH of the platform) and
# Debian's static busybox, in the Dockerfile's layout. An engine named
# explicitly never falls back.
#
# Environment: IMAGE_REPO (localhost/zq-csi), IMAGE_TAG (the chart's
# appVersion), PLATFORMS (linux/<this machine's GOARCH>; e.g.
# linux/amd64,linux/arm64), ZQ_IMAGE_ENGINE, GO_IMAGE, BUSYBOX_IMAGE,
# ZQ_BUSYBOX_<arch> (a static busybox for the packer, for other arches),
# ZQ_IMAGE_BUILD_FLAGS (more flags for the engine's build).
# Options: --out DIR (default bin/image), --print-ref.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH=/usr/local/go/bin:$PATH
appversion=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/zq-csi/Chart.yaml)
repo=${IMAGE_REPO:-localhost/zq-csi}
tag=${IMAGE_TAG:-$appversion}
ref=$repo:$tag
out=bin/image
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --print-ref) echo "$ref"; exit 0 ;;
    *) echo "image.sh: unknown argument $1 (want --out DIR or --print-ref)" >&2; exit 2 ;;
  esac
done
hostarch=$(go env GOARCH)
platforms=${PLATFORMS:-linux/$hostarch}
engine=${ZQ_IMAGE_ENGINE:-auto}
go_image=${GO_IMAGE:-docker.io/library/golang:1.26-bookworm}
busybox_image=${BUSYBOX_IMAGE:-docker.io/library/busybox:1.37.0-uclibc}
rev=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
version=$tag
case $engine in auto|docker|podman|buildah|imgpack) ;; *)
  echo "image.sh: ZQ_IMAGE_ENGINE=$engine: want auto, docker, podman, buildah or imgpack" >&2; exit 2 ;;
esac
IFS=, read -r -a plats <<<"$platforms"
for p in "${plats[@]}"; do
  case $p in linux/amd64|linux/arm64|linux/arm|linux/ppc64le|linux/s390x|linux/riscv64) ;; *)
    echo "image.sh: PLATFORMS=$platforms: $p is not one of linux/amd64, linux/arm64, linux/arm, linux/ppc64le, linux/s390x, linux/riscv64" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
tarball() { echo "$out/zq-csi-$tag-${1//\//-}.tar"; }

# An engine "works" when its daemon or storage answers, not when its
# client is merely installed (a docker CLI without a daemon is common).
works() { command -v "$1" >/dev/null && timeout 20 "$1" info >/dev/null 2>&1; }
# The base images for platform $2 with engine $1, pulled if missing.
have_bases() {
  local e=$1 p=$2 img
  for img in "$go_image" "$busybox_image"; do
    case $e in
      docker) docker image inspect "$img" >/dev/null 2>&1 || timeout 120 docker pull -q --platform "$p" "$img" >/dev/null 2>&1 || { echo "$img"; return 1; } ;;
      *) timeout 120 "$e" pull -q --platform "$p" "$img" >/dev/null 2>&1 || "$e" inspect --type image "$img" >/dev/null 2>&1 || { echo "$img"; return 1; } ;;
    esac
  done
}

if [ "$engine" = auto ]; then
  engine=imgpack
  for e in docker podman buildah; do
    works "$e" || continue
    if missing=$(have_bases "$e" "${plats[0]}"); then engine=$e; break; fi
    echo "[image] $e works but cannot get the base image $missing (no registry reachable?):" \
      "packing the same layout without an engine instead (ZQ_IMAGE_ENGINE=$e makes this an error)" >&2
    break
  done
  [ "$engine" = imgpack ] && ! works docker && ! works podman && ! works buildah &&
    echo "[image] no working docker, podman or buildah: packing the image with test/e2e/tools/imgpack" >&2
elif [ "$engine" != imgpack ]; then
  works "$engine" || { echo "image.sh: ZQ_IMAGE_ENGINE=$engine, but '$engine info' fails" >&2; exit 1; }
fi

# ZQ_IMAGE_BUILD_FLAGS: more flags for the engine's build (image-check.sh
# lends the build the host's module cache with -v).
read -r -a extra <<<"${ZQ_IMAGE_BUILD_FLAGS:-}"
build_args=("${extra[@]}" --build-arg "VERSION=$version" --build-arg "GO_IMAGE=$go_image" --build-arg "BUSYBOX_IMAGE=$busybox_image"
  --build-arg "GOPROXY=$(go env GOPROXY)" --label "org.opencontainers.image.revision=$rev")
# The host's platform last, so that the engine's store keeps that one under $ref.
ordered=()
for p in "${plats[@]}"; do [ "$p" = "linux/$hostarch" ] || ordered+=("$p"); done
for p in "${plats[@]}"; do [ "$p" = "linux/$hostarch" ] && ordered+=("$p"); done
for p in "${ordered[@]}"; do
  t=$(tarball "$p"); rm -f "$t"
  start=$(date +%s)
  case $engine in
    docker)
      DOCKER_BUILDKIT=1 docker build --platform "$p" "${build_args[@]}" -t "$ref" .
      docker save -o "$t" "$ref" ;;
    podman)
      podman build --platform "$p" "${build_args[@]}" -t "$ref" .
      podman save --format docker-archive -o "$t" "$ref" ;;
    buildah)
      buildah bud --platform "$p" "${build_args[@]}" -t "$ref" .
      buildah push --quiet "$ref" "docker-archive:$t:$ref" ;;
    imgpack)
      arch=${p#linux/}
      bash "$root/scripts/image-pack.sh" "$ref" "$arch" "$version" "$rev" "$t" ;;
  esac
  echo "[image] $ref ($p, $engine, $(( $(date +%s) - start ))s): $t ($(du -h "$t" | cut -f1))"
done
# Packed without an engine, but one works here: put the image into its store too.
if [ "$engine" = imgpack ]; then
  for e in docker podman; do
    works "$e" && "$e" load -i "$(tarball "linux/$hostarch")" >/dev/null && echo "[image] loaded into $e as $ref" && break
  done
fi
cat <<MSG
[image] built $ref for $platforms. To use it (charts/zq-csi/README.md, "The image"):
  kind load image-archive $(tarball "${ordered[-1]}")
  minikube image load $(tarball "${ordered[-1]}")
  k3s ctr images import $(tarball "${ordered[-1]}")        # on each node
  skopeo copy docker-archive:$(tarball "${ordered[-1]}") docker://REGISTRY/zq-csi:$tag   # then --set image.repository=REGISTRY/zq-csi
MSG
