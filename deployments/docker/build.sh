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
cp -r rootfs "$ctx/"
rm -f "$ctx/rootfs/data/tmp/.keep"
docker build -q -t "$tag" "$ctx"
