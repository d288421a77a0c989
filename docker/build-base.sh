#!/usr/bin/env bash
# A local base image for hosts that cannot pull one: Debian bookworm from Debian's own packages
# (debootstrap), with Python 3.11 and venv, imported into podman as fleet-base:bookworm.
# Production builds use a registry base instead (BASE_IMAGE, docker/Dockerfile.*).
#
# Usage: docker/build-base.sh [TAG]   (default fleet-base:bookworm; needs root, debootstrap, podman)
# Env:   DEBIAN_MIRROR (default http://deb.debian.org/debian)
set -euo pipefail

TAG=${1:-fleet-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# What the Dockerfiles need of a base: python3 with venv (pip comes from ensurepip), CA
# certificates for PyPI, and apt (for redis-server in the control image).
PACKAGES=python3,python3-venv,ca-certificates

for tool in debootstrap podman; do
  command -v "$tool" >/dev/null || { echo "build-base.sh: $tool not found (apt-get install $tool)" >&2; exit 1; }
done

ROOT=$(mktemp -d /var/tmp/fleet-base.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 \
  || { echo "build-base.sh: debootstrap failed, see $ROOT.log" >&2; exit 1; }
rm -f "$ROOT.log"
# The image's apt uses the same mirror; no package lists or caches are kept in the image.
echo "deb $MIRROR bookworm main" >"$ROOT/etc/apt/sources.list"
# As Docker's Debian images: packages installed in a build never start their services.
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"
rm -f "$ROOT/etc/hostname" "$ROOT/etc/resolv.conf"  # the container runtime provides both
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/archives/*.deb
tar -C "$ROOT" --numeric-owner -c . | podman import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
podman image inspect --format '{{.Id}} {{.Size}}' "$TAG" | awk -v t="$TAG" '{printf "%s %s %.0f MB\n", t, substr($1,1,12), $2/1e6}'
