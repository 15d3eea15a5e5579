"""Reading OCI layer tars as streams: decompression, digests, safe entry paths.

A layer is read once, front to back, never held in memory. Its digest (the
manifest's) is checked when the stream ends; callers must not commit
anything derived from a layer before `LayerReader.finish()` returns. The
uncompressed digest (the config's diff_id) is not recomputed for compressed
layers: the verified compressed bytes already fix every uncompressed byte,
and hashing a GB twice costs seconds. Gzip is decoded with ISA-L, which is
about twice as fast as zlib here.

Entry paths are normalised to relative byte strings; a path that is absolute
or climbs with `..` is rejected here. Paths that would escape through a
symlink can only be seen against the tree being built, so the tree checks
those (builder/tree.py).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import stat
import tarfile
import zlib
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from typing import BinaryIO

import zstandard
from isal import igzip, isal_zlib

from naiad.errors import InvalidLayerError
from naiad.oci.digest import HashingReader

WHITEOUT_PREFIX = b".wh."
OPAQUE_WHITEOUT = b".wh..wh..opq"

_TYPE_TO_KIND = {
    tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.CONTTYPE: "reg",
    tarfile.GNUTYPE_SPARSE: "reg", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}
KIND_TO_IFMT = {
    "reg": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO,
}


@dataclasses.dataclass(slots=True)
class LayerEntry:
    """One tar entry. `kind` is a KIND_TO_IFMT key, "hardlink", "whiteout" or "opaque".

    For a whiteout, `path` is the path it deletes; for an opaque marker, the
    directory it empties. `link` is a symlink's target as stored, or a hard
    link's normalised target path.
    """

    path: bytes
    kind: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    link: bytes = b""
    rdev: int = 0
    xattrs: dict[bytes, bytes] = dataclasses.field(default_factory=dict)


def normalise_path(name: str | bytes, what: str) -> bytes:
    """`name` as a relative path of components, or InvalidLayerError if it escapes the root."""
    raw = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
    if b"\0" in raw:
        raise InvalidLayerError(f"{what}: path {raw!r} contains a NUL byte")
    if raw.startswith(b"/") and raw.strip(b"/"):
        raise InvalidLayerError(f"{what}: absolute path {_show(raw)} escapes the root")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise InvalidLayerError(f"{what}: path {_show(raw)} escapes the root with '..'")
    return b"/".join(parts)


def _show(path: bytes) -> str:
    return repr(path.decode("utf-8", "backslashreplace"))


class _ZstdStream:
    """A read() interface over a zstd stream that may hold several frames."""

    def __init__(self, raw: BinaryIO):
        self._r = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)

    def read(self, n: int = -1) -> bytes:
        return self._r.read(n)


_DECODE_ERRORS = (
    tarfile.TarError, EOFError, zlib.error, isal_zlib.error, zstandard.ZstdError, igzip.BadGzipFile,
)


class _CountingReader:
    """Counts the bytes read through it and notes when its source has ended."""

    def __init__(self, raw: object):
        self._raw = raw
        self.count = 0
        self.ended = False

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)  # type: ignore[attr-defined]
        self.count += len(data)
        if not data and n != 0:
            self.ended = True
        return data


class _GuardedFile:
    """A member's data stream whose decoding errors become InvalidLayerError."""

    def __init__(self, raw: BinaryIO, what: str):
        self._raw, self._what = raw, what

    def read(self, n: int = -1) -> bytes:
        try:
            return self._raw.read(n)
        except _DECODE_ERRORS as e:
            raise InvalidLayerError(f"{self._what}: corrupt or truncated layer: {_reason(e)}") from None


