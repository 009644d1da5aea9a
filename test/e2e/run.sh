#!/usr/bin/env bash
# make e2e: a real one-node Kubernetes cluster on this machine
# (scripts/e2e/cluster.sh), the chart installed with helm, the tests below,
# and everything torn down again. Prints each test and the time of each
# phase (build, up, tests, down); builds are cached outside the work tree
# (scripts/e2e/versions.sh), so a second run only rebuilds zq-csi.
#
# This machine has no nbd module, so the node plugin's `auto` attacher
# picks FUSE + loop: pods get a real /dev/loopN on which the zone rules hold.
# There is no registrar sidecar: the node plugin registers itself with the
# kubelet.
#
# Environment: ZQ_E2E_KEEP=1 leaves the cluster up after the tests
# (tear down with scripts/e2e/cluster.sh down); ZQ_E2E_BACKEND=local runs
# the chart with the local backend instead of the default cluster backend.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
export PATH=/usr/local/go/bin:$PATH
. scripts/e2e/versions.sh
start=$(date +%s); last=$start
declare -a phase_times=()
phase() {
  local now; now=$(date +%s)
  [ -n "${cur_phase:-}" ] && phase_times+=("$(printf '%-8s %5ds' "$cur_phase" $((now - last)))")
  cur_phase=$1; last=$now
  printf '\n=== [e2e %4ds] %s\n' $((now - start)) "$*"
}

phase build "binaries (cached in $ZQ_CACHE), images"
bash scripts/e2e/build-tools.sh etcd node helm
bash scripts/e2e/build-k8s.sh kube-apiserver kubectl kube-controller-manager kube-scheduler kubelet
export ZQ_E2E_IMAGES=$ZQ_CACHE/images
bash scripts/e2e/build-images.sh "$ZQ_E2E_IMAGES"
helm=$ZQ_CACHE/tools/helm-$HELM_VERSION/helm

phase up "one-node cluster"
. scripts/e2e/cluster.sh
down_done=0
teardown() {
  [ "$down_done" = 1 ] && return
  down_done=1
  if [ "${ZQ_E2E_KEEP:-0}" = 1 ]; then echo "ZQ_E2E_KEEP=1: cluster left up"; return; fi
  phase down "uninstall, stop, clean up"
  if [ -f "$E2E_DIR/kubelet.pid" ]; then
    kubectl delete pod,pvc,volumesnapshot -n e2e --all --wait=true --timeout=90s >/dev/null 2>&1 || true
    "$helm" uninstall zq-csi -n kube-system --wait --timeout 90s >/dev/null 2>&1 || true
  fi
  cluster_down
  local left; left=$(cluster_leftovers)
  if [ -n "$left" ]; then echo "LEFT BEHIND:"; echo "$left"; leftover=1; else echo "nothing left behind"; fi
}
leftover=0
trap 'teardown' EXIT
cluster_up
kubectl get nodes -o wide

phase tests "install the chart, run the tests"
passed=0 failed=0 skipped=0
declare -a results=()
pass() { passed=$((passed + 1)); results+=("PASS  $1"); echo "--- PASS: $1"; }
fail() { failed=$((failed + 1)); results+=("FAIL  $1: $2"); echo "--- FAIL: $1: $2"; }
skip() { skipped=$((skipped + 1)); results+=("SKIP  $1: $2"); echo "--- SKIP: $1: $2"; }
testlog=$(mktemp)
run_test() { # name function: the function runs in a background subshell so
  # that set -e applies inside it (it would not in an `if` condition).
  echo "=== RUN   $1"
  "$2" > "$testlog" 2>&1 &
  if wait $!; then
    pass "$1"; sed 's/^/    /' "$testlog"
  else
    sed 's/^/    /' "$testlog"; fail "$1" "$(tail -3 "$testlog" | tr '\n' ' ')"
  fi
}
DRIVER=zq-csi.zq-csi.io
SC=zq-csi-zoned
MiB=$((1 << 20))

