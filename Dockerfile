# cove's image for people with a container engine; `make image` builds the same layout
# without one (hack/image.sh). Both binaries go to /usr/local/bin, where install/kubernetes
# runs them:
#
#   docker build --build-arg VERSION=$(git describe --tags --always --dirty) -t REGISTRY/cove:TAG .
#
# Static binaries (CGO_ENABLED=0), stamped with VERSION as `make build` stamps them.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X github.com/cove-oci/cove/internal/version.Version=${VERSION}" \
      -o /out/cove-cache ./cmd/cove-cache && \
    CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X github.com/cove-oci/cove/internal/version.Version=${VERSION}" \
      -o /out/cove-node ./cmd/cove-node

# Debian slim, not scratch or distroless: the cove-node DaemonSet's install runs systemctl
# on the node through `nsenter` (util-linux) and its hold container runs `sleep infinity`
# (coreutils); both are in debian:trixie-slim. cove-cache itself needs neither, nor a shell.
FROM debian:trixie-slim
# The slim image has no CA bundle: cove-cache fetches from HTTPS origins and S3.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/cove-cache /out/cove-node /usr/local/bin/
# The default command's storage, writable by the image's user.
RUN install -d -o 65532 -g 65532 /var/lib/cove-cache
# Non-root for cove-cache (the Deployment also sets runAsUser 65532); the DaemonSet's
# containers set runAsUser 0, as cove-node's install needs root on the node.
USER 65532:65532
WORKDIR /
ENTRYPOINT ["/usr/local/bin/cove-cache"]
CMD ["serve", "--addr=0.0.0.0:5005", "--storage-dir=/var/lib/cove-cache"]