class LayerReader:
    """Iterates the entries of one layer stream and verifies both of its digests."""

    def __init__(self, raw: BinaryIO, *, digest: str | None, size: int | None,
                 diff_id: str | None, what: str):
        self.what = what
        self._compressed = HashingReader(raw, digest, size, what)
        peek = io.BufferedReader(self._compressed, 1 << 20)
        head = peek.peek(4)[:4]
        if head[:2] == b"\x1f\x8b":
            self._tar_stream: object = igzip.GzipFile(fileobj=peek, mode="rb")  # type: ignore[arg-type]
        elif head == b"\x28\xb5\x2f\xfd":
            self._tar_stream = _ZstdStream(peek)  # type: ignore[arg-type]
        else:
            # An uncompressed layer is its own diff: both digests must agree.
            if digest and diff_id and digest != diff_id:
                raise InvalidLayerError(f"{what}: uncompressed layer's digest is not its diff_id {diff_id}")
            self._tar_stream = peek

    def entries(self) -> Iterator[tuple[LayerEntry, BinaryIO | None]]:
        """(entry, data stream for regular files) in tar order; read the stream before next()."""
        stream = _CountingReader(self._tar_stream)
        try:
            with tarfile.open(fileobj=stream, mode="r|", errors="surrogateescape") as tf:
                last: tarfile.TarInfo | None = None
                while True:
                    try:
                        info = tf.next()
                    except tarfile.ReadError:
                        # The stream stopped right after the last member's data, with neither its
                        # padding nor the end-of-archive blocks (umoci's `insert` writes such layers).
                        # Go's reader, and so containerd, accepts that; data cut short it does not.
                        if last is not None and stream.ended and stream.count >= last.offset_data + last.size:
                            break
                        raise
                    if info is None:
                        break
                    last = info
                    entry = self._entry(info)
                    data = tf.extractfile(info) if entry.kind == "reg" else None
                    yield entry, (_GuardedFile(data, self.what) if data else None)  # type: ignore[misc]
        except _DECODE_ERRORS as e:
            raise InvalidLayerError(f"{self.what}: corrupt or truncated layer: {_reason(e)}") from None

    def finish(self) -> str:
        """Read to the end (so trailers and checksums are checked) and verify the digest."""
        try:
            while self._tar_stream.read(1 << 20):  # type: ignore[attr-defined]
                pass
        except _DECODE_ERRORS as e:
            raise InvalidLayerError(f"{self.what}: corrupt or truncated layer: {_reason(e)}") from None
        return self._compressed.verify()

    def _entry(self, info: tarfile.TarInfo) -> LayerEntry:
        kind = _TYPE_TO_KIND.get(info.type)
        if kind is None:
            raise InvalidLayerError(
                f"{self.what}: unsupported tar entry type {info.type!r} for {info.name!r}"
            )
        path = normalise_path(info.name, self.what)
        entry = LayerEntry(
            path=path, kind=kind, mode=info.mode & 0o7777, uid=info.uid, gid=info.gid,
            mtime_ns=_mtime_ns(info), size=info.size if kind == "reg" else 0,
            xattrs=_xattrs(info, self.what),
        )
        if kind == "symlink":
            entry.link = info.linkname.encode("utf-8", "surrogateescape")
        elif kind == "hardlink":
            entry.link = normalise_path(info.linkname, self.what)
            if not entry.link:
                raise InvalidLayerError(f"{self.what}: hard link {_show(path)} points at the root")
        elif kind in ("char", "block"):
            entry.rdev = _makedev(info.devmajor, info.devminor)
        base = path.rsplit(b"/", 1)[-1]
        if base == OPAQUE_WHITEOUT:
            entry.kind, entry.path = "opaque", path[: -len(OPAQUE_WHITEOUT)].rstrip(b"/")
        elif base.startswith(WHITEOUT_PREFIX):
            entry.kind = "whiteout"
            entry.path = path[: len(path) - len(base)] + base[len(WHITEOUT_PREFIX):]
        return entry


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text[0].lower() + text[1:] if text else text


def _makedev(major: int, minor: int) -> int:
    # The Linux encoding of dev_t, computed here so it does not depend on the build host.
    return ((major & 0xFFFFF000) << 32) | ((major & 0xFFF) << 8) | ((minor & 0xFFFFFF00) << 12) | (
        minor & 0xFF
    )


def _mtime_ns(info: tarfile.TarInfo) -> int:
    text = info.pax_headers.get("mtime")
    if text is not None:
        try:
            return int(Decimal(text) * 1_000_000_000)
        except InvalidOperation:
            pass
    return int(info.mtime) * 1_000_000_000


def _xattrs(info: tarfile.TarInfo, what: str) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in info.pax_headers.items():
        if not value:
            continue  # POSIX pax: an empty value unsets the keyword (umoci and Go agree)
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr."):].encode("utf-8", "surrogateescape")
            out[name] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            try:
                name = _b64(key[len("LIBARCHIVE.xattr."):])
                out[name] = _b64(value)
            except ValueError:
                raise InvalidLayerError(f"{what}: malformed xattr header {key!r}") from None
    return out


def _b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
