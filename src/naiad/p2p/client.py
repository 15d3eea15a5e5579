"""Talking to schedulers: one per task by consistent hashing, and falling back to none when they are down.

`SchedulerClient` is the peer's async client. A scheduler that failed is
skipped for a few seconds (its calls answer None at once), so a peer whose
scheduler is down goes straight back to the source instead of waiting on
connect timeouts for every piece. `scheduler_call` is the blocking client of
the command line (status, preheat).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import time
from typing import Any

import aiohttp
import httpx

from naiad.p2p.pieces import P2PError
from naiad.p2p.security import auth_header, split_hostport

log = logging.getLogger(__name__)

VNODES = 64
RETRY_DOWN_AFTER = 3.0  # seconds a failed scheduler is skipped


def parse_schedulers(text: str) -> list[str]:
    addrs = [a.strip() for a in text.split(",") if a.strip()]
    if not addrs:
        raise P2PError("--scheduler: give at least one HOST:PORT")
    for a in addrs:
        split_hostport(a, "--scheduler")
    return addrs


class Ring:
    """Consistent hashing of task ids over scheduler addresses (64 virtual nodes each)."""

    def __init__(self, addrs: list[str]):
        points = sorted((self._hash(f"{a}#{v}"), a) for a in addrs for v in range(VNODES))
        self._keys = [k for k, _ in points]
        self._addrs = [a for _, a in points]

    @staticmethod
    def _hash(text: str) -> int:
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")

    def owner(self, task: str) -> str:
        i = bisect.bisect(self._keys, self._hash(task)) % len(self._keys)
        return self._addrs[i]


class SchedulerClient:
    def __init__(self, addrs: list[str], token: str):
        self.addrs = addrs
        self.ring = Ring(addrs)
        self._headers = auth_header(token)
        self._down_until: dict[str, float] = {}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # Connections are reused: a schedule call is one request on a warm connection.
        connector = aiohttp.TCPConnector(limit=256)
        self._session = aiohttp.ClientSession(connector=connector,
                                              timeout=aiohttp.ClientTimeout(total=15, connect=2))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def is_down(self, addr: str) -> bool:
        return time.monotonic() < self._down_until.get(addr, 0.0)

    async def call(self, addr: str, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """POST to one scheduler; None if it is down or failed (the caller carries on without it)."""
        if self._session is None or self.is_down(addr):
            return None
        try:
            async with self._session.post(f"http://{addr}{path}", json=body, headers=self._headers) as r:
                if r.status == 409:
                    return {"unknown_peer": True}
                if r.status != 200:
                    raise aiohttp.ClientResponseError(r.request_info, (), status=r.status,
                                                      message=(await r.text())[:200])
                return await r.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            if not self.is_down(addr):
                log.warning("scheduler %s: %s %s; going without it for %.0f s", addr, path,
                            type(e).__name__ if not str(e) else str(e)[:200], RETRY_DOWN_AFTER)
            self._down_until[addr] = time.monotonic() + RETRY_DOWN_AFTER
            return None

    async def for_task(self, task: str, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        return await self.call(self.ring.owner(task), path, body)

    def mark_up(self, addr: str) -> None:
        self._down_until.pop(addr, None)


def scheduler_call(addr: str, token: str, method: str, path: str, body: dict[str, Any] | None = None,
                   timeout: float = 30.0) -> dict[str, Any]:
    """Blocking request to a scheduler for the command line; P2PError with a one-line reason."""
    try:
        response = httpx.request(method, f"http://{addr}{path}", json=body, headers=auth_header(token),
                                 timeout=timeout)
    except httpx.HTTPError as e:
        raise P2PError(f"scheduler {addr}: {type(e).__name__}: {str(e)[:200] or 'unreachable'}") from None
    if response.status_code == 401:
        raise P2PError(f"scheduler {addr}: the cluster token was refused (check --token-file)")
    try:
        answer = response.json()
    except json.JSONDecodeError:
        answer = {}
    if response.status_code != 200:
        reason = answer.get("error") if isinstance(answer, dict) else None
        raise P2PError(f"scheduler {addr}: HTTP {response.status_code}: {reason or response.text[:200]}")
    return answer
