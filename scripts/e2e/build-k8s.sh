#!/usr/bin/env bash
# Builds Kubernetes components from the Go module proxy and caches them
# outside the work tree, keyed on the version:
#   $ZQ_CACHE/k8s/$K8S_VERSION/bin/{kube-apiserver,kubectl,...}
#
# The module proxy will not `go install` k8s.io/kubernetes (its go.mod has
# replace directives for the staging modules), so we build from a scratch
# module that requires k8s.io/kubernetes and replaces every staging module
# (k8s.io/api, k8s.io/client-go, ...) with its v0.x release of the same
# Kubernetes version. The replace list is read from kubernetes' own go.mod.
#
# Usage: build-k8s.sh [component ...]   (default: kube-apiserver kubectl)
# Components: kube-apiserver kubectl kube-controller-manager kube-scheduler kubelet
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.sh"
export PATH=/usr/local/go/bin:$PATH CGO_ENABLED=0 GOFLAGS=-buildvcs=false

comps=("$@"); [ ${#comps[@]} -gt 0 ] || comps=(kube-apiserver kubectl)
mkdir -p "$K8S_CACHE/bin"
todo=()
for c in "${comps[@]}"; do
  [ -x "$K8S_CACHE/bin/$c" ] || todo+=("$c")
done
if [ ${#todo[@]} -eq 0 ]; then
  echo "[build-k8s] cached: ${comps[*]} ($K8S_CACHE/bin)"; exit 0
fi

src=$K8S_CACHE/src
staging_ver=v0.${K8S_VERSION#v1.}
if [ ! -f "$src/.ready" ]; then
  rm -rf "$src"; mkdir -p "$src"
  modfile=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
  {
    echo "module zq-csi.local/k8s-build"
    echo
    echo "go 1.24.0"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    sed -n 's#^[[:space:]]*\(k8s.io/[^ ]*\) => ./staging/src/.*#\t\1 => \1 '"$staging_ver"'#p' "$modfile"
    echo ")"
  } > "$src/go.mod"
  cat > "$src/doc.go" <<'GO'
// Package build is a scratch module used only to build Kubernetes binaries.
package build
GO
  (cd "$src" && go get "k8s.io/kubernetes@$K8S_VERSION" >/dev/null &&
     for c in kube-apiserver kubectl kube-controller-manager kube-scheduler kubelet; do
       go get "k8s.io/kubernetes/cmd/$c@$K8S_VERSION" >/dev/null
     done)
  touch "$src/.ready"
fi

ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags="$ldflags -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) -X $p.gitTreeState=clean"
done
pkgs=(); for c in "${todo[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
t0=$(date +%s)
echo "[build-k8s] building ${todo[*]} $K8S_VERSION (cold: tens of minutes on 2 cores)"
(cd "$src" && go build -trimpath -ldflags "$ldflags" -o "$K8S_CACHE/bin/" "${pkgs[@]}")
echo "[build-k8s] built ${todo[*]} in $(( $(date +%s) - t0 ))s"