t_install() {
  "$helm" install zq-csi charts/zq-csi -n kube-system -f test/e2e/values-e2e.yaml \
    --set kubeletDir="$E2E_DIR/kubelet" --set dataDir="$E2E_DIR/data" --set stateDir="$E2E_DIR/data/state" \
    --set kubernetesServicePort="${ZQ_API_PORT:-26443}" --set backend="${ZQ_E2E_BACKEND:-cluster}" \
    --wait --timeout 180s
  kubectl -n kube-system get pods -o wide
  # The chart's default image is what make image built (values-e2e.yaml
  # sets only pullPolicy: Never), and containerd runs that very tarball.
  local want got id
  want=$(bash scripts/image.sh --print-ref)
  got=$(kubectl -n kube-system get pods -l app.kubernetes.io/name=zq-csi -o jsonpath='{range .items[*]}{.spec.containers[?(@.name=="zq-csi")].image}{"\n"}{end}' | sort -u)
  [ "$got" = "$want" ] || { echo "driver pods run image '$got', want make image's $want"; return 1; }
  id=$(kubectl -n kube-system get pods -l app.kubernetes.io/name=zq-csi -o jsonpath='{.items[0].status.containerStatuses[?(@.name=="zq-csi")].imageID}')
  local cfg; cfg=$(tar -xOf "$ZQ_E2E_IMAGES/zq-csi-image.tar" manifest.json | sed 's/.*"Config":"\([^"]*\)".*/\1/')
  cfg=${cfg##*/}; cfg=${cfg%.json}
  [ "${id##*:}" = "$cfg" ] || { echo "driver pods run image ID $id, but make image's tarball has config $cfg"; return 1; }
  echo "driver pods: image $got, ID $id = the config of make image's $ZQ_E2E_IMAGES/zq-csi-image.tar"
}
run_test "helm install (controller Deployment and node DaemonSet ready)" t_install || true
if [ "$failed" -gt 0 ]; then
  kubectl -n kube-system get pods -o wide || true
  kubectl -n kube-system describe pods 2>&1 | tail -40 || true
  for p in $(kubectl -n kube-system get pods -o name 2>/dev/null); do kubectl -n kube-system logs --all-containers "$p" 2>&1 | tail -20; done
fi

t_registered() {
  wait_for 60 "CSINode lists $DRIVER" bash -c "'$BIN/kubectl' get csinode $NODE_NAME -o jsonpath='{.spec.drivers[*].name}' | grep -qw $DRIVER"
  local keys; keys=$(kubectl get csinode "$NODE_NAME" -o jsonpath="{.spec.drivers[?(@.name=='$DRIVER')].topologyKeys}")
  echo "CSINode $NODE_NAME: $DRIVER topologyKeys=$keys"
  [[ $keys == *topology.zq-csi/node* ]]
  [ "$(kubectl get node "$NODE_NAME" -o jsonpath='{.metadata.labels.topology\.zq-csi/node}')" = "$NODE_NAME" ]
  # By the plugin itself (values-e2e.yaml: no registrar sidecar).
  local np; np=$(kubectl -n kube-system get pods -l app.kubernetes.io/component=node -o name)
  local containers; containers=$(kubectl -n kube-system get "$np" -o jsonpath='{.spec.containers[*].name}')
  echo "node plugin pod $np: containers $containers"
  [ "$containers" = zq-csi ]
  [ -S "$E2E_DIR/kubelet/plugins_registry/$DRIVER-reg.sock" ]
  echo "registration socket $E2E_DIR/kubelet/plugins_registry/$DRIVER-reg.sock"
  wait_for 30 "the plugin's log to report the kubelet's registration" bash -c "'$BIN/kubectl' -n kube-system logs $np | grep -q 'Registered with the kubelet'"
  kubectl -n kube-system logs "$np" | grep 'Registered with the kubelet' | head -1
}
run_test "node plugin registered itself with the kubelet (CSINode, topology label, no registrar sidecar)" t_registered

t_capacity() {
  wait_for 90 "CSIStorageCapacity for $SC" bash -c "'$BIN/kubectl' -n kube-system get csistoragecapacities -o jsonpath='{.items[?(@.storageClassName==\"$SC\")].capacity}' | grep -q ."
  kubectl -n kube-system get csistoragecapacities -o custom-columns=SC:.storageClassName,NODE:.nodeTopology.matchLabels,CAPACITY:.capacity
}
run_test "CSIStorageCapacity published for the node" t_capacity

kubectl create namespace e2e >/dev/null
# Data the tests wrote, kept on the host to compare with what pods read.
datadir=$(mktemp -d)
kubectl -n e2e wait --for=jsonpath='{.metadata.name}'=default serviceaccount/default --timeout=60s >/dev/null 2>&1 || true
pvc() { # name size [storageclass]
  kubectl -n e2e apply -f - >/dev/null <<Y
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1}
spec:
  storageClassName: ${3:-$SC}
  volumeMode: Block
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: $2}}
Y
}
pod() { # name pvc
  kubectl -n e2e apply -f - >/dev/null <<Y
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: docker.io/zq-csi/e2e-tools:e2e
    imagePullPolicy: Never
    command: [sh, -c, 'blockdev --getsize64 /dev/zq0; sleep 3600']
    volumeDevices: [{name: v, devicePath: /dev/zq0}]
  volumes: [{name: v, persistentVolumeClaim: {claimName: $2}}]
Y
}

