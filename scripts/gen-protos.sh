#!/bin/sh
# Regenerate naiad's gRPC stubs for containerd's snapshots API (src/naiad/snapshotter/api/)
# from the protos of Debian's golang-github-containerd-containerd-dev.
#
# The gogoproto options are Go-only and stripped. The protos are copied to the stubs' own
# Python package path, so the generated imports read `from naiad.snapshotter.api import ...`;
# the proto packages (containerd.services.snapshots.v1, containerd.types) stay as they are,
# because gRPC method names on the wire are built from them.
#
# Needs: pip install -e '.[protos]'  (grpcio-tools)
set -eu
SRC=${CONTAINERD_PROTOS:-/usr/share/gocode/src/github.com/containerd/containerd/api}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=$ROOT/src
PKG=naiad/snapshotter/api
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/$PKG"

strip_gogo() {
    # Drop the gogoproto import and every option bracket / option line that names gogoproto.
    sed -e '/import weak "gogoproto\/gogo.proto";/d' \
        -e '/option (gogoproto\./d' \
        -e 's/ *\[(gogoproto\.[^]]*\]//g' \
        -e "s#import \"github.com/containerd/containerd/api/types/mount.proto\";#import \"$PKG/mount.proto\";#" \
        "$1"
}
strip_gogo "$SRC/types/mount.proto" > "$TMP/$PKG/mount.proto"
strip_gogo "$SRC/services/snapshots/v1/snapshots.proto" > "$TMP/$PKG/snapshots.proto"
if grep -n gogoproto "$TMP/$PKG"/*.proto; then
    echo "gen-protos: gogoproto options left after stripping" >&2
    exit 1
fi
"$PY" -m grpc_tools.protoc -I "$TMP" --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
    "$TMP/$PKG/mount.proto" "$TMP/$PKG/snapshots.proto"
printf '"""Generated gRPC stubs of containerd'"'"'s snapshots API (scripts/gen-protos.sh); do not edit."""\n' \
    > "$OUT/$PKG/__init__.py"
echo "stubs written to $OUT/$PKG"
