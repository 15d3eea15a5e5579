"""The layer-wise build cache: what earlier conversions on this machine made of each source layer.

`$NAIAD_HOME/layers/index.db` (SQLite) maps a source layer, keyed by its
compressed digest, the chunk size and how chunks are stored (the compressor,
and zstd's level unless 3: `BuildOptions.stored_as`), to the layer's entries
(every LayerEntry field, whiteouts and opaque markers included, with each
file's chunk digests) and to the naiad image (pinned by manifest digest) whose
blobs hold those chunks. A later `naiad convert` of an image sharing that
layer takes its entries from here instead of reading the layer, opens the
recorded naiad image as a chunk dictionary (builder/chunkdict.py) and copies
the layer's compressed chunks out of it (builder/convert.py says why copied).

The cache is only a shortcut: where it is missing, damaged or points at an
image that is gone, the layer is converted from the source as usual. Chunk
locations are deliberately not copied in here: they are read from the
recorded image itself, which verifies that it still exists and is intact.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import struct
from collections.abc import Iterable

from naiad.oci.layer import LayerEntry
from naiad.paths import naiad_home

CACHE_VERSION = "1"
DIGEST_SIZE = 32

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS layers (
    id INTEGER PRIMARY KEY, digest TEXT NOT NULL, chunk_size INTEGER NOT NULL, compressor TEXT NOT NULL,
    image TEXT NOT NULL, manifest TEXT NOT NULL, UNIQUE (digest, chunk_size, compressor));
CREATE TABLE IF NOT EXISTS entries (
    layer INTEGER NOT NULL, seq INTEGER NOT NULL, path BLOB NOT NULL, kind TEXT NOT NULL,
    mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL, link BLOB NOT NULL, rdev INTEGER NOT NULL, xattrs BLOB, chunks BLOB,
    PRIMARY KEY (layer, seq)) WITHOUT ROWID;
"""

# What the converter keeps per layer: its entries in tar order, each with its chunk digests (None if
# the entry has no data, [] for an empty file), and the set of all its chunk digests.
LayerEntries = list[tuple[LayerEntry, list[bytes] | None]]
LayerResult = tuple[LayerEntries, set[bytes]]


@dataclasses.dataclass(frozen=True)
class CachedLayer:
    id: int
    digest: str
    image: str  # reference of the naiad image holding the chunks, pinned by digest
    manifest: str


def default_path() -> str:
    return os.path.join(naiad_home(), "layers", "index.db")


class LayerCache:
    """One connection to the cache database; use from one thread."""

    def __init__(self, path: str | None = None):
        path = path or default_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Autocommit mode: every write below is one explicit transaction, committed or rolled back whole.
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
        try:
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.executescript(SCHEMA)
            version = self.db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
            if version is None or version[0] != CACHE_VERSION:
                # A cache of another version is not read: it is cleared (it only ever saves time).
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute("DELETE FROM entries")
                self.db.execute("DELETE FROM layers")
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (CACHE_VERSION,))
                self.db.execute("COMMIT")
        except BaseException:
            self.db.close()
            raise

    def lookup(self, digest: str, chunk_size: int, compressor: str) -> CachedLayer | None:
        row = self.db.execute(
            "SELECT id, image, manifest FROM layers WHERE digest = ? AND chunk_size = ? AND compressor = ?",
            (digest, chunk_size, compressor)).fetchone()
        return CachedLayer(row[0], digest, row[1], row[2]) if row else None

    def entries(self, layer: CachedLayer) -> LayerResult:
        """The layer's entries and chunk digests, as reading the layer would have produced them."""
        entries: LayerEntries = []
        chunks: set[bytes] = set()
        for path, kind, mode, uid, gid, mtime_ns, size, link, rdev, xattrs, blob in self.db.execute(
                "SELECT path, kind, mode, uid, gid, mtime_ns, size, link, rdev, xattrs, chunks "
                "FROM entries WHERE layer = ? ORDER BY seq", (layer.id,)):
            entry = LayerEntry(bytes(path), kind, mode, uid, gid, mtime_ns, size, bytes(link), rdev,
                               _decode_xattrs(xattrs))
            digests = None
            if blob is not None:
                blob = bytes(blob)
                if len(blob) % DIGEST_SIZE:
                    raise sqlite3.DatabaseError(f"layer {layer.digest}: damaged chunk list")
                digests = [blob[i:i + DIGEST_SIZE] for i in range(0, len(blob), DIGEST_SIZE)]
                chunks.update(digests)
            entries.append((entry, digests))
        return entries, chunks

    def record(self, image: str, manifest: str, chunk_size: int, compressor: str,
               layers: Iterable[tuple[str, LayerEntries | None]]) -> None:
        """Point each layer at `image`; entries given replace the stored ones, None keeps them.

        One transaction: a crash leaves the cache as it was before or after, never half written.
        """
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for digest, entries in layers:
                row = self.db.execute(
                    "SELECT id FROM layers WHERE digest = ? AND chunk_size = ? AND compressor = ?",
                    (digest, chunk_size, compressor)).fetchone()
                if row is None and entries is None:
                    continue
                if row is None:
                    layer_id = self.db.execute(
                        "INSERT INTO layers (digest, chunk_size, compressor, image, manifest) "
                        "VALUES (?, ?, ?, ?, ?)", (digest, chunk_size, compressor, image, manifest)).lastrowid
                else:
                    layer_id = row[0]
                    self.db.execute("UPDATE layers SET image = ?, manifest = ? WHERE id = ?",
                                    (image, manifest, layer_id))
                if entries is None:
                    continue
                self.db.execute("DELETE FROM entries WHERE layer = ?", (layer_id,))
                self.db.executemany(
                    "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    ((layer_id, seq, e.path, e.kind, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.link, e.rdev,
                      _encode_xattrs(e.xattrs), None if digests is None else b"".join(digests))
                     for seq, (e, digests) in enumerate(entries)))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> LayerCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encode_xattrs(xattrs: dict[bytes, bytes]) -> bytes | None:
    if not xattrs:
        return None
    parts = []
    for k, v in xattrs.items():  # insertion order kept: the tree sees them as the layer gave them
        parts += [struct.pack(">I", len(k)), k, struct.pack(">I", len(v)), v]
    return b"".join(parts)


def _decode_xattrs(data: bytes | None) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    if data is None:
        return out
    data, pos = bytes(data), 0
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        k = data[pos + 4:pos + 4 + n]
        pos += 4 + n
        (n,) = struct.unpack_from(">I", data, pos)
        v = data[pos + 4:pos + 4 + n]
        pos += 4 + n
        out[k] = v
    if pos != len(data):
        raise sqlite3.DatabaseError("damaged xattrs")
    return out
