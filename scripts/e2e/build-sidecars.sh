#!/usr/bin/env bash
# Builds the CSI sidecars of the controller pod from their Go module source
# and caches the binaries outside the work tree, keyed on their versions:
#   $ZQ_CACHE/sidecars/<name>-<version>/<name>
#
# The module proxy refuses `go install` for modules with replace directives
# (all three have them), so each is built from a writable copy of its
# module source (`go mod download`, copy, `go build ./cmd/<name>`); the
# snapshotter's go.mod replaces its client/v8 module with ./client, so that
# module's source is copied there. The proxy refuses node-driver-registrar
# altogether: the e2e lane runs without it (the node plugin registers
# itself with the kubelet).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.sh"
export PATH=/usr/local/go/bin:$PATH CGO_ENABLED=0 GOFLAGS="-buildvcs=false -mod=mod"

moddir() { (cd /tmp && go mod download -json "$1" | sed -n 's/.*"Dir": "\(.*\)",*/\1/p'); }

build() { # name module version
  local name=$1 mod=$2 ver=$3 out=$ZQ_CACHE/sidecars/$1-$3
  # The snapshotter's directory also holds the snapshot controller (the
  # cluster-wide half of VolumeSnapshot support), built from the same source.
  local extra=""; [ "$name" = csi-snapshotter ] && extra=snapshot-controller
  if [ -x "$out/$name" ] && { [ -z "$extra" ] || [ -x "$out/$extra" ]; }; then echo "[build-sidecars] cached: $name $ver"; return; fi
  local t0; t0=$(date +%s)
  local src; src=$(moddir "$mod@$ver")
  rm -rf "$out/src"; mkdir -p "$out"
  cp -r "$src" "$out/src"; chmod -R u+w "$out/src"
  if [ "$name" = csi-snapshotter ]; then
    local csrc; csrc=$(moddir "github.com/kubernetes-csi/external-snapshotter/client/v8@$ver")
    rm -rf "$out/src/client"; cp -r "$csrc" "$out/src/client"; chmod -R u+w "$out/src/client"
  fi
  (cd "$out/src" && go build -trimpath -ldflags "-s -w -X main.version=$ver" -o "$out/$name" "./cmd/$name")
  if [ -n "$extra" ]; then
    (cd "$out/src" && go build -trimpath -ldflags "-s -w -X main.version=$ver" -o "$out/$extra" "./cmd/$extra")
  fi
  rm -rf "$out/src"
  echo "[build-sidecars] $name $ver built in $(( $(date +%s) - t0 ))s"
}

what=("$@"); [ ${#what[@]} -gt 0 ] || what=(csi-provisioner csi-resizer csi-snapshotter)
for w in "${what[@]}"; do
  case $w in
    csi-provisioner) build csi-provisioner github.com/kubernetes-csi/external-provisioner/v5 "$PROVISIONER_VERSION" ;;
    csi-resizer)     build csi-resizer github.com/kubernetes-csi/external-resizer "$RESIZER_VERSION" ;;
    csi-snapshotter) build csi-snapshotter github.com/kubernetes-csi/external-snapshotter/v8 "$SNAPSHOTTER_VERSION" ;;
    *) echo "unknown sidecar $w" >&2; exit 2 ;;
  esac
done
