"""The OCI distribution (registry v2) client, as an image source and target.

`RegistryClient` speaks to one registry host over one pooled httpx.Client:
ping, anonymous / basic / bearer-token auth driven by the 401 challenge,
manifests, blob HEAD/GET/Range GET, monolithic and chunked uploads and
cross-repository mounts. Transient failures (5xx, 429, connection errors,
bodies cut short) are retried with exponential backoff; a blob stream whose
connection drops resumes with a Range request from where it got to.

`RegistrySource` and `RegistryTarget` fit the ImageSource / ImageTarget
protocols of naiad.oci.image over one repository. A target stores blobs only;
the manifest, which makes an image visible, is pushed by `put_manifest`, which
callers call last. A failed blob upload cancels its upload session.

Every failure is a RegistryError (NotFoundError for a 404) whose message is
one line naming host, operation, repository and HTTP status. Neither messages
nor log lines ever carry credentials, tokens or the headers that hold them.
"""

from __future__ import annotations

import email.utils
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import BinaryIO

import httpx

from naiad.errors import NotFoundError, RegistryError
from naiad.oci import mediatypes as mt
from naiad.oci.auth import (
    Challenge,
    Credentials,
    TokenCache,
    fetch_token,
    parse_www_authenticate,
    pick_challenge,
    resolve_credentials,
)
from naiad.oci.digest import check_digest, sha256_digest, verify_bytes
from naiad.oci.fastrange import RangeConnections
from naiad.oci.image import Descriptor, RegistryOptions
from naiad.oci.reference import Reference
from naiad.oci.tls import client_context

log = logging.getLogger(__name__)

# Defaults read when a RegistryClient is made; tests lower them to stay fast.
RETRIES = 5  # attempts per request (and per upload, and per stalled blob stream)
BACKOFF = 0.2  # seconds before the first retry, doubled each time
BACKOFF_MAX = 5.0
MONOLITHIC_MAX = 32 << 20  # blobs up to this size go up in one PUT
CHUNK_SIZE = 16 << 20  # PATCH size for larger ones
TIMEOUT = httpx.Timeout(60.0, connect=15.0)

_IO_SIZE = 1 << 20
_MANIFEST_LIMIT = 16 << 20
_MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_USER_AGENT = "naiad/0.1"

Body = bytes | Callable[[], Iterable[bytes]] | None


class _TransientError(RegistryError):
    """A failure worth starting over for (5xx, 429, dropped connection, lost upload)."""


def _is_transient_status(status: int) -> bool:
    return status == 429 or (status >= 500 and status not in (501, 505))


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def _describe_transport_error(e: httpx.TransportError) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _error_detail(response: httpx.Response) -> str:
    """`CODE: message` pairs from a distribution error body, if there is one."""
    try:
        if not response.is_stream_consumed:
            response.read()
        errors = response.json().get("errors") or []
        parts = [f"{e.get('code', '?')}: {e.get('message', '')}".rstrip(": ") for e in errors]
    except Exception:  # an HTML error page, a closed stream: there is no detail to give
        return ""
    return "; ".join(parts)[:200]


