"""Optimising a naiad image for its app's start: a prefetch list, and hot chunks laid out first.

`naiad optimize` runs the app on a lazy mount, which records every chunk
read, in order (fs/mount.py writes the trace). The new image gets that
order as its prefetch list and, by default, a new *hot* blob holding those
chunks in that order, zstd ones recompressed harder (HOT_ZSTD_LEVEL): a mount
then prefetches the app's working set with a few large sequential range
requests instead of hundreds of scattered ones. Every other chunk stays
where it was, so the new image shares all of the old one's blobs and a
push costs the hot blob and the bootstrap.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from naiad.builder.assemble import finish_image
from naiad.builder.convert import output_layout
from naiad.builder.hints import Process
from naiad.errors import NaiadError
from naiad.format import spec
from naiad.format.bootstrap import ROOT_INO, UNCOMPRESSED_ALIGN, Bootstrap, Chunk, ChunkMove, rewrite
from naiad.format.chunk import decode_chunk
from naiad.format.compression import Codec
from naiad.format.pathwalk import follow
from naiad.oci.copy import copy_blob
from naiad.oci.image import Descriptor, Platform, RegistryOptions, source_for
from naiad.oci.layout import OCILayout
from naiad.oci.reference import Reference
from naiad.storage.hints import BUDGET, walk
from naiad.storage.image import NaiadImage
from naiad.storage.ranges import contiguous_runs, read_run

# A prefetch entry: a path, and the index of one chunk of it (None: the whole file).
Entry = tuple[str, int | None]
# What a container runtime reads in the image before it runs the program: runc resolves the
# process's user and groups with them.
RUNTIME_FILES = (b"/etc/passwd", b"/etc/group")
# The hot blob is written once and read by every cold start, often over the slowest link, so it
# is worth a slower compression: torchapp's 228.7 MB of hot chunks are 70.3 MB at the build's
# level 3 (1.2 CPU s), 65.8 MB at 9 (4.8 CPU s), 63.8 MB at 16 (35 CPU s), 60.2 MB at 18 (53 CPU s,
# 27 s on 2 cores): at 100 Mbit/s, 0.45 s less of every start than level 9, for 0.05 CPU s more of
# decoding (811 against 983 MB/s).
HOT_ZSTD_LEVEL = 18


@dataclasses.dataclass
class OptimizeResult:
    manifest_digest: str
    files: int
    chunks: int
    bytes: int
    hot_blob: Descriptor | None
    missing: list[str]


def optimize_image(source_ref: Reference, target_ref: Reference, entries: Sequence[Entry] | None, *,
                   relayout: bool = True, hot_level: int = HOT_ZSTD_LEVEL,
                   registry: RegistryOptions | None = None,
                   platform: Platform | None = None) -> OptimizeResult:
    """Write `source_ref` to `target_ref` with prefetch list `entries` (and the hot blob, its zstd
    chunks recompressed at `hot_level`); `entries` None: the list its access hints predict
    (predicted_prefetch)."""
    registry = registry or RegistryOptions()
    with source_for(source_ref, registry) as source:
        img = NaiadImage.open(source, platform)
        try:
            bs = img.bootstrap
            if entries is None:
                prefetch, missing = predicted_prefetch(bs, img.image.config), []
                if not prefetch:
                    raise NaiadError(f"{source_ref} predicts no start: its config names no program the image "
                                     "holds, or the image was built without access hints")
            else:
                prefetch, missing = _resolve(img, entries)
            if not prefetch and entries:
                raise NaiadError(f"none of the {len(entries)} listed paths is a regular file of {source_ref}")
            hot = bs.prefetch_chunks_of(prefetch)
            compressors = {b.compressor for b in img.blobs.values()}
            relayout = relayout and len(compressors) == 1 and bool(hot)
            annotations = {k: v for k, v in (img.image.manifest.get("annotations") or {}).items()
                           if k != spec.ANNOTATION_VERSION}
            with output_layout(target_ref, registry, fallback=source) as layout:
                db = os.path.join(layout.staging_dir(), "bootstrap.db")
                hot_desc = None
                new_blobs: list[tuple[int, str, int, str]] = []
                moves: list[ChunkMove] = []
                if relayout:
                    hot_id = max(img.blobs) + 1
                    hot_desc, moves = _write_hot_blob(img, hot, hot_id, layout, hot_level)
                    new_blobs = [(hot_id, hot_desc.digest, hot_desc.size, compressors.pop())]
                rewrite(bs.path, db, prefetch, new_blobs, moves)
                moved = {m.chunk for m in moves}
                still_used = {c.blob for c in bs.chunks() if c.id not in moved}
                blob_descs = [img.blob_desc(b) for b in sorted(still_used)]
                if hot_desc is not None:
                    blob_descs.append(hot_desc)
                if target_ref.transport == "oci":
                    for desc in blob_descs:
                        copy_blob(source, layout, desc)
                digest, _, _ = finish_image(layout, img.image.config, blob_descs, db, target_ref.tag,
                                            annotations)
            files = len({ino for ino, _ in prefetch})
            size = sum(c.usize for c in hot)
        finally:
            img.close()
    return OptimizeResult(digest, files, len(hot), size, hot_desc, missing)


def _resolve(img: NaiadImage, entries: Sequence[Entry]) -> tuple[list[tuple[int, int | None]], list[str]]:
    bs = img.bootstrap
    inos: dict[str, int | None] = {}
    out: list[tuple[int, int | None]] = []
    missing: list[str] = []
    seen: set[tuple[int, int | None]] = set()
    for path, index in entries:
        if path not in inos:
            ino = bs.resolve(path)
            inos[path] = ino if ino is not None and bs.getattr(ino).is_reg else None
            if inos[path] is None:
                missing.append(path)
        ino = inos[path]
        if ino is None:
            continue
        key = (ino, None if index is None else index * bs.chunk_size)
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out, missing


def predicted_prefetch(bs: Bootstrap, config: dict) -> list[tuple[int, int | None]]:
    """(ino, foffset) of the chunks a container of the image reads first, in order, as predicted:
    the files its runtime reads before it runs the program (RUNTIME_FILES), the program its config
    runs, then the walk of access hints (docs/format.md §10) a lazy mount takes when that program's
    first read misses, followed to its end (up to the mount's hint budget). Empty when the config
    runs no program the image holds, or the image has no hints.
    """
    process = Process.of_config(config)
    program = None if process is None else next(
        (ino for path in process.program_paths() if (ino := _regular(bs, path, executable=True))), None)
    first = None if program is None else bs.first_chunk(program)
    if program is None or first is None or not bs.has_hints:
        return []
    runtime = [ino for path in RUNTIME_FILES if (ino := _regular(bs, path)) and bs.first_chunk(ino)]
    order: dict[tuple[int, int | None], None] = {(ino, 0): None for ino in [*runtime, program]}
    stored = 0
    for ino, chunks in walk(bs, [iter(bs.hints_of(first))], {first}, set()):
        for c in chunks:
            order.setdefault((ino, c.foffset), None)
            stored += c.csize
        if stored >= BUDGET:
            break
    return list(order)


def _regular(bs: Bootstrap, path: bytes, *, executable: bool = False) -> int | None:
    """The inode of the regular (and, if asked, executable) file at `path`, symlinks followed."""
    def child(parent: int, name: bytes) -> int | None:
        return bs.lookup(parent, name) if bs.getattr(parent).is_dir else None

    def link(ino: int) -> bytes | None:
        return bs.readlink(ino) if bs.getattr(ino).is_symlink else None

    ino = follow(path, ROOT_INO, child, link)
    attr = None if ino is None else bs.getattr(ino)
    return ino if attr is not None and attr.is_reg and (attr.mode & 0o111 or not executable) else None


def _write_hot_blob(img: NaiadImage, hot: list[Chunk], blob_id: int, layout: OCILayout,
                    level: int) -> tuple[Descriptor, list[ChunkMove]]:
    """Write the chunks of `hot`, verified, into one new blob in that order (zstd ones recompressed
    at `level` where that makes them smaller)."""
    path = os.path.join(layout.staging_dir(), "hot-blob")
    h = hashlib.sha256()
    moves: list[ChunkMove] = []
    offset = uoffset = 0
    hot_codec = Codec("zstd", level)

    def stored_chunks() -> Iterator[tuple[Chunk, bytes, str]]:
        for run in contiguous_runs(hot):
            blob = img.blobs[run[0].blob]
            for c, stored in read_run(img.source, blob.digest, run):
                yield c, stored, blob.compressor

    def stored_for(c: Chunk, stored: bytes, compressor: str) -> bytes:
        data = decode_chunk(stored, c, compressor)  # nothing unverified goes into a blob
        if compressor != "zstd":
            return stored
        again = hot_codec.compress(data)
        return again if len(again) < len(stored) else stored

    workers = os.cpu_count() or 2
    # Chunks are compressed a window ahead of the one written, on every core whatever the runs'
    # lengths (most are a few chunks), and at most this many are in memory.
    window: collections.deque[tuple[Chunk, Future[bytes]]] = collections.deque()
    with open(path, "wb") as out, ThreadPoolExecutor(workers) as pool:
        def write_first() -> None:
            nonlocal offset, uoffset
            c, fut = window.popleft()
            stored = fut.result()
            out.write(stored)
            h.update(stored)
            moves.append(ChunkMove(c.id, blob_id, offset, len(stored), uoffset))
            offset += len(stored)
            uoffset += -(-c.usize // UNCOMPRESSED_ALIGN) * UNCOMPRESSED_ALIGN

        for c, stored, compressor in stored_chunks():
            window.append((c, pool.submit(stored_for, c, stored, compressor)))
            if len(window) >= 4 * workers:
                write_first()
        while window:
            write_first()
    desc = Descriptor(spec.MEDIA_TYPE_BLOB, "sha256:" + h.hexdigest(), offset,
                      {spec.ANNOTATION_BLOB: str(spec.FORMAT_VERSION)})
    layout.put_blob_file(path, desc)
    return desc, moves
