"""Cutting files into chunks, hashing and compressing them on a thread pool.

Each distinct chunk (by sha256 of its uncompressed bytes) is compressed once
and its stored bytes are appended to a spool file; blobs are assembled from
the spools later, in canonical order, so that what ends up in a blob never
depends on which thread finished first. hashlib and zstd release the GIL,
so the pool really runs in parallel.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Container
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

from naiad.errors import InvalidLayerError
from naiad.format.compression import Codec
from naiad.oci.digest import read_exact


class Spool:
    """An append-only file of stored chunk bytes; writers reserve a range, then pwrite."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._size = 0
        self._lock = threading.Lock()

    def append(self, data: bytes) -> int:
        with self._lock:
            offset = self._size
            self._size += len(data)
        view, pos = memoryview(data), offset
        while view:  # a short write is retried, so a full disk surfaces as ENOSPC
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n
        return offset

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def close(self) -> None:
        os.close(self.fd)


class StoredChunk:
    __slots__ = ("csize", "offset", "spool", "usize")

    def __init__(self, spool: Spool, offset: int, csize: int, usize: int):
        self.spool, self.offset, self.csize, self.usize = spool, offset, csize, usize


class ChunkStore:
    """All distinct chunks of one build, by digest."""

    def __init__(self, spool_dir: str, chunk_size: int, codec: Codec, workers: int | None = None,
                 known: Container[bytes] = ()):
        self.spool_dir = spool_dir
        # Digests stored elsewhere (a chunk dictionary): only named, never compressed or spooled.
        self.known = known
        self.chunk_size = chunk_size
        self.codec = codec
        workers = workers or max(2, os.cpu_count() or 2)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="naiad-chunk")
        # Bounds the chunks read but not yet stored, so memory stays ~ workers * chunk_size.
        self._slots = threading.BoundedSemaphore(workers * 3)
        self._lock = threading.Lock()
        self._spools: list[Spool] = []
        self.chunks: dict[bytes, StoredChunk] = {}
        self._pending: set[bytes] = set()
        self.bytes_in = 0

    def new_spool(self) -> Spool:
        with self._lock:
            spool = Spool(os.path.join(self.spool_dir, f"spool-{len(self._spools)}"))
            self._spools.append(spool)
        return spool

    def add_stream(self, stream: BinaryIO, size: int, spool: Spool, what: str) -> list[Future[bytes]]:
        """Queue the chunks of a `size`-byte file; the futures give their digests in file order."""
        futures = []
        remaining = size
        while remaining > 0:
            n = min(self.chunk_size, remaining)
            data = read_exact(stream, n)
            if len(data) != n:
                raise InvalidLayerError(f"{what}: file data ends {remaining - len(data)} bytes early")
            remaining -= n
            self._slots.acquire()
            try:
                futures.append(self._pool.submit(self._store, data, spool))
            except BaseException:
                self._slots.release()
                raise
        return futures

    def _store(self, data: bytes, spool: Spool) -> bytes:
        try:
            digest = hashlib.sha256(data).digest()
            with self._lock:
                if digest in self.chunks or digest in self._pending or digest in self.known:
                    return digest
                self._pending.add(digest)
                self.bytes_in += len(data)
            stored = self.codec.compress(data)
            offset = spool.append(stored)
            with self._lock:
                self.chunks[digest] = StoredChunk(spool, offset, len(stored), len(data))
                self._pending.discard(digest)
            return digest
        finally:
            self._slots.release()

    def adopt(self, digest: bytes, stored: bytes, usize: int, spool: Spool) -> None:
        """Take a chunk's already compressed, verified bytes (a dictionary chunk stored here after all)."""
        offset = spool.append(stored)
        with self._lock:
            self.chunks[digest] = StoredChunk(spool, offset, len(stored), usize)
            self.bytes_in += usize

    def read_stored(self, digest: bytes) -> tuple[bytes, StoredChunk]:
        c = self.chunks[digest]
        return c.spool.read(c.offset, c.csize), c

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for spool in self._spools:
            spool.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spool.path)
        self._spools.clear()
