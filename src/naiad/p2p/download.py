"""One piece on its way in: its bytes so far, which parts have arrived, and readers waiting for them.

Bytes from the registry are readable as they arrive (the registry is the
root of trust, and a lazy reader should not wait for the rest of the piece);
bytes from a peer become readable all at once, after the piece's sha256 was
checked. A reader asks for a span and gets the bytes in order, as soon as
each part is there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class PieceDownload:
    def __init__(self, length: int):
        self.length = length
        self.buf: bytearray | bytes = bytearray(length)
        self._spans: list[list[int]] = []  # sorted, merged [start, end) spans that have arrived
        self._changed = asyncio.Event()
        self.error: BaseException | None = None
        self.finished = False
        self.waiting: list[tuple[int, int]] = []  # spans readers are blocked on now (fetched first)

    @classmethod
    def complete(cls, data: bytes) -> PieceDownload:
        dl = cls(0)
        dl.fill_all(data)
        return dl

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def fill(self, offset: int, data: bytes) -> None:
        """Bytes [offset, offset + len(data)) arrived (from the source, in order per stream)."""
        end = offset + len(data)
        assert isinstance(self.buf, bytearray)  # fill_all, which stores bytes, comes alone
        self.buf[offset:end] = data
        spans = self._spans
        spans.append([offset, end])
        spans.sort()
        merged = [spans[0]]
        for s, e in spans[1:]:
            if s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self._spans = merged
        self._notify()

    def fill_all(self, data: bytes) -> None:
        self.buf = data  # kept as it is: a piece from a peer or the store is not copied
        self.length = len(data)
        self._spans = [[0, len(data)]]
        self.finish()

    def finish(self) -> None:
        self.finished = True
        self._notify()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._notify()

    def data(self) -> bytes:
        return self.buf if isinstance(self.buf, bytes) else bytes(self.buf)

    def _available(self, pos: int) -> int:
        """The end of the arrived span holding `pos` (pos itself if none does)."""
        for s, e in self._spans:
            if s <= pos < e:
                return e
        return pos

    async def read(self, lo: int, hi: int) -> AsyncIterator[bytes]:
        """Bytes [lo, hi) in order, each part as soon as it has arrived; raises the fetch's error."""
        pos = lo
        while pos < hi:
            end = min(self._available(pos), hi)
            if end > pos:
                yield bytes(self.buf[pos:end])
                pos = end
                continue
            if self.error is not None:
                raise self.error
            if self.finished:
                raise EOFError(f"piece ended at {pos} of {self.length} bytes")
            span = (pos, hi)
            self.waiting.append(span)
            try:
                await self._changed.wait()
            finally:
                self.waiting.remove(span)

    async def wait(self) -> bytes:
        """The whole piece, once complete."""
        while not self.finished:
            if self.error is not None:
                raise self.error
            await self._changed.wait()
        if self.error is not None:
            raise self.error
        return self.data()
