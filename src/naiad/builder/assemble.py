"""Turning a built tree and its chunks into a naiad image in an OCI layout.

The canonical walk of the tree (builder/tree.py) fixes everything: inode
numbers, the order of chunks inside blobs, the order of rows in the
bootstrap. Each chunk is stored in the blob of the lowest source layer that
holds it, and only if the final tree still uses it, so one blob per source
layer carries that layer's new content and nothing whited out later.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import hashlib
import json
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import zstandard

from naiad.builder.chunkdict import ChunkDict
from naiad.builder.chunks import ChunkStore
from naiad.builder.hints import Hint, Process, access_hints
from naiad.builder.placement import HEADER_SIZE, placement
from naiad.builder.tree import Node, Tree
from naiad.errors import FormatError, InvalidLayerError
from naiad.format import spec
from naiad.format.bootstrap import ROOT_INO, UNCOMPRESSED_ALIGN, Bootstrap, BootstrapWriter
from naiad.format.erofs import erofs_path, write_erofs
from naiad.oci import mediatypes as mt
from naiad.oci.copy import CopyResult, copy_blob
from naiad.oci.image import Descriptor
from naiad.oci.layout import OCILayout

METADATA_ZSTD_LEVEL = 10  # the bootstrap and its EROFS view: fetched before anything else


@dataclasses.dataclass
class BuildResult:
    manifest_digest: str
    manifest: dict[str, Any]
    blobs: list[Descriptor]
    bootstrap: Descriptor
    files: int
    bytes_in: int
    dict_blobs: list[Descriptor] = dataclasses.field(default_factory=list)  # referenced, not written
    push: CopyResult | None = None  # for a registry target: what the push sent
    cached_layers: list[str] = dataclasses.field(default_factory=list)  # source layers the layer cache gave

    @property
    def new_blobs(self) -> list[Descriptor]:
        dict_digests = {d.digest for d in self.dict_blobs}
        return [d for d in self.blobs if d.digest not in dict_digests]


def assemble(
    tree: Tree,
    store: ChunkStore,
    layer_chunks: Sequence[set[bytes]],
    config: dict[str, Any],
    layout: OCILayout,
    tag: str | None,
    *,
    annotations: dict[str, str] | None = None,
    prefetch: Sequence[bytes] = (),
    progress: Callable[[int], None] | None = None,
    chunk_dict: ChunkDict | None = None,
    min_blob_use: float = 0.1,
    copy_dict_blobs: bool = False,
) -> BuildResult:
    """Write blobs, bootstrap, config and manifest into `layout`; the manifest last.

    Chunks missing from `store` are `chunk_dict` chunks; `copy_dict_blobs`
    copies the dictionary blobs used into `layout` (a layout target must hold
    every blob; a staging layout for a registry leaves them to the push).
    """
    staging = layout.staging_dir()
    inos: dict[int, int] = {id(tree.root): ROOT_INO}
    nlinks: dict[int, int] = {}
    order: list[tuple[bytes, Node, Node]] = []
    for path, parent, node in tree.walk():
        order.append((path, parent, node))
        key = id(node)
        if key not in inos:
            inos[key] = len(inos) + 1
        nlinks[key] = nlinks.get(key, 0) + 1

    blob_descs: list[Descriptor] = []
    chunk_rows: list[tuple[int, bytes, int, int, int, int, int]] = []
    chunk_ids: dict[bytes, int] = {}
    blob_rows: list[tuple[int, str, int, str]] = []
    dict_descs: list[Descriptor] = []
    if chunk_dict is not None:
        dict_descs = _reference_dict(order, store, chunk_dict, min_blob_use, blob_descs, chunk_rows,
                                     chunk_ids, blob_rows)
        if copy_dict_blobs:
            for desc in dict_descs:
                copy_blob(chunk_dict.source_of(desc.digest), layout, desc)

    # Which blob holds each chunk: the lowest layer that has it, in first-use order of the layout.
    home: dict[bytes, int] = {}
    per_blob: list[list[bytes]] = [[] for _ in layer_chunks]
    reader = _FileReader(store)
    for node in placement(order, lambda n: reader(n, 0, HEADER_SIZE)):
        for digest in node.chunks:
            if digest not in home and digest not in chunk_ids:
                layer = next(i for i, s in enumerate(layer_chunks) if digest in s)
                home[digest] = layer
                per_blob[layer].append(digest)

    for digests in per_blob:
        if not digests:
            continue
        blob_id = len(blob_descs) + 1
        path = os.path.join(staging, f"blob-{blob_id}")
        h = hashlib.sha256()
        offset = uoffset = 0
        with open(path, "wb") as f:
            for digest in digests:
                data, stored = store.read_stored(digest)
                f.write(data)
                h.update(data)
                chunk_ids[digest] = len(chunk_rows) + 1
                chunk_rows.append((len(chunk_rows) + 1, digest, blob_id, offset, stored.csize, stored.usize,
                                   uoffset))
                offset += stored.csize
                uoffset += -(-stored.usize // UNCOMPRESSED_ALIGN) * UNCOMPRESSED_ALIGN
                if progress:
                    progress(stored.usize)
        desc = Descriptor(spec.MEDIA_TYPE_BLOB, "sha256:" + h.hexdigest(), offset,
                          {spec.ANNOTATION_BLOB: str(spec.FORMAT_VERSION)})
        layout.put_blob_file(path, desc)
        blob_descs.append(desc)
        blob_rows.append((blob_id, desc.digest, desc.size, store.codec.name))

    db_path = os.path.join(staging, "bootstrap.db")
    with _disk_full_as_oserror():
        writer = BootstrapWriter(db_path, store.chunk_size)
        try:
            _write_tree(writer, tree, order, inos, nlinks, chunk_ids)
            writer.add_blobs(blob_rows)
            writer.add_chunks(chunk_rows)
            writer.set_prefetch((inos[id(n)], None) for p in prefetch if (n := _prefetch_node(tree, p)))
            writer.add_hints(_hint_rows(access_hints(tree.root, order, reader, Process.of_config(config)),
                                        inos, chunk_ids))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
    manifest_digest, manifest, bootstrap = finish_image(layout, config, blob_descs, db_path, tag,
                                                         annotations)
    files = len({id(n) for _, _, n in order if stat.S_ISREG(n.mode)})
    return BuildResult(manifest_digest, manifest, blob_descs, bootstrap, files, store.bytes_in, dict_descs)


class _FileReader:
    """Byte ranges of files this build stores (not those whose chunks a dictionary holds)."""

    def __init__(self, store: ChunkStore):
        self.store = store
        self._last: tuple[bytes, bytes] | None = None  # the chunk read last: ELF parsing rereads it
        # Files' first bytes: placement and the hints ask for every bytecode file's header, twice.
        self._headers: dict[int, bytes | None] = {}

    def __call__(self, node: Node, offset: int, size: int) -> bytes | None:
        if offset == 0 and size <= HEADER_SIZE:
            if id(node) not in self._headers:
                self._headers[id(node)] = self._read(node, 0, HEADER_SIZE)
            head = self._headers[id(node)]
            return None if head is None else head[:size]
        return self._read(node, offset, size)

    def _read(self, node: Node, offset: int, size: int) -> bytes | None:
        cs = self.store.chunk_size
        end = min(offset + size, node.size)
        parts = []
        for i in range(offset // cs, -(-end // cs)):
            parts.append(self._chunk(node.chunks[i]))
            if parts[-1] is None:
                return None
        data = b"".join(parts)  # type: ignore[arg-type]
        skip = offset - offset // cs * cs
        return data[skip: skip + end - offset]

    def _chunk(self, digest: bytes) -> bytes | None:
        if self._last is not None and self._last[0] == digest:
            return self._last[1]
        if digest not in self.store.chunks:
            return None
        data, stored = self.store.read_stored(digest)
        chunk = self.store.codec.decompress(data, stored.usize)
        self._last = (digest, chunk)
        return chunk


def _hint_rows(hints: list[Hint], inos: dict[int, int], chunk_ids: dict[bytes, int]
               ) -> list[tuple[int, int, int, int, int]]:
    """Bootstrap rows of `hints`, keyed by the trigger's first chunk; a target once per trigger."""
    rows: dict[int, dict[tuple[int, int], int]] = {}
    for trigger, target, offset, size in hints:
        per = rows.setdefault(chunk_ids[trigger.chunks[0]], {})
        per.setdefault((inos[id(target)], offset), size)
    return sorted((chunk, seq, ino, offset, size) for chunk, per in rows.items()
                  for seq, ((ino, offset), size) in enumerate(per.items()))


