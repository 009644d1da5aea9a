#!/usr/bin/env bash
# Renders deploy/kubernetes/zq-csi.yaml from charts/zq-csi with the chart's
# default values (release zq-csi in kube-system, no test hooks, no CRDs:
# those are deploy/crds, which the chart carries as crds/).
#   render-deploy.sh          rewrite deploy/kubernetes/zq-csi.yaml
#   render-deploy.sh --check  fail with a diff when it differs from the chart
set -euo pipefail
cd "$(dirname "$0")/../.."
here=scripts/e2e
. "$here/versions.sh"
helm=$ZQ_CACHE/tools/helm-$HELM_VERSION/helm
[ -x "$helm" ] || bash "$here/build-tools.sh" helm >/dev/null
out=deploy/kubernetes/zq-csi.yaml
tmp=$(mktemp); trap 'rm -f "$tmp"' EXIT
{
  echo "# Generated from charts/zq-csi by scripts/e2e/render-deploy.sh; do not edit."
  echo "# helm template zq-csi charts/zq-csi --namespace kube-system --skip-tests --kube-version $K8S_VERSION"
  "$helm" template zq-csi charts/zq-csi --namespace kube-system --skip-tests --kube-version "$K8S_VERSION"
} > "$tmp"
if [ "${1:-}" = --check ]; then
  if ! diff -u "$out" "$tmp"; then
    echo "deploy/kubernetes/zq-csi.yaml differs from the chart: run scripts/e2e/render-deploy.sh" >&2
    exit 1
  fi
  echo "deploy/kubernetes/zq-csi.yaml matches the chart"
else
  mkdir -p "$(dirname "$out")"; cp "$tmp" "$out"; echo "wrote $out"
fi
