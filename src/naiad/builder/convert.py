"""`naiad convert` and `naiad build`: OCI image or rootfs directory → naiad image.

Layers are streamed (never held in memory) on a few threads, their files
chunked and compressed on a shared pool, then applied in order onto one tree
and assembled. The result is written into an OCI layout: the target layout
itself, or a staging layout that is then pushed to the target registry.

With `--chunk-dict`, chunks that the dictionary images already store are
referenced instead (builder/chunkdict.py): they are neither compressed nor
written, and the push mounts or copies the dictionary blobs the image uses.

A layer an earlier convert on this machine already converted (same layer
digest, chunk size and compressor) is not read at all: its entries come from
the layer cache (builder/layercache.py), and its chunks, already compressed,
are copied out of the naiad image that conversion wrote. The result is byte
for byte what a convert without the cache makes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sqlite3
import stat
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from naiad.builder.assemble import BuildResult, assemble
from naiad.builder.chunkdict import ChunkDict
from naiad.builder.chunks import ChunkStore
from naiad.builder.layercache import CachedLayer, LayerCache, LayerEntries, LayerResult
from naiad.builder.progress import CountingReader, NoProgress, Progress
from naiad.builder.tree import Node, Tree
from naiad.errors import BadReferenceError, FormatError, NaiadError
from naiad.format import spec
from naiad.format.compression import ZSTD_LEVEL, codec
from naiad.oci.copy import BlobLocator, CopyResult, copy_image
from naiad.oci.image import (
    ImageSource,
    Platform,
    RegistryOptions,
    ResolvedImage,
    resolve_image,
    source_for,
    target_for,
)
from naiad.oci.layer import LayerEntry, LayerReader
from naiad.oci.layout import OCILayout
from naiad.oci.reference import Reference, parse_reference
from naiad.paths import naiad_home

MAX_LAYER_THREADS = 4


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    chunk_size: int = spec.DEFAULT_CHUNK_SIZE
    compressor: str = "zstd"
    zstd_level: int = ZSTD_LEVEL
    platform: Platform = dataclasses.field(default_factory=Platform)
    prefetch: Sequence[str] = ()
    workers: int | None = None
    chunk_dict: Sequence[str] = ()  # naiad image references or dictionary files
    min_blob_use: float = 0.1  # reference a dictionary blob only if this fraction of its bytes is used
    layer_cache: bool = True  # convert: reuse (and record) earlier conversions of identical layers

    @property
    def stored_as(self) -> str:
        """How chunks are stored, as the layer cache keys it: a layer converted otherwise is not
        this convert's. Level 3 is plain "zstd": every entry recorded before levels were a choice."""
        if self.compressor != "zstd" or self.zstd_level == 3:
            return self.compressor
        return f"zstd-{self.zstd_level}"


def _chunk_store(layout: OCILayout, options: BuildOptions, cd: ChunkDict | None) -> ChunkStore:
    return ChunkStore(layout.staging_dir(), options.chunk_size, codec(options.compressor, options.zstd_level),
                      options.workers, cd.usable(options.compressor) if cd else ())


@contextlib.contextmanager
def _chunk_dict(options: BuildOptions, registry: RegistryOptions) -> Iterator[ChunkDict | None]:
    if not 0.0 <= options.min_blob_use <= 1.0:
        raise NaiadError(f"--min-blob-use {options.min_blob_use}: must be a fraction from 0 to 1")
    if not options.chunk_dict:
        yield None
        return
    with ChunkDict.load(options.chunk_dict, registry, options.platform) as cd:
        yield cd


def default_target_tag(source: Reference, target: Reference) -> str | None:
    """`TAG-naiad` for a target without tag or digest."""
    if target.tag or target.digest:
        return target.tag
    return f"{source.tag or 'latest'}-naiad"


@contextlib.contextmanager
def output_layout(target: Reference, registry: RegistryOptions,
                  fallback: ImageSource | BlobLocator | None = None,
                  pushed: list[CopyResult] | None = None) -> Iterator[OCILayout]:
    """The layout to assemble into; for a registry target, a staging layout pushed at the end.

    Blobs the staging layout lacks are pushed (or mounted) from `fallback`
    (see copy_image); the push's result is appended to `pushed`.
    """
    if target.transport == "oci":
        layout = OCILayout(target, create=True)
        try:
            yield layout
        except BaseException:
            layout.rollback()
            raise
        finally:
            layout.close()
        return
    if target.transport != "docker":
        raise BadReferenceError(f"{target}: cannot write images there")
    tmp_root = os.path.join(naiad_home(), "tmp")
    os.makedirs(tmp_root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix="build-", dir=tmp_root)
    try:
        layout = OCILayout(Reference("oci", path=staging, tag=target.tag), create=True)
        yield layout
        layout.close()
        with source_for(layout.ref) as src, target_for(target, registry) as dst:
            result = copy_image(src, dst, target.tag, fallback=fallback)
        if pushed is not None:
            pushed.append(result)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _stderr_warning(message: str) -> None:
    print(f"naiad: warning: {message}", file=sys.stderr)


