#!/usr/bin/env bash
# Builds turnpike's OCI image from deploy/Dockerfile with Debian's buildah,
# on a machine with no container registry:
#   bash deploy/image.sh [TAG]        # default tag: turnpike:VERSION
# - the binary is built on the host (cargo build --release) and the
#   Dockerfile's BUILD=host stage takes it, stripped, from target/image/;
# - when the Dockerfile's base (debian:bookworm-slim) is not in local
#   storage and cannot be pulled, it is made from Debian's packages
#   (debootstrap --variant=minbase, apt lists and docs removed) and
#   imported under that name.
# Containers' storage and configuration are this script's own, under
# target/containers/ (TURNPIKE_CONTAINERS overrides), so nothing of the
# host's podman is touched. Prints the image's tag and size.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
tag="${1:-turnpike:$version}"
base="debian:bookworm-slim"

state="${TURNPIKE_CONTAINERS:-$(pwd)/target/containers}"
# shellcheck source=/dev/null
source deploy/containers-env.sh "$state"

cargo build --release --locked -p turnpike
mkdir -p target/image
objcopy --strip-debug target/release/turnpike target/image/turnpike

if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
  if ! timeout 60 buildah pull -q "docker.io/library/$base" >/dev/null 2>&1; then
    echo "no $base to pull: making it with debootstrap" >&2
    root="$state/rootfs"
    rm -rf "$root"
    mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    debootstrap --variant=minbase bookworm "$root" "${mirror:-http://deb.debian.org/debian}" >/dev/null
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* \
      "$root"/usr/share/man/* "$root"/usr/share/locale/*
    tar -C "$root" -c . | podman import - "$base" >/dev/null
    rm -rf "$root"
  fi
fi

buildah bud --isolation chroot --layers=false --build-arg BUILD=host \
  -f deploy/Dockerfile -t "$tag" . >&2
size=$(podman image inspect "$tag" --format '{{.Size}}')
echo "$tag $size"