def _for_session(challenge: Challenge | None) -> Challenge | None:
    """A challenge without the parts that belong to the one request that got it."""
    if challenge is None:
        return None
    params = {k: v for k, v in challenge.params.items() if k not in ("scope", "error")}
    return Challenge(challenge.scheme, params)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class RegistryClient:
    """A client for one registry host; `push` asks tokens for push as well as pull.

    Safe to share between threads; close() when done.
    """

    def __init__(
        self,
        host: str,
        options: RegistryOptions | None = None,
        *,
        push: bool = False,
        retries: int | None = None,
        backoff: float | None = None,
        backoff_max: float | None = None,
        monolithic_max: int | None = None,
        chunk_size: int | None = None,
        timeout: httpx.Timeout | float | None = None,
    ):
        options = options or RegistryOptions()
        self.host = host
        self.push = push
        plain = options.plain_http
        if plain is None:
            plain = Reference("docker", host=host).plain_http_default
        self.base_url = httpx.URL(f"{'http' if plain else 'https'}://{host}")
        self.retries = max(1, RETRIES if retries is None else retries)
        self.backoff = BACKOFF if backoff is None else backoff
        self.backoff_max = BACKOFF_MAX if backoff_max is None else backoff_max
        self.monolithic_max = MONOLITHIC_MAX if monolithic_max is None else monolithic_max
        self.chunk_size = CHUNK_SIZE if chunk_size is None else chunk_size
        self._creds: Credentials | None = resolve_credentials(host, options.creds)
        timeout = timeout if timeout is not None else TIMEOUT
        tls = client_context(options.tls_verify)
        self._http = httpx.Client(
            verify=tls,
            timeout=timeout,
            follow_redirects=False,  # followed by hand, so credentials stay on this host
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
            headers={"User-Agent": _USER_AGENT},
        )
        read_timeout = timeout.read if isinstance(timeout, httpx.Timeout) else timeout
        self._ranges = RangeConnections(self.base_url, tls, read_timeout or 60.0, _USER_AGENT)
        self._challenge: Challenge | None = None
        self._pinged = False
        self._tokens = TokenCache()
        self._lock = threading.Lock()
        # Upload sessions a refused mount opened, kept for the upload that follows.
        self._pending_uploads: dict[tuple[str, str], httpx.URL] = {}
        # (repo, digest) -> the blob's request path: httpx parses a URL in ~0.8 ms of CPU, once per
        # range request of a lazy start otherwise (torchapp: ~500 of them, on a 2-core machine).
        self._blob_paths: dict[tuple[str, str], str] = {}

    def __repr__(self) -> str:
        return f"RegistryClient({self.base_url}, push={self.push})"

    def close(self) -> None:
        for location in list(self._pending_uploads.values()):
            self._cancel_upload(location)
        self._pending_uploads.clear()
        self._ranges.close()
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------

    def _what(self, operation: str) -> str:
        return f"registry {self.host}: {operation}"

    def _scope(self, repo: str) -> str:
        return f"repository:{repo}:{'pull,push' if self.push else 'pull'}"

    def _url(self, path: str, params: dict[str, str] | None = None) -> httpx.URL:
        url = self.base_url.join(path)
        return url.copy_merge_params(params) if params else url

    def _sleep(self, attempt: int, response: httpx.Response | None = None) -> None:
        delay = min(self.backoff * (2 ** (attempt - 1)), self.backoff_max)
        if response is not None:
            hinted = _retry_after(response)
            if hinted is not None:
                delay = min(max(delay, hinted), self.backoff_max)
        time.sleep(delay)

    def ping(self) -> None:
        """GET /v2/: learn whether and how this registry wants us to authenticate."""
        what = self._what("ping /v2/")
        response = self._request("GET", self._url("/v2/"), what=what, scopes=(), auth=False)
        if response.status_code == 401:
            self._challenge = _for_session(
                pick_challenge(parse_www_authenticate(response.headers.get("www-authenticate", "")))
            )
            log.debug(
                "%s wants %s auth", self.host, self._challenge.scheme if self._challenge else "?"
            )
        elif response.status_code != 200:
            raise self._error(response, what + " (is this an OCI registry?)")
        self._pinged = True

    def _ensure_pinged(self) -> None:
        if not self._pinged:
            with self._lock:
                if not self._pinged:
                    self.ping()

    def _authorization(self, scopes: tuple[str, ...], what: str) -> str | None:
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._creds.basic_header() if self._creds else None
        token = self._tokens.get(challenge, scopes)
        if token is None:
            token = self._fetch_token(challenge, set(scopes), what)
        return f"Bearer {token}"

    def _fetch_token(self, challenge: Challenge, scopes: set[str], what: str) -> str:
        for attempt in range(1, self.retries + 1):
            try:
                token, expires_in = fetch_token(self._http, challenge, scopes, self._creds)
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise RegistryError(
                        f"{what}: token server unreachable: {_describe_transport_error(e)}"
                    ) from None
                self._sleep(attempt)
                continue
            except RegistryError as e:
                raise RegistryError(f"{what}: {e}") from None
            self._tokens.put(challenge, scopes, token, expires_in)
            return token
        raise AssertionError("unreachable")

    def _send_following(
        self,
        method: str,
        url: httpx.URL,
        headers: dict[str, str],
        authorization: str | None,
        body: Body,
        stream: bool,
    ) -> httpx.Response:
        """One request, following redirects of GET/HEAD (e.g. to a storage backend).

        The Authorization header only ever goes to the registry's own origin:
        a presigned storage URL needs none, and must not see ours.
        """
        for _ in range(_MAX_REDIRECTS + 1):
            h = dict(headers)
            if authorization and _same_origin(url, self.base_url):
                h["Authorization"] = authorization
            content = body() if callable(body) else body
            request = self._http.build_request(method, url, headers=h, content=content)
            response = self._http.send(request, stream=stream)
            location = response.headers.get("location")
            if response.status_code in _REDIRECTS and method in ("GET", "HEAD") and location:
                response.close()
                url = url.join(location)
                log.debug("%s redirected to %s", method, url.host)
                continue
            return response
        raise RegistryError(f"registry {self.host}: more than {_MAX_REDIRECTS} redirects")

    def _send(
        self,
        method: str,
        url: httpx.URL,
        headers: dict[str, str],
        body: Body,
        stream: bool,
        scopes: tuple[str, ...],
        what: str,
        auth: bool,
    ) -> httpx.Response:
        """One attempt, answering an auth challenge once if the registry sends one."""
        reauthenticated = False
        while True:
            authorization = self._authorization(scopes, what) if auth else None
            response = self._send_following(method, url, headers, authorization, body, stream)
            if (
                not auth
                or response.status_code != 401
                or not _same_origin(response.url, self.base_url)
            ):
                return response
            challenge = pick_challenge(
                parse_www_authenticate(response.headers.get("www-authenticate", ""))
            )
            if reauthenticated or challenge is None:
                return response
            if challenge.scheme == "basic" and self._creds is None:
                return response
            if authorization and challenge.scheme == "basic":
                return response  # the same credentials again would be refused again
            if challenge.scheme == "bearer":
                # The scope the registry names is what this request needs.
                scopes = tuple(sorted(set(scopes) | set(challenge.params.get("scope", "").split())))
                if authorization:
                    # A token we held was refused (expired early, too narrow): drop it.
                    self._tokens.discard(authorization.removeprefix("Bearer "))
            self._challenge = _for_session(challenge)
            response.close()
            reauthenticated = True

    def _request(
        self,
        method: str,
        url: httpx.URL,
        *,
        what: str,
        scopes: tuple[str, ...],
        headers: dict[str, str] | None = None,
        body: Body = None,
        stream: bool = False,
        retry: bool = True,
        auth: bool = True,
    ) -> httpx.Response:
        """Send with auth and retries; the response may be any non-transient status.

        Transient statuses and connection errors are retried (when `retry`),
        then raised as _TransientError. A 401 left after the challenge was
        answered is raised as RegistryError.
        """
        if auth:
            self._ensure_pinged()
        attempts = self.retries if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                response = self._send(method, url, headers or {}, body, stream, scopes, what, auth)
            except httpx.TransportError as e:
                log.debug("%s: attempt %d: %s", what, attempt, _describe_transport_error(e))
                if attempt == attempts:
                    tries = f" after {attempt} attempts" if attempt > 1 else ""
                    raise _TransientError(
                        f"{what}: connection failed{tries}: {_describe_transport_error(e)}"
                    ) from None
                self._sleep(attempt)
                continue
            log.debug("%s %s -> %d", method, url.path, response.status_code)
            if _is_transient_status(response.status_code):
                if attempt == attempts:
                    tries = f" after {attempt} attempts" if attempt > 1 else ""
                    raise _TransientError(str(self._error(response, what)) + tries)
                response.close()
                self._sleep(attempt, response)
                continue
            if response.status_code == 401 and auth:
                raise self._error(response, what)
            return response
        raise AssertionError("unreachable")

    def _error(self, response: httpx.Response, what: str) -> RegistryError:
        status = response.status_code
        detail = _error_detail(response)
        message = f"{what}: HTTP {status} {response.reason_phrase}".rstrip()
        if detail:
            message += f" ({detail})"
        if status == 401:
            if self._creds is None:
                message += ": credentials required (use --creds USER:PASS or docker login)"
            else:
                message += ": credentials rejected"
        elif status == 403:
            message += ": access denied"
        response.close()
        return NotFoundError(message) if status == 404 else RegistryError(message)

    # --- manifests -------------------------------------------------------------

    @staticmethod
    def _name(repo: str, reference: str) -> str:
        return f"{repo}@{reference}" if reference.startswith("sha256:") else f"{repo}:{reference}"

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str]:
        """Manifest or index bytes and media type; verified when `reference` is a digest."""
        name = self._name(repo, reference)
        what = self._what(f"GET manifest {name}")
        response = self._request(
            "GET",
            self._url(f"/v2/{repo}/manifests/{reference}"),
            what=what,
            scopes=(self._scope(repo),),
            headers={"Accept": mt.MANIFEST_ACCEPT},
        )
        if response.status_code == 404:
            raise NotFoundError(
                f"docker://{self.host}/{name}: manifest not found (HTTP 404"
                + (f", {d})" if (d := _error_detail(response)) else ")")
            )
        if response.status_code != 200:
            raise self._error(response, what)
        data = response.content
        if len(data) > _MANIFEST_LIMIT:
            raise RegistryError(f"{what}: manifest is {len(data)} bytes, over the limit")
        if reference.startswith("sha256:"):
            verify_bytes(data, reference, f"manifest {name}")
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        return data, media_type

    def put_manifest(self, repo: str, data: bytes, media_type: str, reference: str) -> str:
        """PUT the manifest under a tag or its digest; returns its digest."""
        digest = sha256_digest(data)
        what = self._what(f"PUT manifest {self._name(repo, reference)}")
        response = self._request(
            "PUT",
            self._url(f"/v2/{repo}/manifests/{reference}"),
            what=what,
            scopes=(self._scope(repo),),
            headers={"Content-Type": media_type},
            body=data,
        )
        if response.status_code not in (200, 201):
            raise self._error(response, what)
        theirs = response.headers.get("docker-content-digest")
        if theirs and theirs != digest:
            raise RegistryError(f"{what}: registry stored digest {theirs}, expected {digest}")
        return digest

    # --- reading blobs -----------------------------------------------------------

    def has_blob(self, repo: str, desc: Descriptor) -> bool:
        what = self._what(f"HEAD blob {repo}@{desc.digest}")
        response = self._request(
            "HEAD",
            self._url(f"/v2/{repo}/blobs/{check_digest(desc.digest)}"),
            what=what,
            scopes=(self._scope(repo),),
        )
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise self._error(response, what)
        length = response.headers.get("content-length")
        # A size that disagrees means the descriptor is wrong; uploading surfaces that.
        return length is None or int(length) == desc.size

    def open_blob(self, repo: str, desc: Descriptor) -> BinaryIO:
        """A stream of the blob's bytes that resumes across dropped connections (unverified)."""
        raw = _BlobReader(self, repo, desc)
        raw.open()  # so that a missing blob fails here, not at the first read
        return io.BufferedReader(raw, buffer_size=_IO_SIZE)  # type: ignore[return-value]

    def _get_blob(
        self, repo: str, digest: str, start: int, end: int | None, what: str
    ) -> httpx.Response:
        """A streamed GET of the blob from byte `start` (to `end` inclusive, if given)."""
        headers = {"Accept-Encoding": "identity"}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        response = self._request(
            "GET",
            self._url(f"/v2/{repo}/blobs/{check_digest(digest)}"),
            what=what,
            scopes=(self._scope(repo),),
            headers=headers,
            stream=True,
        )
        if response.status_code == 404:
            response.close()
            raise NotFoundError(f"docker://{self.host}/{repo}: blob {digest} not found (HTTP 404)")
        if response.status_code == 206:
            got = response.headers.get("content-range", "")
            if not got.startswith(f"bytes {start}-"):
                response.close()
                raise RegistryError(f"{what}: asked for bytes from {start}, got range {got!r}")
        elif response.status_code != 200 and not (response.status_code == 416 and end is not None):
            raise self._error(response, what)
        return response

    def read_range(self, repo: str, digest: str, offset: int, size: int,
                   head: tuple[int, Callable[[bytes], None]] | None = None) -> bytes:
        """`size` bytes of the blob from `offset` (fewer at its end); unverified.

        With `head` (n, on_head), on_head may get the first n bytes as soon as they are in
        (storage.ranges.ReadHeadFirst): the fast path does that, a retry does not.
        """
        if size <= 0:
            return b""
        what = self._what(f"GET blob {repo}@{digest} bytes {offset}+{size}")
        path, authorization = self._fast_blob_request(repo, digest, what)
        data = self._ranges.get(path, offset, size, authorization, head)
        if data is not None:
            return data
        for attempt in range(1, self.retries + 1):
            response = self._get_blob(repo, digest, offset, offset + size - 1, what)
            try:
                if response.status_code == 416:
                    return b""
                if response.status_code == 206:
                    # The common case: one read of a bounded body is much faster than
                    # gathering pieces (this is the lazy filesystem's hot path).
                    return response.read()[:size]
                # A 200 is the whole blob (the server ignored Range): cut the slice out.
                skip = offset
                out = bytearray()
                for piece in response.iter_raw():
                    if skip:
                        cut = min(skip, len(piece))
                        piece, skip = piece[cut:], skip - cut
                    out += piece
                    if len(out) >= size:
                        break
                return bytes(out[:size])
            except httpx.TransportError as e:
                log.debug("%s: attempt %d: %s", what, attempt, _describe_transport_error(e))
                if attempt == self.retries:
                    raise _TransientError(
                        f"{what}: connection dropped after {attempt} attempts: "
                        f"{_describe_transport_error(e)}"
                    ) from None
                self._sleep(attempt)
            finally:
                response.close()
        raise AssertionError("unreachable")

    def prewarm(self, n: int) -> None:
        """Open `n` connections for range reads now, while the link is idle (RangeConnections)."""
        self._ranges.prewarm(n)

    @property
    def multi_range(self) -> bool:
        """Whether `read_ranges` asks for several ranges in one request (until the registry
        shows it does not answer such requests)."""
        return self._ranges.enabled and self._ranges.multi

    def read_ranges(self, repo: str, digest: str, spans: Sequence[tuple[int, int]],
                    on_span: Callable[[int, bytes], None]) -> int:
        """Each (offset, size) of `spans` of the blob, handed to on_span(its index, its bytes) as
        it comes in (fewer bytes at the blob's end); unverified. One request for all of them
        where the registry answers multi-range requests, the rest one by one as `read_range`;
        returns how many requests were made. Errors as `read_range`'s."""
        done: set[int] = set()
        requests = 0
        if len(spans) > 1 and self.multi_range:
            what = self._what(f"GET blob {repo}@{digest}, {len(spans)} ranges")
            path, authorization = self._fast_blob_request(repo, digest, what)
            done = self._ranges.get_many(path, spans, authorization, on_span)
            requests = 1
        for i, (offset, size) in enumerate(spans):
            if i not in done:
                on_span(i, self.read_range(repo, digest, offset, size))
                requests += 1
        return requests

    def _fast_blob_request(self, repo: str, digest: str, what: str) -> tuple[str, str | None]:
        """The blob's request path and Authorization header for the fast range path."""
        self._ensure_pinged()
        authorization = self._authorization((self._scope(repo),), what)
        path = self._blob_paths.get((repo, digest))
        if path is None:
            url = self._url(f"/v2/{repo}/blobs/{check_digest(digest)}")  # subclasses add query parameters
            path = self._blob_paths[(repo, digest)] = url.raw_path.decode("ascii")
        return path, authorization

    # --- writing blobs ---------------------------------------------------------------

    def mount_blob(self, repo: str, desc: Descriptor, from_repo: str) -> bool:
        """Ask the registry to link `desc` from `from_repo` into `repo`; True if it did.

        When it declines (202), the upload session it opened is kept for the
        next upload of the same blob.
        """
        what = self._what(f"mount blob {desc.digest} from {from_repo} into {repo}")
        url = self._url(
            f"/v2/{repo}/blobs/uploads/", {"mount": check_digest(desc.digest), "from": from_repo}
        )
        scopes = (self._scope(repo), f"repository:{from_repo}:pull")
        response = self._request("POST", url, what=what, scopes=scopes)
        if response.status_code == 201:
            response.close()
            return True
        if response.status_code == 202 and response.headers.get("location"):
            location = response.url.join(response.headers["location"])
            response.close()
            old = self._pending_uploads.pop((repo, desc.digest), None)
            if old is not None:
                self._cancel_upload(old)
            self._pending_uploads[(repo, desc.digest)] = location
            return False
        raise self._error(response, what)

    def push_blob_bytes(self, repo: str, data: bytes, desc: Descriptor) -> None:
        view = memoryview(data)

        def chunks(offset: int, length: int) -> Iterator[bytes]:
            for i in range(offset, offset + length, _IO_SIZE):
                yield bytes(view[i : min(i + _IO_SIZE, offset + length)])

        self._push_blob(repo, desc, len(data), chunks)

    def push_blob_file(self, repo: str, path: str, desc: Descriptor) -> None:
        size = os.path.getsize(path)

        def chunks(offset: int, length: int) -> Iterator[bytes]:
            with open(path, "rb") as f:
                f.seek(offset)
                left = length
                while left > 0:
                    piece = f.read(min(_IO_SIZE, left))
                    if not piece:
                        raise RegistryError(f"{path}: file shrank while it was being uploaded")
                    left -= len(piece)
                    yield piece

        self._push_blob(repo, desc, size, chunks)

    def _push_blob(
        self, repo: str, desc: Descriptor, size: int, chunks: Callable[[int, int], Iterator[bytes]]
    ) -> None:
        """Upload a blob, starting over in a new session after a transient failure."""
        check_digest(desc.digest)
        what = self._what(f"push blob {repo}@{desc.digest}")
        if size != desc.size:
            raise RegistryError(f"{what}: content is {size} bytes, its descriptor says {desc.size}")
        for attempt in range(1, self.retries + 1):
            location = self._pending_uploads.pop((repo, desc.digest), None)
            if location is None:
                location = self._start_upload(repo, what)
            try:
                if size <= self.monolithic_max:
                    self._upload_monolithic(location, desc, size, chunks, what)
                else:
                    self._upload_chunked(location, desc, size, chunks, what)
                return
            except _TransientError as e:
                self._cancel_upload(location)
                if attempt == self.retries:
                    raise RegistryError(f"{e} (gave up after {attempt} upload attempts)") from None
                log.debug("%s: attempt %d failed, starting over: %s", what, attempt, e)
                self._sleep(attempt)
                # The last attempt may have landed even though its answer was lost.
                if self.has_blob(repo, desc):
                    return
            except BaseException:
                self._cancel_upload(location)
                raise

    def _start_upload(self, repo: str, what: str) -> httpx.URL:
        response = self._request(
            "POST", self._url(f"/v2/{repo}/blobs/uploads/"), what=what, scopes=(self._scope(repo),)
        )
        if response.status_code != 202 or not response.headers.get("location"):
            raise self._error(response, what + " (starting upload)")
        location = response.url.join(response.headers["location"])
        response.close()
        return location

    def _session_response(self, response: httpx.Response, ok: int, what: str) -> httpx.URL:
        """Check an upload-session reply; return where the session goes on."""
        if response.status_code == 404:
            # The session is gone (expired, registry restarted): a new one may work.
            raise _TransientError(str(self._error(response, what + " (upload session lost)")))
        if response.status_code != ok:
            raise self._error(response, what)
        location = response.headers.get("location")
        url = response.url.join(location) if location else response.url
        response.close()
        return url

    def _upload_monolithic(
        self,
        location: httpx.URL,
        desc: Descriptor,
        size: int,
        chunks: Callable[[int, int], Iterator[bytes]],
        what: str,
    ) -> None:
        response = self._request(
            "PUT",
            location.copy_merge_params({"digest": desc.digest}),
            what=what,
            scopes=(self._scope_from(location),),
            retry=False,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            body=lambda: chunks(0, size),
        )
        self._check_committed(response, desc, what)

    def _upload_chunked(
        self,
        location: httpx.URL,
        desc: Descriptor,
        size: int,
        chunks: Callable[[int, int], Iterator[bytes]],
        what: str,
    ) -> None:
        scope = self._scope_from(location)
        offset = 0
        while offset < size:
            length = min(self.chunk_size, size - offset)
            last = offset + length - 1
            response = self._request(
                "PATCH",
                location,
                what=what,
                scopes=(scope,),
                retry=False,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{last}",
                    "Content-Length": str(length),
                },
                body=lambda o=offset, n=length: chunks(o, n),
            )
            received = response.headers.get("range")
            location = self._session_response(response, 202, what)
            if received and not received.endswith(f"-{last}"):
                raise _TransientError(f"{what}: registry has bytes {received}, sent up to {last}")
            offset += length
        response = self._request(
            "PUT",
            location.copy_merge_params({"digest": desc.digest}),
            what=what,
            scopes=(scope,),
            retry=False,
            headers={"Content-Length": "0"},
            body=b"",
        )
        self._check_committed(response, desc, what)

    def _check_committed(self, response: httpx.Response, desc: Descriptor, what: str) -> None:
        if response.status_code == 404:
            raise _TransientError(str(self._error(response, what + " (upload session lost)")))
        if response.status_code != 201:
            raise self._error(response, what)
        theirs = response.headers.get("docker-content-digest")
        response.close()
        if theirs and theirs != desc.digest:
            raise RegistryError(f"{what}: registry stored digest {theirs}")

    def _scope_from(self, location: httpx.URL) -> str:
        """The token scope for an upload URL (/v2/REPO/blobs/uploads/UUID)."""
        path = location.path
        repo = (
            path[len("/v2/") :].rsplit("/blobs/uploads/", 1)[0] if path.startswith("/v2/") else ""
        )
        return self._scope(repo)

    def _cancel_upload(self, location: httpx.URL) -> None:
        """Best effort: a failed push leaves no upload session behind."""
        try:
            response = self._request(
                "DELETE",
                location,
                what=self._what("cancel upload"),
                scopes=(self._scope_from(location),),
                retry=False,
            )
            response.close()
        except (RegistryError, httpx.HTTPError) as e:
            log.debug("could not cancel upload session on %s: %s", self.host, e)


