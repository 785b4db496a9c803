#!/usr/bin/env bash
# Make a Debian bookworm base image from Debian's own packages, for hosts that reach a Debian mirror but no image
# registry (air-gapped sites, CI without a registry): the cpu flavor builds FROM it instead of debian:bookworm-slim.
#   docker/debian-base.sh [NAME] [MIRROR]     (as root; needs debootstrap)
#   make image FLAVOR=cpu DEBIAN_IMAGE=NAME
# NAME defaults to cotune-base/debian:bookworm; MIRROR to the host's own Debian mirror (or deb.debian.org).
set -euo pipefail
name=${1:-cotune-base/debian:bookworm}
mirror=${2:-$(sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)}
mirror=${mirror:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}
if "${docker}" image inspect "${name}" >/dev/null 2>&1; then
  echo "base image ${name} is there"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 2; }
root=$(mktemp -d)
trap 'rm -rf "${root}"' EXIT
debootstrap --variant=minbase bookworm "${root}" "${mirror}" >"${root}.log" 2>&1 \
  || { tail -n 20 "${root}.log" >&2; echo "error: debootstrap from ${mirror} failed (log above)" >&2; exit 2; }
rm -f "${root}.log"
rm -rf "${root}"/var/cache/apt/archives/*.deb "${root}"/var/lib/apt/lists/*
tar -C "${root}" -c . | "${docker}" import --change 'CMD ["/bin/bash"]' - "${name}" >/dev/null
echo "base image ${name}: made from ${mirror}"
