#!/usr/bin/env bash
# Build a local Debian bookworm base image with Python 3.11 (thresher-base:bookworm) from the
# Debian mirror with debootstrap, for hosts that can reach Debian's mirror but no image registry.
# Skips the work when the image already exists.
#
#   scripts/make-base-image.sh [IMAGE]      (IMAGE defaults to $THRESHER_BASE_IMAGE or thresher-base:bookworm)
#   DEBIAN_MIRROR=http://deb.debian.org/debian   mirror to bootstrap from
set -euo pipefail

image=${1:-${THRESHER_BASE_IMAGE:-thresher-base:bookworm}}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "base image $image already exists; nothing to do"
    exit 0
fi

rootfs=$(mktemp -d /tmp/thresher-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$suite" "$rootfs" "$mirror"

# What an image does not need: downloaded .debs, package lists, docs and man pages.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/tmp/*

tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase $suite + python3, python3-venv, ca-certificates" \
    - "$image"
docker run --rm "$image" python3 --version