class _BlobReader(io.RawIOBase):
    """A blob's bytes over HTTP; after a dropped connection it asks for the rest by Range."""

    def __init__(self, client: RegistryClient, repo: str, desc: Descriptor):
        self._client = client
        self._repo = repo
        self._desc = desc
        self._what = client._what(f"GET blob {repo}@{desc.digest}")
        self._pos = 0
        self._response: httpx.Response | None = None
        self._pieces: Iterator[bytes] | None = None
        self._pending = b""
        self._skip = 0
        self._eof = False
        self._stalls = 0  # drops in a row without a byte between them
        self._drops = 0

    def readable(self) -> bool:
        return True

    def open(self) -> None:
        response = self._client._get_blob(
            self._repo, self._desc.digest, self._pos, None, self._what
        )
        # A 200 to a Range request is the whole blob: skip what was already read.
        self._skip = self._pos if response.status_code == 200 else 0
        self._response = response
        # No chunk size: pieces come as the network delivers them, so nothing
        # received before a drop sits in a buffer and is lost.
        self._pieces = response.iter_raw()

    def _drop(self, reason: str) -> None:
        self._close_response()
        self._stalls += 1
        self._drops += 1
        retries = self._client.retries
        if self._stalls >= retries or self._drops > 10 * retries:
            raise RegistryError(
                f"{self._what}: connection dropped at byte {self._pos} of {self._desc.size} "
                f"and {self._drops} attempts to resume failed ({reason})"
            )
        log.debug("%s: dropped at byte %d (%s), resuming", self._what, self._pos, reason)
        self._client._sleep(self._stalls)

    def readinto(self, buf) -> int:  # type: ignore[override]
        while not self._pending:
            if self._eof:
                return 0
            try:
                if self._pieces is None:
                    self.open()
                assert self._pieces is not None
                piece = next(self._pieces, None)
            except httpx.TransportError as e:
                self._drop(_describe_transport_error(e))
                continue
            if piece is None:
                self._close_response()
                if self._pos < self._desc.size:
                    self._drop("body ended early")
                    continue
                self._eof = True
                return 0
            if self._skip:
                cut = min(self._skip, len(piece))
                piece, self._skip = piece[cut:], self._skip - cut
            if piece:
                self._stalls = 0
            self._pending = piece
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        self._pos += n
        return n

    def _close_response(self) -> None:
        if self._response is not None:
            self._response.close()
        self._response = None
        self._pieces = None

    def close(self) -> None:
        self._close_response()
        super().close()


