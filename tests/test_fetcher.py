"""The chunk fetcher's read-ahead and multi-range prefetch (storage/fetcher.py), against a real
naiad image in an OCI layout and on a real registry.

A read that pulls neighbours in by amplification answers with the chunks it asked for; the
neighbours are decoded, verified and cached after it (on a fetch thread), and one whose bytes
are wrong is neither cached nor served, without failing the read that brought it. From a
registry, the reader is answered as soon as its own chunks' bytes are in, before the rest of
the range; a connection cut after them costs one more request, not the read. A prefetch asks
for its scattered ranges of a blob in one request; a registry that answers that otherwise, or
cuts the answer off, is asked for the missing ranges one by one.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from naiad.errors import NaiadError
from naiad.format.bootstrap import Chunk
from naiad.oci.image import RegistryOptions, open_source
from naiad.oci.reference import parse_reference
from naiad.oci.registry import RegistrySource
from naiad.storage.cache import ChunkCache
from naiad.storage.fetcher import ChunkFetcher
from naiad.storage.image import NaiadImage


class LyingBackend:
    """The layout's blobs, with the stored bytes of one chunk altered on the way (a lying source)."""

    def __init__(self, source, bad: Chunk):
        self.source, self.bad = source, bad
        self.ranges: list[tuple[int, int]] = []

    def read_range(self, digest: str, offset: int, size: int) -> bytes:
        self.ranges.append((offset, size))
        data = bytearray(self.source.read_range(digest, offset, size))
        at = self.bad.offset - offset
        if 0 <= at < size:
            data[at] ^= 0xFF
        return bytes(data)


@pytest.fixture
def image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    tree = tmp_path / "tree"
    tree.mkdir()
    rnd = random.Random(7)
    for i in range(12):  # small files: a chunk each, stored one after another in one blob
        (tree / f"f{i:02d}").write_bytes(rnd.randbytes(20_000 + i))
    monkeypatch.setenv("NAIAD_HOME", str(tmp_path / "home"))
    subprocess.run([sys.executable, "-m", "naiad", "build", str(tree), f"oci:{tmp_path}/layout:t"],
                   check=True, capture_output=True, env=os.environ)
    source = open_source(parse_reference(f"oci:{tmp_path}/layout:t"))
    img = NaiadImage.open(source)
    chunks = sorted(img.bootstrap.chunks(), key=lambda c: (c.blob, c.offset))
    yield img, source, chunks
    img.close()


def test_read_ahead_lands_in_the_cache_and_a_bad_neighbour_does_not(image, tmp_path: Path) -> None:
    img, source, chunks = image
    assert len({c.blob for c in chunks}) == 1 and len(chunks) == 12
    asked, bad = chunks[0], chunks[5]
    backend = LyingBackend(source, bad)
    cache = ChunkCache(str(tmp_path / "cache"))
    fetcher = ChunkFetcher(img.bootstrap, backend, cache, amplify=1 << 20)
    [data] = fetcher.read([asked])
    assert hashlib.sha256(data).digest() == asked.digest
    assert len(backend.ranges) == 1 and backend.ranges[0][1] > asked.csize  # the neighbours came too
    fetcher.close()  # waits for the read-ahead to land
    for c in chunks:
        assert cache.contains(c.digest) == (c is not bad), c
        if c is not bad:
            assert hashlib.sha256(cache.get(c.digest)).digest() == c.digest
    fetcher = ChunkFetcher(img.bootstrap, backend, cache, amplify=1 << 20)
    with pytest.raises(NaiadError, match=r"does not match|corrupt"):
        fetcher.read([bad])
    assert not cache.contains(bad.digest)
    fetcher.close()
    cache.close()


def test_concurrent_readers_of_a_neighbour_get_its_verified_bytes(image, tmp_path: Path) -> None:
    img, source, chunks = image
    cache = ChunkCache(str(tmp_path / "cache"))
    fetcher = ChunkFetcher(img.bootstrap, source, cache, amplify=1 << 20)
    got = fetcher.read([chunks[0]])
    got += fetcher.read(chunks[1:])  # in flight or cached by now: no second fetch
    assert [hashlib.sha256(d).digest() for d in got] == [c.digest for c in chunks]
    assert fetcher.stats.requests == 1
    fetcher.close()
    cache.close()


