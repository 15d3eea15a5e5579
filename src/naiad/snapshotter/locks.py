"""One lock per name (an image, a mount, a snapshot), created on first use."""

from __future__ import annotations

import threading


class KeyedLocks:
    """`locks[name]` is the lock for `name`; the same object every time.

    Locks are never dropped: there is one per image or snapshot name a node has seen, a few
    hundred bytes each, and dropping one that a thread is about to take would split it in two.
    """

    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def __getitem__(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())
