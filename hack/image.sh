#!/usr/bin/env bash
# Builds cove's image without a container engine, the way ko does: static binaries
# (CGO_ENABLED=0, -trimpath, the version stamped as `make build` stamps it) in one layer,
# appended with crane onto BASE (none: an empty base, i.e. scratch) and pushed to IMAGE.
#
#   make image IMAGE=registry.example/cove:v1.2.3 [BASE=debian:trixie-slim]
#
# The image holds /usr/local/bin/cove-cache and /usr/local/bin/cove-node (the paths
# install/kubernetes runs), the build machine's CA bundle at
# /etc/ssl/certs/ca-certificates.crt (cove-cache fetches from HTTPS origins and S3),
# and /var/lib/cove-cache owned by 65532 (the default command's storage). Its config:
# user 65532:65532, entrypoint /usr/local/bin/cove-cache, command
# `serve --addr=0.0.0.0:5005 --storage-dir=/var/lib/cove-cache`, workdir /.
# cove-cache needs nothing else. The cove-node DaemonSet runs root (runAsUser 0), its
# install runs `nsenter` and its hold container `sleep`: for the DaemonSet, BASE must have
# both (debian:trixie-slim has them, in util-linux and coreutils).
#
# Environment: IMAGE (required), BASE, VERSION (default: git describe, as the Makefile),
# GOARCH (default: go env GOARCH; the image is linux/GOARCH), CRANE (default:
# $COVE_TOOLS/bin/crane, else crane on PATH), INSECURE=1 (plain HTTP to the registry;
# crane already speaks plain HTTP to localhost and 127.0.0.1), CA_BUNDLE (default
# /etc/ssl/certs/ca-certificates.crt; "none" leaves it out). Credentials are crane's own
# (`crane auth login`, or the docker config).
set -euo pipefail

die() { echo "image: $*" >&2; exit 1; }

IMAGE="${IMAGE:-}"
[[ -n "$IMAGE" ]] || die "IMAGE is not set: make image IMAGE=REGISTRY/cove:TAG [BASE=...]"
BASE="${BASE:-}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${VERSION:-$(git -C "$ROOT" describe --tags --always --dirty 2>/dev/null || echo dev)}"
GO="${GO:-go}"
GOARCH="${GOARCH:-$("$GO" env GOARCH)}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
UID_GID=65532

if [[ -z "${CRANE:-}" ]]; then
  CRANE="${COVE_TOOLS:-$HOME/.cache/cove-tools}/bin/crane"
  [[ -x "$CRANE" ]] || CRANE="$(command -v crane || true)"
fi
[[ -n "$CRANE" && -x "$CRANE" ]] || die "crane not found: run \`make tools\`, put crane on PATH or set CRANE="
crane=("$CRANE")
[[ "${INSECURE:-}" == 1 ]] && crane+=(--insecure)
if [[ "$CA_BUNDLE" != none && ! -f "$CA_BUNDLE" ]]; then
  die "CA bundle $CA_BUNDLE not found: set CA_BUNDLE=PATH, or CA_BUNDLE=none when BASE has its own"
fi

# A base that cannot be read fails here, before the build, and nothing is pushed.
if [[ -n "$BASE" ]]; then
  "${crane[@]}" digest --platform "linux/$GOARCH" "$BASE" >/dev/null || die "BASE $BASE cannot be read (see crane's error above)"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
stage="$work/root"
mkdir -p "$stage/usr/local/bin" "$stage/etc/ssl/certs" "$stage/var/lib/cove-cache"

ldflags="-s -w -X github.com/cove-oci/cove/internal/version.Version=$VERSION"
for bin in cove-cache cove-node; do
  (cd "$ROOT" && CGO_ENABLED=0 GOOS=linux GOARCH="$GOARCH" "$GO" build -trimpath \
    -ldflags "$ldflags" -o "$stage/usr/local/bin/$bin" "./cmd/$bin")
done
members=(usr usr/local usr/local/bin usr/local/bin/cove-cache usr/local/bin/cove-node var var/lib)
if [[ "$CA_BUNDLE" != none ]]; then
  install -m 0644 "$CA_BUNDLE" "$stage/etc/ssl/certs/ca-certificates.crt"
  members+=(etc etc/ssl etc/ssl/certs etc/ssl/certs/ca-certificates.crt)
fi

# One reproducible layer: fixed times, numeric owners, root's files and then the
# spool directory owned by 65532 (tar -r: the one member with another owner).
layer="$work/layer.tar"
tarflags=(--no-recursion --numeric-owner --mtime=@0 --format=gnu -C "$stage")
chmod 0755 "$stage"/usr "$stage"/usr/local "$stage"/usr/local/bin "$stage"/var "$stage"/var/lib "$stage"/var/lib/cove-cache
tar -cf "$layer" "${tarflags[@]}" --owner=0 --group=0 "${members[@]}"
tar -rf "$layer" "${tarflags[@]}" --owner="$UID_GID" --group="$UID_GID" var/lib/cove-cache

echo "image: cove $VERSION linux/$GOARCH onto ${BASE:-scratch} -> $IMAGE"
if [[ -n "$BASE" ]]; then
  "${crane[@]}" append --platform "linux/$GOARCH" -b "$BASE" -f "$layer" -t "$IMAGE" >/dev/null
else
  "${crane[@]}" append --oci-empty-base -f "$layer" -t "$IMAGE" >/dev/null
fi
# crane mutate prints the pushed reference (IMAGE@sha256:...).
"${crane[@]}" mutate "$IMAGE" -t "$IMAGE" \
  --set-platform "linux/$GOARCH" \
  --user "$UID_GID:$UID_GID" \
  --workdir / \
  --entrypoint /usr/local/bin/cove-cache \
  --cmd serve,--addr=0.0.0.0:5005,--storage-dir=/var/lib/cove-cache \
  --label org.opencontainers.image.version="$VERSION" \
  --label org.opencontainers.image.source=https://github.com/cove-oci/cove
if [[ -z "$BASE" ]]; then
  echo "image: no BASE: the image has no sleep or nsenter, enough for cove-cache; the cove-node DaemonSet needs BASE=debian:trixie-slim (or another with both)" >&2
fi
