#!/usr/bin/env bash
# Runs the csi-sanity command (csi-test v5, the version in go.mod) against
# `zq-csi serve --mode all` on a unix socket, as issue #6 asks. Needs root
# (NodePublishVolume bind-mounts). Without /dev/nbd* the server uses the
# file attacher (see pkg/driver/fileattach.go: data does not flow through
# it; the CSI calls are real).
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d /tmp/zq-csi-sanity.XXXXXX)
server=
cleanup() {
	if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
	rm -rf "$work"
}
trap cleanup EXIT
go build -o "$work/zq-csi" ./cmd/zq-csi
go build -o "$work/csi-sanity" github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity
attacher=file
if [ -e /dev/nbd0 ] && [ "${ZQ_SANITY_ATTACHER:-file}" = nbd ]; then attacher=nbd; fi
"$work/zq-csi" serve --endpoint "unix://$work/csi.sock" --mode all --node-id sanity-node \
	--data-dir "$work/data" --attacher "$attacher" --v 2 >"$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 50); do [ -S "$work/csi.sock" ] && break; sleep 0.1; done
status=0
"$work/csi-sanity" --csi.endpoint "$work/csi.sock" \
	--csi.testvolumeaccesstype=block --csi.testnodevolumeattachlimit \
	--csi.testvolumeparameters test/sanity/testdata/params.yaml \
	--csi.testvolumemutableparameters test/sanity/testdata/mutable.yaml \
	--csi.testvolumesize $((8 << 20)) --csi.testvolumeexpandsize $((16 << 20)) \
	--csi.mountdir "$work/mnt" --csi.stagingdir "$work/staging" \
	--ginkgo.succinct "$@" || status=$?
if [ "$status" != 0 ]; then
	echo "csi-sanity failed; last server log lines:" >&2
	tail -n 40 "$work/serve.log" >&2
fi
exit "$status"
