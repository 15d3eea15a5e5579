"""Registry credentials and the auth challenges of the distribution spec.

Credentials come from `--creds USER:PASS` or from Docker's config.json
(`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`). A registry says
how to authenticate in the `WWW-Authenticate` header of a 401: `Basic` (send
the credentials) or `Bearer` (trade them, or nothing, at the token realm for a
short-lived token scoped to repositories and actions).

Secrets never leave this module in readable form: `Credentials` redacts its
repr, and no message or log line built here includes a password or token.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Iterable

import httpx

from naiad.errors import RegistryError

log = logging.getLogger(__name__)

# Tokens are dropped this many seconds before the registry would refuse them,
# so that a request never leaves with a token that expires on the way.
_EXPIRY_SLACK = 10.0
# The token spec's default lifetime when the server does not say.
_DEFAULT_EXPIRES_IN = 60

_DOCKER_HUB_KEYS = (
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
)


@dataclasses.dataclass(frozen=True)
class Credentials:
    """A user name and password (or identity token); the password is never shown."""

    username: str
    password: str = dataclasses.field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<redacted>)"

    __str__ = __repr__

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def parse_creds(text: str) -> Credentials:
    """Credentials from `USER:PASS` (the password may itself contain colons)."""
    user, sep, password = text.partition(":")
    if not sep or not user:
        # The text itself is not repeated: it may be a password typed in the wrong place.
        raise RegistryError("invalid --creds: expected USER:PASS")
    return Credentials(user, password)


def docker_config_path() -> str:
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


def _normalize_host(key: str) -> str:
    """`https://host:port/v1/` -> `host:port`, lower-cased."""
    key = key.strip().lower()
    if "://" in key:
        key = key.split("://", 1)[1]
    return key.split("/", 1)[0]


def _host_aliases(host: str) -> set[str]:
    host = _normalize_host(host)
    if host in _DOCKER_HUB_KEYS:
        return set(_DOCKER_HUB_KEYS)
    return {host}


def credentials_from_docker_config(host: str, path: str | None = None) -> Credentials | None:
    """The credentials config.json stores for `host`, or None.

    Entries in `credsStore` / `credHelpers` (external helper programs) are not
    consulted; `auths` entries with `auth` or `username`/`password` are.
    """
    path = path or docker_config_path()
    try:
        with open(path, "rb") as f:
            config = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        # The error text of json can quote file content, so only its position is kept.
        where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise RegistryError(f"cannot read Docker config {path}: invalid{where}") from None
    auths = config.get("auths") if isinstance(config, dict) else None
    if not isinstance(auths, dict):
        return None
    wanted = _host_aliases(host)
    for key, entry in auths.items():
        if not isinstance(entry, dict) or _normalize_host(key) not in wanted:
            continue
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(entry["auth"], validate=False).decode()
            except (binascii.Error, UnicodeDecodeError, TypeError):
                raise RegistryError(
                    f"Docker config {path}: the auth entry for {key} is not base64 USER:PASS"
                ) from None
            user, sep, password = decoded.partition(":")
            if sep and user:
                return Credentials(user, password)
            raise RegistryError(
                f"Docker config {path}: the auth entry for {key} is not base64 USER:PASS"
            )
        if entry.get("username") and entry.get("password") is not None:
            return Credentials(str(entry["username"]), str(entry["password"]))
    if config.get("credsStore") or config.get("credHelpers"):
        log.debug("docker config %s uses credential helpers, which naiad does not run", path)
    return None


def resolve_credentials(host: str, creds: str | None) -> Credentials | None:
    """`--creds` if given, else what Docker's config.json holds for `host`."""
    if creds:
        return parse_creds(creds)
    return credentials_from_docker_config(host)