def convert(source_ref: Reference, target_ref: Reference, options: BuildOptions,
            registry: RegistryOptions | None = None, progress: Progress | None = None,
            warn: Callable[[str], None] = _stderr_warning) -> BuildResult:
    registry = registry or RegistryOptions()
    progress = progress or NoProgress()
    spec.check_chunk_size(options.chunk_size)
    target_ref = target_ref.with_tag(t) if (t := default_target_tag(source_ref, target_ref)) else target_ref
    with source_for(source_ref, registry) as source:
        image = resolve_image(source, options.platform)
        diff_ids = image.diff_ids
        if len(diff_ids) != len(image.layers):
            raise FormatError(
                f"{source_ref}: config lists {len(diff_ids)} diff_ids for {len(image.layers)} layers"
            )
        if any(layer.media_type.startswith(spec.MEDIA_TYPE_BLOB) for layer in image.layers) or any(
            layer.media_type == spec.MEDIA_TYPE_BOOTSTRAP for layer in image.layers
        ):
            raise FormatError(f"{source_ref} is already a naiad image")
        pushed: list[CopyResult] = []
        cache = _open_cache(warn) if options.layer_cache else None
        try:
            with _chunk_dict(options, registry) as cd:
                cached, earlier = _use_cache(cache, image, options, registry, warn)
                try:
                    result, layers, tree = _convert(source, image, target_ref, options, registry, progress,
                                                    cd, cached, earlier, pushed, warn)
                finally:
                    for found, _ in earlier:
                        found.close()
            result.cached_layers = [image.layers[i].digest for i in sorted(cached)]
            if cache is not None:
                _record(cache, image, target_ref, result, options, layers, cached, tree, warn)
        finally:
            if cache is not None:
                cache.close()
        result.push = pushed[0] if pushed else None
        return result


def _convert(source: Any, image: ResolvedImage, target_ref: Reference, options: BuildOptions,
             registry: RegistryOptions, progress: Progress, cd: ChunkDict | None,
             cached: dict[int, LayerResult], earlier: list[tuple[ChunkDict, list[int]]],
             pushed: list[CopyResult], warn: Callable[[str], None],
             ) -> tuple[BuildResult, list[LayerResult], Tree]:
    with output_layout(target_ref, registry, cd.locate if cd else None, pushed) as layout:
        store = _chunk_store(layout, options, cd)
        try:
            _adopt_cached(store, cached, earlier, progress, warn)
            read = _read_layers(source, image, store, progress, [i for i in range(len(image.layers))
                                                                 if i not in cached])
            layers = [cached[i] if i in cached else read.pop(0) for i in range(len(image.layers))]
            tree = Tree()
            layer_chunks = []
            for i, (entries, chunks) in enumerate(layers):
                tree.apply_layer(entries, f"layer {i + 1} ({image.layers[i].digest})")
                layer_chunks.append(chunks)
            advance = progress.task("assembling", store.bytes_in)
            result = assemble(
                tree, store, layer_chunks, image.config, layout, target_ref.tag,
                annotations={spec.ANNOTATION_SOURCE: image.manifest_digest},
                prefetch=[os.fsencode(p).strip(b"/") for p in options.prefetch], progress=advance,
                chunk_dict=cd, min_blob_use=options.min_blob_use,
                copy_dict_blobs=target_ref.transport == "oci",
            )
        finally:
            store.close()
    return result, layers, tree


def _open_cache(warn: Callable[[str], None]) -> LayerCache | None:
    try:
        return LayerCache()
    except (sqlite3.Error, OSError) as e:
        warn(f"layer cache unusable, converting every layer: {e}")
        return None