def _reference_dict(order: list[tuple[bytes, Node, Node]], store: ChunkStore, chunk_dict: ChunkDict,
                    min_blob_use: float, blob_descs: list[Descriptor],
                    chunk_rows: list[tuple[int, bytes, int, int, int, int, int]], chunk_ids: dict[bytes, int],
                    blob_rows: list[tuple[int, str, int, str]]) -> list[Descriptor]:
    """Rows for the dictionary chunks the tree uses, and the dictionary blobs (in first-use order)."""
    first_use: list[bytes] = []
    seen: set[bytes] = set()
    for _path, _parent, node in order:
        for digest in node.chunks:
            if digest not in seen:
                seen.add(digest)
                if digest not in store.chunks:
                    first_use.append(digest)
    used: dict[str, int] = {}
    for digest in first_use:
        c = chunk_dict.chunks[digest]
        used[c.blob] = used.get(c.blob, 0) + c.csize
    # Blob hygiene: a blob the image barely uses costs more (pulls, GC pinning) than a copy of the chunks.
    thin = {b for b, n in used.items() if n < min_blob_use * chunk_dict.blobs[b].size}
    copied = [d for d in first_use if chunk_dict.chunks[d].blob in thin]
    if copied:
        spool = store.new_spool()
        for digest, stored in chunk_dict.fetch_stored(copied):
            store.adopt(digest, stored, chunk_dict.chunks[digest].usize, spool)
    blob_ids: dict[str, int] = {}
    descs: list[Descriptor] = []
    for digest in first_use:
        c = chunk_dict.chunks[digest]
        if c.blob in thin:
            continue
        if c.blob not in blob_ids:
            blob = chunk_dict.blobs[c.blob]
            blob_ids[c.blob] = len(blob_descs) + 1
            descs.append(blob.descriptor())
            blob_descs.append(descs[-1])
            blob_rows.append((blob_ids[c.blob], blob.digest, blob.size, blob.compressor))
        chunk_ids[digest] = len(chunk_rows) + 1
        chunk_rows.append((chunk_ids[digest], digest, blob_ids[c.blob], c.offset, c.csize, c.usize,
                           c.uoffset))
    return descs