@pytest.fixture
def on_registry(image, registry, fault_proxy, tmp_path: Path):
    """The image on the real registry, read through the fault proxy: (image, its chunks, source)."""
    img, _layout, chunks = image
    repo = f"fetcher/{uuid.uuid4().hex[:12]}"
    subprocess.run([sys.executable, "-m", "naiad", "copy", f"oci:{tmp_path}/layout:t",
                    f"docker://{registry.host}/{repo}:t"], check=True, capture_output=True, env=os.environ)
    source = RegistrySource(parse_reference(f"{fault_proxy.host}/{repo}:t"), RegistryOptions())
    yield img, chunks, source
    source.close()


def test_a_reader_is_answered_before_the_read_ahead_behind_its_chunk_arrives(
        on_registry, fault_proxy, tmp_path: Path) -> None:
    img, chunks, source = on_registry
    asked = chunks[0]
    cache = ChunkCache(str(tmp_path / "cache"))
    fetcher = ChunkFetcher(img.bootstrap, source, cache, amplify=1 << 20)
    release = threading.Event()
    # The response stops right after the asked chunk's bytes, until released.
    fault_proxy.stall_next(after=asked.csize, release=release)
    pool = ThreadPoolExecutor(1)
    try:
        [data] = pool.submit(fetcher.read, [asked]).result(timeout=10)
        assert hashlib.sha256(data).digest() == asked.digest
        assert not any(cache.contains(c.digest) for c in chunks[1:])  # still on their way
    finally:
        release.set()
        pool.shutdown()
    fetcher.close()
    for c in chunks:
        assert hashlib.sha256(cache.get(c.digest) or b"").digest() == c.digest, c
    assert [s.fault for s in fault_proxy.requests("GET", "/blobs/")] == ["stall"]  # one request for all
    cache.close()


def test_read_ahead_cut_off_after_the_head_is_fetched_again(on_registry, fault_proxy, tmp_path: Path) -> None:
    img, chunks, source = on_registry
    asked = chunks[0]
    cache = ChunkCache(str(tmp_path / "cache"))
    fetcher = ChunkFetcher(img.bootstrap, source, cache, amplify=1 << 20)
    fault_proxy.drop_next(after=asked.csize + 1000)  # the connection dies inside the next chunk
    [data] = fetcher.read([asked])
    assert hashlib.sha256(data).digest() == asked.digest
    fetcher.close()
    for c in chunks:
        assert hashlib.sha256(cache.get(c.digest) or b"").digest() == c.digest, c
    assert [s.fault for s in fault_proxy.requests("GET", "/blobs/")] == ["drop", None]
    assert fetcher.stats.errors == 0
    cache.close()


class BlockingBackend:
    """The layout's blobs, each read held until `release` is set."""

    def __init__(self, source):
        self.source = source
        self.release = threading.Event()
        self.reading = threading.Event()

    def read_range(self, digest: str, offset: int, size: int) -> bytes:
        self.reading.set()
        self.release.wait(30)
        return self.source.read_range(digest, offset, size)


def test_close_fails_queued_fetches_and_waits_only_so_long(image, tmp_path: Path) -> None:
    img, source, chunks = image
    backend = BlockingBackend(source)
    cache = ChunkCache(str(tmp_path / "cache"))
    # One fetch thread; a read-ahead of two neighbours (so each read below goes to the fetch
    # thread, and is a range of its own).
    fetcher = ChunkFetcher(img.bootstrap, backend, cache, amplify=3 * max(c.csize for c in chunks),
                           workers=1)
    pool = ThreadPoolExecutor(2)
    try:
        first = pool.submit(fetcher.read, [chunks[0]])
        assert backend.reading.wait(10)
        queued = pool.submit(fetcher.read, [chunks[6]])  # behind the first on the one fetch thread
        deadline = time.monotonic() + 10
        while chunks[6].digest not in fetcher._inflight and time.monotonic() < deadline:
            time.sleep(0.01)  # until that read has queued its fetch
        fetcher.close(timeout=0.5)
        assert not first.done()  # close() gave up on the fetch still held, and returned
        with pytest.raises(NaiadError, match="closed"):
            queued.result(timeout=10)
    finally:
        backend.release.set()
        pool.shutdown()
    assert hashlib.sha256(first.result()[0]).digest() == chunks[0].digest  # under way: it finished
    cache.close()


