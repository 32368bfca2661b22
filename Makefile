# cove: make build | test | bench | run | tools
GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X github.com/cove-oci/cove/internal/version.Version=$(VERSION)
# Real test peers (containerd, ctr, crictl, registry, crane), built once.
export COVE_TOOLS ?= $(HOME)/.cache/cove-tools
# Fuzz time per target inside `make test`; run longer by hand: make fuzz FUZZTIME=5m
FUZZTIME  ?= 10s

.PHONY: all build image tools test unit fuzz bench run clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/cove-cache ./cmd/cove-cache
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/cove-node ./cmd/cove-node

# The image both manifests run (install/kubernetes), built and pushed without a container
# engine: make image IMAGE=registry.example/cove:v1 [BASE=debian:trixie-slim]. See hack/image.sh.
image:
	IMAGE='$(IMAGE)' BASE='$(BASE)' VERSION='$(VERSION)' GO='$(GO)' ./hack/image.sh

tools:
	./hack/tools.sh

# Every test, against the real peers; the race detector on.
test: tools
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 25m ./...
	$(MAKE) fuzz

fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 2s ./proxy/route
	$(GO) test -run '^$$' -fuzz '^FuzzParseRange$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 2s ./proxy/httpx
	$(GO) test -run '^$$' -fuzz '^FuzzParsePattern$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 2s ./proxy/origin
	$(GO) test -run '^$$' -fuzz '^FuzzParseTokenRequest$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 2s ./proxy/token

# Benchmarks print ratios against anchors measured in the same run; see docs/benchmarks.md.
bench: tools build
	$(GO) test -run '^$$' -bench . -benchtime 1x -timeout 60m ./bench/...

# The embedded default: filesystem storage under ./.cove-data, loopback only.
run: build
	./bin/cove-cache serve --addr 127.0.0.1:5005 --storage-dir ./.cove-data

clean:
	rm -rf bin .cove-data
