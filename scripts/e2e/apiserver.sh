#!/usr/bin/env bash
# Starts etcd and kube-apiserver on loopback in a directory of their own,
# or stops them again. Sourced (functions) by chart-check.sh and the e2e
# lane; also usable by hand:
#   scripts/e2e/apiserver.sh up DIR     # prints the kubeconfig path
#   scripts/e2e/apiserver.sh down DIR
#
# The API server listens on 127.0.0.1 only, authenticates one static admin
# token (group system:masters), and has no endpoint reconciler (there is no
# Service network here; pods that need the API use the host network).
# Ports come from ZQ_ETCD_PORT (default 23790, peer +1) and ZQ_API_PORT
# (default 26443).

zq_api_up() {
  local dir=$1
  local here; here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  . "$here/versions.sh"
  local etcd_port=${ZQ_ETCD_PORT:-23790} api_port=${ZQ_API_PORT:-26443}
  local bin=$K8S_CACHE/bin
  [ -x "$bin/kube-apiserver" ] || { echo "kube-apiserver not built: run scripts/e2e/build-k8s.sh" >&2; return 1; }
  command -v etcd >/dev/null || { echo "etcd missing: run scripts/e2e/build-tools.sh etcd" >&2; return 1; }
  for p in "$etcd_port" $((etcd_port + 1)) "$api_port"; do
    if ss -Hltn "sport = :$p" | grep -q .; then echo "port $p is in use (set ZQ_ETCD_PORT / ZQ_API_PORT)" >&2; return 1; fi
  done
  mkdir -p "$dir/pki" "$dir/etcd" "$dir/log"
  # etcd
  etcd --name zq-e2e --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$((etcd_port + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((etcd_port + 1))" \
    --initial-cluster "zq-e2e=http://127.0.0.1:$((etcd_port + 1))" \
    --quota-backend-bytes $((2 << 30)) \
    > "$dir/log/etcd.log" 2>&1 &
  echo $! > "$dir/etcd.pid"
  # service account keys and the admin token
  [ -f "$dir/pki/sa.key" ] || openssl genrsa -out "$dir/pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$dir/pki/sa.key" -pubout -out "$dir/pki/sa.pub" 2>/dev/null
  local token; token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  echo "$token,admin,admin,system:masters" > "$dir/pki/tokens.csv"
  "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --cert-dir "$dir/pki" \
    --service-account-key-file "$dir/pki/sa.pub" \
    --service-account-signing-key-file "$dir/pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc \
    --token-auth-file "$dir/pki/tokens.csv" \
    --authorization-mode Node,RBAC \
    --allow-privileged=true \
    --service-cluster-ip-range 10.96.0.0/24 \
    --endpoint-reconciler-type none \
    --kubelet-preferred-address-types InternalIP \
    --profiling=false \
    ${ZQ_API_EXTRA_ARGS:-} \
    > "$dir/log/kube-apiserver.log" 2>&1 &
  echo $! > "$dir/kube-apiserver.pid"
  cat > "$dir/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: zq-e2e
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $dir/pki/apiserver.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: zq-e2e
  context: {cluster: zq-e2e, user: admin}
current-context: zq-e2e
KC
  local i
  for i in $(seq 1 120); do
    if curl -fsS --cacert "$dir/pki/apiserver.crt" -H "Authorization: Bearer $token" \
         "https://127.0.0.1:$api_port/readyz" >/dev/null 2>&1; then
      echo "$dir/kubeconfig"; return 0
    fi
    if ! kill -0 "$(cat "$dir/kube-apiserver.pid")" 2>/dev/null || ! kill -0 "$(cat "$dir/etcd.pid")" 2>/dev/null; then
      break
    fi
    sleep 0.5
  done
  echo "kube-apiserver did not become ready; last log lines:" >&2
  tail -20 "$dir/log/kube-apiserver.log" >&2; tail -5 "$dir/log/etcd.log" >&2
  zq_api_down "$dir"
  return 1
}

# zq_api_down DIR: stops what zq_api_up started (by the pids it recorded).
zq_api_down() {
  local dir=$1 f pid i
  for f in kube-apiserver etcd; do
    [ -f "$dir/$f.pid" ] || continue
    pid=$(cat "$dir/$f.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/$f.pid"
  done
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  case ${1:-} in
    up) zq_api_up "${2:?dir}" ;;
    down) zq_api_down "${2:?dir}" ;;
    *) echo "usage: $0 up|down DIR" >&2; exit 2 ;;
  esac
fi
