"""blobfs: one read-only FUSE file per data blob, for the kernel fast path (served by fusewire).

In kernel mode the kernel itself serves the image tree from an EROFS
metadata image (naiad.format.erofs) whose files are chunk-indexed into
extra devices, one per blob. Those devices are the files of this
filesystem: file `N` is blob N-1's *uncompressed* byte space, every chunk at
its `uoffset` (docs/format.md), holes reading as zeros. Python then sees only
data reads, never lookups or getattrs, and each read is a cache pread once
its chunks are cached; the kernel keeps what it read in its own page cache.

A read maps its byte range to the chunks it covers (bisect over the blob's
chunk offsets), takes cached chunks from the shared chunk cache and fetches
the others through the ChunkFetcher, which verifies them before they are
returned or cached: a chunk that fails gives EIO to that read only.

Per blob only two integer arrays are kept (chunk offsets and ids, 16 bytes
a chunk); a read asks the bootstrap for the few chunk rows it needs. Once a
chunk has been read and checked, its file also remembers that it sits in the
blob's own cache file, whose layout is this file's: a read whose chunks all
do is one pread of that file, without the bootstrap or the cache index
(`_read_present`). Reads run on fusewire's threads and block there, for the
disk or for a fetch.
"""

from __future__ import annotations

import bisect
import errno
import json
import logging
import os
from array import array

from naiad.errors import NaiadError
from naiad.format.bootstrap import ROOT_INO, Bootstrap, Chunk
from naiad.format.erofs import blob_extents
from naiad.fs.fusewire import FlatFile
from naiad.storage.fetcher import ChunkFetcher

log = logging.getLogger(__name__)


class _BlobFile:
    __slots__ = ("blob_id", "chunk_ids", "digest", "ino", "name", "present", "size", "uoffsets")

    def __init__(self, ino: int, name: bytes, digest: str, blob_id: int, size: int):
        self.ino, self.name, self.digest, self.blob_id, self.size = ino, name, digest, blob_id, size
        self.uoffsets = array("q")
        self.chunk_ids = array("q")
        # Chunk index -> digest, for the chunks whose verified bytes this process knows to sit in
        # this blob's own cache file at their uoffset: that file then reads like this one.
        self.present: dict[int, bytes] = {}


