"""A token bucket for the upload rate limit, shared by every upload of one peer."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    def __init__(self, rate: int, burst: int | None = None):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst or max(rate // 10, 1 << 20)  # 100 ms of bandwidth, at least 1 MiB
        self._tokens = float(self.burst)
        self._at = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        """Wait until `n` bytes may be sent (first come, first served)."""
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            self._tokens -= n
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)
