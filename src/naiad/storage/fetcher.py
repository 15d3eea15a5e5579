"""Getting verified chunks: from the cache, else from the backend, fetched once.

`ChunkFetcher.read(chunks)` returns the uncompressed bytes of each chunk.
Cache misses are grouped into as few range requests as possible: chunks
adjacent in one blob become one request, and a small read may pull in the
chunks stored after it (read amplification: `amplify` bytes, or, by
default, as many as the link's latency and throughput make worth it, see
storage/link.py). A reader is answered once its own chunks are in and
verified: they come first in their range, and a backend that can
(`read_range_head_first`) hands them over before the read-ahead behind them
has arrived. Concurrent readers of the same chunk share one fetch. Every
fetched chunk is decoded and checked against its sha256 before it is cached
or returned; a chunk that fails is neither, and the next read tries again.
A prefetch (no reader waiting) asks for all its ranges of one blob in one
request where the backend can (`read_ranges`): a registry's cost is mostly
per request, not per byte.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from naiad.errors import NaiadError
from naiad.format.bootstrap import Blob, Bootstrap, Chunk
from naiad.format.chunk import decode_chunk
from naiad.storage.cache import ChunkCache
from naiad.storage.link import LinkEstimate
from naiad.storage.ranges import MAX_REQUEST, RangeReader, ReadHeadFirst, ReadRanges, contiguous_runs

log = logging.getLogger(__name__)

MAX_RANGES = 32  # ranges in one multi-range request: its Range header stays well under 1 KiB


class FetchError(NaiadError):
    """A chunk that could not be fetched or failed verification."""


@dataclasses.dataclass
class FetchStats:
    requests: int = 0
    bytes_fetched: int = 0
    chunks_fetched: int = 0
    chunks_from_cache: int = 0
    ranges: int = 0  # byte ranges those requests asked for (several in a multi-range request)
    misses: int = 0  # chunks a reader had to fetch itself
    joined: int = 0  # chunks a reader waited for while another fetch (read-ahead, hints) brought them
    miss_wait: float = 0.0  # seconds readers waited on fetches of their own (summed over readers)
    join_wait: float = 0.0  # seconds readers waited on fetches another one started
    reads: int = 0  # read requests the filesystem answered
    bytes_served: int = 0
    errors: int = 0
    latencies: list[float] = dataclasses.field(default_factory=list)

    def snapshot(self) -> dict:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else None

        return {
            "requests": self.requests, "ranges": self.ranges, "bytes_fetched": self.bytes_fetched,
            "chunks_fetched": self.chunks_fetched, "chunks_from_cache": self.chunks_from_cache,
            "misses": self.misses, "joined": self.joined,
            "miss_wait_s": round(self.miss_wait, 3), "join_wait_s": round(self.join_wait, 3),
            "reads": self.reads, "bytes_served": self.bytes_served, "errors": self.errors,
            "read_amplification": round(self.bytes_fetched / self.bytes_served, 3)
            if self.bytes_served else None,
            "fetch_ms_p50": pct(0.5), "fetch_ms_p99": pct(0.99),
        }


class ChunkFetcher:
    def __init__(self, bootstrap: Bootstrap, backend: RangeReader, cache: ChunkCache, *,
                 amplify: int | None = None, workers: int = 16):
        self.bootstrap = bootstrap
        self.backend = backend
        self.cache = cache
        self.amplify = amplify  # None: LinkEstimate's
        self.link = LinkEstimate()
        self._active = self._started = 0  # range requests running, and started so far
        self.blobs: dict[int, Blob] = {b.id: b for b in bootstrap.blobs()}
        self.stats = FetchStats()
        self._lock = threading.Lock()
        self._inflight: dict[bytes, Future[bytes]] = {}
        self._settled = threading.Condition(self._lock)  # notified when _inflight empties
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="naiad-fetch")
        # A backend that hands over the head of a range before its tail has arrived (the registry's,
        # the peer's); others return the whole range, and readers wait for it.
        self._read_head_first: ReadHeadFirst | None = getattr(backend, "read_range_head_first", None)
        self._read_ranges: ReadRanges | None = getattr(backend, "read_ranges", None)
        # Told the chunks each fetch has just put in the cache (verified, in their blob's own file).
        self.on_cached: Callable[[list[Chunk]], None] | None = None
        # Told the chunks a reader misses, before they are fetched (storage/hints.py).
        self.on_miss: Callable[[list[Chunk]], None] | None = None

    @property
    def multi_range(self) -> bool:
        """Whether a prefetch asks for several ranges of a blob in one request."""
        return self._read_ranges is not None and bool(getattr(self.backend, "multi_range", False))

    def read(self, chunks: list[Chunk], *, amplify: bool = True) -> list[bytes]:
        """Uncompressed bytes of each chunk, in order; FetchError if any cannot be had."""
        out: list[bytes | None] = []
        waits: list[tuple[int, Future[bytes]]] = []
        mine: list[Chunk] = []
        for i, chunk in enumerate(chunks):
            fut = None
            while (data := self.cache.get(chunk.digest)) is None:
                with self._lock:
                    fut = self._inflight.get(chunk.digest)
                    # A fetch puts its chunks in the cache before it leaves _inflight, so
                    # one that ended since get() above shows here: no second fetch.
                    if fut is None and not self.cache.contains(chunk.digest):
                        fut = self._inflight[chunk.digest] = Future()
                        mine.append(chunk)
                    elif fut is not None and amplify:
                        self.stats.joined += 1
                if fut is not None:
                    break
            if data is not None:
                out.append(data)
                with self._lock:
                    self.stats.chunks_from_cache += 1
                continue
            out.append(None)
            waits.append((i, fut))
        began = time.monotonic() if waits else 0.0  # a read served from the cache waits for nothing
        if mine:
            if amplify:  # a reader's miss, not a prefetch
                with self._lock:
                    self.stats.misses += len(mine)
                if self.on_miss is not None:
                    self.on_miss(mine)
            self._fetch(mine, amplify)
        for i, fut in waits:
            out[i] = fut.result()
        if waits and amplify:
            # A reader's stall, by who started what it waited for: its own misses (which hints
            # did not name in time) or fetches already in flight (hints or read-ahead, not yet in).
            waited = time.monotonic() - began
            with self._lock:
                if mine:
                    self.stats.miss_wait += waited
                else:
                    self.stats.join_wait += waited
        return out  # type: ignore[return-value]

    def served(self, nbytes: int, from_cache: int) -> None:
        """Count `nbytes` returned to a reader, `from_cache` chunks of them read from the cache
        without `read()`. Only the filesystem knows this: prefetch is not serving anyone."""
        with self._lock:
            self.stats.reads += 1
            self.stats.bytes_served += nbytes
            self.stats.chunks_from_cache += from_cache

    def prefetch(self, chunks: Iterable[Chunk]) -> None:
        """Fetch into the cache, without amplification (the list is the plan)."""
        self.read([c for c in chunks if not self.cache.contains(c.digest)], amplify=False)

    # --- fetching ------------------------------------------------------

    def _fetch(self, chunks: list[Chunk], amplify: bool) -> None:
        """Start fetching `chunks`; their futures in `_inflight` tell how it went.

        A range that ends with an asked chunk is fetched on the caller's thread: it waits for all
        of it anyway. One that goes on past them (read-ahead) runs on the pool, so that the caller
        can be answered once its own chunks are in and verified, while the rest still arrives.
        """
        asked = frozenset(c.digest for c in chunks)
        inline = None
        for blob, runs in self._plan(chunks, amplify):
            if inline is None and runs[-1][-1].digest in asked:
                inline = (blob, runs)
            else:
                try:
                    fetch = self._pool.submit(self._fetch_group, blob, runs, asked)
                except RuntimeError:  # close() came first
                    self._fail(_flat(runs), FetchError("the fetcher is closed"))
                    continue
                fetch.add_done_callback(functools.partial(self._fail_if_cancelled, _flat(runs)))
        if inline is not None:
            self._fetch_group(*inline, asked)

    def _plan(self, chunks: list[Chunk], amplify: bool) -> list[tuple[Blob, list[list[Chunk]]]]:
        """Merge chunks into requests: (blob, the contiguous ranges of one request, each a list
        of chunks). A reader's ranges are a request each (it is answered as its own range comes
        in); a prefetch's ranges of one blob share requests where the backend can, in the order
        of `chunks` (the hints' walk, the prefetch list's order: what is wanted first comes
        first, wherever it is in the blob; at 100 Mbit/s, torchapp's start took 8.3-9.6 s
        against 8.8-9.7 s in blob order, 4 alternating runs each; unshaped 4.6-4.7 s against
        4.3-4.6 s, 2 runs each, within the machine's noise)."""
        by_blob: dict[int, list[Chunk]] = {}
        for c in chunks:
            by_blob.setdefault(c.blob, []).append(c)
        multi = not amplify and self.multi_range
        asked = {c.id: i for i, c in enumerate(chunks)} if multi else {}
        requests: list[list[list[Chunk]]] = []
        for blob_id, items in by_blob.items():
            items.sort(key=lambda c: c.offset)
            if amplify:
                items = self._amplified(blob_id, items)
            runs = contiguous_runs(items)
            if multi:
                runs.sort(key=lambda run: min(asked.get(c.id, len(asked)) for c in run))
            requests.extend(_shared_requests(runs) if multi else [[run] for run in runs])
        return [(self.blobs[runs[0][0].blob], runs) for runs in requests]

    def _amplified(self, blob_id: int, items: list[Chunk]) -> list[Chunk]:
        """Add the chunks stored right after the asked ones, up to `amplify` bytes, if not cached."""
        amplify = self.link.amplify() if self.amplify is None else self.amplify
        if amplify <= 0:
            return items
        extra: dict[bytes, Chunk] = {}
        offsets = [c.offset for c in items]
        for i, c in enumerate(items):
            if i + 1 < len(items) and items[i + 1].offset == c.offset + c.csize:
                continue  # the asked chunk after it reads ahead for both
            budget = amplify - c.csize
            for n in self.bootstrap.blob_chunks_between(blob_id, c.offset + c.csize, c.offset + amplify):
                if budget < n.csize:
                    break
                budget -= n.csize
                j = bisect.bisect_left(offsets, n.offset)
                if (j < len(offsets) and offsets[j] == n.offset) or n.digest in extra:
                    continue  # asked for anyway
                # Stop at the first neighbour that is cached or being fetched: the range ends there.
                # (The cache is asked under the lock, as in read(), so that a fetch that just
                # ended is seen either in flight or cached.)
                with self._lock:
                    if n.digest in self._inflight or self.cache.contains(n.digest):
                        break
                    self._inflight[n.digest] = Future()
                extra[n.digest] = n
        return sorted([*items, *extra.values()], key=lambda c: c.offset)

    def _fail_if_cancelled(self, chunks: list[Chunk], fetch: Future[None]) -> None:
        if fetch.cancelled():  # queued when close() came: its readers must not wait forever
            self._fail(chunks, FetchError("the fetcher is closed"))

    def _fetch_group(self, blob: Blob, runs: list[list[Chunk]], asked: frozenset[bytes]) -> None:
        """Fetch one request's ranges; every chunk of them ends verified in the cache, or failed,
        never pending."""
        try:
            if len(runs) == 1:
                self._fetch_range(blob, runs[0], asked)
            else:
                self._fetch_ranges(blob, runs)
        except Exception as e:  # a bug: nobody may wait forever for these chunks
            log.exception("fetching %d ranges of %s failed", len(runs), blob.digest)
            self._fail(_flat(runs), e)

    def _fetch_range(self, blob: Blob, run: list[Chunk], asked: frozenset[bytes]) -> None:
        start = run[0].offset
        size = run[-1].offset + run[-1].csize - start
        # The asked chunks come first in the range (read-ahead only adds chunks after them): their
        # readers are answered as soon as these bytes are in, and the rest lands after.
        last = max((i for i, c in enumerate(run) if c.digest in asked), default=len(run) - 1)
        head = run[last].offset + run[last].csize - start
        good: list[tuple[Chunk, bytes]] = []
        head_done = False
        began = self._begin()
        t0 = time.monotonic()

        def on_head(data: bytes) -> None:
            nonlocal head_done
            head_done = True
            # The head's arrival is a sample of its own, and often the only one alone on the link:
            # its reader goes on meanwhile, and its next miss overlaps the rest of this range.
            self._sample(head, time.monotonic() - t0, began)
            good.extend(self._decode(blob, run[:last + 1], data, start))

        try:
            if last + 1 < len(run) and self._read_head_first is not None:
                data = self._read_head_first(blob.digest, start, size, head, on_head)
            else:
                data = self.backend.read_range(blob.digest, start, size)
            if len(data) != size:
                raise FetchError(f"blob {blob.digest}: short read ({len(data)} of {size} bytes at {start})")
        except Exception as e:
            self._land(blob, good)  # verified before the rest of the range failed to come
            self._fail(run, e)
            return
        finally:
            with self._lock:
                self._active -= 1
        self._count(1, 1, size, time.monotonic() - t0, began)
        if not head_done:
            good = self._decode(blob, run[:last + 1], data, start)
        self._land(blob, good + self._decode(blob, run[last + 1:], data, start))

    def _fetch_ranges(self, blob: Blob, runs: list[list[Chunk]]) -> None:
        """Fetch several ranges of one blob, all of them asked (a prefetch), with one request if
        the backend manages; each lands as soon as it is in."""
        assert self._read_ranges is not None
        spans = [(run[0].offset, run[-1].offset + run[-1].csize - run[0].offset) for run in runs]
        handed: set[int] = set()

        def on_span(i: int, data: bytes) -> None:
            handed.add(i)
            offset, size = spans[i]
            if len(data) != size:
                self._fail(runs[i], FetchError(
                    f"blob {blob.digest}: short read ({len(data)} of {size} bytes at {offset})"))
            else:
                self._land(blob, self._decode(blob, runs[i], data, offset))

        began = self._begin()
        t0 = time.monotonic()
        try:
            requests = self._read_ranges(blob.digest, spans, on_span)
        except Exception as e:
            self._fail([c for i, run in enumerate(runs) if i not in handed for c in run], e)
            return
        finally:
            with self._lock:
                self._active -= 1
        self._count(requests, len(spans), sum(size for _, size in spans), time.monotonic() - t0, began)

    def _begin(self) -> tuple[int, int]:
        """Count a request as running; (requests running, requests started) with it."""
        with self._lock:
            self._active += 1
            self._started += 1
            return self._active, self._started

    def _count(self, requests: int, ranges: int, nbytes: int, elapsed: float,
               began: tuple[int, int]) -> None:
        """Count what a fetch took, and tell the link estimate if it was one request."""
        if requests == 1:
            self._sample(nbytes, elapsed, began)
        with self._lock:
            self.stats.requests += requests
            self.stats.ranges += ranges
            self.stats.bytes_fetched += nbytes
            self.stats.latencies.append(elapsed)
            if len(self.stats.latencies) > 10000:
                del self.stats.latencies[:5000]

    def _sample(self, nbytes: int, seconds: float, began: tuple[int, int]) -> None:
        """Tell the link estimate, if this request was alone on the link so far: nothing else ran
        when it started (`began`: requests active and started then), and nothing started since.
        Requests that share the link would blur the fit."""
        with self._lock:
            alone = began == (1, self._started)
        if alone:
            self.link.record(nbytes, seconds)

    def _decode(self, blob: Blob, run: list[Chunk], data: bytes, start: int) -> list[tuple[Chunk, bytes]]:
        """Decode and verify `run` out of `data` (the range from `start`), answering its readers."""
        good: list[tuple[Chunk, bytes]] = []
        for c in run:
            stored = data[c.offset - start: c.offset - start + c.csize]
            try:
                chunk = decode_chunk(stored, c, blob.compressor)
            except Exception as e:
                self._fail([c], e)
                continue
            good.append((c, chunk))
            # A reader waiting for this chunk gets its verified bytes now, not after the rest
            # of the range is decoded and committed; the chunk stays registered as in flight
            # until it is in the cache, so nobody fetches it again meanwhile.
            with self._lock:
                fut = self._inflight.get(c.digest)
            if fut is not None and not fut.done():
                fut.set_result(chunk)
        return good

    def _land(self, blob: Blob, good: list[tuple[Chunk, bytes]]) -> None:
        """Put verified chunks in the cache (one commit for all) and take them out of flight."""
        try:
            # One commit for the whole range: per-chunk commits cost more than the decoding.
            self.cache.put_many(blob.digest, [(c.digest, c.uoffset, chunk) for c, chunk in good])
        except Exception as e:
            log.warning("caching %d chunks of %s failed: %s", len(good), blob.digest, e)
        else:
            if self.on_cached is not None:
                self.on_cached([c for c, _ in good])
        with self._lock:
            self.stats.chunks_fetched += len(good)
            for c, _ in good:
                self._inflight.pop(c.digest, None)
            if not self._inflight:
                self._settled.notify_all()

    def _fail(self, run: list[Chunk], error: Exception) -> None:
        err = error if isinstance(error, FetchError) else FetchError(str(error) or type(error).__name__)
        with self._lock:
            self.stats.errors += 1
            futs = [self._inflight.pop(c.digest, None) for c in run]
            if not self._inflight:
                self._settled.notify_all()
        for fut in futs:
            if fut is not None and not fut.done():
                fut.set_exception(err)

    def close(self, timeout: float = 5.0) -> None:
        """Stop: fetches under way get `timeout` seconds to land what they bring (mostly read-ahead
        still arriving), not more: one may wait for a dead registry until its own timeout. Fetches
        still queued fail at once."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        with self._settled:
            while self._inflight and (left := deadline - time.monotonic()) > 0:
                self._settled.wait(left)


def _shared_requests(runs: list[list[Chunk]]) -> list[list[list[Chunk]]]:
    """Contiguous runs of one blob grouped, in their order, into multi-range requests of at most
    MAX_RANGES ranges and MAX_REQUEST bytes each."""
    requests: list[list[list[Chunk]]] = []
    size = 0
    for run in runs:
        run_size = run[-1].offset + run[-1].csize - run[0].offset
        if not requests or len(requests[-1]) == MAX_RANGES or size + run_size > MAX_REQUEST:
            requests.append([])
            size = 0
        requests[-1].append(run)
        size += run_size
    return requests


def _flat(runs: list[list[Chunk]]) -> list[Chunk]:
    return [c for run in runs for c in run]
