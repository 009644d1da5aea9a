# zq-csi — see README.md. `make help` lists the targets.
SHELL := /bin/bash
GO    ?= go
BIN   := bin/zq-csi
PKGS  := ./...

.PHONY: help build test test-unit test-interop verify bench demo fuzz clean

help: ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

build: ## build bin/zq-csi
	$(GO) build -o $(BIN) ./cmd/zq-csi

test: ## unit, fuzz-seed, interop (qemu-img, libnbd, fio) and csi-sanity tests, race detector on
	$(GO) test -race -count=1 $(PKGS)
	@# the sanity suite prints its spec counts only in verbose mode
	set -o pipefail; $(GO) test -count=1 -v -run 'TestSanity' ./test/sanity/ 2>&1 | grep -E '^zq-csi sanity:|^(ok|FAIL|--- FAIL)'

verify: ## gofmt, go vet, go mod tidy check
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	@$(GO) mod tidy -diff || { echo 'go.mod/go.sum not tidy: run go mod tidy'; exit 1; }

bench: ## engine throughput vs a raw file (same run, same machine)
	$(GO) test -run '^$$' -bench . -benchtime 2x ./pkg/qcow2/ | tee bench/qcow2-latest.txt

fuzz: ## run each fuzz target for FUZZTIME (default 60s)
	$(GO) test -run '^$$' -fuzz '^FuzzOpen$$' -fuzztime $${FUZZTIME:-60s} ./pkg/qcow2/
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeRequest$$' -fuzztime $${FUZZTIME:-60s} ./pkg/nbdattach/
	$(GO) test -run '^$$' -fuzz '^FuzzHandshake$$' -fuzztime $${FUZZTIME:-60s} ./pkg/nbdattach/

demo: build ## build, create a zoned image with the seed's options, show it
	@./scripts/demo.sh

clean:
	rm -rf bin

.PHONY: test-vm
test-vm: ## kernel tests in a qemu VM with Debian's kernel (needs qemu-system-x86 busybox-static qemu-utils)
	bash test/vm/run.sh
