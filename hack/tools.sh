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
# A real Kubernetes API server and its etcd, for the EndpointSlice membership tests
# (internal/peers.StartKubeAPIServer). etcd 3.6 is the line Kubernetes 1.34 runs on.
KUBERNETES_VERSION=v1.34.3
ETCD_VERSION=v3.6.16

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

if need etcd "$ETCD_VERSION"; then
  # etcd's own main packages live in modules with replace directives, which `go install
  # pkg@version` refuses; a throwaway module whose main calls etcdmain builds the same
  # server from the module proxy. Debian's etcd-server is the fallback.
  echo "tools: building etcd $ETCD_VERSION"
  src="$TOOLS/src/etcd"
  rm -rf "$src" && mkdir -p "$src"
  cat >"$src/main.go" <<'EOF_ETCD'
// Command etcd is etcd's server, built from go.etcd.io/etcd/server/v3 by hack/tools.sh.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF_ETCD
  if (cd "$src" && GOWORK=off go mod init cove-tools/etcd >/dev/null 2>&1 &&
      GOWORK=off go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" &&
      GOWORK=off go mod tidy && GOWORK=off CGO_ENABLED=0 go build -o "$BIN/etcd" .); then
    rm -rf "$src"
    done_ etcd "$ETCD_VERSION"
  else
    rm -rf "$src"
    echo "tools: building etcd failed; installing Debian's etcd-server (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq etcd-server >/dev/null 2>&1; then
      apt-get update -qq >/dev/null 2>&1 || true
      apt-get install -y -qq etcd-server >/dev/null || {
        echo "tools: etcd could not be built and \`apt-get install etcd-server\` failed" >&2
        exit 1; }
    fi
    ln -sf "$(command -v etcd)" "$BIN/etcd"
    # Not stamped with ETCD_VERSION: the next run tries the build again.
    echo "tools: etcd $("$BIN/etcd" --version | head -n1) installed from Debian"
  fi
fi

if need kube-apiserver "$KUBERNETES_VERSION"; then
  # kubernetes is not meant to be a dependency: its go.mod points the k8s.io/* staging
  # modules at ./staging (absent from the module zip) and requires them as v0.0.0.
  # Build in a writable copy with the published staging modules instead (about 5 minutes).
  echo "tools: building kube-apiserver $KUBERNETES_VERSION"
  json="$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION")" || {
    echo "$json" >&2; echo "tools: downloading kubernetes failed" >&2; exit 1; }
  mod="$(sed -n 's/.*"Dir": "\(.*\)".*/\1/p' <<<"$json")"
  src="$TOOLS/src/kubernetes"
  rm -rf "$src" && mkdir -p "$src"
  cp -r "$mod/." "$src/"
  chmod -R u+w "$src"
  rm -rf "$src/go.work" "$src/go.work.sum" "$src/vendor"
  staging="v0${KUBERNETES_VERSION#v1}" # k8s.io/kubernetes v1.X.Y ships staging v0.X.Y
  sed -i -E -e '\#=> \./staging/#d' \
    -e "s#^(\s*k8s\.io/[^ ]+) v0\.0\.0\$#\1 $staging#" "$src/go.mod"
  (cd "$src" && GOWORK=off GOFLAGS="$GOFLAGS -mod=mod" go build -o "$BIN/kube-apiserver" ./cmd/kube-apiserver)
  rm -rf "$src"
  done_ kube-apiserver "$KUBERNETES_VERSION"
fi

echo "tools: all in $BIN"
