"""Corner-case images for the unpack oracle, as layer lists for imagegen.

Each focused image lives under its own top-level directory (its PREFIX), so that
`everything()` can merge them layer by layer without one case disturbing another.
Every directory has its own tar entry (and the root has "./"), which makes every mtime
in the unpacked tree deterministic (see treecmp's docstring); mtimes differ from entry to
entry where a mix-up (e.g. keeping a lower layer's directory metadata) would matter.

All content is seeded; the same call gives byte-identical layers. Total payload of
`everything()` is about 23 MB of tar (16 MB gzipped), mostly the incompressible big files
of `sizes()`; it has about 3200 entries in 3 layers.

Typical use in a test:

    infos = write_corpus(tmp_path / "corpus")          # name -> imagegen.ImageInfo
    expected = treecmp.umoci_unpack(infos["everything"].path, "latest", tmp_path / "ref")
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from imagegen import (
    DEFAULT_MTIME,
    BlockDev,
    CharDev,
    Compression,
    Concat,
    Dir,
    Entry,
    Fifo,
    File,
    Hardlink,
    ImageInfo,
    MiB,
    Opaque,
    Random,
    Symlink,
    Whiteout,
    Zeros,
    write_oci_layout,
)

Layers = list[list[Entry]]

T0, T1, T2 = DEFAULT_MTIME, DEFAULT_MTIME + 1000, DEFAULT_MTIME + 2000
ROOT = Dir(path=".", mode=0o755, mtime=T0 - 5)

# security.capability v2 granting cap_net_bind_service (bit 10), effective flag set:
# le32 magic|flags, then permitted/inheritable low words, then the high words.
CAP_NET_BIND_SERVICE = bytes.fromhex("01000002" "00040000" "00000000" "00000000" "00000000")
BIG_SIZE = 3 * MiB
BIG_SEED = 4242


def _with_root(layers: Layers) -> Layers:
    return [[ROOT, *layers[0]], *layers[1:]]


def _whiteouts() -> Layers:
    return [
        [
            Dir(path="wh", mtime=T0 + 1),
            File(path="wh/keep", data=b"keep\n"),
            File(path="wh/gone", data=b"lower gone\n"),
            Dir(path="wh/gonedir", mtime=T0 + 2),
            Dir(path="wh/gonedir/sub"),
            File(path="wh/gonedir/sub/x", data=b"x\n"),
            Dir(path="wh/opq", mode=0o750, mtime=T0 + 3),
            File(path="wh/opq/a", data=b"a\n"),
            Dir(path="wh/opq/sub"),
            File(path="wh/opq/sub/b", data=b"b\n"),
            Dir(path="wh/opq2", mtime=T0 + 4),
            File(path="wh/opq2/x", data=b"x\n"),
        ],
        [
            Whiteout("wh/gone"),
            Whiteout("wh/gonedir"),
            # Whiteouts of names that never existed are legal and must be no-ops.
            Whiteout("wh/never"),
            # Opaque plus a new child in the same layer: the child must survive.
            Opaque("wh/opq"),
            File(path="wh/opq/new", data=b"new\n", mtime=T1),
            Opaque("wh/opq2"),
            File(path="wh/made-in-1", data=b"1\n"),
        ],
        [
            File(path="wh/gone", data=b"upper gone, back again\n", mtime=T2),
            Dir(path="wh/gonedir", mode=0o711, mtime=T2 + 1),
            File(path="wh/gonedir/fresh", data=b"fresh\n"),
            Whiteout("wh/made-in-1"),
            Whiteout("wh/opq/new"),
            File(path="wh/opq2/y", data=b"y\n"),
        ],
    ]


def _replacements() -> Layers:
    return [
        [
            Dir(path="rp", mtime=T0 + 10),
            File(path="rp/f2d", data=b"file, dir, file\n"),
            Dir(path="rp/d2f", mtime=T0 + 11),
            File(path="rp/d2f/a", data=b"a\n"),
            Dir(path="rp/d2f/sub"),
            File(path="rp/d2f/sub/b", data=b"b\n"),
            Symlink(path="rp/l2f", target="f2d"),
            File(path="rp/f2l", data=b"becomes a link\n"),
            Dir(path="rp/d2l"),
            File(path="rp/d2l/child", data=b"c\n"),
            Fifo(path="rp/fifo2f"),
            Dir(path="rp/wd2f"),
            File(path="rp/wd2f/child", data=b"c\n"),
        ],
        [
            Dir(path="rp/f2d", mode=0o701, mtime=T1),
            File(path="rp/f2d/child", data=b"child\n"),
            File(path="rp/d2f", data=b"was a dir\n", mode=0o600, mtime=T1 + 1),
            File(path="rp/l2f", data=b"was a link\n"),
            Symlink(path="rp/f2l", target="d2f"),
            Symlink(path="rp/d2l", target="../wh"),
            File(path="rp/fifo2f", data=b"was a fifo\n"),
            # The explicit form of a type change: whiteout plus new entry, same layer.
            Whiteout("rp/wd2f"),
            File(path="rp/wd2f", data=b"was a dir, explicitly\n"),
        ],
        [
            File(path="rp/f2d", data=b"file again\n", mtime=T2),
            Dir(path="rp/d2f", mode=0o755, mtime=T2 + 1),
            File(path="rp/d2f/new", data=b"new\n"),
            Symlink(path="rp/l2f", target="d2f/new"),
        ],
    ]


def _hardlinks() -> Layers:
    return [
        [
            Dir(path="hl", mtime=T0 + 20),
            File(path="hl/a", data=b"shared by a, b, sub/c\n", mode=0o4755, uid=1000, gid=1000),
            Hardlink(path="hl/b", target="hl/a"),
            Dir(path="hl/sub"),
            Hardlink(path="hl/sub/c", target="hl/b"),  # a link to a link: same inode
            Dir(path="hl/grp"),
            File(path="hl/grp/x", data=b"x and y\n"),
            Hardlink(path="hl/grp/y", target="hl/grp/x"),
            Hardlink(path="hl/grp/z", target="hl/grp/x"),
            Symlink(path="hl/sym", target="a"),
            Hardlink(path="hl/sym-link", target="hl/sym"),
            Fifo(path="hl/fifo"),
            Hardlink(path="hl/fifo-link", target="hl/fifo"),
            File(path="hl/big", data=Random(MiB + 1, seed=11)),
            Hardlink(path="hl/big-link", target="hl/big"),
        ],
        [
            # Replacing one member splits it off; the others keep sharing an inode.
            File(path="hl/grp/y", data=b"y on its own\n"),
            Whiteout("hl/grp/z"),
            # A link to a file of a lower layer.
            Hardlink(path="hl/cross", target="hl/big"),
        ],
    ]


def _symlinks() -> Layers:
    return [
        [
            Dir(path="sl", mtime=T0 + 30),
            Dir(path="sl/sub"),
            File(path="sl/sub/file", data=b"target\n"),
            Symlink(path="sl/abs", target="/etc/passwd"),
            Symlink(path="sl/abs-dir", target="/sl/sub"),
            Symlink(path="sl/rel", target="sub/file"),
            Symlink(path="sl/rel-up", target="../hl/a"),
            Symlink(path="sl/dir", target="sub"),
            Symlink(path="sl/dangling", target="does/not/exist"),
            Symlink(path="sl/self", target="self"),
            Symlink(path="sl/escape", target="../../../../.."),
            Symlink(path="sl/long", target="/".join(["x" * 50] * 8)),  # PAX linkpath
            Symlink(path="sl/ünï", target="ünïcødé-target"),
            Symlink(path="sl/owned", target="sub", uid=1000, gid=1000, mtime="1600000000.25"),
        ],
    ]


def _devices() -> Layers:
    return [
        [
            Dir(path="dev", mtime=T0 + 40),
            CharDev(path="dev/null", major=1, minor=3),
            CharDev(path="dev/console", major=5, minor=1, mode=0o600),
            BlockDev(path="dev/sda1", major=8, minor=1),
            BlockDev(path="dev/bigminor", major=259, minor=1048575),  # largest Linux minor
            Fifo(path="dev/fifo", mode=0o600, uid=1000, gid=1000),
        ],
    ]


def _modes() -> Layers:
    return [
        [
            Dir(path="md", mtime=T0 + 50),
            File(path="md/setuid", data=b"#!/bin/true\n", mode=0o4755),
            File(path="md/setuid-user", data=b"u\n", mode=0o4750, uid=1000, gid=1000),
            File(path="md/setgid", data=b"g\n", mode=0o2755, gid=1000),
            File(path="md/all-bits", data=b"7777\n", mode=0o7777),
            File(path="md/no-perms", data=b"0000\n", mode=0o000),
            File(path="md/nobody", data=b"nobody\n", uid=65534, gid=65534),
            File(path="md/uid-ne-gid", data=b"1000:2000\n", uid=1000, gid=2000),
            File(path="md/huge-ids", data=b"PAX uid/gid\n", uid=4_000_000, gid=3_000_000),
            File(path="md/named", data=b"names are not ids\n", uid=1000, gid=1000,
                 uname="someone", gname="somegroup"),
            Dir(path="md/private", mode=0o700, uid=1000, gid=1000),
            File(path="md/private/secret", data=b"s\n", mode=0o600, uid=1000, gid=1000),
            Dir(path="md/tmp", mode=0o1777),
            Dir(path="md/shared", mode=0o2775, gid=1000),
            Dir(path="md/locked", mode=0o000),
        ],
        [
            # An upper entry for an existing dir replaces its mode, owner and mtime.
            Dir(path="md/shared", mode=0o3770, uid=65534, gid=1000, mtime=T1 + 50),
        ],
    ]


def _xattrs() -> Layers:
    return [
        [
            Dir(path="xa", mtime=T0 + 60, xattrs={"user.dir": b"on a directory"}),
            File(path="xa/plain", data=b"x\n", xattrs={"user.comment": "hello"}),
            File(path="xa/many", data=b"x\n", xattrs={
                "user.a": b"1",
                "user.binary": bytes(range(256)),  # NULs and non-UTF-8 bytes
                "user.long": b"L" * 3000,
                "user.ünï": "välüé",
                # An empty PAX value means "unset" (POSIX); umoci drops it, so must we.
                "user.empty": b"",
            }),
            File(path="xa/cap", data=b"\x7fELF", mode=0o755,
                 xattrs={"security.capability": CAP_NET_BIND_SERVICE}),
            File(path="xa/linked", data=b"x\n", xattrs={"user.linked": b"yes"}),
            Hardlink(path="xa/linked2", target="xa/linked"),
        ],
        [
            File(path="xa/plain", data=b"x\n", xattrs={"user.changed": b"upper layer"}),
        ],
    ]


def _sizes() -> Layers:
    big = Random(BIG_SIZE, seed=BIG_SEED)
    return [
        [
            Dir(path="sz", mtime=T0 + 70),
            File(path="sz/empty"),
            File(path="sz/one-byte", data=b"1"),
            File(path="sz/chunk", data=Random(MiB, seed=1)),
            File(path="sz/chunk-plus-one", data=Random(MiB + 1, seed=2)),
            File(path="sz/chunk-minus-one", data=Random(MiB - 1, seed=3)),
            File(path="sz/sparse", data=Concat(Zeros(MiB + MiB // 2), Random(4096, seed=4),
                                              Zeros(MiB + MiB // 2 - 4096))),
            File(path="sz/zeros", data=Zeros(2 * MiB)),
            # Two identical 1 MiB halves: chunks deduplicate within one file.
            File(path="sz/twice", data=Concat(Random(MiB, seed=5), Random(MiB, seed=5))),
            File(path="sz/big", data=big),
        ],
        [
            # The same big file again, under a new name and rewritten at the old one.
            File(path="sz/big-copy", data=big),
            File(path="sz/big", data=big, mtime=T1 + 70),
            File(path="sz/empty", data=b"no longer empty\n"),
        ],
    ]


def _names() -> Layers:
    deep = [f"nm/deep/{'/'.join(f'd{i:02d}' for i in range(1, k + 1))}" for k in range(1, 41)]
    return [
        [
            Dir(path="nm", mtime=T0 + 80),
            File(path="nm/ünïcødé.txt", data=b"u\n"),
            Dir(path="nm/日本語"),
            File(path="nm/日本語/ファイル", data=b"j\n"),
            File(path="nm/🐳", data=b"whale\n"),
            File(path="nm/" + "n" * 200, data=b"200 ascii\n"),
            File(path="nm/" + "é" * 120, data=b"240 bytes of UTF-8\n"),
            File(path="nm/with space", data=b"s\n"),
            File(path="nm/tab\there", data=b"t\n"),
            File(path="nm/new\nline", data=b"n\n"),
            File(path="nm/back\\slash", data=b"b\n"),
            File(path="nm/-rf", data=b"dash\n"),
            File(path="nm/...", data=b"dots\n"),
            File(path="nm/.hidden", data=b"h\n"),
            File(path="nm/.whatever", data=b"looks like, is not, a whiteout\n"),
            File(path="nm/.wh", data=b"neither is this\n"),
            Dir(path="nm/deep"),
            *(Dir(path=p) for p in deep),
            File(path=f"{deep[-1]}/leaf", data=b"40 levels down\n"),
        ],
    ]


def _many_files() -> Layers:
    return [
        [
            Dir(path="mn", mtime=T0 + 90),
            Dir(path="mn/many"),
            *(File(path=f"mn/many/f{i:04d}", data=f"small file {i}\n".encode())
              for i in range(3000)),
        ],
    ]


def _mtimes() -> Layers:
    return [
        [
            Dir(path="mt", mtime="1700000000.987654321"),
            File(path="mt/half", mtime=1_600_000_000.5),
            File(path="mt/ns", mtime="1600000000.123456789"),
            File(path="mt/one-ns", mtime="1600000000.000000001"),
            File(path="mt/epoch", mtime=0),
            File(path="mt/pre-1970", mtime="-1.5"),
            File(path="mt/year-2255", mtime=9_000_000_000),  # beyond ustar's 11 octal digits
            Symlink(path="mt/link", target="half", mtime="1500000000.000000500"),
            Dir(path="mt/sub", mtime="1400000000.75"),
            File(path="mt/sub/file", mtime=T0),
        ],
        [
            # Adding to a lower dir without an entry for it leaves the dir's mtime alone.
            File(path="mt/sub/added", mtime=T1),
        ],
    ]


FOCUSED: dict[str, Callable[[], Layers]] = {
    "whiteouts": _whiteouts,
    "replacements": _replacements,
    "hardlinks": _hardlinks,
    "symlinks": _symlinks,
    "devices": _devices,
    "modes": _modes,
    "xattrs": _xattrs,
    "sizes": _sizes,
    "names": _names,
    "many_files": _many_files,
    "mtimes": _mtimes,
}
# The top-level directory each focused image keeps to (its first entry).
PREFIX = {
    "whiteouts": "wh", "replacements": "rp", "hardlinks": "hl", "symlinks": "sl",
    "devices": "dev", "modes": "md", "xattrs": "xa", "sizes": "sz", "names": "nm",
    "many_files": "mn", "mtimes": "mt",
}


def image(name: str) -> Layers:
    """The focused image `name` (a key of FOCUSED) or "everything"."""
    if name == "everything":
        return everything()
    return _with_root(FOCUSED[name]())


def merge(images: Sequence[Layers]) -> Layers:
    """Layer i of the result is layer i of every image, concatenated."""
    depth = max(len(im) for im in images)
    return [[e for im in images if i < len(im) for e in im[i]] for i in range(depth)]


def everything() -> Layers:
    return _with_root(merge([fn() for fn in FOCUSED.values()]))


ALL_IMAGES = (*FOCUSED, "everything")


def write_corpus(
    root: str | os.PathLike[str],
    names: Iterable[str] = ALL_IMAGES,
    compression: Compression = "gzip",
    shuffle_seed: int | None = None,
) -> dict[str, ImageInfo]:
    """One OCI layout per image at ROOT/NAME, tagged "latest"."""
    return {name: write_oci_layout(Path(root) / name, image(name), compression=compression,
                                   shuffle_seed=shuffle_seed)
            for name in names}
