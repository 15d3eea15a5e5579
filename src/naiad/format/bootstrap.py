"""The bootstrap: an image's flattened filesystem tree and chunk table, in SQLite.

Opening a bootstrap reads its header and one meta row, so it takes the same
time for ten files or ten million, and holds no Python object per file:
every question (lookup, getattr, readdir, which chunks cover a byte range) is
one indexed query. docs/format.md is the normative description of the schema.

The writer is fed in a deterministic order and the file is VACUUMed and its
header normalised, so the same tree always gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sqlite3
import stat
from collections.abc import Iterable, Iterator

from naiad.errors import FormatError
from naiad.format.spec import FORMAT_VERSION

ROOT_INO = 1
# Chunks sit at multiples of this in a blob's uncompressed byte space (the
# cache's per-blob file, and later a kernel block device).
UNCOMPRESSED_ALIGN = 4096
APPLICATION_ID = 0x6E616961  # "naia"
PAGE_SIZE = 4096

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE inodes (
    ino INTEGER PRIMARY KEY,
    mode INTEGER NOT NULL,
    nlink INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime INTEGER NOT NULL,
    mtime_nsec INTEGER NOT NULL,
    rdev INTEGER NOT NULL,
    target BLOB
);
CREATE TABLE dentries (
    parent INTEGER NOT NULL,
    name BLOB NOT NULL,
    ino INTEGER NOT NULL,
    PRIMARY KEY (parent, name)
) WITHOUT ROWID;
CREATE TABLE xattrs (
    ino INTEGER NOT NULL,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (ino, name)
) WITHOUT ROWID;
CREATE TABLE blobs (
    id INTEGER PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    compressor TEXT NOT NULL
);
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY,
    digest BLOB NOT NULL UNIQUE,
    blob INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    csize INTEGER NOT NULL,
    usize INTEGER NOT NULL,
    uoffset INTEGER NOT NULL
);
-- Read amplification asks "the chunks stored after this one in its blob" on every miss.
CREATE INDEX chunks_place ON chunks (blob, offset);
CREATE TABLE file_chunks (
    ino INTEGER NOT NULL,
    foffset INTEGER NOT NULL,
    chunk INTEGER NOT NULL,
    PRIMARY KEY (ino, foffset)
) WITHOUT ROWID;
CREATE TABLE prefetch (seq INTEGER PRIMARY KEY, ino INTEGER NOT NULL, foffset INTEGER);
CREATE TABLE hints (
    chunk INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    foffset INTEGER NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (chunk, seq)
) WITHOUT ROWID;
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime: int
    mtime_nsec: int
    rdev: int

    @property
    def mtime_ns(self) -> int:
        return self.mtime * 1_000_000_000 + self.mtime_nsec

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


@dataclasses.dataclass(frozen=True, slots=True)
class Blob:
    id: int
    digest: str
    size: int
    compressor: str


@dataclasses.dataclass(frozen=True, slots=True)
class Chunk:
    """One stored chunk; `foffset` is where it sits in the file asking for it."""

    id: int
    digest: bytes
    blob: int
    offset: int
    csize: int
    usize: int
    uoffset: int
    foffset: int = 0


class BootstrapWriter:
    """Writes a bootstrap. Callers add rows in a deterministic order, then `finish()`."""

    def __init__(self, path: str, chunk_size: int):
        self.path = path
        self.chunk_size = chunk_size
        if os.path.exists(path):
            os.unlink(path)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        self._db.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
        self._db.executescript(SCHEMA)
        self._db.execute("BEGIN")
        self._db.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [("format", "naiad-bootstrap"), ("version", str(FORMAT_VERSION)),
             ("chunk_size", str(chunk_size))],
        )

    def add_inodes(self, rows: Iterable[tuple]) -> None:
        """Rows of (ino, mode, nlink, uid, gid, size, mtime, mtime_nsec, rdev, target)."""
        self._db.executemany("INSERT INTO inodes VALUES (?,?,?,?,?,?,?,?,?,?)", rows)

    def add_dentries(self, rows: Iterable[tuple[int, bytes, int]]) -> None:
        self._db.executemany("INSERT INTO dentries VALUES (?,?,?)", rows)

    def add_xattrs(self, rows: Iterable[tuple[int, bytes, bytes]]) -> None:
        self._db.executemany("INSERT INTO xattrs VALUES (?,?,?)", rows)

    def add_blobs(self, rows: Iterable[tuple[int, str, int, str]]) -> None:
        self._db.executemany("INSERT INTO blobs VALUES (?,?,?,?)", rows)

    def add_chunks(self, rows: Iterable[tuple[int, bytes, int, int, int, int, int]]) -> None:
        """Rows of (id, digest, blob, offset, csize, usize, uoffset)."""
        self._db.executemany("INSERT INTO chunks VALUES (?,?,?,?,?,?,?)", rows)

    def add_file_chunks(self, rows: Iterable[tuple[int, int, int]]) -> None:
        self._db.executemany("INSERT INTO file_chunks VALUES (?,?,?)", rows)

    def set_prefetch(self, entries: Iterable[tuple[int, int | None]]) -> None:
        """(ino, foffset) in fetch order; foffset None means the whole file."""
        self._db.executemany("INSERT INTO prefetch VALUES (?,?,?)",
                             ((i, ino, foff) for i, (ino, foff) in enumerate(entries, 1)))

    def add_hints(self, rows: Iterable[tuple[int, int, int, int, int]]) -> None:
        """Rows of (trigger chunk id, seq, target ino, foffset, size); size -1 means to the end."""
        self._db.executemany("INSERT INTO hints VALUES (?,?,?,?,?)", rows)

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def finish(self) -> None:
        self._db.execute("COMMIT")
        self._db.execute("VACUUM")
        self._db.close()
        _normalise_header(self.path)

    def abort(self) -> None:
        self._db.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


@dataclasses.dataclass(frozen=True)
class ChunkMove:
    """A chunk's new home (for relayout): blob id, offset, stored size and uncompressed offset there."""

    chunk: int
    blob: int
    offset: int
    csize: int
    uoffset: int


