# zq-csi — see README.md. `make help` lists the targets.
SHELL := /bin/bash
GO    ?= go
BIN   := bin/zq-csi
PKGS  := ./...

.PHONY: help build test test-unit test-interop verify bench demo demo-img fuzz clean

help: ## list targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

# zq-csi version: the version and commit are stamped at build time (GOFLAGS
# here may carry -buildvcs=false, so the binary cannot rely on the toolchain
# recording them); override VERSION for a release build.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)
COMMIT  ?= $(shell git rev-parse HEAD 2>/dev/null)
LDFLAGS := -X main.version=$(VERSION) -X main.commit=$(COMMIT)

build: ## build bin/zq-csi (version and commit stamped: bin/zq-csi version)
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/zq-csi

test: ## unit, fuzz-seed, interop (qemu-img, libnbd, fio) and csi-sanity tests, race detector on
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -v -e /test/sanity -e /test/vm)
	@# kernel tests: on a host without nbd/ublk they skip; -v so the reason shows (make test-vm runs them)
	set -o pipefail; $(GO) test -race -count=1 -v ./test/vm/ 2>&1 | grep -E '^(ok|FAIL|--- FAIL|\*{8} test/vm)'
	@# csi-sanity (local backend, then the cluster backend against a real kube-apiserver), verbose so the spec counts show
	set -o pipefail; $(GO) test -race -count=1 -v ./test/sanity/ 2>&1 | grep -E '^(\[cluster-sanity\] )?zq-csi sanity|^(ok|FAIL|--- FAIL|--- SKIP)|SKIP'

verify: ## gofmt, go vet, go mod tidy check
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	@$(GO) mod tidy -diff || { echo 'go.mod/go.sum not tidy: run go mod tidy'; exit 1; }

bench: ## qcow2 and zone engine throughput vs a raw file, NBD server vs qemu-nbd (same run, same machine)
	set -o pipefail; $(GO) test -run '^$$' -bench . -benchtime 5x ./pkg/qcow2/ | tee bench/qcow2-latest.txt
	set -o pipefail; $(GO) test -run '^$$' -bench . -benchtime 5x ./pkg/zoned/ | tee bench/zoned-latest.txt
	bash bench/nbd.sh

# The seeds are real images of 20-50 KB; minimizing a new input of that size
# would otherwise eat most of a one-minute run.
FUZZFLAGS = -run '^$$' -fuzztime $${FUZZTIME:-60s} -fuzzminimizetime 5s

fuzz: ## run each fuzz target for FUZZTIME (default 60s)
	$(GO) test $(FUZZFLAGS) -fuzz '^FuzzOpen$$' ./pkg/qcow2/
	$(GO) test $(FUZZFLAGS) -fuzz '^FuzzOpenZoned$$' ./pkg/zoned/
	$(GO) test $(FUZZFLAGS) -fuzz '^FuzzDecodeRequest$$' ./pkg/nbdattach/
	$(GO) test $(FUZZFLAGS) -fuzz '^FuzzHandshake$$' ./pkg/nbdattach/

demo: build ## build, then one CSI driver process driven through real CSI calls: a zoned volume from create to delete
	@./scripts/demo.sh

demo-img: build ## the image tool: create a zoned image with the seed's options, write to it, show its zones
	@./scripts/demo-img.sh

# make image IMAGE_REPO=registry.example.com/zq-csi PLATFORMS=linux/amd64,linux/arm64 ZQ_IMAGE_ENGINE=podman
.PHONY: image image-check
image: ## the container image (Dockerfile) as bin/image/*.tar, tagged as the chart's default image; docker/podman/buildah or the in-repo packer
	@bash scripts/image.sh

image-check: ## build the Dockerfile with buildah from local base images and compare it with the packer's image
	@bash scripts/image-check.sh

clean:
	rm -rf bin

.PHONY: test-vm
test-vm: ## kernel tests in a qemu VM with Debian's kernel (needs qemu-system-x86 busybox-static qemu-utils)
	bash test/vm/run.sh

.PHONY: chart-check e2e
chart-check: ## helm lint --strict, schema, deploy/ render diff, server-side dry run against a real kube-apiserver
	bash scripts/e2e/chart-check.sh

e2e: ## one-node Kubernetes (kubelet, containerd, runc) on loopback: install the chart, run test/e2e, tear down
	bash test/e2e/run.sh
