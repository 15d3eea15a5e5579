"""Fetching ahead by the image's access hints (docs/format.md §10) as a lazy start misses.

When a reader misses a file's first chunk, the chunk's hints say which bytes
the app reads next: a Python module's imports, an ELF object's loader tables,
libraries and initialisers' code. They are fetched, and their own hints in turn, depth first:
the order an interpreter imports in. The newest miss goes first, since that
is where the app is now. The walk is taken a batch at a time and cut into
range requests (one per blob of the batch, where the backend takes several
ranges in one request), which a few threads of this prefetcher fetch at once
in walk order (the reader wants the batch's first file next, whatever its place
in the blob), so that readers never queue behind them in the fetcher's pool.
Each asks only for chunks that are neither cached nor in flight (a reader
that wants one meanwhile shares its fetch).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator

from naiad.format.bootstrap import Bootstrap, Chunk
from naiad.storage.fetcher import ChunkFetcher, FetchError
from naiad.storage.ranges import contiguous_runs

log = logging.getLogger(__name__)

WORKERS = 4  # hinted range requests in flight at once
BATCH = 1 << 20  # stored bytes one worker takes from the walk before fetching them
BUDGET = 512 << 20  # stored bytes one mount fetches by hints at most
# Read-ahead's ceiling when hints are followed: the hints fetch the neighbours a start reads, and a
# miss's read-ahead mostly fetched what it does not (a warm rerun of torchapp read none of 22 MB of
# the 90 MB a cold start had fetched with a 1 MiB ceiling, 6 of 74 with 128 KiB). An asked chunk
# counts against it, so a miss reads ahead only after a small chunk. torchapp, bench/datapath.py, 3
# alternating runs each: unshaped 4.49-5.20 s and 74 MB against 4.79-5.23 s and 87-90 MB at 1 MiB,
# daemon CPU 2.5-2.7 s against 2.9-3.1 s; 100 Mbit/s 8.45-8.66 s and 74 MB against 9.34-9.57 s and
# 84-86 MB. No read-ahead at all: 680 range requests instead of 390, 120 misses instead of 105.
READ_AHEAD_CEILING = 128 << 10
# A hinted fetch reads across a gap of uncached chunks between two hinted runs of one blob when
# the gap's bytes cost less time than a request of their own: up to latency x throughput of the
# link (storage/link.py), within these bounds, GAP_MAX until the link has a fit. torchapp,
# unshaped (bench/datapath.py): 330-360 requests instead of 500 for 1-3 MB more; a ceiling of
# 1 MiB made 230 requests but fetched 10 MB more.
GAP_MIN = 16 << 10
GAP_MAX = 64 << 10


def walk(bs: Bootstrap, stack: list[Iterator[tuple[int, int, int]]], expanded: set[int],
         visited: set[tuple[int, int]]) -> Iterator[tuple[int, list[Chunk]]]:
    """(file, its chunks) of each hint on `stack` (the last iterator first) and of the hints they
    lead to, depth first. `expanded` holds the chunks whose hints were walked, `visited` the (ino,
    foffset) of hints taken; both carry over from walk to walk of one mount."""
    while stack:
        hint = next(stack[-1], None)
        if hint is None:
            stack.pop()
            continue
        ino, foffset, size = hint
        if (ino, foffset) in visited:
            continue
        visited.add((ino, foffset))
        if size:
            yield ino, bs.file_chunks(ino, foffset, size)
        first = bs.first_chunk(ino)
        if first is not None and first not in expanded:
            expanded.add(first)
            if nested := bs.hints_of(first):
                stack.append(iter(nested))


class HintPrefetcher:
    """One mount's walker of access hints: told each miss (`on_miss`), fetches what follows."""

    def __init__(self, bootstrap: Bootstrap, fetcher: ChunkFetcher, *, workers: int = WORKERS,
                 budget: int = BUDGET):
        self.bs = bootstrap
        self.fetcher = fetcher
        self.budget = budget
        self.triggers = 0  # misses that started a walk
        self.chunks = 0  # chunks the walks asked for
        self.bytes = 0  # their stored bytes
        self._cond = threading.Condition()
        self._walks: list[Iterator[tuple[int, list[Chunk]]]] = []  # a stack: the newest miss's walk on top
        self._expanded: set[int] = set()  # chunks whose hints have been walked (or are being)
        self._visited: set[tuple[int, int]] = set()  # (ino, foffset) of hints taken
        self._taken: set[int] = set()  # chunks given to a worker (hints overlap: code in one chunk)
        self._runs: deque[list[Chunk]] = deque()  # range requests cut from batches, next first
        self._fresh = False  # a miss started a walk since the last batch was taken: take from it first
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"naiad-hints-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def on_miss(self, chunks: list[Chunk]) -> None:
        """A reader misses `chunks` (ChunkFetcher.on_miss): walk the hints of those that start a file."""
        with self._cond:
            roots = [c.id for c in chunks if c.id not in self._expanded]
            if not roots or self._closed:
                return
            self._expanded.update(roots)
            self._walks.append(self._walk([iter(h) for c in reversed(roots) if (h := self.bs.hints_of(c))]))
            self._fresh = True
            self._cond.notify()

    def snapshot(self) -> dict:
        with self._cond:
            return {"triggers": self.triggers, "chunks": self.chunks, "bytes": self.bytes}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._walks.clear()
            self._runs.clear()
            self._cond.notify_all()

    def _walk(self, stack: list[Iterator[tuple[int, int, int]]]) -> Iterator[tuple[int, list[Chunk]]]:
        """`walk`, counted (called under the lock)."""
        if stack:
            self.triggers += 1
        yield from walk(self.bs, stack, self._expanded, self._visited)

    def _take(self) -> list[Chunk]:
        """Up to BATCH stored bytes of chunks to fetch next, none cached (called under the lock)."""
        batch: list[Chunk] = []
        size = 0
        while self._walks and size < BATCH and self.bytes < self.budget:
            step = next(self._walks[-1], None)
            if step is None:
                self._walks.pop()
                continue
            _, chunks = step
            for c in chunks:
                if c.id not in self._taken and not self.fetcher.cache.contains(c.digest):
                    self._taken.add(c.id)
                    batch.append(c)
                    size += c.csize
                    self.chunks += 1
                    self.bytes += c.csize
        return batch

    def _gap(self) -> int:
        """The largest gap between two hinted runs that one request reads across (a fixed
        read-ahead, `--amplify`, bounds it too: reading a gap is reading ahead)."""
        fixed = self.fetcher.amplify
        fit = self.fetcher.link.fit()
        gap = GAP_MAX if fit is None else int(min(max(fit[0] * fit[1], GAP_MIN), GAP_MAX))
        return gap if fixed is None else min(gap, fixed)

    def _spans(self, batch: list[Chunk]) -> list[list[Chunk]]:
        """The batch as requests, in walk order: its contiguous runs, joined across short gaps;
        those of one blob make one (multi-range) request if the fetcher's backend can.

        A gap is read along only if the image's chunks fill it and none of them is cached: each
        request costs the link's latency, and (docker-registry reads up to 4 MiB of the blob for
        any range) server time. torchapp's start: 330-360 range requests in all instead of 500.
        """
        walked = {c.id: i for i, c in enumerate(batch)}  # ids are unique: _take hands each out once
        gap = self._gap()
        joined: list[Chunk] = []
        for c in sorted(batch, key=lambda c: (c.blob, c.offset)):
            if joined and joined[-1].blob == c.blob:
                end = joined[-1].offset + joined[-1].csize
                if 0 < c.offset - end <= gap and (filler := self._filler(c.blob, end, c.offset)):
                    joined.extend(filler)
                    with self._cond:
                        self._taken.update(n.id for n in filler)
                        self.chunks += len(filler)
                        self.bytes += sum(n.csize for n in filler)
            joined.append(c)
        # A batch of small files is tens of runs, in blob order (alphabetical): the reader is
        # after the first file the walk named, not the first in the blob.
        runs = sorted(contiguous_runs(joined), key=lambda run: min(walked.get(c.id, len(batch)) for c in run))
        if not self.fetcher.multi_range:
            return runs
        by_blob: dict[int, list[Chunk]] = {}  # in the order of each blob's first run
        for run in runs:
            by_blob.setdefault(run[0].blob, []).extend(run)
        return list(by_blob.values())

    def _filler(self, blob: int, start: int, stop: int) -> list[Chunk]:
        """The chunks stored back to back in [start, stop) of `blob`, none cached; else none."""
        filler: list[Chunk] = []
        pos = start
        for n in self.bs.blob_chunks_between(blob, start, stop):
            if n.offset != pos or self.fetcher.cache.contains(n.digest):
                return []
            filler.append(n)
            pos = n.offset + n.csize
        return filler if pos == stop else []

    def _next(self) -> list[Chunk] | None:
        """The next range request to fetch, cutting a new batch from the walks when the queue is
        empty or a newer miss waits; None when closed."""
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return None
                    if self._runs and not self._fresh:
                        return self._runs.popleft()
                    self._fresh = False
                    if batch := self._take():
                        break
                    if self._runs:
                        return self._runs.popleft()
                    self._cond.wait()
            runs = self._spans(batch)  # outside the lock: it looks up gap fillers in the bootstrap
            with self._cond:
                self._runs.extendleft(reversed(runs))
                self._cond.notify_all()

    def _run(self) -> None:
        # Each thread fetches one range at a time itself (prefetch() would put all but the first in
        # the fetcher's pool, where readers' read-ahead waits).
        while (run := self._next()) is not None:
            try:
                self.fetcher.prefetch(run)
            except FetchError as e:
                log.debug("hinted fetch: %s", e)  # a reader that needs these chunks retries
