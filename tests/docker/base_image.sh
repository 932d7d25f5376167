#!/usr/bin/env bash
# Test-only: build local/python-base:bookworm offline (nothing can be pulled on the CI machine).
# debootstrap a minimal Debian with Python and tini, add this machine's CA certificates (pip inside
# `docker build` reaches PyPI only with them) and the local CPU torch wheel as a pip find-links
# source. Users never get this image: the Dockerfile's defaults are the real upstream images.
set -euo pipefail
IMAGE=${1:-local/python-base:bookworm}
if docker image inspect "$IMAGE" >/dev/null 2>&1; then echo "$IMAGE exists"; exit 0; fi
MIRROR=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOTFS=$(mktemp -d /tmp/rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,tini \
  bookworm "$ROOTFS" "$MIRROR" >/dev/null
cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
mkdir -p "$ROOTFS/wheels"
cp /opt/wheels/torch-2.13.0+cpu-*.whl "$ROOTFS/wheels/" 2>/dev/null || true
printf '[global]\nfind-links = /wheels\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$ROOTFS/etc/pip.conf"
rm -rf "$ROOTFS/var/cache/apt/archives/"*.deb "$ROOTFS/var/lib/apt/lists/"*
tar -C "$ROOTFS" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$IMAGE" >/dev/null
echo "built $IMAGE"
