#!/usr/bin/env bash
# Prints the directory holding the VolumeSnapshot CRDs
# (snapshot.storage.k8s.io/v1 and groupsnapshot.storage.k8s.io) of the
# pinned external-snapshotter, taken from its client/v8 module source in the
# Go module cache (`go mod download`; the CRDs ship in that module).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.sh"
export PATH=/usr/local/go/bin:$PATH
dir=$(cd /tmp && go mod download -json "github.com/kubernetes-csi/external-snapshotter/client/v8@$SNAPSHOTTER_VERSION" |
      sed -n 's/.*"Dir": "\(.*\)",*/\1/p')
[ -d "$dir/config/crd" ] || { echo "no config/crd in external-snapshotter client $SNAPSHOTTER_VERSION" >&2; exit 1; }
echo "$dir/config/crd"
