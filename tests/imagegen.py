"""Build OCI image layouts and docker-save archives from Python descriptions.

A test describes an image as a list of layers, each a list of `Entry` objects, and gets
a real OCI image layout (or `docker save` archive) on disk. Every tar header field that
matters is under the test's control: paths are written verbatim (so "bad" paths such as
`../x` or `/etc/x` can be produced), modes keep setuid/setgid/sticky bits, mtimes carry
nanoseconds through PAX records, and xattrs go in `SCHILY.xattr.*` PAX records, which is
what Go's archive/tar (umoci, skopeo, containerd) reads.

Everything is deterministic: the same description gives byte-identical blobs, so digests
can be compared across runs and tests can reason about reproducibility.

Helpers at the end build the malformed inputs the converter must reject (truncated or
corrupt gzip, a blob whose bytes do not match its digest, entries escaping the root, a
hard link to nothing); `write_bad_layout(path, kind)` writes one of them by name.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import ClassVar, Literal

import zstandard

# Kept as literals rather than imported from naiad.oci.mediatypes so that the oracle
# does not break (or silently follow) if the code under test changes a constant.
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
REF_NAME = "org.opencontainers.image.ref.name"

Compression = Literal["gzip", "zstd", "none"]
LAYER_MEDIA_TYPES: dict[str, str] = {
    "gzip": OCI_LAYER_GZIP,
    "zstd": OCI_LAYER_ZSTD,
    "none": OCI_LAYER,
}

# A fixed, whole-second default so that images are reproducible and so that tests that
# do not care about time never trip over sub-second handling.
DEFAULT_MTIME = 1_700_000_000
WHITEOUT_PREFIX = ".wh."
OPAQUE_NAME = ".wh..wh..opq"
MiB = 1 << 20

# --------------------------------------------------------------------------------------
# File contents: streamed, so a test can describe a large file without holding it twice.
# --------------------------------------------------------------------------------------


class Content:
    """Bytes of a regular file, produced in pieces. Subclasses are deterministic."""

    size: int

    def chunks(self) -> Iterator[bytes]:
        raise NotImplementedError

    def read_all(self) -> bytes:
        return b"".join(self.chunks())

    def sha256(self) -> str:
        h = hashlib.sha256()
        for c in self.chunks():
            h.update(c)
        return h.hexdigest()


@dataclass(frozen=True)
class Bytes(Content):
    data: bytes

    @property
    def size(self) -> int:  # type: ignore[override]
        return len(self.data)

    def chunks(self) -> Iterator[bytes]:
        yield self.data


@dataclass(frozen=True)
class Random(Content):
    """`size` pseudo-random (incompressible) bytes determined by `seed`."""

    size: int
    seed: int = 0

    def chunks(self) -> Iterator[bytes]:
        rng = random.Random(self.seed)
        left = self.size
        while left:
            n = min(left, 1 << 16)
            yield rng.randbytes(n)
            left -= n


@dataclass(frozen=True)
class Zeros(Content):
    size: int

    def chunks(self) -> Iterator[bytes]:
        block = bytes(1 << 16)
        left = self.size
        while left:
            n = min(left, len(block))
            yield block if n == len(block) else block[:n]
            left -= n


@dataclass(frozen=True)
class Concat(Content):
    parts: tuple[Content, ...]

    def __init__(self, *parts: Content | bytes) -> None:
        object.__setattr__(
            self, "parts", tuple(Bytes(p) if isinstance(p, bytes) else p for p in parts)
        )

    @property
    def size(self) -> int:  # type: ignore[override]
        return sum(p.size for p in self.parts)

    def chunks(self) -> Iterator[bytes]:
        for p in self.parts:
            yield from p.chunks()


class _ContentReader(io.RawIOBase):
    """File-like view of a Content, for tarfile.addfile()."""

    def __init__(self, content: Content) -> None:
        self._it = content.chunks()
        self._buf = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            nxt = next(self._it, None)
            if nxt is None:
                break
            self._buf += nxt
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out


# --------------------------------------------------------------------------------------
# Tar entries
# --------------------------------------------------------------------------------------

Mtime = int | float | str | Decimal


def mtime_to_ns(mtime: Mtime) -> int:
    """Exact nanoseconds for an mtime given as seconds (int, float, decimal string).

    Floats go through their shortest repr so that 1.1 means 1.100000000 s and not the
    binary neighbour 1.0999999999999999 s.
    """
    d = Decimal(repr(mtime)) if isinstance(mtime, float) else Decimal(mtime)
    return int((d * 1_000_000_000).to_integral_value(rounding="ROUND_FLOOR"))


def _pax_time(ns: int) -> str:
    sec, frac = divmod(ns, 1_000_000_000)
    if frac == 0:
        return str(sec)
    # PAX times are decimal seconds; a negative time is written as -S.F meaning
    # -(S.F), so convert from the floor-division form for pre-1970 stamps.
    if ns < 0:
        sec, frac = divmod(-ns, 1_000_000_000)
        return f"-{sec}.{frac:09d}".rstrip("0")
    return f"{sec}.{frac:09d}".rstrip("0")


@dataclass(kw_only=True)
class Entry:
    """One tar member. `path` is written to the tar exactly as given (see make_layer_tar)."""

    path: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime: Mtime = DEFAULT_MTIME
    # Values are bytes (binary-safe, e.g. security.capability) or str (UTF-8).
    xattrs: Mapping[str, bytes | str] = field(default_factory=dict)
    # Extra raw PAX records, for tests that want headers imagegen does not model.
    pax: Mapping[str, str] = field(default_factory=dict)

    tar_type: ClassVar[bytes] = tarfile.REGTYPE

    @property
    def mtime_ns(self) -> int:
        return mtime_to_ns(self.mtime)

    def content(self) -> Content | None:
        return None

    def _fill(self, ti: tarfile.TarInfo) -> None:
        """Type-specific TarInfo fields."""

    def tarinfo(self, name: str) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = self.tar_type
        ti.mode = self.mode
        ti.uid, ti.gid = self.uid, self.gid
        ti.uname, ti.gname = self.uname, self.gname
        ns = self.mtime_ns
        # ustar holds whole non-negative seconds; anything else goes in a PAX record,
        # written by hand because tarfile would format a float with only ~µs precision.
        sec = ns // 1_000_000_000
        pax: dict[str, str] = {}
        if ns % 1_000_000_000 or not 0 <= sec < 8**11:
            pax["mtime"] = _pax_time(ns)
            ti.mtime = min(max(sec, 0), 8**11 - 1)
        else:
            ti.mtime = sec
        for key in sorted(self.xattrs):
            val = self.xattrs[key]
            if isinstance(val, bytes):
                # tarfile re-encodes PAX values with surrogateescape in binary mode, which
                # restores exactly these bytes even when they are not valid UTF-8.
                val = val.decode("utf-8", "surrogateescape")
            pax["SCHILY.xattr." + key] = val
        pax.update(self.pax)
        ti.pax_headers = pax
        self._fill(ti)
        return ti


@dataclass(kw_only=True)
class File(Entry):
    """A regular file. `data` is bytes or a Content (Random, Zeros, Concat...)."""

    data: bytes | Content = b""

    def content(self) -> Content:
        return Bytes(self.data) if isinstance(self.data, bytes) else self.data

    def _fill(self, ti: tarfile.TarInfo) -> None:
        ti.size = self.content().size


@dataclass(kw_only=True)
class Dir(Entry):
    mode: int = 0o755
    tar_type: ClassVar[bytes] = tarfile.DIRTYPE


@dataclass(kw_only=True)
class Symlink(Entry):
    target: str
    mode: int = 0o777
    tar_type: ClassVar[bytes] = tarfile.SYMTYPE

    def _fill(self, ti: tarfile.TarInfo) -> None:
        ti.linkname = self.target


@dataclass(kw_only=True)
class Hardlink(Entry):
    """A hard link to `target`, a path as it appears in the tar (same conventions)."""

    target: str
    tar_type: ClassVar[bytes] = tarfile.LNKTYPE

    def _fill(self, ti: tarfile.TarInfo) -> None:
        ti.linkname = self.target


@dataclass(kw_only=True)
class CharDev(Entry):
    major: int
    minor: int
    mode: int = 0o666
    tar_type: ClassVar[bytes] = tarfile.CHRTYPE

    def _fill(self, ti: tarfile.TarInfo) -> None:
        ti.devmajor, ti.devminor = self.major, self.minor


@dataclass(kw_only=True)
class BlockDev(CharDev):
    mode: int = 0o660
    tar_type: ClassVar[bytes] = tarfile.BLKTYPE


@dataclass(kw_only=True)
class Fifo(Entry):
    tar_type: ClassVar[bytes] = tarfile.FIFOTYPE


def Whiteout(path: str, **kw: object) -> File:
    """Delete `path` (from lower layers): an empty file named DIR/.wh.NAME."""
    head, _, name = path.rstrip("/").rpartition("/")
    return File(path=f"{head}/{WHITEOUT_PREFIX}{name}" if head else WHITEOUT_PREFIX + name,
                **kw)  # type: ignore[arg-type]


def Opaque(dir_path: str, **kw: object) -> File:
    """Hide everything lower layers put in `dir_path`: DIR/.wh..wh..opq."""
    d = dir_path.rstrip("/")
    return File(path=f"{d}/{OPAQUE_NAME}" if d else OPAQUE_NAME, **kw)  # type: ignore[arg-type]


def with_prefix(entries: Iterable[Entry], prefix: str) -> list[Entry]:
    """Copies of `entries` with `prefix` + "/" in front of every path and hard-link target."""
    out: list[Entry] = []
    for e in entries:
        changes: dict[str, object] = {"path": f"{prefix}/{e.path}"}
        if isinstance(e, Hardlink):
            changes["target"] = f"{prefix}/{e.target}"
        out.append(dataclasses.replace(e, **changes))  # type: ignore[arg-type]
    return out


def implicit_dirs(layers: Sequence[Sequence[Entry]]) -> set[str]:
    """Directories ("/"-rooted, as treecmp keys them) that the image implies but never
    describes: umoci creates them with the time of unpacking as mtime, so comparisons
    must skip their mtimes. "/" is included when no layer has a "./" entry."""
    described = {"/" + _norm(e.path) if _norm(e.path) not in ("", ".") else "/"
                 for layer in layers for e in layer if isinstance(e, Dir)}
    implied = {"/"}
    for layer in layers:
        for e in layer:
            parts = _norm(e.path).split("/")[:-1]
            implied.update("/" + "/".join(parts[:k]) for k in range(1, len(parts) + 1))
    return implied - described


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


def _norm(path: str) -> str:
    return path.strip("/").removeprefix("./")


def valid_shuffle(entries: Sequence[Entry], seed: int) -> list[int]:
    """A seeded permutation of `entries` that is still the same layer.

    Two orders are kept because a tar reader cannot do without them: an entry comes
    after the entries of its ancestor directories in the same layer (umoci fails on
    `r/x` before the `r/` that replaces a lower-layer *file* r), and a hard link comes
    after its target. Everything else, whiteouts and opaque markers included, moves.
    """
    paths = [_norm(e.path) for e in entries]
    first_index = {}
    for i, p in enumerate(paths):
        first_index.setdefault(p, i)
    deps: list[list[str]] = []
    for e, p in zip(entries, paths, strict=True):
        d = []
        parts = p.split("/")
        for k in range(1, len(parts)):
            anc = "/".join(parts[:k])
            if anc in first_index:
                d.append(anc)
        if isinstance(e, Hardlink) and _norm(e.target) in first_index:
            d.append(_norm(e.target))
        deps.append(d)

    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    result: list[int] = []
    placed: set[str] = set()
    waiting: dict[str, list[int]] = {}

    def offer(i: int) -> None:
        missing = next((d for d in deps[i] if d not in placed), None)
        if missing is not None:
            waiting.setdefault(missing, []).append(i)
            return
        result.append(i)
        if paths[i] not in placed:
            placed.add(paths[i])
            for j in waiting.pop(paths[i], []):
                offer(j)

    for i in order:
        offer(i)
    if len(result) != len(entries):
        raise ValueError("entries have circular dependencies (hard link loop?)")
    return result


def make_layer_tar(
    entries: Sequence[Entry],
    order: Sequence[int] | None = None,
    prefix: str = "",
) -> bytes:
    """An uncompressed PAX tar of `entries` (in `order`, a permutation of indices).

    Paths are written as given after `prefix` (e.g. "./" for the style `tar -C dir .`
    produces); directories get the trailing "/" tarfile always adds.
    """
    buf = io.BytesIO()
    idx = range(len(entries)) if order is None else order
    if sorted(idx) != list(range(len(entries))):
        raise ValueError("order must be a permutation of the entry indices")
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8") as tf:
        for i in idx:
            e = entries[i]
            # The root entry is always "./": "././" or "/" would test path cleaning,
            # which is the business of the bad-input helpers, not of prefix=.
            ti = e.tarinfo("./" if e.path in (".", "./") else prefix + e.path)
            if isinstance(e, Hardlink) and prefix:
                ti.linkname = prefix + e.target
            content = e.content()
            tf.addfile(ti, _ContentReader(content) if content is not None else None)
    return buf.getvalue()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        out = io.BytesIO()
        # mtime=0 and no file name keep the gzip header (and so the digest) stable.
        with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="",
                           compresslevel=6) as gz:
            gz.write(data)
        return out.getvalue()
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


@dataclass
class LayerBlob:
    """A layer as it goes into a layout: stored bytes plus what manifest/config claim."""

    data: bytes
    media_type: str
    diff_id: str
    digest: str | None = None  # what the manifest says; default: sha256 of `data`
    size: int | None = None  # what the manifest says; default: len(data)

    @property
    def claimed_digest(self) -> str:
        return self.digest or sha256_digest(self.data)

    @property
    def claimed_size(self) -> int:
        return len(self.data) if self.size is None else self.size


def encode_layer(tar: bytes, compression: Compression = "gzip") -> LayerBlob:
    return LayerBlob(compress(tar, compression), LAYER_MEDIA_TYPES[compression],
                     sha256_digest(tar))


# --------------------------------------------------------------------------------------
# Image config, OCI layout, docker archive
# --------------------------------------------------------------------------------------


@dataclass
class ImageInfo:
    """What was written; digests are "sha256:..." strings."""

    path: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layer_digests: list[str]
    diff_ids: list[str]
    manifest: dict
    config: dict

    @property
    def ref(self) -> str:
        """skopeo/umoci style reference, e.g. "oci:/tmp/x:latest"."""
        return f"oci:{self.path}:{self.tag}"


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(
            out.get(k), dict) else v
    return out


def make_config(diff_ids: Sequence[str], overrides: Mapping | None = None) -> dict:
    created = "2023-11-14T22:13:20Z"  # DEFAULT_MTIME, fixed for reproducibility
    cfg = {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "NAIAD_TEST=1"],
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo hello"],
            "WorkingDir": "/",
            "Labels": {"org.example.generator": "naiad-tests-imagegen"},
        },
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": created, "created_by": f"imagegen layer {i}"}
                    for i in range(len(diff_ids))],
    }
    return _deep_merge(cfg, overrides or {})


def _canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _write_blob(layout: Path, data: bytes, digest: str | None = None) -> str:
    digest = digest or sha256_digest(data)
    algo, hexd = digest.split(":", 1)
    p = layout / "blobs" / algo / hexd
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return digest


def write_oci_layout_blobs(
    path: str | os.PathLike[str],
    blobs: Sequence[LayerBlob],
    tag: str = "latest",
    config_overrides: Mapping | None = None,
    manifest_annotations: Mapping[str, str] | None = None,
) -> ImageInfo:
    """Write an image from ready-made layer blobs (the low-level form, used for bad inputs).

    An existing layout at `path` is extended: other tags are kept, `tag` is replaced.
    """
    layout = Path(path)
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    for b in blobs:
        _write_blob(layout, b.data, b.claimed_digest)
    config = make_config([b.diff_id for b in blobs], config_overrides)
    config_bytes = _canonical_json(config)
    config_digest = _write_blob(layout, config_bytes)
    manifest: dict = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest,
                   "size": len(config_bytes)},
        "layers": [{"mediaType": b.media_type, "digest": b.claimed_digest,
                    "size": b.claimed_size} for b in blobs],
    }
    if manifest_annotations:
        manifest["annotations"] = dict(manifest_annotations)
    manifest_bytes = _canonical_json(manifest)
    manifest_digest = _write_blob(layout, manifest_bytes)
    index_path = layout / "index.json"
    index = (json.loads(index_path.read_text()) if index_path.exists()
             else {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get(REF_NAME) != tag]
    index["manifests"].append({
        "mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest_bytes),
        "annotations": {REF_NAME: tag},
        "platform": {"architecture": config["architecture"], "os": config["os"]},
    })
    index_path.write_bytes(_canonical_json(index))
    return ImageInfo(layout, tag, manifest_digest, config_digest,
                     [b.claimed_digest for b in blobs], [b.diff_id for b in blobs],
                     manifest, config)


def layer_tars(layers: Sequence[Sequence[Entry]], shuffle_seed: int | None = None,
               prefix: str = "") -> list[bytes]:
    """Uncompressed tars of `layers`, entry order shuffled per layer when a seed is given."""
    tars = []
    for n, entries in enumerate(layers):
        order = None if shuffle_seed is None else valid_shuffle(entries, shuffle_seed * 1000 + n)
        tars.append(make_layer_tar(entries, order, prefix))
    return tars


def write_oci_layout(
    path: str | os.PathLike[str],
    layers: Sequence[Sequence[Entry]],
    tag: str = "latest",
    config_overrides: Mapping | None = None,
    compression: Compression = "gzip",
    shuffle_seed: int | None = None,
    prefix: str = "",
) -> ImageInfo:
    """Write `layers` (lowest first) as an OCI image layout; returns digests and documents."""
    blobs = [encode_layer(t, compression) for t in layer_tars(layers, shuffle_seed, prefix)]
    return write_oci_layout_blobs(path, blobs, tag, config_overrides)


def write_multiplatform_layout(
    path: str | os.PathLike[str],
    images: Mapping[tuple[str, str], Sequence[Sequence[Entry]]],
    tag: str = "latest",
    compression: Compression = "gzip",
) -> str:
    """A tag pointing at an image index with one manifest per (os, architecture).

    Returns the digest of the nested index. Each platform's image differs in config and,
    through a marker file /platform, in content, so picking the wrong one is visible.
    """
    layout = Path(path)
    descs = []
    for (os_, arch), layers in images.items():
        marked = [*layers[:-1], [*layers[-1], File(path="platform",
                                                   data=f"{os_}/{arch}\n".encode())]]
        info = write_oci_layout(layout, marked, tag=f"{tag}-{os_}-{arch}",
                                config_overrides={"os": os_, "architecture": arch},
                                compression=compression)
        mbytes = _canonical_json(info.manifest)
        descs.append({"mediaType": OCI_MANIFEST, "digest": info.manifest_digest,
                      "size": len(mbytes), "platform": {"architecture": arch, "os": os_}})
    nested = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descs}
    nbytes = _canonical_json(nested)
    ndigest = _write_blob(layout, nbytes)
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get(REF_NAME) != tag]
    index["manifests"].append({"mediaType": OCI_INDEX, "digest": ndigest, "size": len(nbytes),
                               "annotations": {REF_NAME: tag}})
    index_path.write_bytes(_canonical_json(index))
    return ndigest


def _tar_add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = 0o644
    ti.mtime = 0
    tf.addfile(ti, io.BytesIO(data))


def write_docker_archive(
    path: str | os.PathLike[str],
    layers: Sequence[Sequence[Entry]],
    repo_tag: str = "naiad-test/image:latest",
    config_overrides: Mapping | None = None,
    shuffle_seed: int | None = None,
) -> ImageInfo:
    """Write a `docker save`-style tar (legacy layout: manifest.json + per-layer dirs).

    The returned ImageInfo has `path` = the archive, manifest_digest = "" (a docker
    archive has no registry manifest) and layer_digests = diff_ids (layers are stored
    uncompressed).
    """
    tars = layer_tars(layers, shuffle_seed)
    diff_ids = [sha256_digest(t) for t in tars]
    config = make_config(diff_ids, config_overrides)
    config_bytes = _canonical_json(config)
    config_hex = hashlib.sha256(config_bytes).hexdigest()
    buf = io.BytesIO()
    layer_names = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        parent = ""
        for t, diff_id in zip(tars, diff_ids, strict=True):
            # Legacy v1 ids are chained so that equal layers at different depths differ.
            v1 = hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()
            ti = tarfile.TarInfo(v1)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
            tf.addfile(ti)
            _tar_add_bytes(tf, f"{v1}/VERSION", b"1.0")
            v1json = {"id": v1, "created": config["created"], "os": "linux"}
            if parent:
                v1json["parent"] = parent
            _tar_add_bytes(tf, f"{v1}/json", _canonical_json(v1json))
            _tar_add_bytes(tf, f"{v1}/layer.tar", t)
            layer_names.append(f"{v1}/layer.tar")
            parent = v1
        _tar_add_bytes(tf, f"{config_hex}.json", config_bytes)
        manifest = [{"Config": f"{config_hex}.json", "RepoTags": [repo_tag],
                     "Layers": layer_names}]
        _tar_add_bytes(tf, "manifest.json", _canonical_json(manifest))
        repo, _, tag = repo_tag.rpartition(":")
        _tar_add_bytes(tf, "repositories", _canonical_json({repo: {tag: parent}}))
    Path(path).write_bytes(buf.getvalue())
    return ImageInfo(Path(path), tag, "", "sha256:" + config_hex, diff_ids, diff_ids,
                     {"docker": manifest}, config)


# --------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------

SIMPLE_LAYER: list[Entry] = [
    Dir(path="etc"),
    File(path="etc/hostname", data=b"naiad\n"),
    File(path="big", data=Random(256 * 1024, seed=7)),
]


def truncated_gzip_layer(entries: Sequence[Entry] = SIMPLE_LAYER) -> LayerBlob:
    """A gzip layer cut in half; the manifest digest is of the cut bytes (so only
    decompression can notice), the config diff_id is of the full tar."""
    tar = make_layer_tar(entries)
    gz = compress(tar, "gzip")
    return LayerBlob(gz[: len(gz) // 2], OCI_LAYER_GZIP, sha256_digest(tar))


def corrupt_gzip_layer(entries: Sequence[Entry] = SIMPLE_LAYER) -> LayerBlob:
    """A gzip layer with bytes garbled inside the deflate stream (digest matches them)."""
    tar = make_layer_tar(entries)
    gz = bytearray(compress(tar, "gzip"))
    mid = len(gz) // 2
    for i in range(mid, mid + 64):
        gz[i] ^= 0xA5
    return LayerBlob(bytes(gz), OCI_LAYER_GZIP, sha256_digest(tar))


def truncated_tar_layer(entries: Sequence[Entry] = SIMPLE_LAYER) -> LayerBlob:
    """A well-formed gzip stream whose tar ends in the middle of a file's data."""
    tar = make_layer_tar(entries)
    cut = tar[: len(tar) // 2 + 100]
    return LayerBlob(compress(cut, "gzip"), OCI_LAYER_GZIP, sha256_digest(cut))


def not_a_tar_layer() -> LayerBlob:
    """Valid gzip of bytes that are no tar at all."""
    junk = Random(10_000, seed=99).read_all()
    return LayerBlob(compress(junk, "gzip"), OCI_LAYER_GZIP, sha256_digest(junk))


def digest_mismatch_layer(entries: Sequence[Entry] = SIMPLE_LAYER) -> LayerBlob:
    """The manifest names the digest of `entries`' layer, but the blob stored under that
    name is another valid layer (its size is declared correctly, so only hashing tells)."""
    good = encode_layer(make_layer_tar(entries))
    other = encode_layer(make_layer_tar([*entries, File(path="intruder", data=b"evil\n")]))
    return LayerBlob(other.data, OCI_LAYER_GZIP, good.diff_id, digest=good.claimed_digest)


def dotdot_entries() -> list[Entry]:
    return [Dir(path="etc"), File(path="../naiad-escape", data=b"escaped\n")]


def nested_dotdot_entries() -> list[Entry]:
    return [Dir(path="etc"), File(path="etc/../../naiad-escape", data=b"escaped\n")]


def absolute_path_entries() -> list[Entry]:
    return [File(path="/etc/naiad-escape", data=b"escaped\n")]


def symlink_escape_entries(target: str = "/etc") -> list[Entry]:
    """`a -> target` followed by `a/passwd`: writing it naively writes through the link."""
    return [Symlink(path="a", target=target), File(path="a/passwd", data=b"root::0:0::/:\n")]


def missing_hardlink_entries() -> list[Entry]:
    return [File(path="present", data=b"x"), Hardlink(path="link", target="does/not/exist")]


BAD_KINDS = (
    "truncated-gzip", "corrupt-gzip", "truncated-tar", "not-a-tar", "digest-mismatch",
    "dotdot", "nested-dotdot", "absolute", "symlink-abs", "symlink-dotdot",
    "symlink-lower-layer", "missing-hardlink",
)


def write_bad_layout(path: str | os.PathLike[str], kind: str, tag: str = "latest") -> ImageInfo:
    """Write the malformed image `kind` (one of BAD_KINDS) as an OCI layout.

    Blob-level defects sit in the second layer so that a converter has already started
    writing when it meets them (which is what "nothing half-written" tests need).
    """
    base = encode_layer(make_layer_tar([Dir(path="etc"), File(path="etc/os-release",
                                                               data=b"ID=naiad\n")]))
    blob_kinds = {
        "truncated-gzip": truncated_gzip_layer, "corrupt-gzip": corrupt_gzip_layer,
        "truncated-tar": truncated_tar_layer, "not-a-tar": not_a_tar_layer,
        "digest-mismatch": digest_mismatch_layer,
    }
    entry_kinds = {
        "dotdot": dotdot_entries, "nested-dotdot": nested_dotdot_entries,
        "absolute": absolute_path_entries, "symlink-abs": symlink_escape_entries,
        "symlink-dotdot": lambda: symlink_escape_entries(".."),
        "missing-hardlink": missing_hardlink_entries,
    }
    if kind in blob_kinds:
        return write_oci_layout_blobs(path, [base, blob_kinds[kind]()], tag)
    if kind in entry_kinds:
        return write_oci_layout_blobs(
            path, [base, encode_layer(make_layer_tar(entry_kinds[kind]()))], tag)
    if kind == "symlink-lower-layer":
        # The link is harmless on its own; the next layer writes through it.
        lower = encode_layer(make_layer_tar([Symlink(path="a", target="/etc")]))
        upper = encode_layer(make_layer_tar([File(path="a/passwd", data=b"x\n")]))
        return write_oci_layout_blobs(path, [base, lower, upper], tag)
    raise ValueError(f"unknown bad kind {kind!r}; known: {', '.join(BAD_KINDS)}")
