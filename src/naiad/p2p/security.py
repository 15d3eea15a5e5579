"""The cluster token, and which upstream registries a peer may reach.

Peers and schedulers share one secret, read from a file and sent as
`Authorization: Bearer <token>`; it is compared in constant time and never
logged. Local clients of the mirror carry no token: the mirror listens on
loopback, and only reaches registries in its allow-list, so it is not an
open proxy.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import stat
from collections.abc import Awaitable, Callable

from aiohttp import web

from naiad.p2p.pieces import P2PError

MIN_TOKEN_LEN = 16
TOKEN_HEADER = "Authorization"


def load_token(path: str) -> str:
    """The token in `path` (first line, stripped); P2PError if missing, short or readable by others."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
        mode = os.stat(path).st_mode
    except OSError as e:
        raise P2PError(f"cannot read token file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise P2PError(f"token file {path} is not text") from None
    if len(token) < MIN_TOKEN_LEN:
        raise P2PError(f"token file {path}: the token must be at least {MIN_TOKEN_LEN} characters")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise P2PError(f"token file {path} is readable by others: chmod 600 it")
    return token


def auth_header(token: str) -> dict[str, str]:
    return {TOKEN_HEADER: f"Bearer {token}"}


def token_ok(request: web.Request, token: str) -> bool:
    got = request.headers.get(TOKEN_HEADER, "")
    # compare_digest takes as long for a near miss as for a far one.
    return hmac.compare_digest(got.encode(), f"Bearer {token}".encode())


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def token_middleware(token: str, open_paths: frozenset[str] = frozenset({"/metrics"})) -> Callable:
    """An aiohttp middleware refusing (401) every request without the cluster token."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in open_paths and not token_ok(request, token):
            return web.json_response({"error": "cluster token required"}, status=401)
        return await handler(request)

    return check


def split_hostport(text: str, what: str) -> tuple[str, int]:
    """('host', port) from HOST:PORT ([v6]:PORT too); P2PError if malformed."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise P2PError(f"{what}: expected HOST:PORT, got {text!r}")
    return host, int(port)


def normalize_registry(text: str) -> str:
    """A registry name as clients spell it in `ns=`: lower-cased host[:port], docker.io folded."""
    name = text.strip().lower().removeprefix("https://").removeprefix("http://").rstrip("/")
    if not name or "/" in name or any(c.isspace() for c in name):
        raise P2PError(f"not a registry host[:port]: {text!r}")
    return "registry-1.docker.io" if name in ("docker.io", "index.docker.io") else name


def is_loopback(host: str) -> bool:
    name = host.rpartition(":")[0] if host.count(":") == 1 else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class AllowList:
    """The registries a peer may fetch from, and which of them speak plain HTTP."""

    def __init__(self, allowed: list[str], insecure: list[str]):
        self.allowed = frozenset(normalize_registry(r) for r in allowed)
        self.insecure = frozenset(normalize_registry(r) for r in insecure)
        if not self.allowed:
            raise P2PError("--allow-registry must name at least one registry")

    def check(self, registry: str) -> str:
        name = normalize_registry(registry)
        if name not in self.allowed:
            raise P2PError(f"registry {name} is not in this peer's --allow-registry list")
        return name

    def plain_http(self, registry: str) -> bool:
        return registry in self.insecure or is_loopback(registry)
