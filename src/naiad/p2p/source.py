"""Back to the source: reading byte ranges of blobs from the registries in the peer's allow-list.

Built on naiad.oci's RegistryClient (auth challenges, bearer tokens, retries
with backoff, redirects to storage backends), with the peer's own registry
credentials. Bytes are handed over as they arrive, so a client waiting for
the first bytes of a piece gets them before the piece is complete.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from naiad.errors import NaiadError, RegistryError
from naiad.oci.image import RegistryOptions
from naiad.oci.registry import RegistryClient
from naiad.p2p.security import AllowList

log = logging.getLogger(__name__)

SOURCE_WORKERS = 16


class SourceError(NaiadError):
    """The registry failed or refused (after the client's bounded retries)."""

    def __init__(self, message: str, *, timeout: bool = False):
        super().__init__(message)
        self.timeout = timeout


class _RangeClient(RegistryClient):
    """A RegistryClient that streams a byte range, resuming after a dropped connection."""

    def stream_range(self, repo: str, digest: str, start: int, end: int,
                     sink: Callable[[int, bytes], None]) -> None:
        """Call sink(offset, bytes) for bytes [start, end) of the blob, in order."""
        what = self._what(f"GET blob {repo}@{digest} bytes {start}-{end - 1}")
        pos, drops = start, 0
        while pos < end:
            response = self._get_blob(repo, digest, pos, end - 1, what)
            try:
                skip = pos if response.status_code == 200 else 0  # the server ignored Range
                for data in response.iter_raw(1 << 18):
                    if skip:
                        cut = min(skip, len(data))
                        data, skip = data[cut:], skip - cut
                    data = data[: end - pos]
                    if data:
                        sink(pos, data)
                        pos += len(data)
                        drops = 0
                    if pos >= end:
                        break
            except httpx.TransportError as e:
                drops += 1
                if drops >= self.retries:
                    raise RegistryError(f"{what}: connection dropped {drops} times in a row ({e})") from None
                self._sleep(drops)
                continue
            finally:
                response.close()
            if pos < end:
                drops += 1
                if drops >= self.retries:
                    raise RegistryError(f"{what}: body ended at {pos} ({drops} times)")


class Sources:
    """One RegistryClient per allowed registry; blocking reads run on a private thread pool."""

    def __init__(self, allow: AllowList, creds: str | None = None, tls_verify: bool = True,
                 retries: int | None = None):
        self.allow = allow
        self._creds = creds
        self._tls_verify = tls_verify
        self._retries = retries
        self._clients: dict[str, _RangeClient] = {}
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(SOURCE_WORKERS, thread_name_prefix="naiad-source")

    def client(self, registry: str) -> _RangeClient:
        name = self.allow.check(registry)
        with self._lock:
            client = self._clients.get(name)
            if client is None:
                options = RegistryOptions(plain_http=True if self.allow.plain_http(name) else None,
                                          creds=self._creds, tls_verify=self._tls_verify)
                client = self._clients[name] = _RangeClient(name, options, retries=self._retries)
            return client

    def stream(self, registry: str, repo: str, digest: str, start: int, end: int,
               sink: Callable[[int, bytes], None]) -> None:
        """Blocking: bytes [start, end) of the blob to `sink`; SourceError on failure."""
        try:
            self.client(registry).stream_range(repo, digest, start, end, sink)
        except NaiadError as e:
            timeout = "Timeout" in str(e)
            raise SourceError(str(e), timeout=timeout) from None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for client in self._clients.values():
            client.close()
