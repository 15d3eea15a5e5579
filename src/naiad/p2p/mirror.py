"""The node-local registry mirror (--proxy): what containerd, skopeo and the lazy filesystem talk to.

`GET|HEAD /v2/<repo>/manifests/<ref>` pass through to the upstream registry
with the client's own headers (credentials and auth challenges go through
untouched, nothing is stored). `GET|HEAD /v2/<repo>/blobs/<digest>` (with or
without `Range`) are served from the P2P network: the blob is first HEADed
upstream with the client's credentials, so the mirror never hands out a blob
the client could not read from the registry itself (the answer is cached for
a minute). The upstream is containerd's `?ns=<registry>` or, without it, the
default registry, and must be in the allow-list: this is not an open proxy.
Nothing else of the distribution API is answered (no push through a mirror).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time

import aiohttp
from aiohttp import web

from naiad.p2p.metrics import metrics_handler
from naiad.p2p.peer import Peer
from naiad.p2p.pieces import P2PError
from naiad.p2p.security import AllowList
from naiad.p2p.source import SourceError

log = logging.getLogger(__name__)

# The distribution spec's repository name grammar.
_NAME_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_PATH_RE = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_PASS_REQUEST = ("Accept", "Authorization", "If-None-Match")
_PASS_RESPONSE = ("Content-Type", "Content-Length", "Docker-Content-Digest",
                  "Docker-Distribution-Api-Version", "WWW-Authenticate", "ETag")
UPSTREAM_ATTEMPTS = 3
HEAD_TTL = 60.0
MANIFEST_LIMIT = 16 << 20


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"errors": [{"code": code, "message": message}]}, status=status, headers=headers)


class Mirror:
    def __init__(self, peer: Peer, allow: AllowList, default_registry: str | None,
                 upstream_timeout: float = 30.0):
        self.peer = peer
        self.allow = allow
        self.default_registry = allow.check(default_registry) if default_registry else None
        self._timeout = aiohttp.ClientTimeout(total=upstream_timeout, connect=5)
        self._session: aiohttp.ClientSession | None = None
        self._heads: dict[tuple[str, str, str, str], tuple[float, int]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", metrics_handler(self.peer.metrics.registry))
        app.router.add_route("*", "/v2", self._v2)
        app.router.add_route("*", "/v2/", self._v2)
        app.router.add_route("*", "/v2/{tail:.*}", self._route)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app: web.Application) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout, auto_decompress=False)

    async def _stop(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    def _upstream(self, request: web.Request) -> str:
        ns = request.query.get("ns")
        if ns is None:
            if self.default_registry is None:
                raise P2PError("no ns= parameter and no --default-registry")
            return self.default_registry
        return self.allow.check(ns)

    async def _v2(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _error(405, "UNSUPPORTED", "this mirror only reads")
        try:
            registry = self._upstream(request)
        except P2PError:
            # A client checking that this is a registry (skopeo pings /v2/ first).
            return web.json_response({}, headers={"Docker-Distribution-Api-Version": "registry/2.0"})
        return await self._pass(request, registry, "/v2/")

    async def _route(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _error(405, "UNSUPPORTED", "this mirror only reads (push to the registry itself)")
        match = _PATH_RE.match(request.path)
        if match is None or not _NAME_RE.match(match["name"]):
            return _error(404, "NAME_UNKNOWN", "not a manifest or blob path this mirror serves")
        try:
            registry = self._upstream(request)
        except P2PError as e:
            return _error(403, "DENIED", str(e))
        if match["kind"] == "manifests":
            return await self._pass(request, registry, request.path)
        return await self._blob(request, registry, match["name"], match["ref"])

    # --- upstream requests ----------------------------------------------------------------------

    async def _upstream_request(self, method: str, registry: str, path: str,
                                request: web.Request) -> tuple[int, dict[str, str], bytes]:
        """One request upstream with the client's headers, with bounded retries; _Upstream if it fails."""
        assert self._session is not None
        scheme = "http" if self.allow.plain_http(registry) else "https"
        headers = {h: request.headers[h] for h in _PASS_REQUEST if h in request.headers}
        last = ""
        for attempt in range(1, UPSTREAM_ATTEMPTS + 1):
            try:
                async with self._session.request(method, f"{scheme}://{registry}{path}",
                                                 headers=headers) as response:
                    body = await response.content.read(MANIFEST_LIMIT) if method == "GET" else b""
                    if response.status < 500 and response.status != 429:
                        kept = {h: response.headers[h] for h in _PASS_RESPONSE if h in response.headers}
                        if method == "GET":
                            kept["Content-Length"] = str(len(body))
                        return response.status, kept, body
                    last = f"HTTP {response.status}"
            except TimeoutError:
                last = "timeout"
            except aiohttp.ClientError as e:
                last = type(e).__name__
            if attempt < UPSTREAM_ATTEMPTS:
                await asyncio.sleep(0.2 * 2 ** (attempt - 1))
        raise _Upstream(504 if last == "timeout" else 502, registry, last)

    async def _pass(self, request: web.Request, registry: str, path: str) -> web.StreamResponse:
        try:
            status, headers, body = await self._upstream_request(request.method, registry, path, request)
        except _Upstream as e:
            return e.response()
        return web.Response(status=status, headers=headers, body=body if request.method == "GET" else None)

    async def _blob_size(self, request: web.Request, registry: str, repo: str,
                         digest: str) -> int | web.Response:
        """The blob's size, if the client may read it upstream; else the upstream's answer to relay."""
        auth = hashlib.sha256(request.headers.get("Authorization", "").encode()).hexdigest()
        key = (registry, repo, digest, auth)
        cached = self._heads.get(key)
        if cached is not None and time.monotonic() - cached[0] < HEAD_TTL:
            return cached[1]
        try:
            status, headers, _ = await self._upstream_request("HEAD", registry, f"/v2/{repo}/blobs/{digest}",
                                                              request)
        except _Upstream as e:
            return e.response()
        length = headers.get("Content-Length", "")
        if status != 200 or not length.isdigit():
            if status == 200:
                return _error(502, "UNAVAILABLE", f"registry {registry} gave no blob size")
            headers.pop("Content-Length", None)
            return web.Response(status=status, headers=headers)
        if len(self._heads) > 10000:
            self._heads.clear()
        self._heads[key] = (time.monotonic(), int(length))
        return int(length)

    # --- blobs -------------------------------------------------------------------------------------

    async def _blob(self, request: web.Request, registry: str, repo: str, digest: str) -> web.StreamResponse:
        if not _DIGEST_RE.match(digest):
            return _error(400, "DIGEST_INVALID", "only sha256 blob digests are served")
        size = await self._blob_size(request, registry, repo, digest)
        if isinstance(size, web.Response):
            return size
        headers = {"Docker-Content-Digest": digest, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        span = _parse_range(request.headers.get("Range"), size)
        if span == "bad":
            return _error(416, "RANGE_INVALID", "unsatisfiable range", {"Content-Range": f"bytes */{size}"})
        start, end = span if span is not None else (0, size)
        status = 206 if span is not None else 200
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        if request.method == "HEAD" or start == end:
            return web.Response(status=status, headers=headers)
        # A Range read is a lazy filesystem (or a resuming client) waiting: it goes to the source at once.
        chunks = self.peer.read_blob(digest, size, registry, repo, start, end, urgent=span is not None)
        try:
            first = await chunks.__anext__()
        except (P2PError, SourceError) as e:
            await chunks.aclose()
            log.warning("blob %s via %s: %s", digest, registry, e)
            timeout = isinstance(e, SourceError) and e.timeout
            return _error(504 if timeout else 502, "UNAVAILABLE", str(e)[:300])
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        try:
            await response.write(first)
            async for data in chunks:
                await response.write(data)
            await response.write_eof()
        except (P2PError, SourceError, EOFError) as e:
            # Headers are out: cutting the connection is the only way left to say the body is bad.
            log.error("blob %s via %s failed mid-stream: %s", digest, registry, e)
            if request.transport is not None:
                request.transport.close()
        except ConnectionResetError:
            pass  # the client went away; the pieces it started are still fetched and kept
        finally:
            await chunks.aclose()
        return response


class _Upstream(Exception):
    """The upstream registry could not be reached (after retries): a 502, or a 504 on timeout."""

    def __init__(self, status: int, registry: str, what: str):
        super().__init__(f"registry {registry}: {what}")
        self.status = status
        self.message = f"registry {registry}: {what} after {UPSTREAM_ATTEMPTS} attempts"

    def response(self) -> web.Response:
        return _error(self.status, "UNAVAILABLE", self.message)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """[start, end) of a single `bytes=` range; None for no (or an unsupported multi-) range; "bad"."""
    if not header:
        return None
    match = _RANGE_RE.match(header.strip())
    if match is None:
        return None  # several ranges, other units: RFC 9110 lets a server ignore Range
    first, last = match.groups()
    if not first and not last:
        return "bad"
    if not first:  # the last N bytes
        n = int(last)
        return (max(0, size - n), size) if n else "bad"
    start = int(first)
    end = min(size, int(last) + 1) if last else size
    if start >= size or end <= start:
        return "bad"
    return start, end
