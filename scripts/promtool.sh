#!/usr/bin/env bash
# Prints the path of promtool (Prometheus's metrics linter), building it
# from the Go module proxy into /var/cache/zq-csi/tools/promtool-<version>
# when it is not there yet (a few minutes on 2 cores).
# The metrics test (pkg/driver TestMetricsPromtool) runs it on a scrape.
set -euo pipefail
PROMTOOL_VERSION=${PROMTOOL_VERSION:-v0.316.0} # github.com/prometheus/prometheus module version (Prometheus 3.x)
CACHE=${ZQ_TOOLS_CACHE:-/var/cache/zq-csi/tools}
dir="$CACHE/promtool-$PROMTOOL_VERSION"
if [ ! -x "$dir/promtool" ]; then
  mkdir -p "$dir.tmp"
  GOBIN="$dir.tmp" GOFLAGS=-mod=mod go install "github.com/prometheus/prometheus/cmd/promtool@$PROMTOOL_VERSION" >&2
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
fi
echo "$dir/promtool"