@contextlib.contextmanager
def _disk_full_as_oserror() -> Iterator[None]:
    """SQLite's "database or disk is full" as the ENOSPC it is, so it is reported as one."""
    try:
        yield
    except sqlite3.OperationalError as e:
        if e.sqlite_errorcode != sqlite3.SQLITE_FULL:
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None


def _prefetch_node(tree: Tree, path: bytes) -> Node | None:
    """The regular file a prefetch list names; other paths (or ones through a symlink) are skipped."""
    try:
        node = tree.get(path, "prefetch list")
    except InvalidLayerError:
        return None
    return node if node is not None and stat.S_ISREG(node.mode) else None


def _write_tree(writer: BootstrapWriter, tree: Tree, order: list[tuple[bytes, Node, Node]],
                inos: dict[int, int], nlinks: dict[int, int], chunk_ids: dict[bytes, int]) -> None:
    subdirs: dict[int, int] = {}
    for _, parent, node in order:
        if node.is_dir:
            subdirs[id(parent)] = subdirs.get(id(parent), 0) + 1
    inode_rows = []
    dentry_rows = []
    xattr_rows = []
    chunk_rows = []
    seen: set[int] = set()

    def add(node: Node) -> None:
        ino = inos[id(node)]
        nlink = 2 + subdirs.get(id(node), 0) if node.is_dir else nlinks[id(node)]
        sec, nsec = divmod(node.mtime_ns, 1_000_000_000)
        inode_rows.append((ino, node.mode, nlink, node.uid, node.gid, node.size, sec, nsec,
                           node.rdev, node.target))
        xattr_rows.extend((ino, k, v) for k, v in sorted(node.xattrs.items()))
        for i, digest in enumerate(node.chunks):
            chunk_rows.append((ino, i * tree_chunk_size, chunk_ids[digest]))

    tree_chunk_size = writer.chunk_size
    add(tree.root)
    for name_path, parent, node in order:
        dentry_rows.append((inos[id(parent)], name_path.rsplit(b"/", 1)[1], inos[id(node)]))
        if id(node) not in seen:
            seen.add(id(node))
            add(node)
    inode_rows.sort()
    writer.add_inodes(inode_rows)
    writer.add_dentries(sorted(dentry_rows))
    writer.add_xattrs(sorted(xattr_rows))
    writer.add_file_chunks(sorted(chunk_rows))


