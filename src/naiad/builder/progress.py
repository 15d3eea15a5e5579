"""The progress interface the builder reports to; the CLI draws it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> Callable[[int], None]:
        """Start a task; the returned function advances it by n units."""
        ...


class NoProgress:
    def task(self, description: str, total: int | None) -> Callable[[int], None]:
        return lambda n: None


class CountingReader:
    """Passes reads through, reporting the byte count to a progress callback."""

    def __init__(self, raw, advance: Callable[[int], None]):
        self._raw, self._advance = raw, advance

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._advance(len(data))
        return data

    def close(self) -> None:
        self._raw.close()
