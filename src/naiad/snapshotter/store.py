"""The snapshotter's metadata: one SQLite database, crash-safe, shared by all request threads.

Snapshot names (containerd's keys) contain spaces and slashes, so they are only ever rows here;
on disk a snapshot is `snapshots/<id>/`, with `id` an integer that is never reused
(AUTOINCREMENT), so an orphan directory left by a crash can never be mistaken for a new
snapshot. Parents are referenced by id: a Commit renames a snapshot without touching its
children. Every change runs in one `BEGIN IMMEDIATE` transaction under a process-wide lock;
the database is in WAL mode with full sync, so a kill -9 loses no committed change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    name    TEXT NOT NULL UNIQUE,
    parent  INTEGER REFERENCES snapshots(id),
    kind    INTEGER NOT NULL,
    created INTEGER NOT NULL,           -- ns since the epoch
    updated INTEGER NOT NULL,
    labels  TEXT NOT NULL,              -- a JSON object
    size    INTEGER NOT NULL DEFAULT 0, -- usage, fixed at commit
    inodes  INTEGER NOT NULL DEFAULT 0,
    content TEXT NOT NULL DEFAULT 'dir', -- 'dir', 'empty' (a naiad data blob), 'lazy'
    lazy    TEXT REFERENCES lazy_mounts(key)
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
CREATE INDEX IF NOT EXISTS snapshots_lazy ON snapshots(lazy);
CREATE TABLE IF NOT EXISTS lazy_mounts (
    key     TEXT PRIMARY KEY,
    ref     TEXT NOT NULL,              -- the image, pinned to its manifest digest
    created INTEGER NOT NULL
);
"""


class Kind(enum.IntEnum):
    """Values of containerd.services.snapshots.v1.Kind."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclasses.dataclass(frozen=True)
class Snapshot:
    id: int
    name: str
    parent: str  # the parent's name, "" for none
    parent_id: int | None
    kind: Kind
    created: int
    updated: int
    labels: dict[str, str]
    size: int
    inodes: int
    content: str
    lazy: str | None


_SELECT = """SELECT s.id, s.name, COALESCE(p.name, ''), s.parent, s.kind, s.created, s.updated, s.labels,
                    s.size, s.inodes, s.content, s.lazy
             FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent"""


def _row(r: tuple[Any, ...]) -> Snapshot:
    return Snapshot(r[0], r[1], r[2], r[3], Kind(r[4]), r[5], r[6], json.loads(r[7]), *r[8:])


def now_ns() -> int:
    return time.time_ns()


class Tx:
    """The operations of one transaction (only valid inside `Store.transaction()`)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def get(self, name: str) -> Snapshot | None:
        r = self.db.execute(_SELECT + " WHERE s.name = ?", (name,)).fetchone()
        return _row(r) if r else None

    def by_id(self, id_: int) -> Snapshot:
        return _row(self.db.execute(_SELECT + " WHERE s.id = ?", (id_,)).fetchone())

    def all(self) -> list[Snapshot]:
        return [_row(r) for r in self.db.execute(_SELECT + " ORDER BY s.id")]

    def chain(self, snap: Snapshot) -> list[Snapshot]:
        """The ancestors of `snap`, nearest first."""
        out = []
        parent = snap.parent_id
        while parent is not None:
            p = self.by_id(parent)
            out.append(p)
            parent = p.parent_id
        return out

    def has_children(self, id_: int) -> bool:
        row = self.db.execute("SELECT 1 FROM snapshots WHERE parent = ? LIMIT 1", (id_,)).fetchone()
        return row is not None

    def insert(self, name: str, parent_id: int | None, kind: Kind, labels: dict[str, str],
               content: str = "dir", lazy: str | None = None) -> Snapshot:
        t = now_ns()
        cur = self.db.execute(
            "INSERT INTO snapshots (name, parent, kind, created, updated, labels, content, lazy) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (name, parent_id, int(kind), t, t, json.dumps(labels), content, lazy))
        return self.by_id(int(cur.lastrowid or 0))

    def commit(self, id_: int, name: str, labels: dict[str, str], size: int, inodes: int) -> Snapshot:
        t = now_ns()
        self.db.execute("UPDATE snapshots SET name = ?, kind = ?, labels = ?, size = ?, inodes = ?, "
                        "created = ?, updated = ? WHERE id = ?",
                        (name, int(Kind.COMMITTED), json.dumps(labels), size, inodes, t, t, id_))
        return self.by_id(id_)

    def set_labels(self, id_: int, labels: dict[str, str]) -> Snapshot:
        self.db.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
                        (json.dumps(labels), now_ns(), id_))
        return self.by_id(id_)

    def delete(self, id_: int) -> None:
        self.db.execute("DELETE FROM snapshots WHERE id = ?", (id_,))

    def ids(self) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT id FROM snapshots")}

    # --- lazy mounts ---

    def add_lazy(self, key: str, ref: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO lazy_mounts (key, ref, created) VALUES (?, ?, ?)",
                        (key, ref, now_ns()))

    def lazy_ref(self, key: str) -> str | None:
        r = self.db.execute("SELECT ref FROM lazy_mounts WHERE key = ?", (key,)).fetchone()
        return r[0] if r else None

    def lazy_users(self, key: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM snapshots WHERE lazy = ?", (key,)).fetchone()[0]

    def lazy_keys(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT key FROM lazy_mounts ORDER BY created")]

    def delete_lazy(self, key: str) -> None:
        self.db.execute("DELETE FROM lazy_mounts WHERE key = ?", (key,))


class Store:
    """The database at `path`; `transaction()` serialises writers and readers of this process."""

    def __init__(self, path: str):
        # One connection for all gRPC threads, always used under self._lock.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
