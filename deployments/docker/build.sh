#!/usr/bin/env bash
# Builds the kuma image from scratch: a static binary and an empty /data.
# Usage: deployments/docker/build.sh [tag]   (default kuma:dev)
set -euo pipefail
cd "$(dirname "$0")"
tag=${1:-kuma:dev}
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$ctx/kuma" ../../cmd/kuma
cp Dockerfile "$ctx/"
# The image's only directories: an empty /data (the volume) with a tmp/ for
# SQLite, owned by the image's user through COPY --chown.
mkdir -p "$ctx/rootfs/data/tmp"
docker build -q -t "$tag" "$ctx"