# --- WWW-Authenticate -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Challenge:
    """One challenge of a WWW-Authenticate header: `scheme` lower-cased, params by name."""

    scheme: str
    params: dict[str, str]

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class _Scanner:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def skip_commas(self) -> None:
        while True:
            self.skip_ws()
            if self.peek() != ",":
                return
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def token(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _TCHARS:
            self.pos += 1
        return self.text[start : self.pos]

    def token68(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and (
            self.text[self.pos] in _TCHARS or self.text[self.pos] in "/="
        ):
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self) -> str:
        assert self.peek() == '"'
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            self.pos += 1
            if c == "\\" and self.pos < len(self.text):
                out.append(self.text[self.pos])
                self.pos += 1
            elif c == '"':
                return "".join(out)
            else:
                out.append(c)
        return "".join(out)  # unterminated: take what is there

    def lookahead_is_param(self) -> bool:
        """True if a `name=` (not `name==`, a token68 ending) starts here."""
        save = self.pos
        try:
            name = self.token()
            self.skip_ws()
            if not name or self.peek() != "=":
                return False
            self.pos += 1
            return self.peek() != "="
        finally:
            self.pos = save


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Every challenge in a WWW-Authenticate value (RFC 7235 syntax, quoted strings included)."""
    s = _Scanner(header)
    challenges: list[Challenge] = []
    while True:
        s.skip_commas()
        scheme = s.token()
        if not scheme:
            break
        params: dict[str, str] = {}
        s.skip_ws()
        if s.peek() and s.peek() != "," and not s.lookahead_is_param():
            value = s.token68()
            if value:
                params[""] = value
        while True:
            s.skip_commas()
            if not s.lookahead_is_param():
                break
            name = s.token().lower()
            s.skip_ws()
            s.pos += 1  # the "="
            s.skip_ws()
            value = s.quoted() if s.peek() == '"' else s.token()
            params[name] = value
        challenges.append(Challenge(scheme.lower(), params))
        if s.pos >= len(s.text):
            break
        if s.peek() not in ", \t" and s.peek() not in _TCHARS:
            s.pos += 1  # stray character: skip rather than loop forever
    return challenges


def pick_challenge(challenges: Iterable[Challenge]) -> Challenge | None:
    """The challenge to answer: Bearer over Basic, others ignored."""
    by_scheme = {c.scheme: c for c in challenges}
    return by_scheme.get("bearer") or by_scheme.get("basic")


# --- bearer tokens -------------------------------------------------------------


class TokenCache:
    """Bearer tokens by (realm, service, scopes), until shortly before they expire."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, tuple[str, ...]], tuple[str, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(challenge: Challenge, scopes: Iterable[str]) -> tuple[str, str, tuple[str, ...]]:
        return (
            challenge.realm or "",
            challenge.params.get("service", ""),
            tuple(sorted(set(scopes))),
        )

    def get(self, challenge: Challenge, scopes: Iterable[str]) -> str | None:
        key = self._key(challenge, scopes)
        with self._lock:
            entry = self._tokens.get(key)
            if entry is None:
                return None
            token, expires_at = entry
            if time.monotonic() >= expires_at:
                del self._tokens[key]
                return None
            return token

    def put(
        self, challenge: Challenge, scopes: Iterable[str], token: str, expires_in: float
    ) -> None:
        lifetime = max(expires_in - _EXPIRY_SLACK, expires_in / 2)
        with self._lock:
            self._tokens[self._key(challenge, scopes)] = (token, time.monotonic() + lifetime)

    def discard(self, token: str) -> None:
        """Forget `token` (the registry refused it) under whatever scopes it was kept."""
        with self._lock:
            for key in [k for k, (t, _) in self._tokens.items() if t == token]:
                del self._tokens[key]

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()


def fetch_token(
    http: httpx.Client,
    challenge: Challenge,
    scopes: Iterable[str],
    creds: Credentials | None,
) -> tuple[str, float]:
    """Ask the challenge's realm for a token covering `scopes`: (token, seconds it lasts).

    One request, no retries (the caller retries); raises RegistryError.
    """
    realm = challenge.realm
    if not realm:
        raise RegistryError("registry sent a Bearer challenge without a realm")
    realm_url = httpx.URL(realm)
    if realm_url.scheme not in ("http", "https"):
        raise RegistryError(
            f"registry sent a Bearer challenge with an unusable realm {realm_url.host!r}"
        )
    params: list[tuple[str, str]] = []
    if challenge.params.get("service"):
        params.append(("service", challenge.params["service"]))
    params += [("scope", s) for s in sorted(set(scopes))]
    headers = {"Accept": "application/json"}
    if creds is not None:
        headers["Authorization"] = creds.basic_header()
    where = f"token server {realm_url.host}"
    log.debug("fetching token from %s for %s", where, ", ".join(sorted(set(scopes))) or "no scope")
    response = http.get(realm_url.copy_merge_params(params), headers=headers)
    if response.status_code in (401, 403):
        hint = (
            "credentials rejected"
            if creds
            else "credentials required (use --creds or docker login)"
        )
        raise RegistryError(f"{where}: HTTP {response.status_code} unauthorized: {hint}")
    if response.status_code != 200:
        raise RegistryError(f"{where}: HTTP {response.status_code} when fetching a token")
    try:
        body = response.json()
        token = body.get("token") or body.get("access_token")
        expires_in = float(body.get("expires_in") or _DEFAULT_EXPIRES_IN)
    except (ValueError, AttributeError, TypeError):
        raise RegistryError(f"{where}: token response is not the expected JSON") from None
    if not token or not isinstance(token, str):
        raise RegistryError(f"{where}: token response holds no token")
    return token, expires_in
