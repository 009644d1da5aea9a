#!/usr/bin/env bash
# Installs the small tools of the e2e lane and caches them outside the work
# tree, keyed on their versions:
#   helm  -> $ZQ_CACHE/tools/helm-$HELM_VERSION/helm   (go install, pinned)
#   etcd  -> Debian's etcd-server package (/usr/bin/etcd)
#   node  -> Debian's containerd, runc, iptables, containernetworking-plugins
#            and busybox-static (the kubelet's runtime, CNI, test images)
# kubectl comes from build-k8s.sh (same version as the API server).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.sh"
export PATH=/usr/local/go/bin:$PATH CGO_ENABLED=0 GOFLAGS=-buildvcs=false

apt_install() {
  local missing=""
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  [ -z "$missing" ] && return 0
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

what=("$@"); [ ${#what[@]} -gt 0 ] || what=(etcd helm)
for w in "${what[@]}"; do
  case $w in
    etcd)
      apt_install etcd-server
      # The package starts a system etcd on 2379; the lane runs its own.
      if [ -d /run/systemd/system ]; then systemctl disable --now etcd >/dev/null 2>&1 || true; fi
      etcd --version | sed -n 1p ;;
    node)
      apt_install containerd runc iptables containernetworking-plugins busybox-static iproute2 openssl curl
      # Started per run by scripts/e2e/cluster.sh with its own config.
      if [ -d /run/systemd/system ]; then systemctl disable --now containerd >/dev/null 2>&1 || true; fi
      containerd --version; runc --version | sed -n 1p ;;
    helm)
      d=$ZQ_CACHE/tools/helm-$HELM_VERSION
      if [ ! -x "$d/helm" ]; then
        t0=$(date +%s)
        mkdir -p "$d"
        GOBIN=$d go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
        echo "[build-tools] helm $HELM_VERSION built in $(( $(date +%s) - t0 ))s"
      fi
      "$d/helm" version --short ;;
    *) echo "unknown tool $w" >&2; exit 2 ;;
  esac
done
