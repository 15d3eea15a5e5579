"""The P2P parts that need no network: piece arithmetic, piece store, consistent hashing, Range parsing."""

from __future__ import annotations

import collections
import hashlib
import os
from pathlib import Path

import pytest

from naiad.p2p.client import Ring
from naiad.p2p.mirror import _parse_range
from naiad.p2p.pieces import MIB, P2PError, check_task, covering, piece_count, piece_hash, piece_size_for
from naiad.p2p.security import AllowList, load_token
from naiad.p2p.store import PieceMissing, PieceStore


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_piece_size_grows_with_the_blob_and_pieces_cover_ranges() -> None:
    assert piece_size_for(0) == piece_size_for(100 * MIB) == 4 * MIB
    assert piece_size_for(4096 * MIB) == 4 * MIB  # 1024 pieces
    assert piece_size_for(4097 * MIB) == 8 * MIB
    assert piece_size_for(1 << 50) == 64 * MIB
    assert piece_count(0, 4 * MIB) == 1 and piece_count(4 * MIB + 1, 4 * MIB) == 2
    assert list(covering(4 * MIB - 1, 2, 4 * MIB)) == [0, 1]
    assert list(covering(8 * MIB, 4 * MIB, 4 * MIB)) == [2]
    assert list(covering(5, 0, 4 * MIB)) == []
    with pytest.raises(P2PError):
        check_task("sha256:../../etc")


def test_store_keeps_only_verified_whole_pieces_across_restarts(tmp_path: Path) -> None:
    blob = os.urandom(6 * MIB)
    digest = digest_of(blob)
    store = PieceStore(str(tmp_path))
    record = store.open_task(digest, len(blob))
    first, second = blob[:4 * MIB], blob[4 * MIB:]
    store.put(record, 0, first, piece_hash(first))
    store.put(record, 1, second, piece_hash(second))
    store.release(record)
    task_dir = tmp_path / "tasks" / digest[7:]
    (task_dir / ".tmp-crashed").write_bytes(b"half a piece")  # a write a crash interrupted
    (task_dir / "1.nothex").write_bytes(b"junk")

    again = PieceStore(str(tmp_path))
    record = again.get(digest)
    assert record is not None and record.complete and record.bytes == len(blob)
    assert sorted(p.name for p in task_dir.iterdir() if p.name.startswith(".") or "nothex" in p.name) == []
    assert again.read(record, 0) == first
    # Bit rot: the piece is re-hashed on its first read after a start, and dropped.
    path = next(p for p in task_dir.iterdir() if p.name.startswith("1."))
    path.write_bytes(b"x" + second[1:])
    with pytest.raises(PieceMissing):
        again.read(record, 1)
    assert 1 not in record.pieces and not path.exists()


def test_store_quota_evicts_least_recently_used_unpinned_tasks(tmp_path: Path) -> None:
    store = PieceStore(str(tmp_path), quota=10 * MIB)
    blobs = [os.urandom(4 * MIB) for _ in range(4)]
    records = []
    for blob in blobs[:2]:
        r = store.open_task(digest_of(blob), len(blob))
        store.put(r, 0, blob, piece_hash(blob))
        store.release(r)
        records.append(r)
    store.read(records[0], 0)  # task 0 is now the more recently used
    pinned = store.open_task(digest_of(blobs[2]), 4 * MIB)
    evicted = store.put(pinned, 0, blobs[2], piece_hash(blobs[2]))
    assert [r.digest for r in evicted] == [digest_of(blobs[1])]
    assert store.usage() == 8 * MIB
    # Everything else is pinned or is the piece's own task: the piece is not kept, nothing breaks.
    held = store.open_task(digest_of(blobs[0]), 4 * MIB)
    other = store.open_task(digest_of(blobs[3]), 4 * MIB)
    assert store.put(other, 0, blobs[3], piece_hash(blobs[3])) == []
    assert 0 not in other.pieces and store.usage() <= 10 * MIB
    store.release(held)


def test_ring_spreads_tasks_and_moves_few_when_a_scheduler_joins() -> None:
    tasks = [digest_of(str(i).encode()) for i in range(3000)]
    three = Ring(["a:1", "b:1", "c:1"])
    counts = collections.Counter(three.owner(t) for t in tasks)
    assert min(counts.values()) > 600  # roughly a third each
    four = Ring(["a:1", "b:1", "c:1", "d:1"])
    moved = sum(three.owner(t) != four.owner(t) for t in tasks)
    assert moved < 0.4 * len(tasks)  # about a quarter move, all of them to the new one
    assert all(four.owner(t) == "d:1" for t in tasks if three.owner(t) != four.owner(t))


def test_range_header_parsing() -> None:
    assert _parse_range(None, 100) is None
    assert _parse_range("bytes=0-9", 100) == (0, 10)
    assert _parse_range("bytes=90-", 100) == (90, 100)
    assert _parse_range("bytes=-10", 100) == (90, 100)
    assert _parse_range("bytes=50-1000", 100) == (50, 100)
    assert _parse_range("bytes=100-", 100) == "bad"
    assert _parse_range("bytes=-0", 100) == "bad"
    assert _parse_range("bytes=0-1,5-6", 100) is None  # several ranges: served whole, as RFC 9110 allows
    assert _parse_range("items=0-1", 100) is None


def test_allow_list_and_token_file(tmp_path: Path) -> None:
    allow = AllowList(["Registry.Example:5000", "docker.io"], ["10.0.0.1:5000"])
    assert allow.check("registry.example:5000") == "registry.example:5000"
    assert allow.check("index.docker.io") == "registry-1.docker.io"
    with pytest.raises(P2PError, match="allow-registry"):
        allow.check("registry.example:5001")
    assert allow.plain_http("127.0.0.1:5000") and allow.plain_http("10.0.0.1:5000")
    assert not allow.plain_http("registry.example:5000")
    with pytest.raises(P2PError, match="cannot read"):
        load_token(str(tmp_path / "missing"))
