#!/bin/bash
# Build a workload image from Debian packages as an OCI image layout (3 gzip layers), the way
# ../shared/images/torchapp.sh builds the reference image:
#   layer 1: Debian bookworm minbase (debootstrap; cached as $DEBAPP_CACHE/debootstrap.tar, so every
#            workload built with the same cache shares this layer, bit for bit)
#   layer 2: PACKAGES installed by apt-get inside the chroot (no recommends; apt lists, caches and logs removed)
#   layer 3: the files of APPDIR as /app
# Usage (as root): debapp.sh OUTDIR TAG APPDIR "PACKAGES" ENTRYPOINT...
#   -> OCI layout OUTDIR/oci with tag TAG, working dir /app, entrypoint ENTRYPOINT...
# Needs: debootstrap, umoci, reach to Debian's package mirror ($MIRROR). Takes a few minutes.
set -euo pipefail
OUTDIR=$(realpath -m "${1:?usage: debapp.sh OUTDIR TAG APPDIR PACKAGES ENTRYPOINT...}")
TAG=${2:?tag}; APPDIR=$(realpath "${3:?app dir}"); PACKAGES=${4:?packages}; shift 4
[ $# -gt 0 ] || { echo "debapp.sh: no entrypoint given" >&2; exit 2; }
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
TS=$(date -u -d @$SOURCE_DATE_EPOCH +%Y-%m-%dT%H:%M:%SZ)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
C=${DEBAPP_CACHE:-$OUTDIR/cache}
OCI=$OUTDIR/oci.tmp; B=$OUTDIR/bundle   # the layout is renamed to OUTDIR/oci only when complete
mkdir -p "$OUTDIR" "$C"; rm -rf "$OCI" "$B"
umoci init --layout "$OCI"
umoci new --image "$OCI:$TAG"
umoci unpack --image "$OCI:$TAG" "$B"

if [ ! -f "$C/debootstrap.tar" ]; then
  rm -rf "$C/ds" && mkdir -p "$C/ds"
  debootstrap --variant=minbase bookworm "$C/ds" "$MIRROR"
  rm -rf "$C"/ds/var/cache/apt/archives/*.deb "$C"/ds/var/lib/apt/lists/* "$C"/ds/var/log/*.log \
         "$C"/ds/var/cache/debconf/*-old
  tar -C "$C/ds" --numeric-owner -cf "$C/debootstrap.tar.tmp" . && mv "$C/debootstrap.tar.tmp" "$C/debootstrap.tar"
  rm -rf "$C/ds"
fi
R="$B/rootfs"
tar -C "$R" --numeric-owner -xpf "$C/debootstrap.tar"
umoci repack --refresh-bundle --history.created "$TS" --history.created_by "debootstrap minbase bookworm" \
   --image "$OCI:$TAG" "$B"

# apt needs /proc and name resolution inside the chroot; both are undone before the layer is taken.
cp -a "$R/etc/resolv.conf" "$B/resolv.conf.orig" 2>/dev/null || true
cp /etc/resolv.conf "$R/etc/resolv.conf"
mount -t proc proc "$R/proc"
cleanup() { umount "$R/proc" 2>/dev/null || true; }
trap cleanup EXIT
APT=(chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root DEBIAN_FRONTEND=noninteractive
     SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH apt-get -q -y -o APT::Install-Recommends=false)
"${APT[@]}" update
# shellcheck disable=SC2086  # PACKAGES is a list of words
"${APT[@]}" install $PACKAGES
"${APT[@]}" clean
cleanup; trap - EXIT
rm -rf "$R"/var/lib/apt/lists/* "$R"/var/log/*.log "$R"/var/log/apt/* "$R"/var/cache/debconf/*-old
if [ -e "$B/resolv.conf.orig" ]; then cp -a "$B/resolv.conf.orig" "$R/etc/resolv.conf"; else rm -f "$R/etc/resolv.conf"; fi
umoci repack --refresh-bundle --history.created "$TS" --history.created_by "apt-get install $PACKAGES" \
   --image "$OCI:$TAG" "$B"

mkdir -p "$R/app"
cp -a "$APPDIR/." "$R/app/"
find "$R/app" -exec touch -h -d @$SOURCE_DATE_EPOCH {} +
umoci repack --refresh-bundle --history.created "$TS" --history.created_by "app" --image "$OCI:$TAG" "$B"
CONFIG=(--config.workingdir /app --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
for arg in "$@"; do CONFIG+=(--config.entrypoint "$arg"); done
umoci config --image "$OCI:$TAG" --created "$TS" "${CONFIG[@]}" --history.created "$TS" --history.created_by "config"
umoci gc --layout "$OCI"
rm -rf "$B" "$OUTDIR/oci" && mv "$OCI" "$OUTDIR/oci"
echo "$TAG: oci:$OUTDIR/oci:$TAG"