class RegistrySource:
    """One registry repository as an ImageSource."""

    def __init__(
        self, ref: Reference, options: RegistryOptions | None = None, *, push: bool = False
    ):
        self.ref = ref
        self.repo = ref.repo
        self.client = RegistryClient(ref.host, options, push=push)

    def get_manifest(self, reference: str) -> tuple[bytes, str]:
        return self.client.get_manifest(self.repo, reference)

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        return self.client.open_blob(self.repo, desc)

    def read_range(self, digest: str, offset: int, size: int) -> bytes:
        return self.client.read_range(self.repo, digest, offset, size)

    def read_range_head_first(self, digest: str, offset: int, size: int, head: int,
                              on_head: Callable[[bytes], None]) -> bytes:
        return self.client.read_range(self.repo, digest, offset, size, (head, on_head))

    def prewarm(self, n: int) -> None:
        self.client.prewarm(n)

    @property
    def multi_range(self) -> bool:
        return self.client.multi_range

    def read_ranges(self, digest: str, spans: Sequence[tuple[int, int]],
                    on_span: Callable[[int, bytes], None]) -> int:
        return self.client.read_ranges(self.repo, digest, spans, on_span)

    def has_blob(self, desc: Descriptor) -> bool:
        return self.client.has_blob(self.repo, desc)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RegistrySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RegistryTarget(RegistrySource):
    """One registry repository as an ImageTarget (and, for checks, a source)."""

    def __init__(self, ref: Reference, options: RegistryOptions | None = None):
        super().__init__(ref, options, push=True)

    def put_blob_file(self, path: str, desc: Descriptor) -> None:
        if not self.has_blob(desc):
            self.client.push_blob_file(self.repo, path, desc)

    def put_blob_bytes(self, data: bytes, desc: Descriptor) -> None:
        if not self.has_blob(desc):
            self.client.push_blob_bytes(self.repo, data, desc)

    def mount_blob(self, desc: Descriptor, from_repo: str) -> bool:
        return self.client.mount_blob(self.repo, desc, from_repo)

    def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        return self.client.put_manifest(self.repo, data, media_type, tag or sha256_digest(data))

    def staging_dir(self) -> str | None:
        return None
