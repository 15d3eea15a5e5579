"""The node's chunk cache, shared by every image and mount under `$NAIAD_HOME/cache`.

Layout: one sparse file per blob (`blobs/<hex>`) holding chunks uncompressed
at their `uoffset` (docs/format.md), plus an SQLite index (`index.db`, WAL)
whose rows say which chunks are present. The index is keyed by chunk
digest, so a chunk that two images share is stored once, wherever it
arrived first.

Crash safety: a chunk's bytes are written before its index row is
committed, so a process killed at any point leaves at worst bytes nobody
points at, never a row pointing at torn bytes. Only verified chunks are
ever put here (the fetcher decodes and checks them first).

Trust is scoped to a boot. Each row records the boot (the kernel's
`boot_id`) in which its bytes were written or last checked. Within that
boot the kernel's page cache is the truth for every process, so a row of
the current boot is served as is: a second mount of an image reads only
the bytes it needs, with no hashing. A row of an earlier boot may point at
bytes a power loss never let reach the disk (the bytes are not fsynced; the
row may be), so the first read of such a chunk hashes it whole: a match
moves the row to this boot, a mismatch drops it and the chunk is fetched
again rather than served.

Eviction is least-recently-used by chunk: holes are punched where evicted
chunks were, so the files stay sparse and their layout stays fixed. Every
process that has a cache file open holds a shared flock on it, and eviction
takes an exclusive one without waiting: chunks of a file that a running
mount is using are never evicted under its feet.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable

from naiad.paths import naiad_home

ABSENT_TTL = 2.0  # seconds a "not cached" answer is reused without asking the index again
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)  # the running libc; find_library would run ldconfig

SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    digest BLOB PRIMARY KEY,
    blob TEXT NOT NULL,
    uoffset INTEGER NOT NULL,
    usize INTEGER NOT NULL,
    atime INTEGER NOT NULL,  -- last use, in ns: in seconds, all the chunks one read touches would tie
    boot TEXT NOT NULL DEFAULT ''  -- the boot_id in which the bytes were written or last checked
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_atime ON chunks (atime);
CREATE INDEX IF NOT EXISTS chunks_blob ON chunks (blob);
"""


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    blob: str
    uoffset: int
    usize: int