# delete_pod NAME PV: deletes a pod that uses PV and waits until it is gone.
# File attacher only: the kubelet's unmap takes a bind mount for one only
# when the published path is a device node (IsDeviceBindMountExist), so it
# would try to remove the still-mounted regular file (EBUSY) forever. The
# harness unmounts that bind mount for it; with nbd or loop devices the
# kubelet does it itself.
delete_pod() {
  local i m
  kubectl -n e2e delete pod "$1" --wait=false >/dev/null
  for i in $(seq 1 90); do
    "$BIN/kubectl" -n e2e get pod "$1" >/dev/null 2>&1 || return 0
    for m in $(awk -v d="$E2E_DIR/kubelet/plugins/kubernetes.io/csi/volumeDevices/$2/dev/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo); do
      [ -f "$m" ] && umount "$m" && echo "harness: unmounted the kubelet's bind mount of the stand-in file $m"
    done
    sleep 1
  done
  echo "pod $1 still there after 90s"; return 1
}

t_wffc() {
  pvc data 512Mi
  sleep 3
  [ "$(kubectl -n e2e get pvc data -o jsonpath='{.status.phase}')" = Pending ]
  kubectl -n e2e get events --field-selector involvedObject.name=data -o jsonpath='{.items[*].reason}' | grep -q WaitForFirstConsumer
  echo "PVC data Pending, waiting for its first consumer"
}
run_test "PVC with the zoned StorageClass waits for its first consumer" t_wffc

t_bind() {
  pod user data
  wait_for 90 "PVC data Bound" bash -c "[ \"\$('$BIN/kubectl' -n e2e get pvc data -o jsonpath='{.status.phase}')\" = Bound ]"
  local pv; pv=$(kubectl -n e2e get pvc data -o jsonpath='{.spec.volumeName}')
  kubectl get pv "$pv" -o jsonpath='{.spec.csi.volumeAttributes}'; echo
  want() { local got; got=$(kubectl get pv "$pv" -o jsonpath="{.spec.csi.volumeAttributes.zone\.$1}"); [ "$got" = "$2" ] || { echo "zone.$1=$got, want $2"; return 1; }; }
  want size $((64 * MiB)); want capacity $((64 * MiB)); want nr_zones 8; want max_open_zones 6
  want max_active_zones 8; want max_append_bytes 4096; want conventional_zones 0
  [ "$(kubectl get pv "$pv" -o jsonpath='{.spec.capacity.storage}')" = 512Mi ]
  kubectl get pv "$pv" -o jsonpath='{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0]}' | grep -q "topology.zq-csi/node"
  kubectl get pv "$pv" -o jsonpath='{.spec.nodeAffinity}'; echo
  [ -f "$E2E_DIR/data/volumes/$(kubectl get pv "$pv" -o jsonpath='{.spec.csi.volumeHandle}').qcow2" ]
  echo "image $E2E_DIR/data/volumes/$(kubectl get pv "$pv" -o jsonpath='{.spec.csi.volumeHandle}').qcow2"
}
run_test "PVC binds when a pod uses it; the PV shows the zone geometry and the node" t_bind

t_zonedvolume() {
  local h; h=$(kubectl get pv "$(kubectl -n e2e get pvc data -o jsonpath='{.spec.volumeName}')" -o jsonpath='{.spec.csi.volumeHandle}')
  kubectl get zonedvolumes -o wide
  [ "$(kubectl get zonedvolume "$h" -o jsonpath='{.spec.node}')" = "$NODE_NAME" ]
  [ "$(kubectl get zonedvolume "$h" -o jsonpath='{.spec.zone.count}')" = 8 ]
  kubectl get zonednodes
}
if [ "${ZQ_E2E_BACKEND:-cluster}" = cluster ]; then
  run_test "kubectl get zonedvolumes shows the volume's node, size and zones (cluster backend)" t_zonedvolume
else
  skip "kubectl get zonedvolumes" "backend=local: no custom resources"
fi

# The chart's node restriction (rbac.nodeRestriction): the node plugin's
# service account may write only the records of the node its token names.
# Real tokens from the API server's TokenRequest, no impersonation (kubectl
# 1.34 has no --as-user-extra): one bound to the node plugin's pod, in which
# the API server names the pod's node ($NODE_NAME); one bound to a decoy pod
# of the same service account assigned to a node that does not exist (it
# never runs, but the API server names its node in tokens bound to it: what
# a node plugin elsewhere holds); and one bound to nothing, which names no
# node. The node agent's own writes, made with its pod's token, are proven
# by the other tests (status, finalizers, capacity).
t_node_restriction() {
  local h np sa tok other_tok free_tok out node probe
  h=$(kubectl get pv "$(kubectl -n e2e get pvc data -o jsonpath='{.spec.volumeName}')" -o jsonpath='{.spec.csi.volumeHandle}')
  np=$(kubectl -n kube-system get pods -l app.kubernetes.io/component=node -o jsonpath='{.items[0].metadata.name}')
  sa=$(kubectl -n kube-system get pod "$np" -o jsonpath='{.spec.serviceAccountName}')
  token_node() { kubectl --token="$1" auth whoami -o yaml | grep -A1 'authentication.kubernetes.io/node-name:' | sed -n '2s/^ *- *//p'; }
  probe='{"status":{"error":"e2e node restriction probe"}}'

  tok=$(kubectl -n kube-system create token "$sa" --bound-object-kind Pod --bound-object-name "$np" --duration 10m)
  node=$(token_node "$tok") || true
  echo "token bound to $np: user system:serviceaccount:kube-system:$sa, node-name ${node:-(none)}"
  [ "$node" = "$NODE_NAME" ]
  kubectl --token="$tok" patch zonedvolume "$h" --subresource=status --type=merge -p "$probe" --dry-run=server
  kubectl --token="$tok" patch zonednode "$NODE_NAME" --subresource=status --type=merge -p '{"status":{"attacher":"probe"}}' --dry-run=server
  echo "as node $NODE_NAME: status patches of its ZonedVolume and ZonedNode allowed (server dry run)"

  kubectl -n kube-system apply -f - >/dev/null <<Y
apiVersion: v1
kind: Pod
metadata: {name: zq-e2e-decoy}
spec:
  serviceAccountName: $sa
  nodeName: other-node
  automountServiceAccountToken: false
  containers: [{name: c, image: docker.io/zq-csi/e2e-tools:e2e, imagePullPolicy: Never}]
Y
  trap '"$BIN/kubectl" -n kube-system delete pod zq-e2e-decoy --grace-period=0 --force >/dev/null 2>&1 || true' EXIT
  other_tok=$(kubectl -n kube-system create token "$sa" --bound-object-kind Pod --bound-object-name zq-e2e-decoy --duration 10m)
  node=$(token_node "$other_tok") || true
  echo "token bound to the decoy pod on other-node: node-name ${node:-(none)}"
  [ "$node" = other-node ]
  # Status writes are made for real (the agent would rewrite them); those
  # that would break the later tests if let through are server dry runs,
  # which go through admission all the same.
  denied() { # what want-message kubectl-args...: must be refused with want-message
    local what=$1 want=$2; shift 2
    if out=$(kubectl "$@" 2>&1); then echo "$what: allowed: $out"; return 1; fi
    grep -qF "$want" <<<"$out" || { echo "$what: refused, but not by the node restriction: $out"; return 1; }
    echo "$what: $out"
  }
  denied "as other-node, status of ZonedVolume $h" \
    "zq-csi node restriction: the node plugin of node \"other-node\" may not UPDATE ZonedVolume $h (status) of node \"$NODE_NAME\"" \
    --token="$other_tok" patch zonedvolume "$h" --subresource=status --type=merge -p "$probe"
  denied "as other-node, finalizers of ZonedVolume $h" \
    "zq-csi node restriction: the node plugin of node \"other-node\" may not UPDATE ZonedVolume $h of node \"$NODE_NAME\"" \
    --token="$other_tok" patch zonedvolume "$h" --type=json -p '[{"op":"replace","path":"/metadata/finalizers","value":[]}]' --dry-run=server
  denied "as other-node, status of ZonedNode $NODE_NAME" \
    "zq-csi node restriction: the node plugin of node \"other-node\" may not UPDATE ZonedNode $NODE_NAME (status) of node \"$NODE_NAME\"" \
    --token="$other_tok" patch zonednode "$NODE_NAME" --subresource=status --type=merge -p '{"status":{"capacityBytes":0}}'
  denied "as $NODE_NAME, moving ZonedVolume $h to other-node" \
    "zq-csi node restriction: the node plugin of node \"$NODE_NAME\" may not UPDATE ZonedVolume $h for node \"other-node\"" \
    --token="$tok" patch zonedvolume "$h" --type=merge -p '{"spec":{"node":"other-node"}}' --dry-run=server
  free_tok=$(kubectl -n kube-system create token "$sa" --duration 10m)
  denied "with a token bound to no pod (no node name)" \
    "zq-csi node restriction: UPDATE of ZonedVolume $h (status) by the node plugin refused: its token names no node" \
    --token="$free_tok" patch zonedvolume "$h" --subresource=status --type=merge -p "$probe"
  [ "$(kubectl get zonedvolume "$h" -o jsonpath='{.spec.node}')" = "$NODE_NAME" ]
  [ "$(kubectl get zonedvolume "$h" -o jsonpath='{.status.phase}')" = Ready ]
  if kubectl get zonedvolume "$h" -o jsonpath='{.status.error}' | grep -q probe; then echo "the probe reached the status"; return 1; fi
  echo "ZonedVolume $h unchanged: node $NODE_NAME, phase Ready"

  # Not the controller: its service account matches no rule of the policy.
  kubectl --as="system:serviceaccount:kube-system:$(kubectl -n kube-system get deploy -l app.kubernetes.io/component=controller -o jsonpath='{.items[0].spec.template.spec.serviceAccountName}')" \
    annotate zonedvolume "$h" zq-csi.io/e2e-probe=1 --dry-run=server
  echo "the controller's service account (no node name) may still annotate ZonedVolume $h (server dry run)"
}
if [ "${ZQ_E2E_BACKEND:-cluster}" = cluster ]; then
  run_test "node restriction: the node plugin writes only its own node's records (ValidatingAdmissionPolicy)" t_node_restriction
else
  skip "node restriction" "backend=local: no custom resources"
fi

t_staged() {
  local pv; pv=$(kubectl -n e2e get pvc data -o jsonpath='{.spec.volumeName}')
  local uid; uid=$(kubectl -n e2e get pod user -o jsonpath='{.metadata.uid}')
  local pub="$E2E_DIR/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/$pv/$uid"
  wait_for 90 "the kubelet to publish $pv" test -e "$pub"
  local size
  if [ -b "$pub" ]; then size=$(blockdev --getsize64 "$pub"); else size=$(stat -L -c %s "$pub"); fi
  echo "published at $pub: $size bytes"
  [ "$size" = $((512 * MiB)) ]
  # What the runtime says of the file attacher's stand-in (see the skip below).
  local ev=""
  for i in $(seq 1 20); do
    ev=$("$BIN/kubectl" -n e2e get events --field-selector involvedObject.name=user,reason=Failed -o jsonpath='{.items[*].message}' 2>/dev/null || true)
    [ -n "$ev" ] && break; sleep 1
  done
  echo "the pod: ${ev:-(no Failed event yet)}"
}
run_test "the kubelet stages and publishes the volume through the node plugin (size 512Mi)" t_staged

t_blockdev() {
  wait_for 120 "pod user Running" bash -c "[ \"\$('$BIN/kubectl' -n e2e get pod user -o jsonpath='{.status.phase}')\" = Running ]"
  local got; got=$(kubectl -n e2e logs user | head -1)
  echo "blockdev --getsize64 /dev/zq0 in the pod: $got"
  [ "$got" = $((512 * MiB)) ]
}
run_test "pod sees a block device of the right size (fuse-loop attacher: no nbd here)" t_blockdev
# I/O inside the pods, on /dev/zq0, with O_DIRECT in 4 KiB blocks (a
# multiple of the device's logical block size) so every write reaches the
# zone engine as issued. The data comes from the host and goes back to it,
# where cmp compares it with what was written.
#   zwrite POD OFFSET FILE    writes FILE at byte OFFSET
#   zread POD OFFSET BYTES    prints BYTES from byte OFFSET
#   zrefused POD OFFSET       a 4 KiB write at OFFSET must fail with EIO
# pod_dd POD OFFSET FILE: dd FILE onto /dev/zq0 at OFFSET in POD through
# `kubectl exec -i`; prints dd's output, returns its status. The stdin of
# `kubectl exec -i` sometimes reaches the pod empty (dd then reads nothing,
# writes nothing and says "0+0 records in"), more often in the first
# seconds of a pod: nothing was written then, so it is sent again.
pod_dd() {
  local out rc try
  for try in 1 2 3 4 5; do
    rc=0
    out=$(kubectl -n e2e exec -i "$1" -- dd of=/dev/zq0 bs=4096 seek=$(($2 / 4096)) oflag=direct conv=notrunc iflag=fullblock 2>&1 < "$3") || rc=$?
    if [ "$rc" = 0 ] && grep -q '^0+0 records in' <<<"$out"; then
      echo "$1: kubectl exec delivered no input (try $try); sending it again" >&2
      continue
    fi
    echo "$out"
    return $rc
  done
  echo "$1: kubectl exec delivered no input in 5 tries"
  return 1
}
zwrite() {
  local out want=$(($(stat -c %s "$3") / 4096))
  out=$(pod_dd "$1" "$2" "$3") || { echo "$1: a write at $2 failed: $out"; return 1; }
  grep -q "^$want+0 records out" <<<"$out" || { echo "$1: a write at $2 wrote less than $want blocks: $out"; return 1; }
  echo "$1: wrote $(stat -c %s "$3") bytes at $2"
}
zread() {
  kubectl -n e2e exec "$1" -- dd if=/dev/zq0 bs=4096 skip=$(($2 / 4096)) count=$(($3 / 4096)) iflag=direct 2>/dev/null
}
zrefused() {
  local out
  head -c 4096 /dev/urandom > "$datadir/refused"
  if out=$(pod_dd "$1" "$2" "$datadir/refused"); then
    echo "$1: a write at $2 succeeded; want EIO: $out"; return 1
  fi
  if ! grep -q 'Input/output error' <<<"$out"; then echo "$1: a write at $2 failed, but not with EIO: $out"; return 1; fi
  echo "$1: write at $2 refused: Input/output error"
}
# same FILE1 FILE2: cmp, saying what differed.
same() { cmp "$1" "$2" && echo "read back $(stat -c %s "$1") bytes: same as written"; }
# Zones used on PVC data, each by one test: the first three sequential
# zones (conventional zones come first and take writes anywhere). The zone
# geometry is the PV's, not assumed.
geometry() { # pvc -> sets zsz (zone size) and z1, z2, z3 (byte offsets)
  local pv; pv=$(kubectl -n e2e get pvc "$1" -o jsonpath='{.spec.volumeName}')
  zsz=$(kubectl get pv "$pv" -o jsonpath='{.spec.csi.volumeAttributes.zone\.size}')
  local conv nr; conv=$(kubectl get pv "$pv" -o jsonpath='{.spec.csi.volumeAttributes.zone\.conventional_zones}')
  nr=$(kubectl get pv "$pv" -o jsonpath='{.spec.csi.volumeAttributes.zone\.nr_zones}')
  [ -n "$zsz" ] && [ -n "$conv" ] && [ $((nr - conv)) -ge 3 ] || { echo "PV $pv: zone.size=$zsz conventional_zones=$conv nr_zones=$nr: want 3 sequential zones"; return 1; }
  z1=$(((conv + 0) * zsz)) z2=$(((conv + 1) * zsz)) z3=$(((conv + 2) * zsz))
}

t_zone_rules() { # zone z1 of PVC data, in pod user
  geometry data
  echo "zone size $zsz; this test uses the zone at $z1"
  head -c 4096 /dev/urandom > "$datadir/a"; head -c 4096 /dev/urandom > "$datadir/b"
  zwrite user "$z1" "$datadir/a"                # at the write pointer (the zone is empty)
  zread user "$z1" 4096 > "$datadir/got"; same "$datadir/a" "$datadir/got"
  zrefused user $((z1 + MiB))                   # ahead of the write pointer
  zrefused user "$z1"                           # behind it (over written data)
  zwrite user $((z1 + 4096)) "$datadir/b"       # at the advanced write pointer
  # Reset: a discard of the whole zone.
  kubectl -n e2e exec user -- blkdiscard -o "$z1" -l "$zsz" /dev/zq0
  echo "user: blkdiscard -o $z1 -l $zsz"
  zread user "$z1" 8192 > "$datadir/got"
  head -c 8192 /dev/zero > "$datadir/zero"
  cmp "$datadir/zero" "$datadir/got"; echo "the reset zone reads as zeros"
  zwrite user "$z1" "$datadir/b"                # at the zone start again
  zread user "$z1" 4096 > "$datadir/got"; same "$datadir/b" "$datadir/got"
  cp "$datadir/b" "$datadir/z1"                 # zone z1 now: b, write pointer 4 KiB
}
run_test "in a pod: a write at the write pointer succeeds, writes elsewhere fail with EIO, blkdiscard of a zone resets it" t_zone_rules

# kubectl zq: the same binary as kubectl-zq on PATH, as a user installs it.
zqbin=$(mktemp -d)
ln -s "$ZQ_E2E_IMAGES/zq-csi-bin/zq-csi" "$zqbin/kubectl-zq"
kzq() { PATH="$zqbin:$BIN:$PATH" kubectl zq "$@"; }
t_kubectl_zq() { # zone z1 of PVC data holds 4 KiB (t_zone_rules), pod user runs
  geometry data
  local pv cap nr out
  pv=$(kubectl -n e2e get pvc data -o jsonpath='{.spec.volumeName}')
  cap=$(kubectl get pv "$pv" -o jsonpath='{.spec.csi.volumeAttributes.zone\.capacity}')
  nr=$(kubectl get pv "$pv" -o jsonpath='{.spec.csi.volumeAttributes.zone\.nr_zones}')
  out=$(kzq zones data -n e2e --start $((z1 / zsz)) --count 1); echo "$out"
  # qemu-io's zrp line: sectors; implicitly open (2) or closed (4), sequential (type 2)
  grep -Eq "^$(printf 'start: 0x%x, len 0x%x, cap 0x%x, wptr 0x%x' $((z1 / 512)) $((zsz / 512)) $((cap / 512)) $(((z1 + 4096) / 512))), zcond:[24], \[type: 2\]$" <<<"$out"
  [ "$(kzq zones data -n e2e | wc -l)" = "$nr" ] || { echo "kubectl zq zones: not $nr lines"; return 1; }
  kzq zones data -n e2e -o json --start $((z1 / zsz)) --count 1 | grep -q "\"wptr\": $((z1 + 4096)),"
  # The picture: drawn by kubectl zq from the plugin's JSON report; the
  # zone holds 4 KiB, the first eighth of its cell (no colours: not a terminal).
  out=$(kzq zones data -n e2e -o wide --start $((z1 / zsz)) --count 1); echo "$out"
  grep -q "^volume zqv-[0-9a-f]* (PVC e2e/data) on node $NODE_NAME\$" <<<"$out"
  grep -Eq "^ *$((z1 / zsz)) ▁\$" <<<"$out" || { echo "kubectl zq zones -o wide: no cell ▁ for zone $((z1 / zsz))"; return 1; }
  local svg; svg=$(kzq zones data -n e2e -o svg)
  [ "$(grep -o '<title>zone ' <<<"$svg" | wc -l)" = "$nr" ] || { echo "kubectl zq zones -o svg: not $nr zones"; return 1; }
  echo "kubectl zq zones -o svg: an SVG of $nr zones ($(wc -c <<<"$svg") bytes)"
  out=$(kzq describe data -n e2e); echo "$out"
  grep -q "^Node: *$NODE_NAME " <<<"$out"
  grep -Eq "^Attachment: *fuse-loop, generation [0-9]+" <<<"$out"
  grep -q "^Device open: *yes" <<<"$out"
  grep -q "^Zone states: *conv=" <<<"$out"
  if out=$(kzq zones nope -n e2e 2>&1); then echo "kubectl zq zones of a missing PVC succeeded: $out"; return 1; fi
  grep -q 'PVC "nope" not found in namespace "e2e"' <<<"$out"; echo "missing PVC: $out"
}
run_test "kubectl zq zones/describe show the live write pointer and the attachment of PVC data; zones -o wide|svg draw it" t_kubectl_zq

t_persist() { # zone z2 of PVC data: written by pod user, read by its successor
  geometry data
  local pv; pv=$(kubectl -n e2e get pvc data -o jsonpath='{.spec.volumeName}')
  local uid; uid=$(kubectl -n e2e get pod user -o jsonpath='{.metadata.uid}')
  head -c 8192 /dev/urandom > "$datadir/c"; head -c 4096 /dev/urandom > "$datadir/d"
  zwrite user "$z2" "$datadir/c"
  delete_pod user "$pv"
  pod user data
  wait_for 120 "the new pod user Running" bash -c "[ \"\$('$BIN/kubectl' -n e2e get pod user -o jsonpath='{.status.phase}')\" = Running ]"
  [ "$(kubectl -n e2e get pod user -o jsonpath='{.metadata.uid}')" != "$uid" ]
  echo "pod user re-created ($uid -> $(kubectl -n e2e get pod user -o jsonpath='{.metadata.uid}'))"
  zread user "$z2" 8192 > "$datadir/got"; same "$datadir/c" "$datadir/got"
  [ -f "$datadir/z1" ] && { zread user "$z1" 4096 > "$datadir/got"; same "$datadir/z1" "$datadir/got"; }
  # The write pointer came back too: behind it is refused, at it works.
  zrefused user "$z2"
  zrefused user $((z2 + 4096))
  zwrite user $((z2 + 8192)) "$datadir/d"
  cat "$datadir/c" "$datadir/d" > "$datadir/z2"  # zone z2 now: c d, write pointer 12 KiB
}
run_test "data and write pointers persist across pod deletion and re-creation" t_persist
t_snapshot() {
  kubectl -n e2e apply -f - >/dev/null <<Y
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: snap}
spec:
  volumeSnapshotClassName: zq-csi-snapclass
  source: {persistentVolumeClaimName: data}
Y
  wait_for 90 "VolumeSnapshot snap ready" bash -c "[ \"\$('$BIN/kubectl' -n e2e get volumesnapshot snap -o jsonpath='{.status.readyToUse}')\" = true ]"
  kubectl -n e2e get volumesnapshot snap
  kubectl -n e2e apply -f - >/dev/null <<Y
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: restored}
spec:
  storageClassName: $SC
  volumeMode: Block
  accessModes: [ReadWriteOnce]
  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: snap}
  resources: {requests: {storage: 512Mi}}
