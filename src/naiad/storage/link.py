"""How much to read ahead on a cache miss, from what the link to the backend has shown so far.

A lazy start waits on one range request per cache miss, one after another,
so each miss costs the backend's per-request latency `L` plus its bytes at
throughput `B`. Reading `a` more bytes with a miss costs `a / B` now and
saves the later misses those bytes hold, so the right `a` grows with the
bandwidth-delay product `L * B`. On torchapp (bench/datapath.py, cold
cache, 2 runs each, same session): against a local registry (L ≈ 6 ms,
0.4-0.9 GB/s) it asks for more than the 2 MiB cap, and the app is ready
in 7.3-8.1 s against 8.3 s with a fixed 1 MiB (4 MiB was no faster than
2 MiB there, 6.4-7.2 s against 6.6-6.8 s, and read 9% more); behind a
100 Mbit/s link it picks 128 KiB, and the app is ready in 13.5 s after
85 MB against 15.5-15.9 s after 110 MB.

`LinkEstimate` fits `seconds = L + bytes / B` over the last requests (least
squares; their sizes differ enough, since read-ahead stops at cached
chunks and blob ends) and proposes `FACTOR * L * B`, rounded down to a power
of two between `MIN_AMPLIFY` and `MAX_AMPLIFY`. Until it has seen enough
requests, and whenever the fit makes no sense (concurrent requests share the
link and blur it), it proposes `DEFAULT_AMPLIFY`. A mount that follows the
image's access hints lowers the ceiling (`ceiling`, storage/hints.py).
"""

from __future__ import annotations

import collections
import threading

DEFAULT_AMPLIFY = 1 << 20
MIN_AMPLIFY = 128 << 10
MAX_AMPLIFY = 2 << 20
FACTOR = 4
WINDOW = 64  # requests the fit looks at
MIN_SAMPLES = 8


class LinkEstimate:
    """Thread-safe: fetch threads record, readers ask."""

    def __init__(self) -> None:
        self._samples: collections.deque[tuple[int, float]] = collections.deque(maxlen=WINDOW)
        self._lock = threading.Lock()
        self._amplify = DEFAULT_AMPLIFY
        self.ceiling = MAX_AMPLIFY

    def record(self, nbytes: int, seconds: float) -> None:
        """One range request of `nbytes` took `seconds` (from asking to the last byte)."""
        with self._lock:
            self._samples.append((nbytes, seconds))
            if len(self._samples) >= MIN_SAMPLES:
                self._amplify = _propose(list(self._samples))

    def amplify(self) -> int:
        """Bytes to read ahead with the next miss."""
        return min(self._amplify, self.ceiling)

    def fit(self) -> tuple[float, float] | None:
        """(latency in seconds, throughput in bytes/s), if the samples give a sensible fit."""
        with self._lock:
            return _fit(list(self._samples))


def _fit(samples: list[tuple[int, float]]) -> tuple[float, float] | None:
    n = len(samples)
    if n < MIN_SAMPLES:
        return None
    mean_s = sum(s for s, _ in samples) / n
    mean_t = sum(t for _, t in samples) / n
    var = sum((s - mean_s) ** 2 for s, _ in samples)
    if var <= 0:
        return None
    slope = sum((s - mean_s) * (t - mean_t) for s, t in samples) / var  # seconds per byte
    latency = mean_t - slope * mean_s
    if slope <= 0 or latency <= 0:
        return None
    return latency, 1 / slope


def _propose(samples: list[tuple[int, float]]) -> int:
    fit = _fit(samples)
    if fit is None:
        return DEFAULT_AMPLIFY
    latency, throughput = fit
    want = FACTOR * latency * throughput
    amplify = MIN_AMPLIFY
    while amplify * 2 <= min(want, MAX_AMPLIFY):
        amplify *= 2
    return amplify
