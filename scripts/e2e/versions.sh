# Pinned versions of everything the e2e lane builds or installs. Every cache
# directory is keyed on these, so bumping one rebuilds only what it names.
# Sourced by the scripts in scripts/e2e and test/e2e.
K8S_VERSION=${K8S_VERSION:-v1.34.4}            # k8s.io/kubernetes; staging modules at v0.${K8S_VERSION#v1.}
HELM_VERSION=${HELM_VERSION:-v3.19.0}          # helm.sh/helm/v3
SNAPSHOTTER_VERSION=${SNAPSHOTTER_VERSION:-v8.6.0}   # github.com/kubernetes-csi/external-snapshotter/v8 and client/v8 (CRDs, csi-snapshotter)
PROVISIONER_VERSION=${PROVISIONER_VERSION:-v5.3.0}   # github.com/kubernetes-csi/external-provisioner/v5
RESIZER_VERSION=${RESIZER_VERSION:-v1.14.0}          # github.com/kubernetes-csi/external-resizer
ZQ_CACHE=${ZQ_CACHE:-/var/cache/zq-csi}
K8S_CACHE=$ZQ_CACHE/k8s/$K8S_VERSION