def _blob_gets(fault_proxy) -> list[tuple[str, str | None]]:
    """(Range header, fault) of each blob GET the proxy saw."""
    return [(s.headers.get("range", ""), s.fault) for s in fault_proxy.requests("GET", "/blobs/")]


def _range_header(c: Chunk) -> str:
    return f"bytes={c.offset}-{c.offset + c.csize - 1}"


def _assert_cached(cache: ChunkCache, chunks: list[Chunk]) -> None:
    for c in chunks:
        assert hashlib.sha256(cache.get(c.digest) or b"").digest() == c.digest, c


def test_a_prefetch_of_scattered_chunks_is_one_multi_range_request(
        on_registry, fault_proxy, tmp_path: Path) -> None:
    img, chunks, source = on_registry
    wanted = [chunks[i] for i in (11, 0, 7, 2, 3)]  # four ranges: 2 and 3 are back to back
    cache = ChunkCache(str(tmp_path / "cache"))
    fetcher = ChunkFetcher(img.bootstrap, source, cache)
    assert fetcher.multi_range
    fetcher.prefetch(wanted)
    fetcher.close()
    _assert_cached(cache, wanted)
    [(asked, fault)] = _blob_gets(fault_proxy)
    # In the order asked for (what is wanted first comes first), not the blob's.
    two_three = f"{chunks[2].offset}-{chunks[3].offset + chunks[3].csize - 1}"
    assert asked == "bytes=" + ",".join(
        [_range_header(chunks[i]).removeprefix("bytes=") for i in (11, 0, 7)] + [two_three])
    assert fault is None
    assert (fetcher.stats.requests, fetcher.stats.ranges) == (1, 4)
    assert not any(cache.contains(c.digest) for c in chunks if c not in wanted)
    cache.close()


@pytest.mark.parametrize("server", ["ignores several ranges", "serves only the first"])
def test_a_registry_that_does_not_answer_multi_range_requests_gets_one_range_each(
        on_registry, fault_proxy, tmp_path: Path, server: str) -> None:
    img, chunks, source = on_registry
    rewrite = {"ignores several ranges": lambda header: None,  # a 200 with the whole blob
               "serves only the first": lambda header: _range_header(chunks[0])}[server]
    fault_proxy.rewrite_range_next(rewrite)
    cache = ChunkCache(str(tmp_path / "cache"))
    fetcher = ChunkFetcher(img.bootstrap, source, cache)
    fetcher.prefetch([chunks[i] for i in (0, 2, 4)])
    assert not fetcher.multi_range  # not asked that way again
    fetcher.prefetch([chunks[i] for i in (6, 8)])
    fetcher.close()
    _assert_cached(cache, [chunks[i] for i in (0, 2, 4, 6, 8)])
    gets = _blob_gets(fault_proxy)
    assert gets[0][1] == "range" and gets[0][0].count(",") == 2
    # A server that sent the first range has delivered it: only the others are asked again.
    again = (2, 4) if server == "serves only the first" else (0, 2, 4)
    singles = [h for h, _ in gets[1:]]
    assert singles[:len(again)] == [_range_header(chunks[i]) for i in again]
    # The next prefetch is one request per range (two at once: their order is the threads').
    assert sorted(singles[len(again):]) == sorted(_range_header(chunks[i]) for i in (6, 8))
    assert fetcher.stats.errors == 0
    cache.close()


def test_a_multi_range_answer_cut_off_midway_keeps_its_ranges_and_asks_for_the_rest(
        on_registry, fault_proxy, tmp_path: Path) -> None:
    img, chunks, source = on_registry
    wanted = [chunks[i] for i in (0, 2, 4, 6)]
    # The connection dies inside the third part (its headers and the first two parts are ~250 B
    # and 40 KB).
    fault_proxy.drop_next(after=wanted[0].csize + wanted[1].csize + 1000)
    cache = ChunkCache(str(tmp_path / "cache"))
    fetcher = ChunkFetcher(img.bootstrap, source, cache)
    fetcher.prefetch(wanted)
    fetcher.close()
    _assert_cached(cache, wanted)
    gets = _blob_gets(fault_proxy)
    assert gets[0][1] == "drop" and gets[0][0].count(",") == 3
    # The two parts that came are not asked for again; the others are, singly.
    assert sorted(h for h, _ in gets[1:]) == sorted(_range_header(c) for c in wanted[2:])
    assert fetcher.multi_range and fetcher.stats.errors == 0
    cache.close()