class BlobFS:
    """Files `1`..`N` at the root: the blobs in device order (EROFS device N is file N)."""

    def __init__(self, bootstrap: Bootstrap, fetcher: ChunkFetcher):
        self.bs = bootstrap
        self.fetcher = fetcher
        ids = {b.digest: b.id for b in bootstrap.blobs()}
        self.files: list[_BlobFile] = [
            _BlobFile(ROOT_INO + 1 + i, str(i + 1).encode(), digest, ids[digest], size)
            for i, (digest, size) in enumerate(blob_extents(bootstrap))
        ]
        by_blob = {f.blob_id: f for f in self.files}
        for blob_id, uoffset, chunk_id in bootstrap.query(
                "SELECT blob, uoffset, id FROM chunks ORDER BY blob, uoffset"):
            f = by_blob[blob_id]
            f.uoffsets.append(uoffset)
            f.chunk_ids.append(chunk_id)
        self._by_ino = {f.ino: f for f in self.files}
        self._by_blob = by_blob
        for f in self.files:
            self._mark_present(f, fetcher.cache.trusted_in_file(f.digest))
        fetcher.on_cached = self._cached
        # For the stats and the trace: the chunk each read request starts in, in first-read order.
        # EROFS reads whole pages, so a read may also cover the start of the next chunk (another
        # file's); the chunk it starts in is the one it was for.
        self._started: dict[int, None] = {}
        self._files_read = (0, 0)  # (len(_started) when counted, files)

    def _mark_present(self, f: _BlobFile, placed: list[tuple[bytes, int]]) -> None:
        """Note the chunks of `f` whose verified bytes are in its cache file: (digest, uoffset)."""
        if not placed:
            return
        digests = dict(self.bs.query("SELECT uoffset, digest FROM chunks WHERE blob = ?", (f.blob_id,)))
        for digest, uoffset in placed:
            if digests.get(uoffset) == digest:  # the bootstrap's chunk there, not just a chunk there
                f.present[bisect.bisect_left(f.uoffsets, uoffset)] = digest

    def _cached(self, chunks: list[Chunk]) -> None:
        """The fetcher's news (a fetch thread): these chunks are now in their blob's cache file."""
        for c in chunks:
            f = self._by_blob.get(c.blob)
            if f is not None:
                i = bisect.bisect_left(f.uoffsets, c.uoffset)
                if i < len(f.chunk_ids) and f.chunk_ids[i] == c.id:
                    f.present[i] = c.digest

    def files_read(self) -> int:
        """How many files the reads so far were for (by the chunks they started in)."""
        counted, files = self._files_read
        if counted != len(self._started):
            # Called from a worker thread while reads add chunks: count one snapshot of them.
            started = list(self._started)
            files = self.bs.query("SELECT count(DISTINCT ino) FROM file_chunks"
                                  " WHERE chunk IN (SELECT value FROM json_each(?))",
                                  (json.dumps(started),))[0][0]  # one parameter, however many chunks
            self._files_read = (len(started), files)
        return files

    def first_reads(self) -> list[tuple[int, int]]:
        """(ino, chunk index) of the files whose chunks reads started in, in first-read order.

        Approximate, unlike FUSE mode's trace: EROFS asks only for pages it does not hold, so
        a chunk shared by several files is seen once and names them all.
        """
        order = {chunk: i for i, chunk in enumerate(self._started)}
        rows = self.bs.query("SELECT chunk, ino, foffset FROM file_chunks"
                             " WHERE chunk IN (SELECT value FROM json_each(?))", (json.dumps(list(order)),))
        rows.sort(key=lambda r: (order[r[0]], r[1], r[2]))
        return [(ino, foffset // self.bs.chunk_size) for _, ino, foffset in rows]

    def paths(self, root: str) -> list[str]:
        """The blob files' paths under mount point `root`, in device order."""
        return [os.path.join(root, f.name.decode()) for f in self.files]

    def flat_files(self) -> list[FlatFile]:
        """The files to serve (naiad.fs.fusewire)."""
        return [FlatFile(f.ino, f.name, f.size) for f in self.files]

    def backing(self, ino: int) -> int | None:
        """The blob's cache file, for FUSE passthrough, if it holds every chunk of blob file `ino`.

        Asked when EROFS opens the file (at mount): only chunks whose rows are of this boot
        count (present), so every byte the kernel will read there is verified. The cache file
        stays open, and so flocked, for the mount's life: eviction never empties it meanwhile.
        Chunks of other images in the gaps are never read: EROFS reads only this image's.
        """
        f = self._by_ino.get(ino)
        if f is None or not f.chunk_ids or len(f.present) < len(f.chunk_ids):
            return None  # (a blob none of whose chunks this image uses gets no cache file either)
        cache = self.fetcher.cache
        try:
            # EROFS takes a short read for EIO: the cache file must reach the end of the blob
            # file (less than a block further, every chunk being there).
            cache.extend_to(f.digest, f.size)
        except OSError as e:
            log.warning("blob file %d: no passthrough: %s", ino - ROOT_INO, e)
            return None
        cache.touch(f.present.values())  # reads from now on are the kernel's, unseen
        return cache.blob_fd(f.digest)

    # --- data (on the server's threads) ----------------------------------

    def read(self, ino: int, off: int, size: int) -> bytes | bytearray:
        """Bytes [off, off+size) of blob file `ino`; OSError(EIO) if a chunk cannot be had."""
        f = self._by_ino.get(ino)
        if f is None:
            raise OSError(errno.ENOENT, "no such blob file")
        try:
            return self._read(f, off, size)
        except NaiadError as e:
            log.warning("read of blob file %d at %d failed: %s", ino - ROOT_INO, off, e)
            raise OSError(errno.EIO, str(e)) from None

    def _read(self, f: _BlobFile, off: int, size: int) -> bytes | bytearray:
        end = min(off + size, f.size)
        if off >= end:
            return b""
        # Chunks lo..hi-1 overlap [off, end) (lo may end just before off, in a gap).
        lo = max(bisect.bisect_right(f.uoffsets, off) - 1, 0)
        hi = bisect.bisect_left(f.uoffsets, end)
        if lo < hi and f.uoffsets[lo] <= off:
            self._started.setdefault(f.chunk_ids[lo], None)
        if all(i in f.present for i in range(lo, hi)):
            return self._read_present(f, off, end, lo, hi)
        return self._read_chunks(f, off, end, lo, hi)

    def _read_present(self, f: _BlobFile, off: int, end: int, lo: int, hi: int) -> bytes:
        """Bytes [off, end) with one pread of the blob's cache file: no index, no copies.

        The cache file has this file's layout (chunks at their uoffset, zeros between them), so
        with every chunk of the range present in it the read is the answer.
        """
        cache = self.fetcher.cache
        data = os.pread(cache.blob_fd(f.digest), end - off, off)
        if len(data) < end - off:  # the cache file ends before this file: the rest is holes
            data += bytes(end - off - len(data))
        cache.touch(f.present[i] for i in range(lo, hi))
        self.fetcher.served(len(data), hi - lo)
        return data

    def _read_chunks(self, f: _BlobFile, off: int, end: int, first: int, stop: int) -> bytearray:
        """Bytes [off, end) chunk by chunk, from the cache where it has them, else fetched."""
        ids = f.chunk_ids[first:stop]
        rows = self.bs.query(
            "SELECT id, digest, blob, offset, csize, usize, uoffset FROM chunks WHERE id IN"
            f" ({','.join('?' * len(ids))}) ORDER BY uoffset", tuple(ids)) if ids else []
        chunks = [(first + k, c) for k, c in enumerate(Chunk(*r) for r in rows) if c.uoffset + c.usize > off]
        cache = self.fetcher.cache
        out = bytearray(end - off)  # holes between chunks read as zeros
        missing: list[Chunk] = []
        from_cache = 0
        for _, c in chunks:
            lo, hi = max(off, c.uoffset), min(end, c.uoffset + c.usize)
            part = cache.read_part(c.digest, lo - c.uoffset, hi - lo)
            if part is None:
                missing.append(c)
            else:
                out[lo - off:hi - off] = part
                from_cache += 1
        if missing:
            # Verified by the fetcher before it returns or caches anything.
            for c, data in zip(missing, self.fetcher.read(missing), strict=True):
                lo, hi = max(off, c.uoffset), min(end, c.uoffset + c.usize)
                out[lo - off:hi - off] = data[lo - c.uoffset:hi - c.uoffset]
        self.fetcher.served(len(out), from_cache)
        # Chunks found in this blob's own cache file take the fast path from now on (fetched ones
        # were marked by _cached already; one that another read is still fetching, once it lands).
        for i, c in chunks:
            where = cache.verified(c.digest)
            if where is not None and where.blob == f.digest and where.uoffset == c.uoffset:
                f.present[i] = c.digest
        return out

