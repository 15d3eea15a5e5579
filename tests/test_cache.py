"""The chunk cache's trust in its own rows: scoped to a boot (storage/cache.py)."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from naiad.storage import cache as cache_mod
from naiad.storage.cache import ChunkCache

BLOB = "sha256:" + "ab" * 32


def chunk(fill: bytes, n: int = 8192) -> tuple[bytes, bytes]:
    data = (fill * n)[:n]
    return hashlib.sha256(data).digest(), data


def damage(root: Path, uoffset: int) -> None:
    with open(root / "blobs" / BLOB.removeprefix("sha256:"), "r+b") as f:
        f.seek(uoffset + 100)
        f.write(b"\xff" * 16)


def hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the cache's sha256 calls from now on."""
    calls = [0]
    real = hashlib.sha256

    def counting(data: bytes = b""):
        calls[0] += 1
        return real(data)

    monkeypatch.setattr(cache_mod.hashlib, "sha256", counting)
    return calls


def test_rows_of_this_boot_are_read_in_part_without_hashing(tmp_path: Path, monkeypatch) -> None:
    digest, data = chunk(b"naiad")
    writer = ChunkCache(str(tmp_path), boot="boot-a")
    writer.put(digest, BLOB, 4096, data)
    writer.close()
    calls = hashes(monkeypatch)
    reader = ChunkCache(str(tmp_path), boot="boot-a")
    assert reader.read_part(digest, 100, 50) == data[100:150]
    assert reader.get(digest) == data
    assert calls[0] == 0
    reader.close()


def test_rows_of_an_earlier_boot_are_checked_once_and_damage_is_dropped(tmp_path: Path, monkeypatch) -> None:
    good_digest, good = chunk(b"good")
    bad_digest, bad = chunk(b"bad!")
    writer = ChunkCache(str(tmp_path), boot="boot-a")
    writer.put_many(BLOB, [(good_digest, 0, good), (bad_digest, 8192, bad)])
    writer.close()
    damage(tmp_path, 8192)  # e.g. bytes a power loss kept from reaching the disk
    calls = hashes(monkeypatch)
    reader = ChunkCache(str(tmp_path), boot="boot-b")
    assert reader.read_part(good_digest, 10, 20) == good[10:30]
    assert reader.read_part(bad_digest, 0, 10) is None  # never the damaged bytes
    assert calls[0] == 2
    assert reader.get(good_digest) == good
    assert calls[0] == 2  # checked once per process
    reader.close()
    # The good row now belongs to boot b, the bad one is gone: a new process of boot b trusts it.
    again = ChunkCache(str(tmp_path), boot="boot-b")
    assert again.lookup(bad_digest) is None
    assert again.get(good_digest) == good
    assert calls[0] == 2
    again.close()


def test_a_cache_without_the_boot_column_is_upgraded_and_rechecked(tmp_path: Path, monkeypatch) -> None:
    digest, data = chunk(b"old")
    writer = ChunkCache(str(tmp_path), boot="boot-a")
    writer.put(digest, BLOB, 0, data)
    writer.close()
    db = sqlite3.connect(tmp_path / "index.db")
    db.executescript("""
        CREATE TABLE old (digest BLOB PRIMARY KEY, blob TEXT NOT NULL, uoffset INTEGER NOT NULL,
                          usize INTEGER NOT NULL, atime INTEGER NOT NULL) WITHOUT ROWID;
        INSERT INTO old SELECT digest, blob, uoffset, usize, atime FROM chunks;
        DROP TABLE chunks;
        ALTER TABLE old RENAME TO chunks;
    """)
    db.close()
    calls = hashes(monkeypatch)
    reader = ChunkCache(str(tmp_path), boot="boot-a")
    assert reader.get(digest) == data
    assert calls[0] == 1  # rows from before boots were recorded are checked
    reader.close()


def test_a_file_shorter_than_its_rows_is_not_served(tmp_path: Path) -> None:
    digest, data = chunk(b"tail")
    writer = ChunkCache(str(tmp_path), boot="boot-a")
    writer.put(digest, BLOB, 4096, data)
    writer.close()
    path = tmp_path / "blobs" / BLOB.removeprefix("sha256:")
    with open(path, "r+b") as f:
        f.truncate(4096 + 100)
    reader = ChunkCache(str(tmp_path), boot="boot-a")
    assert reader.read_part(digest, 0, 8192) is None
    assert reader.lookup(digest) is None
    reader.close()


def test_asking_for_trusted_chunks_of_an_uncached_blob_makes_no_file(tmp_path: Path) -> None:
    digest, data = chunk(b"some")
    cache = ChunkCache(str(tmp_path), boot="boot-a")
    assert cache.trusted_in_file(BLOB) == []
    assert list((tmp_path / "blobs").iterdir()) == []  # an empty file no row names: never evicted
    cache.put(digest, BLOB, 4096, data)
    cache.close()
    again = ChunkCache(str(tmp_path), boot="boot-a")
    assert again.trusted_in_file(BLOB) == [(digest, 4096)]
    assert again.verified(digest) is not None
    again.close()
