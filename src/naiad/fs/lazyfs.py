"""The lazy filesystem: a read-only FUSE view of a naiad image.

Handlers stay thin: metadata is one bootstrap query each (fast enough to
run on the event loop), and file data comes from the ChunkFetcher, which
runs on worker threads because it may wait on the network. The image is
immutable, so the kernel may cache entries, attributes and pages for as
long as it likes. Hard links share an inode number because the bootstrap's
inode numbers are used as they are.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

import pyfuse3
import trio

from naiad.errors import NaiadError
from naiad.format.bootstrap import ROOT_INO, Attr, Bootstrap, Chunk
from naiad.storage.fetcher import ChunkFetcher

log = logging.getLogger(__name__)

CACHE_TIMEOUT = 86400.0 * 365  # immutable image: let the kernel keep what it learnt
BLOCK = 4096

assert pyfuse3.ROOT_INODE == ROOT_INO


class _Open:
    __slots__ = ("chunks", "ino", "size")

    def __init__(self, ino: int, size: int, chunks: list[Chunk]):
        self.ino, self.size, self.chunks = ino, size, chunks


class LazyFS(pyfuse3.Operations):
    def __init__(self, bootstrap: Bootstrap, fetcher: ChunkFetcher, *, fetch_threads: int = 32):
        super().__init__()
        self.bs = bootstrap
        self.fetcher = fetcher
        self._fetch_limiter = trio.CapacityLimiter(fetch_threads)
        self._files: dict[int, _Open] = {}
        self._dirs: dict[int, list[tuple[bytes, Attr]]] = {}
        self._next_fh = 1
        # The access trace: (ino, chunk index) in first-read order (a dict keeps insertion order).
        self.trace: dict[tuple[int, int], None] = {}
        self.files_read: set[int] = set()
        # Overlayfs and exec ask for xattrs on every lookup and open, and most images have
        # few or none: knowing which inodes have any answers the rest without a query.
        # This costs one row per xattr, not per file.
        self._has_xattrs = bootstrap.inodes_with_xattrs()

    # --- metadata ------------------------------------------------------

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        e.entry_timeout = CACHE_TIMEOUT
        e.attr_timeout = CACHE_TIMEOUT
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = BLOCK
        e.st_blocks = -(-a.size // 512)
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = a.mtime_ns
        return e

    def _attr(self, ino: int) -> Attr:
        try:
            return self.bs.getattr(ino)
        except NaiadError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def lookup(self, parent_inode: int, name: bytes, ctx=None) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._entry(self._attr(parent_inode))
        attr = self.bs.lookup_attr(parent_inode, name)
        if attr is None:
            # Inode 0 is a negative entry the kernel may keep: the image never changes, so
            # a name that is absent now (a path an import probes, say) stays absent.
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = CACHE_TIMEOUT
            return negative
        return self._entry(attr)

    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        return self._entry(self._attr(inode))

    async def readlink(self, inode: int, ctx) -> bytes:
        try:
            return self.bs.readlink(inode)
        except NaiadError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None

    async def opendir(self, inode: int, ctx) -> int:
        if not self._attr(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._new_fh()
        self._dirs[fh] = self.bs.readdir_attrs(inode)
        return fh

    async def readdir(self, fh: int, start_id: int, token) -> None:
        entries = self._dirs[fh]
        for i in range(start_id, len(entries)):
            name, attr = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._entry(attr), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def getxattr(self, inode: int, name: bytes, ctx) -> bytes:
        if inode not in self._has_xattrs:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        for key, value in self.bs.xattrs(inode):
            if key == name:
                return value
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx) -> list[bytes]:
        if inode not in self._has_xattrs:
            return []
        return [k for k, _ in self.bs.xattrs(inode)]

    async def statfs(self, ctx) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        total = self.bs.query("SELECT coalesce(sum(size), 0) FROM inodes WHERE mode & ? = ?",
                              (0o170000, stat.S_IFREG))[0][0]
        s.f_bsize = s.f_frsize = BLOCK
        s.f_blocks = -(-total // BLOCK)
        s.f_bfree = s.f_bavail = 0
        s.f_files = self.bs.count("inodes")
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # --- data ------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    async def open(self, inode: int, flags: int, ctx) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        attr = self._attr(inode)
        if not attr.is_reg:
            raise pyfuse3.FUSEError(errno.EINVAL)
        fh = self._new_fh()
        self._files[fh] = _Open(inode, attr.size, self.bs.file_chunks(inode))
        fi = pyfuse3.FileInfo(fh=fh)
        fi.keep_cache = True
        return fi

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return await self._read(fh, off, size)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            # A bug must cost this read, not the whole mount.
            log.exception("read of fh %d at %d failed", fh, off)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def _read(self, fh: int, off: int, size: int) -> bytes:
        f = self._files[fh]
        if off >= f.size or size <= 0:
            return b""
        end = min(off + size, f.size)
        # Chunks are aligned at multiples of chunk_size: chunk i starts at i * chunk_size.
        first = off // self.bs.chunk_size
        wanted = f.chunks[first:(end - 1) // self.bs.chunk_size + 1]
        self.files_read.add(f.ino)
        for i in range(first, first + len(wanted)):
            self.trace.setdefault((f.ino, i), None)
        cache = self.fetcher.cache
        parts: list[bytes] = []
        missing = [c for c in wanted if not cache.contains(c.digest)]
        fetched: dict[bytes, bytes] = {}
        if missing:
            try:
                datas = await trio.to_thread.run_sync(self.fetcher.read, missing,
                                                      limiter=self._fetch_limiter)
            except NaiadError as e:
                log.warning("read of inode %d at %d failed: %s", f.ino, off, e)
                raise pyfuse3.FUSEError(errno.EIO) from None
            fetched = {c.digest: d for c, d in zip(missing, datas, strict=True)}
        from_cache = 0
        for c in wanted:
            lo = max(off, c.foffset) - c.foffset
            hi = min(end, c.foffset + c.usize) - c.foffset
            data = fetched.get(c.digest)
            if data is not None:
                part = data[lo:hi]
            else:
                part = cache.read_part(c.digest, lo, hi - lo)
                from_cache += part is not None
            if part is None:  # evicted or damaged since we looked: fetch it again
                try:
                    data = (await trio.to_thread.run_sync(self.fetcher.read, [c],
                                                          limiter=self._fetch_limiter))[0]
                except NaiadError as e:
                    log.warning("read of inode %d at %d failed: %s", f.ino, off, e)
                    raise pyfuse3.FUSEError(errno.EIO) from None
                part = data[lo:hi]
            parts.append(part)
        out = b"".join(parts)
        self.fetcher.served(len(out), from_cache)
        return out

    async def release(self, fh: int) -> None:
        self._files.pop(fh, None)