Y
  pod user2 restored
  wait_for 90 "PVC restored Bound" bash -c "[ \"\$('$BIN/kubectl' -n e2e get pvc restored -o jsonpath='{.status.phase}')\" = Bound ]"
  local pv; pv=$(kubectl -n e2e get pvc restored -o jsonpath='{.spec.volumeName}')
  [ "$(kubectl get pv "$pv" -o jsonpath='{.spec.csi.volumeAttributes.zone\.nr_zones}')" = 8 ]
  echo "restored into $pv ($(kubectl get pv "$pv" -o jsonpath='{.spec.capacity.storage}'), 8 zones)"
}
run_test "VolumeSnapshot is ready; restoring it to a new PVC binds (controller side)" t_snapshot

t_restored() { # pod user2 on PVC restored: zones z1 and z2 as the snapshot saw them
  [ -f "$datadir/z1" ] && [ -f "$datadir/z2" ] || { echo "the zone-rule and persistence tests wrote no data to compare"; return 1; }
  geometry restored
  wait_for 120 "pod user2 Running" bash -c "[ \"\$('$BIN/kubectl' -n e2e get pod user2 -o jsonpath='{.status.phase}')\" = Running ]"
  zread user2 "$z1" 4096 > "$datadir/got"; same "$datadir/z1" "$datadir/got"
  zread user2 "$z2" 12288 > "$datadir/got"; same "$datadir/z2" "$datadir/got"
  # The write pointers travelled with the data: behind them is refused,
  # at them works; the untouched zone z3 is still empty.
  zrefused user2 "$z1"
  zrefused user2 $((z2 + 8192))
  head -c 4096 /dev/urandom > "$datadir/e"
  zwrite user2 $((z2 + 12288)) "$datadir/e"
  zwrite user2 $((z1 + 4096)) "$datadir/e"
  zwrite user2 "$z3" "$datadir/e"
  # The source volume is a different image: its zone z2 still ends at 12 KiB.
  zread user $((z2 + 12288)) 4096 > "$datadir/got"
  head -c 4096 /dev/zero > "$datadir/zero"
  cmp "$datadir/zero" "$datadir/got"; echo "user: data's zone at $z2 unchanged past its write pointer by writes to the restored volume"
}
run_test "the restored volume has the snapshot's data and write pointers (in a pod)" t_restored

