"""The scheduler: who holds which piece, and from whom (or from the registry) each peer gets the next one.

State is in memory only and rebuilt from what peers announce: a peer the
scheduler does not know (it restarted) is told so in the answer to its next
heartbeat, and sends its holdings again. Bytes never pass through here.

One round trip per decision: `schedule` answers at once for every asked
piece that has holders (ranked parents) or nobody fetching it (the asker, or
a seed peer, goes back to the source); for pieces another peer is already
fetching from the registry (at most K at a time) it holds the request open
until something changes, so a waiting child hears of the new holder at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import time
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

from naiad.p2p.metrics import SchedulerMetrics, metrics_handler
from naiad.p2p.pieces import P2PError, check_task, is_piece_hash, piece_count, piece_size_for
from naiad.p2p.security import auth_header, token_middleware
from naiad.p2p.wire import bad_request, field, int_list, read_json

log = logging.getLogger(__name__)

HEARTBEAT = 1.0  # seconds between a peer's heartbeats (the scheduler tells peers)
DEAD_AFTER = 4.0  # a peer silent this long is not named as a parent
FORGET_AFTER = 120.0  # ... and this long, forgotten
SOURCE_TIMEOUT = 60.0  # a back-to-source fetch not reported by then is given to someone else
BAN_SECONDS = 600.0  # a peer that served a corrupt piece is not named for this long
FAILURE_HALF_LIFE = 10.0
MAX_WAIT = 5.0
MAX_PARENTS = 3
MAX_PIECES_PER_CALL = 4096


@dataclasses.dataclass
class PeerState:
    id: str
    addr: str
    seed: bool
    slots: int
    free: int
    last_seen: float
    throughput: float = 0.0  # bytes/s, EWMA of what children report
    _failures: float = 0.0
    _failures_at: float = 0.0
    banned_until: float = 0.0
    assigned: int = 0  # pieces children were sent to fetch from it, not yet reported

    def alive(self, now: float) -> bool:
        return now - self.last_seen < DEAD_AFTER

    def usable(self, now: float) -> bool:
        return self.alive(now) and now >= self.banned_until

    def failures(self, now: float) -> float:
        return self._failures * 0.5 ** ((now - self._failures_at) / FAILURE_HALF_LIFE)

    def fail(self, now: float) -> None:
        self._failures, self._failures_at = self.failures(now) + 1.0, now


@dataclasses.dataclass
class TaskState:
    digest: str
    size: int
    piece_size: int
    source: tuple[str, str] | None = None  # (registry, repo) the last asker named, for seeds
    digests: dict[int, str] = dataclasses.field(default_factory=dict)
    holders: dict[int, set[str]] = dataclasses.field(default_factory=dict)
    held: Counter[str] = dataclasses.field(default_factory=Counter)  # peer -> pieces it holds
    fetching: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # piece -> peer -> since
    complete: set[str] = dataclasses.field(default_factory=set)
    edges: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)  # (child, parent) -> bytes
    events: dict[int, asyncio.Event] = dataclasses.field(default_factory=dict)  # piece -> "it changed"
    last_active: float = 0.0

    @property
    def count(self) -> int:
        return piece_count(self.size, self.piece_size)

    def add_holder(self, index: int, peer_id: str) -> None:
        holders = self.holders.setdefault(index, set())
        if peer_id not in holders:
            holders.add(peer_id)
            self.held[peer_id] += 1

    def drop_holder(self, index: int, peer_id: str) -> None:
        holders = self.holders.get(index)
        if holders is not None and peer_id in holders:
            holders.discard(peer_id)
            self.held[peer_id] -= 1

    def drop_peer(self, peer_id: str) -> None:
        for index in list(self.holders):
            self.drop_holder(index, peer_id)
        self.complete.discard(peer_id)

    def notify(self, indices: list[int] | None = None) -> None:
        """Wake the requests waiting on these pieces (all, by default): they decide again."""
        for index in list(self.events) if indices is None else indices:
            event = self.events.pop(index, None)
            if event is not None:
                event.set()

    async def wait(self, indices: list[int], timeout: float) -> None:
        """Until one of the pieces changes, or `timeout` seconds."""
        events = [self.events.setdefault(i, asyncio.Event()) for i in indices]
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()


class Scheduler:
    def __init__(self, token: str, *, source_limit: int = 1):
        self.token = token
        self.source_limit = source_limit
        self.peers: dict[str, PeerState] = {}
        self.tasks: dict[str, TaskState] = {}
        self.metrics = SchedulerMetrics()
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task] = set()

    # --- peers --------------------------------------------------------------------------

    def heartbeat(self, body: dict[str, Any]) -> dict[str, Any]:
        peer_id, now = field(body, "id", str), time.monotonic()
        addr = field(body, "addr", str)
        known = peer_id in self.peers
        peer = self.peers.get(peer_id)
        if peer is None or peer.addr != addr:
            peer = self.peers[peer_id] = PeerState(peer_id, addr, False, 1, 1, now)
            log.info("peer %s at %s joined", peer_id, addr)
        peer.seed = bool(field(body, "seed", bool, False))
        peer.slots = max(1, field(body, "slots", int, 1))
        peer.free = max(0, field(body, "free", int, peer.slots))
        peer.last_seen = now
        self._forget_dead(now)
        return {"known": known, "heartbeat": HEARTBEAT}

    def _forget_dead(self, now: float) -> None:
        dead = [p for p in self.peers.values() if now - p.last_seen > FORGET_AFTER]
        for peer in dead:
            log.info("peer %s at %s forgotten (silent %.0f s)", peer.id, peer.addr, now - peer.last_seen)
            del self.peers[peer.id]
            for task in self.tasks.values():
                task.drop_peer(peer.id)
        self.metrics.peers.set(sum(p.alive(now) for p in self.peers.values()))

    def _peer(self, body: dict[str, Any]) -> PeerState:
        peer = self.peers.get(field(body, "peer", str))
        if peer is None:
            # A peer the scheduler forgot (restart): it re-registers with its next heartbeat.
            raise web.HTTPConflict(text='{"error": "unknown peer: send a heartbeat first"}',
                                   content_type="application/json")
        peer.last_seen = time.monotonic()
        return peer

    # --- tasks --------------------------------------------------------------------------

    def _task(self, body: dict[str, Any]) -> TaskState:
        try:
            digest = check_task(field(body, "task", str))
        except P2PError:
            raise bad_request("task must be a sha256 digest") from None
        size = field(body, "size", int)
        if size < 0:
            raise bad_request("size must not be negative")
        task = self.tasks.get(digest)
        if task is None or task.size != size:
            if task is not None:
                log.warning("task %s: size %d now said to be %d; starting over", digest, task.size, size)
            task = self.tasks[digest] = TaskState(digest, size, piece_size_for(size))
            self.metrics.tasks.set(len(self.tasks))
        registry, repo = body.get("registry"), body.get("repo")
        if isinstance(registry, str) and isinstance(repo, str):
            task.source = (registry, repo)
        task.last_active = time.monotonic()
        return task

    def holdings(self, body: dict[str, Any]) -> dict[str, Any]:
        """A peer's full list of what it holds (after it or the scheduler restarted)."""
        peer = self._peer(body)
        for entry in field(body, "tasks", list):
            if not isinstance(entry, dict):
                raise bad_request("tasks must be objects")
            task = self._task(entry)
            pieces = field(entry, "pieces", dict)
            for key, hexdigest in pieces.items():
                if not key.isdigit() or int(key) >= task.count or not is_piece_hash(str(hexdigest)):
                    raise bad_request("pieces must map piece indices to sha256 hex digests")
                self._add_holder(task, int(key), peer.id, hexdigest)
            if field(entry, "complete", bool, False):
                task.complete.add(peer.id)
            task.notify()
        return {}

    def _add_holder(self, task: TaskState, index: int, peer_id: str, hexdigest: str) -> bool:
        known = task.digests.setdefault(index, hexdigest)
        if known != hexdigest:
            # Two peers got different bytes for one piece; the first recorded one stands,
            # and the whole-blob check on completion settles which was right.
            log.warning("task %s piece %d: peer %s holds %s, recorded %s", task.digest, index, peer_id,
                        hexdigest[:12], known[:12])
            return False
        task.add_holder(index, peer_id)
        return True

    def _score(self, peer: PeerState, task: TaskState, now: float) -> float:
        """Higher is better: free upload slots, throughput, how much of the task it holds; minus failures."""
        held = task.held[peer.id] / task.count
        return (peer.free / peer.slots - peer.assigned / peer.slots
                + 0.5 * min(peer.throughput / 100e6, 1.0) + 0.3 * held + (0.2 if peer.seed else 0.0)
                - peer.failures(now) + random.random() * 0.05)  # jitter: spread equals over parents

    def _decide(self, task: TaskState, index: int, asker: PeerState, urgent: bool, exclude: set[str],
                now: float, seed_work: dict[str, list[int]]) -> dict[str, Any] | None:
        digest = task.digests.get(index)
        holders = [self.peers[h] for h in task.holders.get(index, ()) if h in self.peers]
        usable = [p for p in holders if p.id != asker.id and p.id not in exclude and p.usable(now)]
        if usable and digest:
            ranked = sorted(usable, key=lambda p: self._score(p, task, now), reverse=True)[:MAX_PARENTS]
            ranked[0].assigned += 1
            self.metrics.decisions.labels("parents").inc()
            return {"digest": digest, "parents": [{"id": p.id, "addr": p.addr} for p in ranked]}
        fetching = task.fetching.setdefault(index, {})
        for peer_id, since in list(fetching.items()):
            peer = self.peers.get(peer_id)
            if peer is None or not peer.alive(now) or now - since > SOURCE_TIMEOUT:
                del fetching[peer_id]
        if asker.id not in fetching and len(fetching) >= self.source_limit:
            self.metrics.decisions.labels("wait").inc()
            return None
        if asker.id not in fetching and not urgent and not asker.seed:
            seed = self._pick_seed(task, now, exclude)
            if seed is not None and seed.id not in fetching:
                # A seed's fetch is shared by every later asker; the asker waits for it.
                fetching[seed.id] = now
                seed_work.setdefault(seed.id, []).append(index)
                self.metrics.decisions.labels("seed").inc()
                return None
        fetching[asker.id] = now
        self.metrics.decisions.labels("source").inc()
        return {"source": True, **({"digest": digest} if digest else {})}

    def _pick_seed(self, task: TaskState, now: float, exclude: set[str]) -> PeerState | None:
        if task.source is None:
            return None
        seeds = [p for p in self.peers.values() if p.seed and p.usable(now) and p.id not in exclude]
        # Rendezvous hashing: the same seed for the same task, spread over seeds.
        return max(seeds, key=lambda p: hashlib.sha256(f"{p.id}{task.digest}".encode()).digest(),
                   default=None)

    async def schedule(self, body: dict[str, Any]) -> dict[str, Any]:
        peer, task = self._peer(body), self._task(body)
        wanted = [i for i in int_list(body, "pieces", MAX_PIECES_PER_CALL) if i < task.count]
        exclude = field(body, "exclude", list, [])
        if not all(isinstance(e, str) for e in exclude):
            raise bad_request("exclude must list peer ids")
        exclude = set(exclude)
        urgent = field(body, "urgent", bool, False)
        deadline = time.monotonic() + min(max(float(field(body, "wait", (int, float), 0.0)), 0.0), MAX_WAIT)
        while True:
            now = time.monotonic()
            seed_work: dict[str, list[int]] = {}
            answers = {}
            for index in wanted:
                # Asking for a piece it was said to hold: it lost it (evicted, found corrupt).
                task.drop_holder(index, peer.id)
                decision = self._decide(task, index, peer, urgent, exclude, now, seed_work)
                if decision is not None:
                    answers[str(index)] = decision
            for seed_id, pieces in seed_work.items():
                self._spawn(self._tell_seed(self.peers[seed_id], task, pieces))
            if answers or now >= deadline:
                return {"pieces": answers}
            await task.wait(wanted, deadline - now)

    def report(self, body: dict[str, Any]) -> dict[str, Any]:
        """A peer tells how getting a piece went (from a parent, or from the source)."""
        peer, task, now = self._peer(body), self._task(body), time.monotonic()
        index = field(body, "piece", int)
        origin = field(body, "from", str)
        ok = field(body, "ok", bool)
        nbytes = max(0, field(body, "bytes", int, 0))
        seconds = max(1e-6, float(field(body, "seconds", (int, float), 0.0)))
        parent = self.peers.get(origin)
        if origin == "source":
            task.fetching.get(index, {}).pop(peer.id, None)
        elif parent is not None:
            parent.assigned = max(0, parent.assigned - 1)
        answer: dict[str, Any] = {}
        if ok:
            hexdigest = field(body, "digest", str)
            if not is_piece_hash(hexdigest) or not 0 <= index < task.count:
                raise bad_request("digest must be a sha256 hex digest of a piece of the task")
            answer["accepted"] = self._add_holder(task, index, peer.id, hexdigest)
            task.edges[(peer.id, origin)] += nbytes
            if origin == "source":
                self.metrics.source_bytes.inc(nbytes)
            else:
                self.metrics.peer_bytes.inc(nbytes)
                if parent is not None:
                    rate = nbytes / seconds
                    old = parent.throughput
                    parent.throughput = rate if not old else 0.7 * old + 0.3 * rate
        elif parent is not None:
            if not field(body, "busy", bool, False):  # busy is no failure: it is ranked by free slots
                parent.fail(now)
            if field(body, "corrupt", bool, False):
                log.warning("peer %s served a corrupt piece %d of %s: not naming it for %.0f s",
                            parent.id, index, task.digest, BAN_SECONDS)
                self.metrics.bad_pieces.inc()
                parent.banned_until = now + BAN_SECONDS
            if field(body, "missing", bool, False) or parent.banned_until > now:
                task.drop_holder(index, parent.id)
        task.notify([index])
        return answer

    def update(self, body: dict[str, Any]) -> dict[str, Any]:
        """A peer completed (whole blob verified) or dropped (evicted, failed the check) a task."""
        peer, task = self._peer(body), self._task(body)
        if field(body, "complete", bool, False):
            task.complete.add(peer.id)
        if field(body, "dropped", bool, False):
            task.drop_peer(peer.id)
        task.notify()
        return {}

    # --- seeds and preheat ---------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        job = asyncio.ensure_future(coro)
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    async def _post_peer(self, peer: PeerState, path: str, body: dict[str, Any]) -> bool:
        assert self._session is not None
        try:
            async with self._session.post(f"http://{peer.addr}{path}", json=body,
                                          headers=auth_header(self.token)) as response:
                return response.status < 300
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("cannot reach seed %s at %s: %s", peer.id, peer.addr, e)
            return False

    async def _tell_seed(self, seed: PeerState, task: TaskState, pieces: list[int]) -> None:
        assert task.source is not None
        registry, repo = task.source
        body = {"registry": registry, "repo": repo, "blobs": [{"digest": task.digest, "size": task.size}],
                "pieces": pieces}
        if not await self._post_peer(seed, "/api/v1/fetch", body):
            seed.fail(time.monotonic())
            for index in pieces:
                task.fetching.get(index, {}).pop(seed.id, None)
            task.notify()

    async def preheat(self, body: dict[str, Any]) -> dict[str, Any]:
        registry, repo = field(body, "registry", str), field(body, "repo", str)
        now = time.monotonic()
        per_seed: dict[str, list[dict[str, Any]]] = {}
        for blob in field(body, "blobs", list):
            if not isinstance(blob, dict):
                raise bad_request("blobs must be objects")
            task = self._task({**blob, "task": blob.get("digest"), "registry": registry, "repo": repo})
            seed = self._pick_seed(task, now, set())
            if seed is None:
                raise web.HTTPConflict(text='{"error": "no live seed peer (naiad peer --seed)"}',
                                       content_type="application/json")
            per_seed.setdefault(seed.id, []).append({"digest": task.digest, "size": task.size})
        for seed_id, blobs in per_seed.items():
            if not await self._post_peer(self.peers[seed_id], "/api/v1/fetch",
                                         {"registry": registry, "repo": repo, "blobs": blobs}):
                raise web.HTTPBadGateway(text=f'{{"error": "seed {seed_id} did not accept the preheat"}}',
                                         content_type="application/json")
        return {"seeds": {s: [b["digest"] for b in blobs] for s, blobs in per_seed.items()}}

    # --- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        peers = [{"id": p.id, "addr": p.addr, "seed": p.seed, "alive": p.alive(now),
                  "banned": now < p.banned_until, "slots": p.slots, "free": p.free,
                  "throughput": round(p.throughput), "failures": round(p.failures(now), 2)}
                 for p in self.peers.values()]
        tasks = []
        for t in self.tasks.values():
            tasks.append({"digest": t.digest, "size": t.size, "pieces": t.count, "piece_size": t.piece_size,
                          "known_pieces": len(t.digests), "holders": {p: n for p, n in t.held.items() if n},
                          "complete": sorted(t.complete),
                          "source": "/".join(t.source) if t.source else None,
                          "edges": [{"child": c, "parent": p, "bytes": b} for (c, p), b in t.edges.items()]})
        self.metrics.active_tasks.set(sum(bool(f) for t in self.tasks.values() for f in t.fetching.values()))
        return {"peers": peers, "tasks": tasks}

    # --- the HTTP application -----------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[token_middleware(self.token)], client_max_size=8 << 20)

        def sync(fn: Any) -> Any:
            async def handle(request: web.Request) -> web.Response:
                return web.json_response(fn(await read_json(request)))
            return handle

        async def schedule(request: web.Request) -> web.Response:
            return web.json_response(await self.schedule(await read_json(request)))

        async def preheat(request: web.Request) -> web.Response:
            return web.json_response(await self.preheat(await read_json(request)))

        async def status(_request: web.Request) -> web.Response:
            return web.json_response(self.status())

        app.router.add_post("/api/v1/peers", sync(self.heartbeat))
        app.router.add_post("/api/v1/holdings", sync(self.holdings))
        app.router.add_post("/api/v1/schedule", schedule)
        app.router.add_post("/api/v1/report", sync(self.report))
        app.router.add_post("/api/v1/update", sync(self.update))
        app.router.add_post("/api/v1/preheat", preheat)
        app.router.add_get("/api/v1/status", status)
        app.router.add_get("/metrics", metrics_handler(self.metrics.registry))
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app: web.Application) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10, connect=3))

    async def _stop(self, _app: web.Application) -> None:
        for job in list(self._background):
            job.cancel()
        if self._session is not None:
            await self._session.close()
