"""Reading stored chunks with as few range requests as possible.

Chunks that sit back to back in one blob are read with one request (up to
`MAX_REQUEST` bytes). Shared by the lazy fetcher, `naiad optimize` (copying
hot chunks) and chunk dictionaries (copying chunks of barely used blobs).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Protocol, TypeVar

from naiad.errors import NaiadError

MAX_REQUEST = 16 << 20


class RangeReader(Protocol):
    """A storage backend: registry, local layout, or the node's peer daemon.

    A backend whose bytes come over a network may also offer `read_range_head_first`
    (a ReadHeadFirst): the same read, which hands the range's first `head` bytes to
    `on_head` as soon as they have arrived, before the rest has. One that can ask
    for several ranges of a blob in one request offers `read_ranges` (a
    ReadRanges) and says in `multi_range` whether it currently does.
    """

    def read_range(self, digest: str, offset: int, size: int) -> bytes: ...


# read_range_head_first(digest, offset, size, head, on_head) -> the whole range. `on_head` is called
# at most once, from the reading thread; if it is not (a retried request), the caller has only the
# whole range, once it is in.
ReadHeadFirst = Callable[[str, int, int, int, Callable[[bytes], None]], bytes]

# read_ranges(digest, [(offset, size), ...], on_span) -> how many requests it took. Each range is
# handed to on_span(its index, its bytes) as it comes in, from the reading thread.
ReadRanges = Callable[[str, Sequence[tuple[int, int]], Callable[[int, bytes], None]], int]


class Stored(Protocol):
    """Where a chunk's stored bytes are: a blob (by id or digest), an offset and a size."""

    @property
    def blob(self) -> Hashable: ...
    @property
    def offset(self) -> int: ...
    @property
    def csize(self) -> int: ...


S = TypeVar("S", bound=Stored)


def contiguous_runs(items: Iterable[S], max_request: int = MAX_REQUEST) -> list[list[S]]:
    """Split `items` (in blob order) into runs stored back to back, each one request long."""
    runs: list[list[S]] = []
    for c in items:
        run = runs[-1] if runs else None
        if (run is not None and run[-1].blob == c.blob and c.offset == run[-1].offset + run[-1].csize
                and c.offset + c.csize - run[0].offset <= max_request):
            run.append(c)
        else:
            runs.append([c])
    return runs


def read_run(reader: RangeReader, digest: str, run: Sequence[S]) -> Iterator[tuple[S, bytes]]:
    """(item, its stored bytes) for a run of blob `digest`, read with one request; unverified."""
    start = run[0].offset
    size = run[-1].offset + run[-1].csize - start
    data = reader.read_range(digest, start, size)
    if len(data) != size:
        raise NaiadError(f"blob {digest}: short read at {start} ({len(data)} of {size} bytes)")
    for c in run:
        yield c, data[c.offset - start: c.offset - start + c.csize]
