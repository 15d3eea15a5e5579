"""The peer daemon's core: getting pieces (local store, parents, or the source) and serving them to peers.

`Peer.read_blob` is what the registry mirror calls: it yields the bytes of a
range of a blob, fetching the covering pieces a few ahead of the reader. Each
piece is fetched once however many readers want it. Where a piece comes from
is the scheduler's call (one round trip): from the parents it names, checked
against the piece digest it gives, else from the registry at once; when the
scheduler is unreachable, from the registry directly. A parent that fails or
serves a corrupt piece is reported and the next one tried, so a client's read
only fails when the registry itself does.

The piece server (`piece_app`, on --listen, cluster token required) serves
pieces this peer holds, by task digest and index, under an upload rate limit
and a limit on concurrent uploads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import random
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from naiad.p2p.client import SchedulerClient
from naiad.p2p.download import PieceDownload
from naiad.p2p.metrics import PeerMetrics, metrics_handler
from naiad.p2p.pieces import P2PError, check_task, covering, piece_hash, piece_span
from naiad.p2p.ratelimit import TokenBucket
from naiad.p2p.security import AllowList, auth_header, token_middleware
from naiad.p2p.source import SourceError, Sources
from naiad.p2p.store import PieceMissing, PieceStore, TaskRecord
from naiad.p2p.wire import bad_request, field, int_list, read_json

log = logging.getLogger(__name__)

WINDOW = 8  # pieces fetched ahead of a reader
WAIT_STEP = 2.0  # seconds the scheduler may hold a request while another peer fetches the piece
MAX_WAIT = 60.0  # then this peer fetches it from the source itself
PARENT_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=2, sock_read=10)
PRELOAD_WORKERS = 8
BUSY_BACKOFF = 0.1  # seconds (jittered) before asking again when every named parent was busy
BACKGROUND_PART = 256 << 10  # the rest of a lazily read piece comes from the source in parts this big


@dataclasses.dataclass
class PeerConfig:
    data: str
    advertise: str  # HOST:PORT other peers reach this peer's piece server at
    schedulers: list[str]
    token: str
    allow: AllowList
    seed: bool = False
    upload_rate: int | None = None  # bytes/s to other peers, None: unlimited
    upload_slots: int = 16
    quota: int | None = None
    creds: str | None = None
    tls_verify: bool = True
    source_retries: int | None = None


class Peer:
    def __init__(self, config: PeerConfig):
        self.config = config
        self.store = PieceStore(config.data, config.quota)
        self.metrics = PeerMetrics()
        self.sources = Sources(config.allow, config.creds, config.tls_verify, config.source_retries)
        self.schedulers = SchedulerClient(config.schedulers, config.token)
        self.id = _peer_id(config.data)
        self.bucket = TokenBucket(config.upload_rate) if config.upload_rate else None
        self.free_slots = config.upload_slots
        self._downloads: dict[tuple[str, int], PieceDownload] = {}
        self._jobs: set[asyncio.Task] = set()
        self._whole_checks: set[str] = set()  # tasks whose whole-blob digest is being checked
        self._streamed_ok: set[str] = set()  # tasks a reader hashed whole (a match) before all were stored
        self._parents: aiohttp.ClientSession | None = None
        self._urgent_sources = 0  # source fetches of spans a reader waits for, running now
        self._sources_idle = asyncio.Event()
        self._background_busy = False
        self._preloading: set[str] = set()  # tasks fetch_task is getting whole
        self._known_by: set[str] = set()  # schedulers that have our holdings

    # --- life ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.schedulers.start()
        self._parents = aiohttp.ClientSession(timeout=PARENT_TIMEOUT, auto_decompress=False,
                                              connector=aiohttp.TCPConnector(limit=64))
        self.metrics.stored_bytes.set(self.store.usage())
        self.spawn(self._heartbeats())
        for record in list(self.store.tasks.values()):
            if record.complete and not record.verified:
                self._check_whole(record)

    async def close(self) -> None:
        for job in list(self._jobs):
            job.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        if self._parents is not None:
            await self._parents.close()
        await self.schedulers.close()
        self.sources.close()

    def spawn(self, coro: Any) -> asyncio.Task:
        job = asyncio.ensure_future(coro)
        self._jobs.add(job)
        job.add_done_callback(self._done)
        return job

    def _done(self, job: asyncio.Task) -> None:
        self._jobs.discard(job)
        if not job.cancelled() and job.exception() is not None:
            log.error("background job failed: %r", job.exception())

    async def _heartbeats(self) -> None:
        interval = 1.0
        while True:
            body = {"id": self.id, "addr": self.config.advertise, "seed": self.config.seed,
                    "slots": self.config.upload_slots, "free": self.free_slots}
            for addr in self.schedulers.addrs:
                self.schedulers.mark_up(addr)  # the heartbeat is the probe that brings it back
                answer = await self.schedulers.call(addr, "/api/v1/peers", body)
                if answer is None:
                    self._known_by.discard(addr)
                    continue
                interval = float(answer.get("heartbeat", interval))
                if not answer.get("known") or addr not in self._known_by:
                    await self._send_holdings(addr)
            self.metrics.active_tasks.set(len({d for d, _ in self._downloads}))
            self.metrics.stored_bytes.set(self.store.usage())
            await asyncio.sleep(interval)

    async def _send_holdings(self, addr: str) -> None:
        tasks = [{"task": r.digest, "size": r.size, "complete": r.verified,
                  "pieces": {str(i): h for i, h in r.pieces.items()}}
                 for r in list(self.store.tasks.values())
                 if r.pieces and self.schedulers.ring.owner(r.digest) == addr]
        body = {"peer": self.id, "tasks": tasks}
        if await self.schedulers.call(addr, "/api/v1/holdings", body) is not None:
            self._known_by.add(addr)
            log.info("scheduler %s: announced %d tasks", addr, len(tasks))

    # --- reading blobs --------------------------------------------------------------------

    async def read_blob(self, digest: str, size: int, registry: str, repo: str, start: int, end: int,
                        *, urgent: bool) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the blob, piece by piece as they come; the whole blob is checked too.

        When the reader reads the whole blob, its digest is checked before the
        last bytes are given out: a blob whose pieces all passed but whose
        digest fails (a wrong piece digest recorded) is never completed.
        """
        record = self.store.open_task(check_task(digest), size)
        whole_pull = not urgent and (start, end) == (0, size)
        if whole_pull and not record.complete and digest not in self._preloading:
            # A whole-blob pull: keep PRELOAD_WORKERS pieces in flight however the reader
            # advances, so the registry link and the parents never sit idle behind one slow piece.
            self.spawn(self.fetch_task(digest, size, registry, repo))
        whole = hashlib.sha256() if (start, end) == (0, size) and not record.verified else None
        if whole is not None:
            self._whole_checks.add(digest)
        try:
            indices = list(covering(start, end - start, record.piece_size))
            ahead: dict[int, PieceDownload] = {}
            for k, index in enumerate(indices):
                for j in indices[k:k + WINDOW]:
                    if j not in ahead:
                        offset, length = piece_span(size, record.piece_size, j)
                        want = (max(start, offset) - offset, min(end, offset + length) - offset)
                        ahead[j] = self.piece(record, j, registry, repo, urgent=urgent, want=want)
                offset, length = piece_span(size, record.piece_size, index)
                lo, hi = max(start, offset) - offset, min(end, offset + length) - offset
                held: bytes | None = None
                async for data in ahead.pop(index).read(lo, hi):
                    if whole is not None:
                        await asyncio.to_thread(whole.update, data)
                    if held is not None:
                        yield held
                    held = data
                if whole is not None and k == len(indices) - 1:
                    if "sha256:" + whole.hexdigest() != digest:
                        await self._drop_task(record, "the whole blob does not match its digest")
                        raise P2PError(f"blob {digest}: assembled bytes do not match the digest")
                    # The stored pieces are the bytes just hashed: no need to read them back.
                    self._streamed_ok.add(digest)
                    if record.complete:
                        await self._verified(record)
                if held is not None:
                    yield held
                self.metrics.client_bytes.inc(hi - lo)
        finally:
            self._whole_checks.discard(digest)
            self.store.release(record)

    def piece(self, record: TaskRecord, index: int, registry: str, repo: str, *, urgent: bool,
              want: tuple[int, int] | None = None) -> PieceDownload:
        """The piece, from the store or on its way; one fetch however many readers ask.

        `want` is the span of the piece an urgent reader waits for: from the
        registry, it is fetched first, and the rest of the piece afterwards.
        """
        key = (record.digest, index)
        dl = self._downloads.get(key)
        if dl is not None:
            return dl
        length = piece_span(record.size, record.piece_size, index)[1]
        dl = self._downloads[key] = PieceDownload(length)
        self.spawn(self._get(record, index, dl, registry, repo, urgent, want))
        return dl

    async def _get(self, record: TaskRecord, index: int, dl: PieceDownload, registry: str, repo: str,
                   urgent: bool, want: tuple[int, int] | None) -> None:
        self.store.open_task(record.digest, record.size)  # pinned while the fetch runs
        try:
            if self.store.has(record.digest, index):
                with contextlib.suppress(PieceMissing):
                    dl.fill_all(await asyncio.to_thread(self.store.read, record, index))
                    return
            await self._fetch(record, index, dl, registry, repo, urgent, want)
        except BaseException as e:  # the readers get the error; the next read tries again
            dl.fail(e)
            if not isinstance(e, (P2PError, SourceError, asyncio.CancelledError)):
                raise
        finally:
            self._downloads.pop((record.digest, index), None)
            self.store.release(record)

    async def _fetch(self, record: TaskRecord, index: int, dl: PieceDownload, registry: str, repo: str,
                     urgent: bool, want: tuple[int, int] | None) -> None:
        exclude: list[str] = []
        waited_since = time.monotonic()
        while time.monotonic() - waited_since < MAX_WAIT:
            answer = await self.schedulers.for_task(record.digest, "/api/v1/schedule", {
                "peer": self.id, "task": record.digest, "size": record.size, "registry": registry,
                "repo": repo, "pieces": [index], "urgent": urgent, "exclude": exclude, "wait": WAIT_STEP})
            if answer is None or answer.get("unknown_peer"):
                break  # no scheduler: the registry directly (slower, never failing)
            decision = answer.get("pieces", {}).get(str(index))
            if decision is None:
                continue  # someone else is fetching it from the source: wait for it
            if decision.get("source"):
                break
            busy = False
            for parent in decision.get("parents", []):
                outcome = await self._from_parent(record, index, dl, parent, decision["digest"])
                if outcome == "ok":
                    return
                if outcome == "busy":
                    busy = True  # a parent with no free upload slot now is asked again later
                else:
                    exclude.append(parent["id"])
            if busy:
                await asyncio.sleep(BUSY_BACKOFF * (0.5 + random.random()))
        await self._from_source(record, index, dl, registry, repo, want if urgent else None)

    async def _from_parent(self, record: TaskRecord, index: int, dl: PieceDownload,
                           parent: dict[str, str], digest: str) -> str:
        """"ok" (the piece is in `dl` and stored), "busy" (no free upload slot) or "failed"."""
        assert self._parents is not None
        length = dl.length
        started = time.monotonic()
        url = f"http://{parent['addr']}/api/v1/pieces/{record.digest}/{index}"
        failure: dict[str, bool] = {}
        try:
            async with self._parents.get(url, headers=auth_header(self.config.token)) as response:
                if response.status == 200 and response.content_length == length:
                    data = await response.read()
                    if len(data) == length and await asyncio.to_thread(piece_hash, data) == digest:
                        self.metrics.peer_bytes.inc(length)
                        self.metrics.piece_seconds.labels("peer").observe(time.monotonic() - started)
                        dl.fill_all(data)
                        await self._stored(record, index, data, digest, parent["id"], started)
                        return "ok"
                    reason = "corrupt"
                    failure["corrupt"] = True
                    log.warning("peer %s served a corrupt piece %d of %s; reported", parent["id"], index,
                                record.digest)
                else:
                    reason = f"http {response.status}" if response.status != 200 else "wrong length"
                    failure["missing"] = response.status == 404
                    failure["busy"] = response.status == 503
        except (aiohttp.ClientError, TimeoutError) as e:
            reason = type(e).__name__
        self.metrics.piece_failures.labels(reason.split()[0]).inc()
        log.info("piece %d of %s from %s failed: %s", index, record.digest, parent["id"], reason)
        await self._report(record, index, parent["id"], ok=False, **failure)
        return "busy" if failure.get("busy") else "failed"

    async def _from_source(self, record: TaskRecord, index: int, dl: PieceDownload, registry: str,
                           repo: str, want: tuple[int, int] | None) -> None:
        """Stream the piece from the registry; the span an urgent reader waits for (`want`) comes first.

        The rest of such a piece is fetched in the background, in small parts,
        each only while no urgent fetch is running: on a thin registry link, a
        lazy reader's next miss then does not queue behind the last one's tail.
        """
        offset, length = piece_span(record.size, record.piece_size, index)
        started = time.monotonic()
        loop = asyncio.get_running_loop()

        def sink(pos: int, data: bytes) -> None:
            loop.call_soon_threadsafe(dl.fill, pos - offset, data)

        async def fetch(a: int, b: int) -> None:
            await loop.run_in_executor(self.sources.pool, self.sources.stream, registry, repo, record.digest,
                                       offset + a, offset + b, sink)

        async def urgent(a: int, b: int) -> None:
            self._urgent_sources += 1
            try:
                await fetch(a, b)
            finally:
                self._urgent_sources -= 1
                if not self._urgent_sources:
                    self._sources_idle.set()

        try:
            if want is None or want == (0, length):
                await fetch(0, length)
            else:
                await urgent(*want)
                parts = [(p, min(p + BACKGROUND_PART, b)) for a, b in ((want[1], length), (0, want[0]))
                         for p in range(a, b, BACKGROUND_PART)]
                while parts:
                    # A reader that joined this piece later and waits: its parts first, as urgent.
                    blocked = [p for p in parts if any(p[0] < hi and lo < p[1] for lo, hi in dl.waiting)]
                    if blocked:
                        # In one request: the blocked parts that follow each other.
                        run = [blocked[0]]
                        for p in blocked[1:]:
                            if p[0] != run[-1][1]:
                                break
                            run.append(p)
                        await urgent(run[0][0], run[-1][1])
                        parts = [p for p in parts if p not in run]
                        continue
                    if self._urgent_sources or self._background_busy:
                        # One background part at a time per peer, none while a reader waits.
                        self._sources_idle.clear()
                        with contextlib.suppress(TimeoutError):
                            # Woken by idleness, or after a bit to look for readers of this piece.
                            await asyncio.wait_for(self._sources_idle.wait(), 0.02)
                        continue
                    self._background_busy = True
                    try:
                        await fetch(*parts.pop(0))
                    finally:
                        self._background_busy = False
                        self._sources_idle.set()
        except SourceError:
            self.metrics.piece_failures.labels("source").inc()
            await self._report(record, index, "source", ok=False)
            raise
        data = dl.data()
        dl.finish()
        self.metrics.source_bytes.inc(length)
        self.metrics.piece_seconds.labels("source").observe(time.monotonic() - started)
        await self._stored(record, index, data, await asyncio.to_thread(piece_hash, data), "source", started)

    async def _stored(self, record: TaskRecord, index: int, data: bytes, hexdigest: str, origin: str,
                      started: float) -> None:
        """Keep a verified piece, tell the scheduler, and check the whole blob once all are here."""
        evicted = await asyncio.to_thread(self.store.put, record, index, data, hexdigest)
        for gone in evicted:
            self.spawn(self._update(gone, dropped=True))
        if self.store.has(record.digest, index):
            await self._report(record, index, origin, ok=True, digest=hexdigest, bytes=len(data),
                               seconds=time.monotonic() - started)
        if record.complete and not record.verified:
            if record.digest in self._streamed_ok:
                await self._verified(record)
            elif record.digest not in self._whole_checks:
                self._check_whole(record)

    async def _verified(self, record: TaskRecord) -> None:
        self._streamed_ok.discard(record.digest)
        self.store.mark_verified(record)
        await self._update(record, complete=True)

    def _check_whole(self, record: TaskRecord) -> None:
        self._whole_checks.add(record.digest)
        self.spawn(self._verify_whole(record))

    async def _verify_whole(self, record: TaskRecord) -> None:
        try:
            h = hashlib.sha256()
            for index in range(record.count):
                h.update(await asyncio.to_thread(self.store.read, record, index))
            if "sha256:" + h.hexdigest() == record.digest:
                await self._verified(record)
            else:
                await self._drop_task(record, "the whole blob does not match its digest")
        except PieceMissing:
            pass  # evicted or found corrupt meanwhile: fetched again when next needed
        finally:
            self._whole_checks.discard(record.digest)

    async def _drop_task(self, record: TaskRecord, why: str) -> None:
        log.error("task %s: %s; dropping all its pieces", record.digest, why)
        self.store.remove(record.digest)
        await self._update(record, dropped=True)

    # --- telling the scheduler ---------------------------------------------------------------

    async def _report(self, record: TaskRecord, index: int, origin: str, *, ok: bool, **extra: Any) -> None:
        await self.schedulers.for_task(record.digest, "/api/v1/report", {
            "peer": self.id, "task": record.digest, "size": record.size, "piece": index, "from": origin,
            "ok": ok, **extra})

    async def _update(self, record: TaskRecord, **flags: bool) -> None:
        await self.schedulers.for_task(record.digest, "/api/v1/update", {
            "peer": self.id, "task": record.digest, "size": record.size, **flags})

    # --- whole tasks (preheat, seed work) -------------------------------------------------------

    async def fetch_task(self, digest: str, size: int, registry: str, repo: str,
                         pieces: list[int] | None = None) -> None:
        """Get pieces (all by default) of a task into the store, a few at a time."""
        record = self.store.open_task(digest, size)
        self._preloading.add(digest)
        try:
            todo = [i for i in (range(record.count) if pieces is None else pieces)
                    if i < record.count and i not in record.pieces]
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in todo:
                queue.put_nowait(i)

            async def worker() -> None:
                while not queue.empty():
                    index = queue.get_nowait()
                    with contextlib.suppress(P2PError, SourceError):
                        await self.piece(record, index, registry, repo, urgent=False).wait()

            await asyncio.gather(*(worker() for _ in range(PRELOAD_WORKERS)))
        finally:
            self._preloading.discard(digest)
            self.store.release(record)

    # --- the piece server ---------------------------------------------------------------------

    def piece_app(self) -> web.Application:
        app = web.Application(middlewares=[token_middleware(self.config.token)])
        app.router.add_get("/api/v1/pieces/{digest}/{index:[0-9]+}", self._serve_piece)
        app.router.add_post("/api/v1/fetch", self._fetch_request)
        app.router.add_get("/metrics", metrics_handler(self.metrics.registry))
        return app

    async def _serve_piece(self, request: web.Request) -> web.StreamResponse:
        digest, index = request.match_info["digest"], int(request.match_info["index"])
        record = self.store.get(digest)
        if record is None or index not in record.pieces:
            raise web.HTTPNotFound(text="piece not held")
        if self.free_slots <= 0:
            self.metrics.upload_refused.inc()
            raise web.HTTPServiceUnavailable(text="no free upload slot", headers={"Retry-After": "1"})
        self.free_slots -= 1
        try:
            try:
                data = await asyncio.to_thread(self.store.read, record, index)
            except PieceMissing:
                raise web.HTTPNotFound(text="piece not held") from None
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                                   "Content-Length": str(len(data))})
            await response.prepare(request)
            view = memoryview(data)
            for pos in range(0, len(data), 1 << 18):
                block = view[pos:pos + (1 << 18)]
                if self.bucket is not None:
                    await self.bucket.take(len(block))
                await response.write(block)
                self.metrics.served_bytes.inc(len(block))
            await response.write_eof()
            return response
        except ConnectionError:
            # The child went away (it timed out, or died): it reports it, nothing to do here.
            raise web.HTTPServiceUnavailable() from None
        finally:
            self.free_slots += 1

    async def _fetch_request(self, request: web.Request) -> web.Response:
        """A scheduler asks this (seed) peer to fetch tasks or pieces: preheat, or a source fetch to share."""
        body = await read_json(request)
        registry, repo = field(body, "registry", str), field(body, "repo", str)
        try:
            registry = self.config.allow.check(registry)
        except P2PError as e:
            raise web.HTTPForbidden(text=str(e)) from None
        pieces = int_list(body, "pieces", 1 << 16) if "pieces" in body else None
        for blob in field(body, "blobs", list):
            if not isinstance(blob, dict):
                raise bad_request("blobs must be objects")
            try:
                digest = check_task(field(blob, "digest", str))
            except P2PError as e:
                raise bad_request(str(e)) from None
            self.spawn(self.fetch_task(digest, field(blob, "size", int), registry, repo, pieces))
        return web.json_response({"accepted": True}, status=202)


def _peer_id(data: str) -> str:
    """This peer's id: random once, then kept in the data directory (a restart is the same peer)."""
    path = os.path.join(data, "peer-id")
    try:
        with open(path) as f:
            value = f.read().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = f"{os.uname().nodename[:24]}-{secrets.token_hex(4)}"
    os.makedirs(data, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(value)
    os.replace(path + ".tmp", path)
    return value
