# syntax=docker/dockerfile:1
# The zq-csi image: the static zq-csi binary on an empty base, plus a static
# busybox for the commands the node plugin execs (mount(8) and umount(8) for
# mount-utils' bind mounts of NodePublish, modprobe for nbd and ublk_drv) and
# a shell for `kubectl exec`. `make image` builds it (scripts/image.sh:
# docker, podman or buildah, whichever works; without one, the in-repo packer
# test/e2e/tools/imgpack writes the same layout, checked by
# scripts/image-check.sh).
#
#   docker buildx build --platform linux/amd64,linux/arm64 -t localhost/zq-csi:0.1.0 .
#
# Cross builds need no emulation: Go cross-compiles on the build platform,
# and busybox is only copied out of the target platform's busybox image.
# GO_IMAGE and BUSYBOX_IMAGE may name locally built images (the check does,
# since no registry is reachable where it runs).
ARG GO_IMAGE=docker.io/library/golang:1.26-bookworm
# uclibc: the statically linked variant (the glibc one is dynamic).
ARG BUSYBOX_IMAGE=docker.io/library/busybox:1.37.0-uclibc

FROM ${BUSYBOX_IMAGE} AS busybox

FROM --platform=$BUILDPLATFORM ${GO_IMAGE} AS build
ARG TARGETOS=linux
ARG TARGETARCH
ARG VERSION=dev
ARG GOPROXY=https://proxy.golang.org,direct
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -buildvcs=false -ldflags "-s -w -X main.version=$VERSION" -o /rootfs/zq-csi ./cmd/zq-csi
COPY --from=busybox /bin/busybox /rootfs/bin/busybox
RUN for a in sh mount umount modprobe; do ln -s busybox /rootfs/bin/$a; done && \
    mkdir -p /rootfs/tmp && chmod 1777 /rootfs/tmp

FROM scratch
ARG VERSION=dev
COPY --from=build /rootfs/ /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL org.opencontainers.image.title=zq-csi \
      org.opencontainers.image.description="CSI driver for zoned qcow2 volumes" \
      org.opencontainers.image.source=https://github.com/zq-csi/zq-csi \
      org.opencontainers.image.version=$VERSION
ENTRYPOINT ["/zq-csi"]
