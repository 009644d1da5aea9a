#!/usr/bin/env bash
# A one-node Kubernetes cluster on this machine, for the e2e lane:
# etcd + kube-apiserver (apiserver.sh), kube-controller-manager,
# kube-scheduler, containerd + runc (Debian packages) and the kubelet, all
# under one directory ($ZQ_E2E_DIR, default /var/lib/zq-e2e), on loopback
# plus a private bridge that carries the node IP.
#
#   cluster.sh up      start everything, import the images of build-images.sh
#   cluster.sh down    stop everything and remove what it left: processes
#                      (by recorded pid), containers, mounts, loop devices,
#                      iptables chains, cgroups, bridges, the directory
#
# Recipe (measured on this machine; see issue 7): kubelet with
# failCgroupV1=false, cgroupDriver=cgroupfs, failSwapOn=false; containerd
# with restrict_oom_score_adj (no CAP_SYS_RESOURCE here); a non-loopback node
# IP on a bridge with no ports; the kubelet root bind-mounted on itself and
# made rshared (Bidirectional propagation of the node plugin); the API
# server without endpoint reconciler (no Service network: pods that need the
# API use the host network and KUBERNETES_SERVICE_HOST=127.0.0.1).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/versions.sh"
. "$here/apiserver.sh"

E2E_DIR=${ZQ_E2E_DIR:-/var/lib/zq-e2e}
NODE_NAME=zq-e2e
NODE_BRIDGE=zqe2e-node
NODE_IP=${ZQ_E2E_NODE_IP:-10.213.255.1}
POD_BRIDGE=zqe2e-cni
POD_SUBNET=${ZQ_E2E_POD_SUBNET:-10.213.0.0/24}
CGROUP_ROOT=zq-e2e
KUBELET_PORT=26250
BIN=$K8S_CACHE/bin
CTR_SOCK=$E2E_DIR/run/containerd.sock
export KUBECONFIG=$E2E_DIR/api/kubeconfig
kubectl() { "$BIN/kubectl" "$@"; }
ctr_() { ctr --address "$CTR_SOCK" -n k8s.io "$@"; }

start_bg() { # name cmd... : starts a process, records its pid
  local name=$1; shift
  "$@" > "$E2E_DIR/log/$name.log" 2>&1 &
  echo $! > "$E2E_DIR/$name.pid"
}