t_snapshot_delete() {
  local pv; pv=$(kubectl -n e2e get pvc restored -o jsonpath='{.spec.volumeName}')
  local h; h=$(kubectl get pv "$pv" -o jsonpath='{.spec.csi.volumeHandle}')
  delete_pod user2 "$pv"
  kubectl -n e2e delete pvc restored --wait=true --timeout=60s >/dev/null
  kubectl -n e2e delete volumesnapshot snap --wait=true --timeout=60s >/dev/null
  wait_for 60 "snapshot image deleted" bash -c "[ -z \"\$(ls '$E2E_DIR/data/snapshots' 2>/dev/null)\" ]"
  wait_for 30 "image of $h deleted" bash -c "[ ! -e '$E2E_DIR/data/volumes/$h.qcow2' ]"
  echo "restored volume $h and the snapshot's image gone"
}
run_test "deleting the restored PVC and the VolumeSnapshot deletes their images" t_snapshot_delete

t_helm_test() {
  # values-e2e.yaml turns tests.checkZoneRules on: the hook's pod also
  # checks that writes away from the write pointer fail with EIO.
  # helm deletes the hook's pod as soon as it passes (hook-succeeded), so
  # --logs cannot fetch them: follow them while it runs instead.
  local rc=0
  "$helm" test zq-csi -n kube-system --timeout 180s > "$datadir/helm-test" 2>&1 &
  local h=$!
  wait_for 180 "the test pod's container to start" bash -c "! kill -0 $h || '$BIN/kubectl' -n kube-system get pod zq-csi-test -o jsonpath='{.status.containerStatuses[0].state}' | grep -q -e running -e terminated" || true
  kubectl -n kube-system logs -f zq-csi-test 2>&1 | sed 's/^/zq-csi-test: /' || true
  wait "$h" || rc=$?
  grep -v '^ *$' "$datadir/helm-test" | sed -n '/^TEST SUITE/,/^NOTES/p' | grep -v NOTES
  # The hook deletes its pod and PVC when it passes; not when it fails.
  kubectl -n kube-system delete pod/zq-csi-test pvc/zq-csi-test --ignore-not-found --wait=true --timeout=60s >/dev/null || true
  return $rc
}
run_test "helm test (the chart's hook writes a zoned volume in a pod and checks the zone rules)" t_helm_test

