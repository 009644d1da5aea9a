#!/usr/bin/env bash
# make chart-check: the chart lints clean (--strict, default and e2e
# values), rejects bad values through values.schema.json, deploy/ matches
# it, and what it renders passes `kubectl apply --dry-run=server
# --validate=strict` against a real kube-apiserver + etcd started here on
# loopback (with the VolumeSnapshot CRDs of the pinned external-snapshotter
# installed first).
set -euo pipefail
cd "$(dirname "$0")/../.."
here=scripts/e2e
. "$here/versions.sh"
start=$(date +%s)
phase() { printf '\n=== [chart-check %4ds] %s\n' "$(( $(date +%s) - start ))" "$*"; }

phase "tools (helm $HELM_VERSION, etcd, kube-apiserver and kubectl $K8S_VERSION; cached in $ZQ_CACHE)"
bash "$here/build-tools.sh" etcd helm
bash "$here/build-k8s.sh" kube-apiserver kubectl
helm=$ZQ_CACHE/tools/helm-$HELM_VERSION/helm
kubectl=$K8S_CACHE/bin/kubectl

phase "helm lint --strict"
"$helm" lint --strict charts/zq-csi
"$helm" lint --strict charts/zq-csi -f test/e2e/values-e2e.yaml
for bad in node.attacher=bogus backend=bogus dataDir=relative/path \
           storageClass.parameters.zone\\.bogus=1 sidecars.provisioner.bogus=1; do
  if "$helm" lint --strict charts/zq-csi --set "$bad" >/dev/null 2>&1; then
    echo "values.schema.json accepts --set $bad" >&2; exit 1
  fi
  echo "schema rejects $bad: ok"
done

if "$helm" template zq-csi charts/zq-csi --kube-version "$K8S_VERSION" --set backend=local --set controller.replicas=2 >/dev/null 2>&1; then
  echo "backend=local with controller.replicas=2 renders" >&2; exit 1
fi
echo "backend=local refuses controller.replicas=2: ok"

phase "deploy/kubernetes matches the chart; the chart's CRDs are deploy/crds"
bash "$here/render-deploy.sh" --check
diff -ru deploy/crds charts/zq-csi/crds || { echo "charts/zq-csi/crds differs from deploy/crds: copy them over" >&2; exit 1; }
echo "charts/zq-csi/crds matches deploy/crds"

phase "kube-apiserver + etcd on loopback"
dir=$(mktemp -d /tmp/zq-chart-check.XXXXXX)
. "$here/apiserver.sh"
trap 'zq_api_down "$dir"; rm -rf "$dir"' EXIT
export KUBECONFIG
KUBECONFIG=$(zq_api_up "$dir")
"$kubectl" version
crds=$(bash "$here/snapshot-crds.sh")
"$kubectl" apply --server-side -f "$crds/snapshot.storage.k8s.io_volumesnapshotclasses.yaml" \
  -f "$crds/snapshot.storage.k8s.io_volumesnapshotcontents.yaml" -f "$crds/snapshot.storage.k8s.io_volumesnapshots.yaml"
"$kubectl" wait --for condition=established --timeout=60s crd/volumesnapshotclasses.snapshot.storage.k8s.io
# The system namespaces and priority classes appear shortly after readyz.
for i in $(seq 1 60); do
  "$kubectl" get ns kube-system >/dev/null 2>&1 && "$kubectl" get priorityclass system-node-critical >/dev/null 2>&1 && break
  sleep 0.5
done

"$kubectl" apply --server-side -f deploy/crds/
"$kubectl" wait --for condition=established --timeout=60s -f deploy/crds/ >/dev/null

phase "kubectl apply --dry-run=server --validate=strict"
"$kubectl" apply --dry-run=server --validate=strict -f deploy/kubernetes/zq-csi.yaml
echo "-- backend=local"
"$helm" template zq-csi charts/zq-csi -n kube-system --skip-tests --kube-version "$K8S_VERSION" --set backend=local |
  "$kubectl" apply --dry-run=server --validate=strict -f -
echo "-- the e2e values, test hooks included, in namespace default"
# No controller-manager runs here to make the namespace's default service
# account, which the test pod's admission looks up.
"$kubectl" -n default create serviceaccount default >/dev/null
"$helm" template zq-csi charts/zq-csi -n default --kube-version "$K8S_VERSION" -f test/e2e/values-e2e.yaml |
  "$kubectl" apply --dry-run=server --validate=strict -f -

phase "sidecar tags in values.yaml are the versions scripts/e2e builds"
for pair in "provisioner:$PROVISIONER_VERSION" "resizer:$RESIZER_VERSION" "snapshotter:$SNAPSHOTTER_VERSION"; do
  got=$(sed -n "/^  ${pair%%:*}:/,/tag:/s/^ *tag: *//p" charts/zq-csi/values.yaml)
  [ "$got" = "${pair#*:}" ] || { echo "values.yaml sidecars.${pair%%:*} tag $got, scripts/e2e/versions.sh ${pair#*:}" >&2; exit 1; }
  echo "sidecars.${pair%%:*}: $got"
done

phase "the chart's default driver image is what make image tags"
want=$(bash scripts/image.sh --print-ref)
got=$("$helm" template zq-csi charts/zq-csi --kube-version "$K8S_VERSION" --skip-tests | sed -n 's/^ *image: *"\{0,1\}\([^"]*zq-csi[^"]*\)"\{0,1\}$/\1/p' | grep -v sig-storage | sort -u)
[ "$got" = "$want" ] || { echo "the chart installs '$got' by default; make image tags $want" >&2; exit 1; }
echo "chart default image $got = make image's tag"

phase "chart-check passed"
