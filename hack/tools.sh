#!/usr/bin/env bash
# Installs the real peers the tests run against, each built once and cached under
# $COVE_TOOLS (default $HOME/.cache/cove-tools). A stamp file per tool records the
# version that was built, so a version bump rebuilds exactly that tool.
set -euo pipefail

TOOLS="${COVE_TOOLS:-$HOME/.cache/cove-tools}"
BIN="$TOOLS/bin"
mkdir -p "$BIN" "$TOOLS/stamps"
export GOBIN="$BIN" GOFLAGS="-buildvcs=false" CGO_ENABLED="${CGO_ENABLED:-1}"

CONTAINERD_VERSION=v2.3.4
REGISTRY_VERSION=v3.0.0
CRANE_VERSION=v0.22.1
CRICTL_VERSION=v1.34.0
# MinIO publishes no semver tags on the module proxy: pin the pseudo-version that
# @latest resolved to (a commit of 2026-02-12); it builds with this Go.
MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c
ORAS_VERSION=v1.3.6

# need NAME VERSION: true when NAME at VERSION is not built yet.
need() {
  local stamp="$TOOLS/stamps/$1"
  [[ ! -x "$BIN/$1" || "$(cat "$stamp" 2>/dev/null)" != "$2" ]]
}
done_() { echo "$2" >"$TOOLS/stamps/$1"; echo "tools: $1 $2 ready"; }

if need containerd "$CONTAINERD_VERSION" || need ctr "$CONTAINERD_VERSION"; then
  echo "tools: building containerd and ctr $CONTAINERD_VERSION"
  go install -tags "no_btrfs no_devmapper no_zfs" \
    "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION"
  done_ containerd "$CONTAINERD_VERSION"; done_ ctr "$CONTAINERD_VERSION"
fi

if need containerd-shim-runc-v2 "$CONTAINERD_VERSION"; then
  # The runc shim, for tests that run containers (`ctr run`). containerd finds it on
  # its PATH (peers.RuntimePath puts $BIN there) or next to its own binary.
  echo "tools: building containerd-shim-runc-v2 $CONTAINERD_VERSION"
  go install "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION"
  done_ containerd-shim-runc-v2 "$CONTAINERD_VERSION"
fi

# runc, which the shim runs, comes from the distribution (Debian: 1.1.5), not from here.
if ! command -v runc >/dev/null; then
  echo "tools: installing runc (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq runc >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    apt-get install -y -qq runc >/dev/null || {
      echo "tools: runc is not installed and \`apt-get install runc\` failed: install runc (as root) by hand" >&2
      exit 1; }
  fi
  command -v runc >/dev/null || { echo "tools: runc still not on PATH after apt-get install" >&2; exit 1; }
  echo "tools: runc $(runc --version | head -n1) installed"
fi

if need registry "$REGISTRY_VERSION"; then
  echo "tools: building distribution registry $REGISTRY_VERSION"
  go install "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION"
  done_ registry "$REGISTRY_VERSION"
fi

if need crane "$CRANE_VERSION"; then
  echo "tools: building crane $CRANE_VERSION"
  go install "github.com/google/go-containerregistry/cmd/crane@$CRANE_VERSION"
  done_ crane "$CRANE_VERSION"
fi

if need oras "$ORAS_VERSION"; then
  # OCI artifacts pushed and pulled through cove-cache (proxy/server push tests).
  echo "tools: building oras $ORAS_VERSION"
  go install "oras.land/oras/cmd/oras@$ORAS_VERSION"
  done_ oras "$ORAS_VERSION"
fi

if need crictl "$CRICTL_VERSION"; then
  echo "tools: building crictl $CRICTL_VERSION"
  # cri-tools refuses a plain `go install` (replace directives); build in a writable copy.
  # The checksum database behind the module proxy answers 404 for this version, so
  # skip it for this one module and check the module's hash against a pinned value
  # instead (the h1: sum the module proxy served on 2025-11-23).
  CRICTL_SUM="h1:KqL9EJ+WgHtz1HR1exezm91n+o8O2uMLs/eHzHJHAWw="
  json="$(GONOSUMDB=sigs.k8s.io/cri-tools go mod download -json "sigs.k8s.io/cri-tools@$CRICTL_VERSION")" || {
    echo "$json" >&2; echo "tools: downloading cri-tools failed" >&2; exit 1; }
  src="$(sed -n 's/.*"Dir": "\(.*\)".*/\1/p' <<<"$json")"
  sum="$(sed -n 's/.*"Sum": "\(.*\)".*/\1/p' <<<"$json")"
  if [[ "$sum" != "$CRICTL_SUM" ]]; then
    echo "tools: cri-tools $CRICTL_VERSION has sum $sum, expected $CRICTL_SUM" >&2; exit 1
  fi
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  cp -r "$src/." "$work/"
  chmod -R u+w "$work"
  # Module zips carry no vendor/ directory; dependencies come from cri-tools' go.sum.
  (cd "$work" && go build -o "$BIN/crictl" ./cmd/crictl)
  done_ crictl "$CRICTL_VERSION"
fi

if need minio "$MINIO_VERSION"; then
  # Real S3-compatible storage for the S3 backend's tests (about 3 minutes). MinIO is
  # AGPL: it only ever runs as a separate process (internal/peers.StartMinIO).
  echo "tools: building minio $MINIO_VERSION"
  CGO_ENABLED=0 go install "github.com/minio/minio@$MINIO_VERSION"
  done_ minio "$MINIO_VERSION"
fi

echo "tools: all in $BIN"