def boot_id() -> str:
    """This boot's identity: rows written in it are trusted by every process until the next."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        # Unknown: a boot of this process's own, so that only the process itself trusts its rows.
        return f"process-{uuid.uuid4()}"


class ChunkCache:
    """Thread-safe; several processes may share one cache directory."""

    def __init__(self, root: str | None = None, *, boot: str | None = None):
        self.root = root or os.path.join(naiad_home(), "cache")
        self.boot = boot or boot_id()
        os.makedirs(os.path.join(self.root, "blobs"), exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(os.path.join(self.root, "index.db"), check_same_thread=False,
                                   isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.executescript(SCHEMA)
        _add_boot_column(self._db)
        self._fds: dict[str, int] = {}
        self._touched: dict[bytes, int] = {}  # uses to write back: digest -> time.time_ns()
        # Chunks this process wrote or has checked, with where they are.
        self._verified: dict[bytes, CacheEntry] = {}
        self._absent: dict[bytes, float] = {}  # digest -> when it was found absent
        self._last_flush = time.monotonic()

    def _path(self, blob: str) -> str:
        return os.path.join(self.root, "blobs", blob.removeprefix("sha256:"))

    def _fd(self, blob: str) -> int:
        fd = self._fds.get(blob)
        if fd is None:
            path = self._path(blob)
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(fd, fcntl.LOCK_SH)
                # Eviction unlinks a file it emptied while holding it exclusively: a file opened
                # before that and locked after is no longer the one at `path`.
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(path).st_ino == os.fstat(fd).st_ino:
                        break
                os.close(fd)
            with self._lock:
                if blob in self._fds:
                    os.close(fd)
                    fd = self._fds[blob]
                else:
                    self._fds[blob] = fd
        return fd

    def lookup(self, digest: bytes) -> CacheEntry | None:
        found = self._row(digest)
        return None if found is None else found[0]

    def _row(self, digest: bytes, *, fresh: bool = False) -> tuple[CacheEntry, bool] | None:
        """(where the chunk is, whether its row is of this boot), if the index has it."""
        now = time.monotonic()
        with self._lock:
            # A chunk found absent a moment ago is taken as still absent: a cold start asks
            # for the same missing chunk several times within milliseconds. If another
            # process cached it meanwhile, the cost is one redundant fetch, never wrong bytes.
            if not fresh and now - self._absent.get(digest, -ABSENT_TTL) < ABSENT_TTL:
                return None
            row = self._db.execute(
                "SELECT blob, uoffset, usize, boot FROM chunks WHERE digest = ?", (digest,)
            ).fetchone()
            if row is None:
                if len(self._absent) > 100_000:
                    self._absent.clear()
                self._absent[digest] = now
                return None
        return CacheEntry(*row[:3]), row[3] == self.boot

    def _held(self, digest: bytes) -> tuple[CacheEntry, bool] | None:
        """The chunk's row, read while this process holds its cache file's flock."""
        found = self._row(digest)
        if found is not None and found[0].blob not in self._fds:
            # Eviction may have taken the chunk between the query and the flock: ask again
            # under the flock, from when on eviction leaves the file alone.
            self._fd(found[0].blob)
            found = self._row(digest, fresh=True)
        return found

    def _locate(self, digest: bytes) -> tuple[CacheEntry, bytes | None] | None:
        """Where the chunk's verified bytes are, if cached; also the bytes if they had to be checked.

        A row of this boot is trusted (module docstring); one of an earlier boot is hashed whole
        once, and then counts as of this boot.
        """
        entry = self._verified.get(digest)
        if entry is not None:
            return entry, None
        found = self._held(digest)
        if found is None:
            return None
        entry, this_boot = found
        data = None
        if not this_boot:
            data = os.pread(self._fd(entry.blob), entry.usize, entry.uoffset)
            if len(data) != entry.usize or hashlib.sha256(data).digest() != digest:
                self._forget(digest)
                return None
            with self._lock:
                self._db.execute("UPDATE chunks SET boot = ? WHERE digest = ?", (self.boot, digest))
        self._verified[digest] = entry
        return entry, data

    def verified(self, digest: bytes) -> CacheEntry | None:
        """Where this process knows the chunk's verified bytes are, without asking the index.

        Such bytes stay put while this process lives: it holds a shared flock on every cache
        file it has opened, and eviction takes an exclusive one.
        """
        return self._verified.get(digest)

    def trusted_in_file(self, blob: str) -> list[tuple[bytes, int]]:
        """(digest, uoffset) of the chunks whose bytes sit in `blob`'s cache file with a row of this
        boot: verified for this process from now on (module docstring), so that a mount can read
        them in place from its first read."""
        rows = self._trusted_rows(blob)
        if rows and blob not in self._fds:
            # As in _held(): only rows read under the file's flock stay (eviction skips the file).
            # A blob without rows gets no file: an empty one would never be evicted.
            self._fd(blob)
            rows = self._trusted_rows(blob)
        for digest, uoffset, usize in rows:
            self._verified.setdefault(digest, CacheEntry(blob, uoffset, usize))
        return [(digest, uoffset) for digest, uoffset, _ in rows]

    def _trusted_rows(self, blob: str) -> list[tuple[bytes, int, int]]:
        with self._lock:
            return self._db.execute("SELECT digest, uoffset, usize FROM chunks WHERE blob = ? AND boot = ?",
                                    (blob, self.boot)).fetchall()

    def blob_fd(self, blob: str) -> int:
        """A descriptor of `blob`'s cache file, for reading verified chunks in place (see verified())."""
        return self._fd(blob)

    def extend_to(self, blob: str, size: int) -> None:
        """Make `blob`'s cache file at least `size` bytes long, the new end reading as zeros.

        For a reader that takes the file for the blob's whole uncompressed space (FUSE
        passthrough). posix_fallocate only ever extends: chunks that another image's mount
        wrote further on stay. OSError (a full disk) if it cannot.
        """
        fd = self._fd(blob)
        end = os.fstat(fd).st_size
        if end < size:
            os.posix_fallocate(fd, end, size - end)

    def contains(self, digest: bytes) -> bool:
        return digest in self._verified or self.lookup(digest) is not None

    def get(self, digest: bytes) -> bytes | None:
        """The chunk's uncompressed bytes, if cached."""
        return self.read_part(digest, 0, None)

    def read_part(self, digest: bytes, start: int, size: int | None) -> bytes | None:
        """Bytes [start, start+size) of a cached chunk (to its end if `size` is None)."""
        found = self._locate(digest)
        if found is None:
            return None
        entry, data = found
        end = entry.usize if size is None else min(start + size, entry.usize)
        if data is None:
            data = os.pread(self._fd(entry.blob), end - start, entry.uoffset + start)
            if len(data) != end - start:  # the file is shorter than its rows say: damaged
                self._forget(digest)
                return None
        elif start or end != entry.usize:
            data = data[start:end]
        self.touch((digest,))
        return data

    def _forget(self, digest: bytes) -> None:
        with self._lock:
            self._verified.pop(digest, None)
            self._db.execute("DELETE FROM chunks WHERE digest = ?", (digest,))

    def put(self, digest: bytes, blob: str, uoffset: int, data: bytes) -> None:
        """Store verified chunk bytes; the row is committed only after the bytes are written."""
        self.put_many(blob, [(digest, uoffset, data)])

    def put_many(self, blob: str, chunks: list[tuple[bytes, int, bytes]]) -> None:
        """Store verified (digest, uoffset, bytes) of one blob: all bytes first, then one commit."""
        if not chunks:
            return
        fd = self._fd(blob)
        for _, uoffset, data in chunks:
            view = memoryview(data)
            pos = uoffset
            while view:
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n
        now = time.time_ns()
        with self._lock:
            for digest, uoffset, data in chunks:
                self._verified[digest] = CacheEntry(blob, uoffset, len(data))
                self._absent.pop(digest, None)
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?, ?)",
                                 [(d, blob, u, len(data), now, self.boot) for d, u, data in chunks])
            self._db.execute("COMMIT")

    def touch(self, digests: Iterable[bytes]) -> None:
        """Record a use of these chunks, for the LRU order of eviction."""
        # Access times are batched: one write per few seconds, not one per read.
        now = time.time_ns()
        with self._lock:
            for digest in digests:
                self._touched[digest] = now
            if time.monotonic() - self._last_flush < 5:
                return
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._touched:
            # One transaction: without it (isolation_level=None) every row is a commit of its own,
            # and a cold start's few thousand rows cost 0.25 CPU s instead of 0.03.
            self._db.execute("BEGIN")
            self._db.executemany("UPDATE chunks SET atime = ? WHERE digest = ?",
                                 [(t, d) for d, t in self._touched.items()])
            self._db.execute("COMMIT")
            self._touched.clear()
        self._last_flush = time.monotonic()

    # --- administration -------------------------------------------------

    def usage(self) -> tuple[int, int]:
        """(chunks, bytes) present."""
        with self._lock:
            n, size = self._db.execute("SELECT count(*), coalesce(sum(usize), 0) FROM chunks").fetchone()
        return n, size

    def blobs(self) -> list[tuple[str, int, int, int]]:
        """(blob, chunks, bytes, last use in seconds since the epoch) per cache file."""
        with self._lock:
            return self._db.execute(
                "SELECT blob, count(*), sum(usize), max(atime) / 1000000000 FROM chunks"
                " GROUP BY blob ORDER BY blob"
            ).fetchall()

    def gc(self, max_size: int) -> tuple[int, int]:
        """Evict least recently used chunks until at most `max_size` bytes remain.

        Chunks in files that another process has open are skipped. Returns
        (chunks, bytes) evicted.
        """
        with self._lock:
            self._flush_locked()
            rows = self._db.execute(
                "SELECT digest, blob, uoffset, usize FROM chunks ORDER BY atime, digest"
            ).fetchall()
        total = sum(r[3] for r in rows)
        victims: dict[str, list[tuple[bytes, int, int]]] = {}
        for digest, blob, uoffset, usize in rows:
            if total <= max_size:
                break
            victims.setdefault(blob, []).append((digest, uoffset, usize))
            total -= usize
        evicted = evicted_bytes = 0
        for blob, chunks in victims.items():
            if blob in self._fds:
                continue  # in use by this process
            try:
                fd = os.open(self._path(blob), os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = None
            try:
                if fd is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a running mount uses this file
                # Rows go first: a crash after this leaves dead bytes, never a row without bytes.
                with self._lock:
                    self._db.execute("BEGIN")
                    self._db.executemany("DELETE FROM chunks WHERE digest = ?", [(c[0],) for c in chunks])
                    self._db.execute("COMMIT")
                    remaining = self._db.execute(
                        "SELECT count(*) FROM chunks WHERE blob = ?", (blob,)).fetchone()[0]
                if fd is not None:
                    if remaining == 0:
                        os.unlink(self._path(blob))
                    else:
                        for _, uoffset, usize in chunks:
                            _punch(fd, uoffset, usize)
                evicted += len(chunks)
                evicted_bytes += sum(c[2] for c in chunks)
            finally:
                if fd is not None:
                    os.close(fd)
        return evicted, evicted_bytes

    def prune(self) -> tuple[int, int]:
        """Remove every chunk that no running mount holds."""
        return self.gc(0)

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._flush_locked()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._db.close()


def _add_boot_column(db: sqlite3.Connection) -> None:
    """Give a cache made before rows had a boot the column; its rows count as of an earlier boot."""
    if any(col[1] == "boot" for col in db.execute("PRAGMA table_info(chunks)")):
        return
    with contextlib.suppress(sqlite3.OperationalError):  # another process added it meanwhile
        db.execute("ALTER TABLE chunks ADD COLUMN boot TEXT NOT NULL DEFAULT ''")


def _punch(fd: int, offset: int, size: int) -> None:
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                       ctypes.c_long(offset), ctypes.c_long(size)) != 0:
        os.pwrite(fd, b"\0" * size, offset)  # no hole punching here: zeros will do