def _use_cache(cache: LayerCache | None, image: ResolvedImage, options: BuildOptions,
               registry: RegistryOptions, warn: Callable[[str], None],
               ) -> tuple[dict[int, LayerResult], list[tuple[ChunkDict, list[int]]]]:
    """The layers (by index) the cache provides, and the earlier images holding their chunks.

    A cached layer is used only if the naiad image it points at opens and verifies, holds
    every one of the layer's chunks and still has the blobs they are in; otherwise the
    layer is converted from the source, with a warning.
    """
    cached: dict[int, LayerResult] = {}
    earlier: list[tuple[ChunkDict, list[int]]] = []
    if cache is None:
        return cached, earlier
    by_image: dict[str, list[tuple[int, CachedLayer]]] = {}
    try:
        for i, desc in enumerate(image.layers):
            hit = cache.lookup(desc.digest, options.chunk_size, options.stored_as)
            if hit is not None:
                by_image.setdefault(hit.image, []).append((i, hit))
    except sqlite3.Error as e:
        warn(f"layer cache unusable, converting every layer: {e}")
        return cached, earlier
    for ref, hits in by_image.items():
        what = ", ".join(f"layer {i + 1}" for i, _ in hits)
        found = ChunkDict(registry)
        use: dict[int, LayerResult] = {}
        try:
            found.add_image(parse_reference(ref), options.platform)
            usable = found.usable(options.compressor)
            present: dict[str, bool] = {}
            for i, hit in hits:
                entries, chunks = cache.entries(hit)
                missing = next((d for d in chunks if d not in usable), None)
                if missing is not None:
                    warn(f"layer cache: {ref} lacks chunk sha256:{missing.hex()} of layer {i + 1} "
                         f"({hit.digest}); converting it")
                    continue
                for blob in {usable[d].blob for d in chunks}:
                    if blob not in present:
                        src = found.source_of(blob)
                        present[blob] = src.has_blob(found.blobs[blob].descriptor())  # type: ignore[attr-defined]
                if not all(present[usable[d].blob] for d in chunks):
                    warn(f"layer cache: {ref} lacks a blob of layer {i + 1} ({hit.digest}); converting it")
                    continue
                use[i] = (entries, chunks)
        except (NaiadError, OSError) as e:
            warn(f"layer cache: earlier conversion unusable for {what}, converting: {e}")
            use = {}
        except (sqlite3.Error, struct.error, ValueError) as e:
            warn(f"layer cache damaged for {what}, converting: {e}")
            use = {}
        if not use:
            found.close()
            continue
        cached.update(use)
        earlier.append((found, sorted(use)))
    return cached, earlier


def _adopt_cached(store: ChunkStore, cached: dict[int, LayerResult],
                  earlier: list[tuple[ChunkDict, list[int]]], progress: Progress,
                  warn: Callable[[str], None]) -> None:
    """Put the cached layers' chunks into `store` as the earlier images stored them.

    They are copied, not referenced: the stored bytes are what compressing the chunk
    gives, so the image is byte for byte the one a convert without the cache makes,
    and it does not come to depend on blobs of an earlier image. Chunks the build's
    own `--chunk-dict` has stay references, as usual. Where an earlier image cannot
    be read after all, its layers are dropped from `cached` and read from the source.
    """
    wanted = [(found, sorted({d for i in layers for d in cached[i][1]
                              if d not in store.known and d not in store.chunks}), layers)
              for found, layers in earlier]
    advance = progress.task("reusing cached layers", sum(found.chunks[d].usize
                                                         for found, digests, _ in wanted for d in digests))
    for found, digests, layers in wanted:
        spool = store.new_spool()
        try:
            for digest, stored in found.fetch_stored([d for d in digests if d not in store.chunks]):
                usize = found.chunks[digest].usize
                store.adopt(digest, stored, usize, spool)
                advance(usize)
        except (NaiadError, OSError) as e:
            # What was adopted is verified and stays; the rest comes from the source layers.
            warn(f"layer cache: reading {found.sources[0].ref} failed, converting its layers: {e}")
            for i in layers:
                del cached[i]


def _record(cache: LayerCache, image: ResolvedImage, target_ref: Reference, result: BuildResult,
            options: BuildOptions, layers: list[LayerResult], cached: dict[int, LayerResult], tree: Tree,
            warn: Callable[[str], None]) -> None:
    """Remember the layers of a finished convert; a failure here costs the next build time, not this one."""
    if target_ref.transport == "oci":
        pinned = Reference("oci", path=os.path.abspath(target_ref.path), digest=result.manifest_digest)
    else:
        pinned = dataclasses.replace(target_ref, tag=None, digest=result.manifest_digest)
    # A chunk of a file deleted by a later layer is not in the image: such a layer is not recorded.
    in_image = {d for _path, _parent, node in tree.walk() for d in node.chunks}
    record: list[tuple[str, LayerEntries | None]] = []
    for i, (entries, chunks) in enumerate(layers):
        if chunks <= in_image:
            # Cached layers only move to the newest image: it is the one most likely still around.
            record.append((image.layers[i].digest, None if i in cached else entries))
    try:
        cache.record(str(pinned), result.manifest_digest, options.chunk_size, options.stored_as, record)
    except sqlite3.Error as e:
        warn(f"layer cache not updated: {e}")