def finish_image(layout: OCILayout, config: dict[str, Any], blob_descs: list[Descriptor], db_path: str,
                 tag: str | None, annotations: dict[str, str] | None = None,
                 ) -> tuple[str, dict[str, Any], Descriptor]:
    """Add the bootstrap at `db_path`, its EROFS view, the config and (last) the manifest to `layout`.

    Layers: the blobs, the EROFS view (unless EROFS cannot hold the tree) and the bootstrap. The
    config is `config` with rootfs.diff_ids made to match them.
    Returns (manifest digest, manifest, bootstrap descriptor).
    """
    extra = [] if (view := _erofs_layer(db_path, layout)) is None else [view]
    bootstrap = _compress_layer(db_path, layout, spec.MEDIA_TYPE_BOOTSTRAP, spec.ANNOTATION_BOOTSTRAP)
    layers = [*((d, d.digest) for d in blob_descs), *extra, bootstrap]
    new_config = copy.deepcopy(config)
    new_config["rootfs"] = {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]}
    config_bytes = _canonical_json(new_config)
    config_desc = Descriptor.for_bytes(mt.OCI_CONFIG, config_bytes)
    layout.put_blob_bytes(config_bytes, config_desc)
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [d.to_json() for d, _ in layers],
        "annotations": {spec.ANNOTATION_VERSION: str(spec.FORMAT_VERSION), **(annotations or {})},
    }
    digest = layout.put_manifest(_canonical_json(manifest), mt.OCI_MANIFEST, tag)
    return digest, manifest, bootstrap[0]


def _erofs_layer(db_path: str, layout: OCILayout) -> tuple[Descriptor, str] | None:
    """The bootstrap's EROFS view as a layer (format.md §9); None where EROFS cannot hold the tree."""
    bs = Bootstrap(db_path)
    try:
        path = erofs_path(db_path)
        write_erofs(bs, path)
    except FormatError:
        return None  # nodes serve such a tree with FUSE
    finally:
        bs.close()
    return _compress_layer(path, layout, spec.MEDIA_TYPE_EROFS, spec.ANNOTATION_EROFS)


def _compress_layer(path: str, layout: OCILayout, media_type: str, annotation: str) -> tuple[Descriptor, str]:
    """Put file `path` into `layout` zstd-compressed, and remove it: (descriptor, diff_id)."""
    raw = hashlib.sha256()
    out_path = path + ".zst"
    h = hashlib.sha256()
    cctx = zstandard.ZstdCompressor(level=METADATA_ZSTD_LEVEL, write_checksum=True)
    with open(path, "rb") as src, open(out_path, "wb") as dst:
        writer = cctx.stream_writer(_HashingSink(dst, h), closefd=False)
        while block := src.read(1 << 20):
            raw.update(block)
            writer.write(block)
        writer.flush(zstandard.FLUSH_FRAME)
    os.unlink(path)
    size = os.path.getsize(out_path)
    desc = Descriptor(media_type, "sha256:" + h.hexdigest(), size, {annotation: str(spec.FORMAT_VERSION)})
    layout.put_blob_file(out_path, desc)
    return desc, "sha256:" + raw.hexdigest()


class _HashingSink:
    def __init__(self, f, h):
        self._f, self._h = f, h

    def write(self, data: bytes) -> int:
        self._h.update(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
