"""Snapshot and compare root filesystems, and produce the reference one with umoci.

The oracle for `naiad unpack` is `umoci unpack` of the source OCI image (run as root,
not --rootless). `compare_trees(expected, actual)` lists every difference a container
could observe, with lstat only (symlinks are never followed):

    type, mode (all 12 bits incl. setuid/setgid/sticky; not for symlinks, always 0777 on
    Linux), uid/gid, size, sha256 of content, mtime in ns, symlink target, device
    major/minor, xattrs (every namespace), and hard-link groups (the set of paths that
    share an inode must be the same set in both trees).

What umoci 0.4.7 preserves, found by experiment (see tests/test_oracle_tools.py, which
re-checks the parts the comparison relies on):

- mtimes: nanosecond precision from PAX `mtime` records, for regular files, directories,
  symlinks (it uses lutimes), devices and fifos; pre-1970 and post-2242 stamps included.
  Directory mtimes are deterministic: umoci restores a directory's times after creating
  or deleting a child in it, in the same or a later layer (whiteouts and opaque markers
  included), so every directory with a tar entry ends with the mtime of its last entry.
  So all mtimes are compared. The exception is a directory that no tar entry describes:
  a parent umoci had to create implicitly, and the rootfs itself when no layer has a
  "./" entry, get the time of unpacking, owner 0:0 and mode 0777 minus umoci's umask
  (umoci_unpack runs it under umask 022, so 0755; entries' own modes ignore the umask).
  imagegen.implicit_dirs(layers) lists such paths; pass them in
  `ignore_mtime_of` (the corpus always has explicit entries, so it needs none). atime
  and ctime are not compared (ctime cannot be set; atime is not kept by images).
- An upper-layer entry for an existing directory replaces its mode, owner and mtime.
- Hard links: the header of a hard-link entry is ignored (mode, owner, mtime and xattrs
  come from the inode of the target). Links to symlinks, fifos and devices, and links to
  a file of a lower layer, all share the inode.
- xattrs: user.*, trusted.* and security.* (security.capability, security.ima) are
  restored; umoci drops security.selinux, system.nfs4_acl and trusted.overlay.* with a
  warning, and keeps user.rootlesscontainers (with a warning) when not --rootless.
  A PAX xattr record with an empty value is dropped (Go's archive/tar treats an empty
  PAX value as "unset"), so an empty-valued xattr never reaches the rootfs.
  user.* xattrs cannot be set on symlinks on Linux: umoci fails the unpack (EPERM).
- zstd layers are not supported by umoci 0.4.7; `umoci_unpack` below recompresses them
  to gzip in a scratch layout first (diff_ids are unchanged, so the tree is too).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import zstandard

KINDS = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


@dataclass(frozen=True)
class Attrs:
    """What a container can see of one path. Fields that do not apply are None."""

    kind: str
    mode: int | None  # S_IMODE (12 bits); None for symlinks
    uid: int
    gid: int
    size: int | None  # regular files only (dir sizes depend on the filesystem)
    sha256: str | None  # regular files only
    mtime_ns: int
    target: str | None  # symlinks only
    rdev: tuple[int, int] | None  # char/block devices only
    xattrs: tuple[tuple[str, bytes], ...]
    # Not compared directly: hard links are compared as groups of paths.
    inode: tuple[int, int] = field(compare=False, repr=False)

    def describe(self, name: str) -> str:
        v = getattr(self, name)
        if name == "mode" and v is not None:
            return oct(v)
        if name == "mtime_ns":
            s, ns = divmod(v, 1_000_000_000)
            return f"{s}.{ns:09d}"
        return repr(v)


COMPARED = tuple(f.name for f in fields(Attrs) if f.compare)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def attrs_of(path: str | os.PathLike[str], hash_content: bool = True) -> Attrs:
    p = os.fspath(path)
    st = os.lstat(p)
    kind = KINDS.get(stat.S_IFMT(st.st_mode), "unknown")
    xattrs = tuple(sorted(
        (k, os.getxattr(p, k, follow_symlinks=False))
        for k in os.listxattr(p, follow_symlinks=False)
    ))
    return Attrs(
        kind=kind,
        mode=None if kind == "symlink" else stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if kind == "file" else None,
        sha256=_sha256_file(p) if kind == "file" and hash_content else None,
        mtime_ns=st.st_mtime_ns,
        target=os.readlink(p) if kind == "symlink" else None,
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev))
        if kind in ("chardev", "blockdev") else None,
        xattrs=xattrs,
        inode=(st.st_dev, st.st_ino),
    )


def _walk(root: str) -> Iterator[tuple[str, str]]:
    """(relative "/"-rooted path, absolute path) for root and everything below it."""
    yield "/", root
    stack = [("", root)]
    while stack:
        rel, absdir = stack.pop()
        with os.scandir(absdir) as it:
            for de in it:
                r = f"{rel}/{de.name}"
                yield r, de.path
                if de.is_dir(follow_symlinks=False):
                    stack.append((r, de.path))


def snapshot_tree(root: str | os.PathLike[str], hash_content: bool = True) -> dict[str, Attrs]:
    """Attrs of every path under `root`, keyed "/", "/etc", "/etc/passwd"...

    Names that are not valid UTF-8 appear with surrogate escapes (os.fsdecode).
    """
    return {rel: attrs_of(p, hash_content) for rel, p in _walk(os.fspath(root))}


def link_groups(snap: dict[str, Attrs]) -> dict[str, frozenset[str]]:
    """For each non-directory path sharing its inode with another path of the tree, the
    set of all paths on that inode (itself included)."""
    by_inode: dict[tuple[int, int], set[str]] = {}
    for path, a in snap.items():
        if a.kind != "dir":
            by_inode.setdefault(a.inode, set()).add(path)
    out = {}
    for group in by_inode.values():
        if len(group) > 1:
            fg = frozenset(group)
            for p in group:
                out[p] = fg
    return out


def compare_snapshots(
    expected: dict[str, Attrs],
    actual: dict[str, Attrs],
    ignore: Collection[str] = (),
    ignore_mtime_of: Collection[str] = (),
) -> list[str]:
    """Human-readable differences, one per line; [] means equal.

    `ignore` names Attrs fields not to compare (e.g. {"mtime_ns"}; "hardlinks" turns off
    the link-group check). `ignore_mtime_of` lists paths whose mtime is not defined by
    the image (see the module docstring).
    """
    diffs: list[str] = []
    for path in sorted(expected.keys() - actual.keys()):
        diffs.append(f"{path}: missing (expected {expected[path].kind})")
    for path in sorted(actual.keys() - expected.keys()):
        diffs.append(f"{path}: unexpected {actual[path].kind}")
    for path in sorted(expected.keys() & actual.keys()):
        e, a = expected[path], actual[path]
        if e.kind != a.kind:
            diffs.append(f"{path}: type expected {e.kind}, actual {a.kind}")
            continue
        for name in COMPARED:
            if name in ignore or name == "kind":
                continue
            if name == "mtime_ns" and path in ignore_mtime_of:
                continue
            if name == "sha256" and e.size != a.size:
                continue  # already reported as a size difference
            if getattr(e, name) != getattr(a, name):
                diffs.append(
                    f"{path}: {name} expected {e.describe(name)}, actual {a.describe(name)}")
    if "hardlinks" not in ignore:
        eg, ag = link_groups(expected), link_groups(actual)
        seen: set[tuple[frozenset[str], frozenset[str]]] = set()
        for path in sorted((eg.keys() | ag.keys()) & expected.keys() & actual.keys()):
            want, got = eg.get(path, frozenset([path])), ag.get(path, frozenset([path]))
            # Compare only within paths both trees have; missing paths are reported above.
            want = frozenset(want & actual.keys())
            got = frozenset(got & expected.keys())
            if want != got and (want, got) not in seen:
                seen.add((want, got))
                diffs.append(f"{path}: hard-link group expected {sorted(want)}, "
                             f"actual {sorted(got)}")
    return diffs


def compare_trees(
    expected_root: str | os.PathLike[str],
    actual_root: str | os.PathLike[str],
    ignore: Collection[str] = (),
    ignore_mtime_of: Collection[str] = (),
) -> list[str]:
    """Differences between two directory trees (see compare_snapshots)."""
    return compare_snapshots(snapshot_tree(expected_root), snapshot_tree(actual_root),
                             ignore, ignore_mtime_of)


# --------------------------------------------------------------------------------------
# The reference unpacker
# --------------------------------------------------------------------------------------

_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")
_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def _blob_path(layout: Path, digest: str) -> Path:
    algo, hexd = digest.split(":", 1)
    return layout / "blobs" / algo / hexd


def _resolve(layout: Path, tag: str, platform: tuple[str, str]) -> dict:
    """The manifest descriptor `tag` names, descending into image indexes by platform."""
    index = json.loads((layout / "index.json").read_text())
    descs = [m for m in index["manifests"]
             if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    if not descs:
        raise LookupError(f"tag {tag!r} not in {layout}/index.json")
    desc = descs[-1]
    while desc.get("mediaType") in _INDEX_TYPES:
        nested = json.loads(_blob_path(layout, desc["digest"]).read_bytes())
        for m in nested["manifests"]:
            p = m.get("platform", {})
            if (p.get("os"), p.get("architecture")) == platform:
                desc = m
                break
        else:
            raise LookupError(f"no {platform[0]}/{platform[1]} manifest under {tag!r}")
    return desc


def _umoci_compatible_layout(layout: Path, tag: str, platform: tuple[str, str],
                             scratch: Path) -> tuple[Path, str]:
    """`layout`:`tag` if umoci can read it, else a scratch layout it can, holding the same
    layers (zstd recompressed to gzip, nested indexes resolved to one manifest)."""
    desc = _resolve(layout, tag, platform)
    manifest = json.loads(_blob_path(layout, desc["digest"]).read_bytes())
    # Did the tag name this manifest itself (not an index above it)?
    direct = desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    if direct and all(ly["mediaType"] != _ZSTD for ly in manifest["layers"]):
        return layout, tag
    out = scratch / "layout"
    (out / "blobs" / "sha256").mkdir(parents=True)
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(data: bytes) -> dict:
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        _blob_path(out, d).write_bytes(data)
        return {"digest": d, "size": len(data)}

    shutil.copyfile(_blob_path(layout, manifest["config"]["digest"]),
                    _blob_path(out, manifest["config"]["digest"]))
    layers = []
    for ly in manifest["layers"]:
        src = _blob_path(layout, ly["digest"])
        if ly["mediaType"] == _ZSTD:
            with src.open("rb") as f, zstandard.ZstdDecompressor().stream_reader(
                    f, read_across_frames=True) as r:
                raw = r.readall()
            layers.append({"mediaType": _GZIP, **put(gzip.compress(raw, mtime=0))})
        else:
            shutil.copyfile(src, _blob_path(out, ly["digest"]))
            layers.append(ly)
    new_manifest = {**manifest, "layers": layers}
    mdesc = put(json.dumps(new_manifest).encode())
    (out / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", **mdesc,
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }))
    return out, tag


def umoci_unpack(
    layout_path: str | os.PathLike[str],
    tag: str,
    dest: str | os.PathLike[str],
    platform: tuple[str, str] = ("linux", "amd64"),
) -> Path:
    """`umoci unpack --image LAYOUT:TAG DEST` (as root); returns DEST/rootfs.

    DEST must not exist. Raises RuntimeError with umoci's stderr when it fails.
    """
    with tempfile.TemporaryDirectory(prefix="umoci-src-") as scratch:
        layout, tag = _umoci_compatible_layout(Path(layout_path), tag, platform,
                                               Path(scratch))
        proc = subprocess.run(
            ["umoci", "unpack", "--image", f"{layout}:{tag}", os.fspath(dest)],
            capture_output=True, text=True, check=False, umask=0o022,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"umoci unpack {layout_path}:{tag} failed: {proc.stderr.strip()}")
    return Path(dest) / "rootfs"


def skopeo_copy(src: str, dst: str) -> None:
    """`skopeo copy SRC DST` (e.g. "docker-archive:/x.tar" to "oci:/layout:tag").

    The parent of an `oci:` destination is created first; skopeo insists it exists.
    """
    if dst.startswith("oci:"):
        Path(dst[4:].rsplit(":", 1)[0]).parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["skopeo", "copy", "--quiet", src, dst],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo copy {src} {dst} failed: {proc.stderr.strip()}")
