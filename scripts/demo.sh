#!/bin/bash
# The 60-second tour, on the embedded default: no registry, a local OCI layout
# and $NAIAD_HOME (default ~/.cache/naiad). Builds a small two-layer OCI image
# with umoci from this machine's own files, converts it to naiad, inspects and
# checks it, unpacks it, and compares the result with `umoci unpack`.
set -euo pipefail
WORK=${DEMO_DIR:-$(mktemp -d /tmp/naiad-demo.XXXXXX)}
trap 'rm -rf "$WORK"' EXIT
OCI=$WORK/oci
echo "== building a small OCI image in $OCI (umoci)"
umoci init --layout "$OCI"
umoci new --image "$OCI:demo"
umoci unpack --image "$OCI:demo" "$WORK/bundle" >/dev/null
R=$WORK/bundle/rootfs
mkdir -p "$R/usr/lib" "$R/etc"
STDLIB=$(python3 -c 'import json, os; print(os.path.dirname(os.path.dirname(json.__file__)))')
cp -a "$STDLIB/json" "$STDLIB/email" "$R/usr/lib/"
cp -a /etc/os-release /etc/passwd "$R/etc/"
umoci repack --image "$OCI:demo" "$WORK/bundle"
rm -rf "$R/usr/lib/email" && echo "v2" > "$R/etc/motd" && ln "$R/etc/passwd" "$R/etc/passwd.link"
umoci repack --image "$OCI:demo" "$WORK/bundle"
rm -rf "$WORK/bundle"

echo "== naiad convert oci:$OCI:demo oci:$OCI  (tag demo-naiad)"
naiad convert "oci:$OCI:demo" "oci:$OCI"
echo "== naiad inspect"
naiad inspect "oci:$OCI:demo-naiad"
echo "== naiad check"
naiad check "oci:$OCI:demo-naiad"
echo "== naiad unpack, compared with umoci unpack"
naiad unpack "oci:$OCI:demo-naiad" "$WORK/naiad-rootfs"
umoci unpack --image "$OCI:demo" "$WORK/umoci" >/dev/null
if diff -r --no-dereference "$WORK/umoci/rootfs" "$WORK/naiad-rootfs"; then
  echo "== identical rootfs: demo OK"
else
  echo "== rootfs differs"; exit 1
fi