def _read_layers(source: Any, image: ResolvedImage, store: ChunkStore, progress: Progress,
                 indices: list[int]) -> list[LayerResult]:
    advance = progress.task("converting layers", sum(image.layers[i].size for i in indices))
    if not indices:
        return []

    def read_one(i: int) -> tuple[LayerEntries, set[bytes]]:
        desc = image.layers[i]
        what = f"layer {i + 1} ({desc.digest})"
        spool = store.new_spool()
        with source.open_blob(desc) as raw:
            reader = LayerReader(CountingReader(raw, advance), digest=desc.digest, size=desc.size,
                                 diff_id=image.diff_ids[i], what=what)
            pending: list[tuple[LayerEntry, list[Future[bytes]] | None]] = []
            for entry, data in reader.entries():
                futures = None
                if data is not None:
                    futures = store.add_stream(data, entry.size, spool, f"{what}: {entry.path!r}")
                pending.append((entry, futures))
            reader.finish()
        entries: LayerEntries = []
        chunks: set[bytes] = set()
        for entry, futures in pending:
            digests = [f.result() for f in futures] if futures is not None else None
            if digests:
                chunks.update(digests)
            entries.append((entry, digests))
        return entries, chunks

    with ThreadPoolExecutor(min(MAX_LAYER_THREADS, len(indices))) as pool:
        futures = [pool.submit(read_one, i) for i in indices]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def build_from_dir(root: str, target_ref: Reference, options: BuildOptions,
                   config: dict[str, Any] | None = None, registry: RegistryOptions | None = None,
                   progress: Progress | None = None) -> BuildResult:
    """A naiad image straight from a rootfs directory."""
    registry = registry or RegistryOptions()
    progress = progress or NoProgress()
    spec.check_chunk_size(options.chunk_size)
    if not os.path.isdir(root):
        raise BadReferenceError(f"{root} is not a directory")
    if config is None:
        config = {"architecture": options.platform.architecture, "os": options.platform.os,
                  "config": {}, "rootfs": {"type": "layers", "diff_ids": []}}
    target_ref = target_ref if target_ref.tag or target_ref.digest else target_ref.with_tag("latest")
    pushed: list[CopyResult] = []
    with _chunk_dict(options, registry) as cd, \
            output_layout(target_ref, registry, cd.locate if cd else None, pushed) as layout:
        store = _chunk_store(layout, options, cd)
        try:
            tree, chunks = _scan_dir(root, store, progress)
            advance = progress.task("assembling", store.bytes_in)
            result = assemble(tree, store, [chunks], config, layout, target_ref.tag,
                              prefetch=[os.fsencode(p).strip(b"/") for p in options.prefetch],
                              progress=advance, chunk_dict=cd, min_blob_use=options.min_blob_use,
                              copy_dict_blobs=target_ref.transport == "oci")
        finally:
            store.close()
    result.push = pushed[0] if pushed else None
    return result


def _scan_dir(root: str, store: ChunkStore, progress: Progress) -> tuple[Tree, set[bytes]]:
    advance = progress.task("reading files", None)
    spool = store.new_spool()
    tree = Tree()
    _fill_node(tree.root, root, os.lstat(root))
    links: dict[tuple[int, int], Node] = {}
    pending: list[tuple[Node, list[Future[bytes]]]] = []
    stack = [(root, tree.root)]
    while stack:
        dirpath, dnode = stack.pop()
        assert dnode.children is not None
        with os.scandir(dirpath) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
        for e in entries:
            st = e.stat(follow_symlinks=False)
            name = os.fsencode(e.name)
            key = (st.st_dev, st.st_ino)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in links:
                dnode.children[name] = links[key]
                continue
            node = Node(st.st_mode)
            _fill_node(node, e.path, st)
            dnode.children[name] = node
            if st.st_nlink > 1 and not node.is_dir:
                links[key] = node
            if stat.S_ISDIR(st.st_mode):
                stack.append((e.path, node))
            elif stat.S_ISREG(st.st_mode):
                node.size = st.st_size
                with open(e.path, "rb") as f:
                    pending.append((node, store.add_stream(f, st.st_size, spool, e.path)))
                advance(st.st_size)
            elif stat.S_ISLNK(st.st_mode):
                node.target = os.fsencode(os.readlink(e.path))
    chunks: set[bytes] = set()
    for node, futures in pending:
        node.chunks = [f.result() for f in futures]
        chunks.update(node.chunks)
    return tree, chunks


def _fill_node(node: Node, path: str, st: os.stat_result) -> None:
    node.mode, node.uid, node.gid, node.mtime_ns = st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        node.rdev = st.st_rdev
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        names = []
    for name in names:
        if name.startswith(("user.", "security.", "trusted.")):
            with contextlib.suppress(OSError):
                node.xattrs[name.encode()] = os.getxattr(path, name, follow_symlinks=False)