t_expand() {
  local pv; pv=$(kubectl -n e2e get pvc data -o jsonpath='{.spec.volumeName}')
  kubectl -n e2e patch pvc data --type merge -p '{"spec":{"resources":{"requests":{"storage":"576Mi"}}}}' >/dev/null
  wait_for 90 "PV $pv at 576Mi" bash -c "[ \"\$('$BIN/kubectl' get pv $pv -o jsonpath='{.spec.capacity.storage}')\" = 576Mi ]"
  echo "PV $pv capacity $(kubectl get pv "$pv" -o jsonpath='{.spec.capacity.storage}')"
}
run_test "PVC expansion grows the volume by whole zones (controller side)" t_expand

t_delete() {
  local pv; pv=$(kubectl -n e2e get pvc data -o jsonpath='{.spec.volumeName}')
  local h; h=$(kubectl get pv "$pv" -o jsonpath='{.spec.csi.volumeHandle}')
  delete_pod user "$pv"
  # No pod: the volume is unstaged, and kubectl zq says so.
  local err; if err=$(kzq zones data -n e2e 2>&1); then echo "kubectl zq zones of an unstaged volume succeeded"; return 1; fi
  grep -q "of PVC e2e/data is not staged on node $NODE_NAME" <<<"$err"; echo "unstaged: $err"
  kzq describe data -n e2e | grep -q "^Staged: no;"
  kubectl -n e2e delete pvc data --wait=true --timeout=60s >/dev/null
  wait_for 60 "PV $pv deleted" bash -c "! '$BIN/kubectl' get pv $pv >/dev/null 2>&1"
  wait_for 30 "image of $h deleted" bash -c "[ ! -e '$E2E_DIR/data/volumes/$h.qcow2' ]"
  echo "PV $pv and image $h.qcow2 gone"
}
run_test "deleting the PVC deletes the PV and the image" t_delete

