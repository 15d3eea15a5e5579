"""The peer's piece store on disk: verified pieces only, a size quota, LRU eviction, kept across restarts.

Layout under the data directory:

    tasks/<blob hex>/meta.json             {"digest", "size", "piece_size", "verified"}
    tasks/<blob hex>/<index>.<piece hex>   one verified piece, named by its sha256

A piece is written to a temporary name and renamed only once its bytes have
been checked against its digest, so a crash never leaves a half-written piece
that looks present; temporaries are swept at start. A piece's name carries its
digest, so a restart knows what it holds without a database and re-checks a
piece the first time it serves it. The quota is kept by evicting whole tasks,
least recently used first; tasks being downloaded or read are pinned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import threading
import time

from naiad.p2p.pieces import check_task, is_piece_hash, piece_count, piece_hash, piece_size_for

log = logging.getLogger(__name__)


class PieceMissing(Exception):
    """The store does not hold this piece (any more)."""


@dataclasses.dataclass
class TaskRecord:
    digest: str
    size: int
    piece_size: int
    pieces: dict[int, str] = dataclasses.field(default_factory=dict)  # index -> piece sha256 hex
    verified: bool = False  # the whole blob was checked against its digest
    last_used: float = 0.0
    pins: int = 0
    bytes: int = 0
    checked: set[int] = dataclasses.field(default_factory=set)  # pieces re-read and re-hashed since start

    @property
    def count(self) -> int:
        return piece_count(self.size, self.piece_size)

    @property
    def complete(self) -> bool:
        return len(self.pieces) == self.count


class PieceStore:
    def __init__(self, root: str, quota: int | None = None):
        self.root = os.path.abspath(root)
        self.quota = quota
        self._tasks_dir = os.path.join(self.root, "tasks")
        os.makedirs(self._tasks_dir, exist_ok=True)
        self._lock = threading.RLock()
        self.tasks: dict[str, TaskRecord] = {}
        self._load()

    # --- loading ------------------------------------------------------------------

    def _dir(self, digest: str) -> str:
        return os.path.join(self._tasks_dir, digest.removeprefix("sha256:"))

    def _load(self) -> None:
        for name in os.listdir(self._tasks_dir):
            path = os.path.join(self._tasks_dir, name)
            try:
                with open(os.path.join(path, "meta.json"), "rb") as f:
                    meta = json.load(f)
                digest = check_task(meta["digest"])
                size = int(meta["size"])
                if digest != "sha256:" + name or meta["piece_size"] != piece_size_for(size):
                    raise ValueError("meta.json does not match its directory")
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("store: dropping unreadable task directory %s (%s)", name, e)
                shutil.rmtree(path, ignore_errors=True)
                continue
            record = TaskRecord(digest, size, piece_size_for(size), verified=bool(meta.get("verified")),
                                last_used=os.stat(os.path.join(path, "meta.json")).st_mtime)
            for entry in os.listdir(path):
                index, _, hexdigest = entry.partition(".")
                if entry.startswith(".tmp-") or (index.isdigit() and not is_piece_hash(hexdigest)):
                    os.unlink(os.path.join(path, entry))  # a write a crash interrupted
                elif index.isdigit() and int(index) < record.count:
                    record.pieces[int(index)] = hexdigest
                    record.bytes += os.path.getsize(os.path.join(path, entry))
            self.tasks[digest] = record
        log.info("store %s: %d tasks, %d bytes", self.root, len(self.tasks), self.usage())

    # --- queries ---------------------------------------------------------------------

    def usage(self) -> int:
        with self._lock:
            return sum(t.bytes for t in self.tasks.values())

    def get(self, digest: str) -> TaskRecord | None:
        with self._lock:
            return self.tasks.get(digest)

    def has(self, digest: str, index: int) -> bool:
        with self._lock:
            record = self.tasks.get(digest)
            return record is not None and index in record.pieces

    def _piece_path(self, record: TaskRecord, index: int) -> str:
        return os.path.join(self._dir(record.digest), f"{index}.{record.pieces[index]}")

    # --- changes -----------------------------------------------------------------------

    def open_task(self, digest: str, size: int) -> TaskRecord:
        """The record of `digest`, created (meta.json written) if new; pinned until `release`."""
        with self._lock:
            record = self.tasks.get(digest)
            if record is not None and record.size != size:
                # Two sizes for one digest: one of them is wrong; what we hold cannot be trusted.
                log.warning("store: %s was %d bytes, now said to be %d: dropping it", digest,
                            record.size, size)
                self._remove(record)
                record = None
            if record is None:
                record = TaskRecord(check_task(digest), size, piece_size_for(size))
                os.makedirs(self._dir(digest), exist_ok=True)
                self._write_meta(record)
                self.tasks[digest] = record
            record.pins += 1
            record.last_used = time.time()
            return record

    def release(self, record: TaskRecord) -> None:
        with self._lock:
            record.pins -= 1

    def _write_meta(self, record: TaskRecord) -> None:
        meta = {"digest": record.digest, "size": record.size, "piece_size": record.piece_size,
                "verified": record.verified}
        directory = self._dir(record.digest)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, os.path.join(directory, "meta.json"))

    def read(self, record: TaskRecord, index: int) -> bytes:
        """The piece's bytes, re-hashed the first time after a start; a piece that fails is dropped."""
        with self._lock:
            if index not in record.pieces:
                raise PieceMissing(f"{record.digest} piece {index}")
            path, expected = self._piece_path(record, index), record.pieces[index]
            record.last_used = time.time()
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self.drop_piece(record, index)
            raise PieceMissing(f"{record.digest} piece {index}") from None
        if index not in record.checked:
            if piece_hash(data) != expected:
                log.error("store: %s piece %d is corrupt on disk; dropped", record.digest, index)
                self.drop_piece(record, index)
                raise PieceMissing(f"{record.digest} piece {index} (corrupt on disk)")
            record.checked.add(index)
        return data

    def put(self, record: TaskRecord, index: int, data: bytes, hexdigest: str) -> list[TaskRecord]:
        """Store a piece already checked against `hexdigest`; returns the tasks evicted for room.

        When even eviction cannot make room (the quota is smaller than what is
        pinned), the piece is not kept: the caller still has it in memory.
        """
        with self._lock:
            if index in record.pieces or self.tasks.get(record.digest) is not record:
                return []
            evicted = self._make_room(len(data), record)
            if self.quota is not None and self.usage() + len(data) > self.quota:
                log.warning("store: quota %d reached by pinned tasks; piece not kept", self.quota)
                return evicted
            directory = self._dir(record.digest)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.rename(tmp, os.path.join(directory, f"{index}.{hexdigest}"))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with self._lock:
            record.pieces[index] = hexdigest
            record.checked.add(index)
            record.bytes += len(data)
        return evicted

    def mark_verified(self, record: TaskRecord) -> None:
        with self._lock:
            record.verified = True
            self._write_meta(record)

    def drop_piece(self, record: TaskRecord, index: int) -> None:
        with self._lock:
            hexdigest = record.pieces.pop(index, None)
            record.checked.discard(index)
            record.verified = False
            if hexdigest is None:
                return
            path = os.path.join(self._dir(record.digest), f"{index}.{hexdigest}")
            with contextlib.suppress(FileNotFoundError):
                record.bytes -= os.path.getsize(path)
                os.unlink(path)

    def remove(self, digest: str) -> None:
        with self._lock:
            record = self.tasks.get(digest)
            if record is not None:
                self._remove(record)

    def _remove(self, record: TaskRecord) -> None:
        del self.tasks[record.digest]
        record.pieces.clear()
        record.bytes = 0
        shutil.rmtree(self._dir(record.digest), ignore_errors=True)

    def _make_room(self, need: int, keep: TaskRecord) -> list[TaskRecord]:
        if self.quota is None:
            return []
        evicted: list[TaskRecord] = []
        for record in sorted(self.tasks.values(), key=lambda r: r.last_used):
            if self.usage() + need <= self.quota:
                break
            if record is keep or record.pins > 0:
                continue
            log.info("store: evicting %s (%d bytes) for the quota", record.digest, record.bytes)
            self._remove(record)
            evicted.append(record)
        return evicted