stop_pid() { # name [signal-timeout-seconds]
  local f=$E2E_DIR/$1.pid pid i
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 $(( ${2:-10} * 5 ))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

wait_for() { # seconds description command...
  local t=$1 what=$2 i; shift 2
  for i in $(seq 1 $(( t * 2 ))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "timed out after ${t}s waiting for $what" >&2
  return 1
}

cluster_up() {
  [ -x "$BIN/kubelet" ] && [ -x "$BIN/kube-controller-manager" ] && [ -x "$BIN/kube-scheduler" ] ||
    { echo "run scripts/e2e/build-k8s.sh kube-apiserver kubectl kube-controller-manager kube-scheduler kubelet" >&2; return 1; }
  for c in containerd runc ctr iptables; do command -v $c >/dev/null || { echo "$c missing (apt-get install containerd runc iptables)" >&2; return 1; }; done
  [ -x /usr/lib/cni/bridge ] || { echo "CNI plugins missing (apt-get install containernetworking-plugins)" >&2; return 1; }
  if [ -e "$E2E_DIR" ]; then cluster_down; fi
  mkdir -p "$E2E_DIR"/{log,run,kubelet,cni/net.d,containerd,data}
  # iptables chains before we start, so that down removes only ours.
  for ipt in iptables ip6tables; do
    for t in filter nat mangle; do
      $ipt -t $t -S 2>/dev/null | awk '/^-N /{print $2}' | sed "s/^/$ipt $t /"
    done
  done > "$E2E_DIR/iptables-chains-before"
  ls /run/netns 2>/dev/null > "$E2E_DIR/netns-before" || true

  # Node IP on a bridge without ports.
  ip link add "$NODE_BRIDGE" type bridge 2>/dev/null || true
  ip addr add "$NODE_IP/32" dev "$NODE_BRIDGE" 2>/dev/null || true
  ip link set "$NODE_BRIDGE" up

  zq_api_up "$E2E_DIR/api" >/dev/null
  # The VolumeSnapshot CRDs of the pinned external-snapshotter.
  local crds; crds=$(bash "$here/snapshot-crds.sh")
  kubectl apply --server-side -f "$crds/snapshot.storage.k8s.io_volumesnapshotclasses.yaml" \
    -f "$crds/snapshot.storage.k8s.io_volumesnapshotcontents.yaml" -f "$crds/snapshot.storage.k8s.io_volumesnapshots.yaml" >/dev/null
  kubectl wait --for condition=established --timeout=60s crd/volumesnapshots.snapshot.storage.k8s.io >/dev/null

  # The kubelet root: bind-mounted on itself and made rshared (the node
  # plugin's Bidirectional mounts propagate back through it).
  mount --bind "$E2E_DIR/kubelet" "$E2E_DIR/kubelet"
  mount --make-rshared "$E2E_DIR/kubelet"

  cat > "$E2E_DIR/cni/net.d/10-zq-e2e.conflist" <<CNI
{
  "cniVersion": "0.4.0",
  "name": "zq-e2e",
  "plugins": [
    {"type": "bridge", "bridge": "$POD_BRIDGE", "isGateway": true, "ipMasq": false,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_SUBNET"}]], "dataDir": "$E2E_DIR/cni/ipam"}},
    {"type": "loopback"}
  ]
}
CNI
  cat > "$E2E_DIR/containerd.toml" <<TOML
version = 2
root = "$E2E_DIR/containerd/root"
state = "$E2E_DIR/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$CTR_SOCK"
[ttrpc]
  address = "$CTR_SOCK.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$E2E_DIR/cni/net.d"
TOML
  start_bg containerd containerd --config "$E2E_DIR/containerd.toml"
  wait_for 30 containerd ctr --address "$CTR_SOCK" version

  local img
  for img in "$ZQ_E2E_IMAGES"/*.tar; do
    ctr_ images import --no-unpack=false "$img" >/dev/null
  done
  ctr_ images ls -q | grep -v '^sha256:' | sed 's/^/  image: /'

  local sa=$E2E_DIR/api/pki
  start_bg kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig "$KUBECONFIG" \
    --authentication-kubeconfig "$KUBECONFIG" --authorization-kubeconfig "$KUBECONFIG" \
    --bind-address 127.0.0.1 --secure-port 26257 --leader-elect=false \
    --service-account-private-key-file "$sa/sa.key" --root-ca-file "$sa/apiserver.crt" \
    --use-service-account-credentials=false --controllers '*,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller' \
    --node-monitor-grace-period 20s
  start_bg kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$KUBECONFIG" \
    --authentication-kubeconfig "$KUBECONFIG" --authorization-kubeconfig "$KUBECONFIG" \
    --bind-address 127.0.0.1 --secure-port 26259 --leader-elect=false

  # The kubelet's cgroup root must exist in every hierarchy (cgroup v1 here);
  # cpuset needs its cpus and mems set before anything can join it.
  local h
  for h in /sys/fs/cgroup/*/; do
    [ -d "$h" ] || continue
    mkdir -p "$h$CGROUP_ROOT" 2>/dev/null || true
  done
  if [ -f /sys/fs/cgroup/cpuset/cpuset.cpus ]; then
    cat /sys/fs/cgroup/cpuset/cpuset.cpus > "/sys/fs/cgroup/cpuset/$CGROUP_ROOT/cpuset.cpus"
    cat /sys/fs/cgroup/cpuset/cpuset.mems > "/sys/fs/cgroup/cpuset/$CGROUP_ROOT/cpuset.mems"
  fi
  # The snapshot controller (cluster-wide half of VolumeSnapshot support,
  # built by build-sidecars.sh) runs as a host process like the other
  # controllers.
  local snapctl=$ZQ_CACHE/sidecars/csi-snapshotter-$SNAPSHOTTER_VERSION/snapshot-controller
  if [ -x "$snapctl" ]; then
    start_bg snapshot-controller "$snapctl" --kubeconfig "$KUBECONFIG" --leader-election=false
  fi
  mkdir -p "$E2E_DIR/kubelet-pki"
  cat > "$E2E_DIR/kubelet.yaml" <<KCFG
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP_ROOT
cgroupsPerQOS: true
failSwapOn: false
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 26248
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization:
  mode: AlwaysAllow
containerRuntimeEndpoint: unix://$CTR_SOCK
imageServiceEndpoint: unix://$CTR_SOCK
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
resolvConf: /etc/resolv.conf
enableServer: true
staticPodPath: ""
KCFG
  start_bg kubelet "$BIN/kubelet" --config "$E2E_DIR/kubelet.yaml" --kubeconfig "$KUBECONFIG" \
    --root-dir "$E2E_DIR/kubelet" --cert-dir "$E2E_DIR/kubelet-pki" \
    --node-ip "$NODE_IP" --hostname-override "$NODE_NAME" --v=2
  wait_for 90 "node $NODE_NAME Ready" \
    kubectl wait --for=condition=Ready "node/$NODE_NAME" --timeout=2s
  wait_for 60 "the default service account" kubectl -n default get serviceaccount default
}

cluster_down() {
  [ -d "$E2E_DIR" ] || return 0
  # Controllers first (nothing recreates pods), then the pods through the
  # kubelet so that sandboxes and volumes are torn down the normal way.
  # (test/e2e/run.sh has already uninstalled the chart and its volumes.)
  stop_pid kube-scheduler
  stop_pid kube-controller-manager
  stop_pid snapshot-controller
  if [ -f "$E2E_DIR/kubelet.pid" ] && kill -0 "$(cat "$E2E_DIR/kubelet.pid")" 2>/dev/null; then
    kubectl delete pods --all -A --grace-period=5 --timeout=60s --wait=true >/dev/null 2>&1 || true
  fi
  stop_pid kubelet 15
  # Every container and sandbox containerd still runs, then containerd.
  if [ -S "$CTR_SOCK" ]; then
    local t
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true; done
    sleep 1
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$t" >/dev/null 2>&1 || true; done
    for t in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$t" >/dev/null 2>&1 || true; done
  fi
  stop_pid containerd
  # Shims whose containerd is gone (matched by our socket path, never by name).
  local pid
  for pid in $(pgrep -f -- "-address $CTR_SOCK" 2>/dev/null || true); do kill -9 "$pid" 2>/dev/null || true; done
  zq_api_down "$E2E_DIR/api"
  # Network namespaces of our pods (containerd's cni-* netns, under our state dir).
  local m
  # Mounts under the directory, deepest first.
  for i in 1 2 3; do
    awk -v d="$E2E_DIR" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
  done
  # Loop devices the kubelet made for block volumes (backed by files under the directory).
  losetup -nl -O NAME,BACK-FILE 2>/dev/null | awk -v d="$E2E_DIR" 'index($2, d) == 1 {print $1}' | while read -r m; do
    losetup -d "$m" 2>/dev/null || true
  done
  # iptables chains created since up (the kubelet's KUBE-* canaries, CNI-*).
  if [ -f "$E2E_DIR/iptables-chains-before" ]; then
    local ipt tbl ch
    for ipt in iptables ip6tables; do
      for tbl in filter nat mangle; do
        for ch in $($ipt -t $tbl -S 2>/dev/null | awk '/^-N (KUBE-|CNI-)/{print $2}'); do
          grep -qx "$ipt $tbl $ch" "$E2E_DIR/iptables-chains-before" && continue
          # Rules elsewhere that jump to it, then its own rules, then the chain.
          $ipt -t $tbl -S 2>/dev/null | awk -v c="$ch" '$1 == "-A" && $0 ~ ("-j " c "( |$)") {sub(/^-A/, "-D"); print}' |
            while read -r rule; do eval "$ipt -t $tbl $rule" 2>/dev/null || true; done
          $ipt -t $tbl -F "$ch" 2>/dev/null || true
        done
        for ch in $($ipt -t $tbl -S 2>/dev/null | awk '/^-N (KUBE-|CNI-)/{print $2}'); do
          grep -qx "$ipt $tbl $ch" "$E2E_DIR/iptables-chains-before" || $ipt -t $tbl -X "$ch" 2>/dev/null || true
        done
      done
    done
  fi
  # Network namespaces of our pod sandboxes that containerd did not remove.
  if [ -f "$E2E_DIR/netns-before" ]; then
    for ch in $(ls /run/netns 2>/dev/null | grep '^cni-' || true); do
      grep -qx "$ch" "$E2E_DIR/netns-before" || ip netns delete "$ch" 2>/dev/null || true
    done
  fi
  # cgroups under our cgroup root, deepest first, in every v1 hierarchy.
  local h
  for h in /sys/fs/cgroup/*/; do
    [ -d "$h$CGROUP_ROOT" ] || continue
    find "$h$CGROUP_ROOT" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  ip link del "$POD_BRIDGE" 2>/dev/null || true
  ip link del "$NODE_BRIDGE" 2>/dev/null || true
  rm -rf "$E2E_DIR"
}

# leftovers: prints anything of ours still present (empty: clean).
cluster_leftovers() {
  local d=$E2E_DIR
  [ -e "$d" ] && echo "directory $d"
  awk -v d="$d" 'index($5, d) == 1 {print "mount " $5}' /proc/self/mountinfo
  pgrep -af -- "$d" 2>/dev/null | sed 's/^/process /' || true
  losetup -nl -O NAME,BACK-FILE 2>/dev/null | awk -v d="$d" 'index($2, d) == 1 {print "loop " $1 " " $2}'
  for h in /sys/fs/cgroup/*/; do [ -d "$h$CGROUP_ROOT" ] && echo "cgroup $h$CGROUP_ROOT"; done
  ip -br link 2>/dev/null | awk '$1 ~ /^zqe2e/ {print "link " $1}'
  for ipt in iptables ip6tables; do
    for t in filter nat mangle; do
      $ipt -t $t -S 2>/dev/null | awk -v p=$ipt -v t=$t '/^-N (KUBE-|CNI-)/{print p " " t " " $2}'
    done
  done
  ls /run/netns 2>/dev/null | grep '^cni-' | sed 's/^/netns /' || true
  return 0
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  case ${1:-} in
    up) : "${ZQ_E2E_IMAGES:?set ZQ_E2E_IMAGES to the directory of build-images.sh}"; cluster_up ;;
    down) cluster_down ;;
    leftovers) cluster_leftovers ;;
    *) echo "usage: $0 up|down|leftovers" >&2; exit 2 ;;
  esac
fi