t_invalid() {
  kubectl apply -f - >/dev/null <<Y
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: zq-csi-bad}
provisioner: $DRIVER
volumeBindingMode: WaitForFirstConsumer
parameters: {zone.size: 64M, zone.capacity: 128M}
Y
  pvc bad 512Mi zq-csi-bad
  pod baduser bad
  wait_for 90 "a ProvisioningFailed event" bash -c "'$BIN/kubectl' -n e2e get events --field-selector involvedObject.name=bad,reason=ProvisioningFailed -o jsonpath='{.items[*].message}' | grep -q zone.capacity"
  kubectl -n e2e get events --field-selector involvedObject.name=bad,reason=ProvisioningFailed -o jsonpath='{.items[0].message}'; echo
  [ "$(kubectl -n e2e get pvc bad -o jsonpath='{.status.phase}')" = Pending ]
  kubectl -n e2e delete pod baduser --wait=false >/dev/null; kubectl -n e2e delete pvc bad --wait=false >/dev/null
  kubectl delete storageclass zq-csi-bad >/dev/null
}
run_test "an invalid StorageClass parameter leaves the PVC Pending with an event naming it" t_invalid

t_exporter_ublk() { # this node has no zoned ublk: an exporter=ublk volume cannot live here
  kubectl apply -f - >/dev/null <<Y
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: zq-csi-ublk}
provisioner: $DRIVER
volumeBindingMode: WaitForFirstConsumer
parameters: {zone.size: 64M, exporter: ublk}
Y
  [ "$(kubectl get node "$NODE_NAME" -o jsonpath='{.metadata.labels.topology\.zq-csi/exporter}')" = nbd ]
  echo "node $NODE_NAME: topology.zq-csi/exporter=nbd"
  pvc needsublk 512Mi zq-csi-ublk
  pod ublkuser needsublk
  # The scheduler sees no capacity for the class on this node (GetCapacity
  # is 0 for exporter=ublk on nbd nodes), or, if it ever got that far,
  # CreateVolume refuses the node naming ublk.
  local ev='' i
  for i in $(seq 1 90); do
    ev=$(kubectl -n e2e get events --field-selector involvedObject.name=needsublk,reason=ProvisioningFailed -o jsonpath='{.items[*].message}' 2>/dev/null | grep -o '[^.]*ublk[^.]*' | head -1 || true)
    [ -n "$ev" ] && break
    ev=$(kubectl -n e2e get events --field-selector involvedObject.name=ublkuser,reason=FailedScheduling -o jsonpath='{.items[*].message}' 2>/dev/null | grep -o '[^.]*enough free storage[^.]*' | head -1 || true)
    [ -n "$ev" ] && break
    sleep 1
  done
  [ -n "$ev" ] || { echo "no event about the exporter=ublk PVC or its pod"; return 1; }
  echo "event: $ev"
  [ "$(kubectl -n e2e get pvc needsublk -o jsonpath='{.status.phase}')" = Pending ]
  kubectl -n e2e delete pod ublkuser --wait=false >/dev/null; kubectl -n e2e delete pvc needsublk --wait=false >/dev/null
  kubectl delete storageclass zq-csi-ublk >/dev/null
}
run_test "exporter: ublk on a node without zoned ublk: the PVC stays Pending (the class has no capacity on nbd nodes)" t_exporter_ublk


rm -rf "$datadir" "$zqbin"
teardown
echo
echo "=== e2e results"
printf '%s\n' "${results[@]}"
echo
echo "=== e2e phase times"
phase_times+=("$(printf '%-8s %5ds' "$cur_phase" $(( $(date +%s) - last )))")
printf '%s\n' "${phase_times[@]}"
printf 'total    %5ds\n' $(( $(date +%s) - start ))
[ "$leftover" = 0 ] || failed=$((failed + 1))
echo
echo "e2e: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