def rewrite(src: str, dst: str, prefetch: Iterable[tuple[int, int | None]],
            new_blobs: Iterable[tuple[int, str, int, str]] = (), moves: Iterable[ChunkMove] = ()) -> None:
    """Write at `dst` a copy of bootstrap `src` with a new prefetch list, reproducibly.

    `new_blobs` rows (id, digest, size, compressor) are added and `moves`
    re-home chunks into them; blobs no chunk is left in are dropped.
    """
    shutil.copyfile(src, dst)
    db = sqlite3.connect(dst, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("BEGIN")
        db.execute("DELETE FROM prefetch")
        db.executemany("INSERT INTO prefetch VALUES (?,?,?)",
                       ((i, ino, foff) for i, (ino, foff) in enumerate(prefetch, 1)))
        db.executemany("INSERT INTO blobs VALUES (?,?,?,?)", new_blobs)
        db.executemany("UPDATE chunks SET blob = ?, offset = ?, csize = ?, uoffset = ? WHERE id = ?",
                       ((m.blob, m.offset, m.csize, m.uoffset, m.chunk) for m in moves))
        db.execute("DELETE FROM blobs WHERE id NOT IN (SELECT DISTINCT blob FROM chunks)")
        db.execute("COMMIT")
        db.execute("VACUUM")
    finally:
        db.close()
    _normalise_header(dst)


def _normalise_header(path: str) -> None:
    # Bytes 96..99 of an SQLite header hold the version of the library that
    # last wrote the file; zero them so that digests do not depend on it.
    with open(path, "r+b") as f:
        f.seek(96)
        f.write(b"\0\0\0\0")


class Bootstrap:
    """A read-only bootstrap. Safe to share between threads (reads are serialised by SQLite)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise FormatError(f"bootstrap {path} does not exist")
        try:
            self._db = sqlite3.connect(
                f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False,
                isolation_level=None,
            )
            meta = dict(self._db.execute("SELECT key, value FROM meta"))
        except sqlite3.DatabaseError as e:
            raise FormatError(f"{path} is not a naiad bootstrap: {e}") from None
        if meta.get("format") != "naiad-bootstrap":
            raise FormatError(f"{path} is not a naiad bootstrap")
        if meta.get("version") != str(FORMAT_VERSION):
            raise FormatError(f"{path}: bootstrap version {meta.get('version')} is not supported")
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(chunks)")}
        columns |= {r[1] for r in self._db.execute("PRAGMA table_info(prefetch)")}
        if "uoffset" not in columns or "foffset" not in columns:
            raise FormatError(f"{path}: bootstrap from a pre-release naiad (old schema); reconvert")
        self.meta = meta
        self.chunk_size = int(meta["chunk_size"])
        # Bootstraps written before access hints (docs/format.md §10) have no such table.
        self.has_hints = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'hints'").fetchone() is not None
        if self.has_hints:
            self.has_hints = self._db.execute("SELECT 1 FROM hints LIMIT 1").fetchone() is not None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Bootstrap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- tree ----------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> int | None:
        row = self._db.execute(
            "SELECT ino FROM dentries WHERE parent = ? AND name = ?", (parent, name)
        ).fetchone()
        return row[0] if row else None

    def lookup_attr(self, parent: int, name: bytes) -> Attr | None:
        """lookup() and getattr() in one query."""
        row = self._db.execute(
            "SELECT i.ino, i.mode, i.nlink, i.uid, i.gid, i.size, i.mtime, i.mtime_nsec, i.rdev"
            " FROM dentries d JOIN inodes i ON i.ino = d.ino WHERE d.parent = ? AND d.name = ?",
            (parent, name),
        ).fetchone()
        return Attr(*row) if row else None

    def getattr(self, ino: int) -> Attr:
        row = self._db.execute(
            "SELECT ino, mode, nlink, uid, gid, size, mtime, mtime_nsec, rdev FROM inodes WHERE ino = ?",
            (ino,),
        ).fetchone()
        if row is None:
            raise FormatError(f"inode {ino} does not exist")
        return Attr(*row)

    def readdir(self, ino: int, after: bytes = b"", limit: int = -1) -> list[tuple[bytes, int]]:
        """Entries of directory `ino` with names sorted bytewise and greater than `after`."""
        return self._db.execute(
            "SELECT name, ino FROM dentries WHERE parent = ? AND name > ? ORDER BY name LIMIT ?",
            (ino, after, limit),
        ).fetchall()

    def readdir_attrs(self, ino: int) -> list[tuple[bytes, Attr]]:
        rows = self._db.execute(
            "SELECT d.name, i.ino, i.mode, i.nlink, i.uid, i.gid, i.size, i.mtime, i.mtime_nsec,"
            " i.rdev FROM dentries d JOIN inodes i ON i.ino = d.ino WHERE d.parent = ?"
            " ORDER BY d.name",
            (ino,),
        ).fetchall()
        return [(r[0], Attr(*r[1:])) for r in rows]

    def readlink(self, ino: int) -> bytes:
        row = self._db.execute("SELECT target FROM inodes WHERE ino = ?", (ino,)).fetchone()
        if row is None or row[0] is None:
            raise FormatError(f"inode {ino} is not a symlink")
        return row[0]

    def xattrs(self, ino: int) -> list[tuple[bytes, bytes]]:
        return self._db.execute(
            "SELECT name, value FROM xattrs WHERE ino = ? ORDER BY name", (ino,)
        ).fetchall()

    def inodes_with_xattrs(self) -> set[int]:
        return {r[0] for r in self._db.execute("SELECT DISTINCT ino FROM xattrs")}

    def resolve(self, path: str | bytes) -> int | None:
        """The inode at `path` (absolute or relative to the root), without following symlinks."""
        ino: int | None = ROOT_INO
        for part in os.fsencode(path).split(b"/"):
            if part in (b"", b"."):
                continue
            ino = self.lookup(ino, part)
            if ino is None:
                return None
        return ino

    def path_of(self, ino: int) -> str:
        """One path of `ino` (for messages; a slow reverse walk)."""
        parts: list[bytes] = []
        while ino != ROOT_INO:
            row = self._db.execute(
                "SELECT parent, name FROM dentries WHERE ino = ? LIMIT 1", (ino,)
            ).fetchone()
            if row is None:
                break
            ino = row[0]
            parts.append(row[1])
        return "/" + os.fsdecode(b"/".join(reversed(parts)))

    def paths_of(self, inos: Iterable[int]) -> dict[int, str]:
        """A path of each inode in `inos`, in one walk of the tree (path_of is one scan per level)."""
        wanted = set(inos)
        found: dict[int, str] = {}
        for path, _parent, attr in self.walk():
            if attr.ino in wanted and attr.ino not in found:
                found[attr.ino] = os.fsdecode(path)
                if len(found) == len(wanted):
                    break
        return found

    def walk(self) -> Iterator[tuple[bytes, int, Attr]]:
        """(path, parent ino, attributes) of every entry, depth first, children sorted by name."""
        stack: list[tuple[bytes, int]] = [(b"", ROOT_INO)]
        while stack:
            prefix, dino = stack.pop()
            entries = self.readdir_attrs(dino)
            for name, attr in entries:
                yield prefix + b"/" + name, dino, attr
            stack.extend((prefix + b"/" + n, a.ino) for n, a in reversed(entries) if a.is_dir)

    # --- chunks --------------------------------------------------------

    def blobs(self) -> list[Blob]:
        return [Blob(*r) for r in self._db.execute("SELECT * FROM blobs ORDER BY id")]

    def file_chunks(self, ino: int, offset: int = 0, size: int = -1) -> list[Chunk]:
        """The chunks of file `ino` that cover bytes [offset, offset+size), in file order."""
        end = offset + size if size >= 0 else 1 << 62
        return [
            Chunk(*r)
            for r in self._db.execute(
                "SELECT c.id, c.digest, c.blob, c.offset, c.csize, c.usize, c.uoffset, f.foffset"
                " FROM file_chunks f JOIN chunks c ON c.id = f.chunk"
                " WHERE f.ino = ? AND f.foffset < ? AND f.foffset >= ?"
                " ORDER BY f.foffset",
                (ino, end, _chunk_floor(self, ino, offset)),
            )
        ]

    def chunks(self) -> Iterator[Chunk]:
        """Every stored chunk, ordered by blob and offset (the order to stream blobs in)."""
        for r in self._db.execute(
            "SELECT id, digest, blob, offset, csize, usize, uoffset FROM chunks ORDER BY blob, offset"
        ):
            yield Chunk(*r)

    def blob_chunks_between(self, blob: int, start: int, stop: int) -> list[Chunk]:
        """The chunks of `blob` stored from `start` on that begin before `stop`, in blob order."""
        return [
            Chunk(*r)
            for r in self._db.execute(
                "SELECT id, digest, blob, offset, csize, usize, uoffset FROM chunks"
                " WHERE blob = ? AND offset >= ? AND offset < ? ORDER BY offset",
                (blob, start, stop),
            )
        ]

    def files_of_chunk(self, chunk_id: int) -> list[int]:
        return [r[0] for r in self._db.execute(
            "SELECT DISTINCT ino FROM file_chunks WHERE chunk = ? ORDER BY ino", (chunk_id,))]

    def prefetch_list(self) -> list[tuple[int, int | None]]:
        """(ino, foffset) in fetch order; foffset None means the whole file."""
        return self._db.execute("SELECT ino, foffset FROM prefetch ORDER BY seq").fetchall()

    def prefetch_chunks(self) -> list[Chunk]:
        """The chunks the prefetch list names, in its order, each once."""
        return self.prefetch_chunks_of(self.prefetch_list())

    def prefetch_chunks_of(self, entries: Iterable[tuple[int, int | None]]) -> list[Chunk]:
        """The chunks that (ino, foffset) entries name, in order, each once."""
        out: list[Chunk] = []
        seen: set[int] = set()
        for ino, foffset in entries:
            chunks = self.file_chunks(ino) if foffset is None else self.file_chunks(ino, foffset, 1)
            for c in chunks:
                if c.id not in seen:
                    seen.add(c.id)
                    out.append(c)
        return out

    def hints_of(self, chunk_id: int) -> list[tuple[int, int, int]]:
        """(ino, foffset, size) to fetch once the file starting with chunk `chunk_id` is read."""
        if not self.has_hints:
            return []
        return self._db.execute(
            "SELECT ino, foffset, size FROM hints WHERE chunk = ? ORDER BY seq", (chunk_id,)).fetchall()

    def first_chunk(self, ino: int) -> int | None:
        """The id of the chunk that file `ino` starts with."""
        row = self._db.execute("SELECT chunk FROM file_chunks WHERE ino = ? AND foffset = 0",
                               (ino,)).fetchone()
        return row[0] if row else None

    def count(self, table: str) -> int:
        if table not in ("inodes", "dentries", "chunks", "file_chunks", "blobs", "xattrs", "hints"):
            raise ValueError(table)
        return self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Run a read-only aggregate query (for statistics)."""
        return self._db.execute(sql, args).fetchall()


def _chunk_floor(bs: Bootstrap, ino: int, offset: int) -> int:
    # The chunk holding `offset` starts at the largest foffset <= offset.
    if offset == 0:
        return 0
    row = bs._db.execute(
        "SELECT max(foffset) FROM file_chunks WHERE ino = ? AND foffset <= ?", (ino, offset)
    ).fetchone()
    return row[0] if row and row[0] is not None else 0
