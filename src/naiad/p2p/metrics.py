"""Prometheus metrics of the peer daemon and the scheduler, each on its own registry (served at /metrics)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_PIECE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class PeerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.source_bytes = Counter("naiad_p2p_source_bytes", "Bytes fetched from registries", registry=r)
        self.peer_bytes = Counter("naiad_p2p_peer_bytes", "Bytes of verified pieces fetched from peers",
                                  registry=r)
        self.served_bytes = Counter("naiad_p2p_served_bytes", "Bytes of pieces served to other peers",
                                    registry=r)
        self.client_bytes = Counter("naiad_p2p_client_bytes", "Blob bytes sent to local clients", registry=r)
        self.piece_seconds = Histogram("naiad_p2p_piece_seconds", "Time to get one piece, by origin",
                                       ["origin"], buckets=_PIECE_BUCKETS, registry=r)
        self.piece_failures = Counter("naiad_p2p_piece_failures", "Piece fetches that failed, by reason",
                                      ["reason"], registry=r)
        self.active_tasks = Gauge("naiad_p2p_active_tasks", "Tasks with pieces being fetched or read",
                                  registry=r)
        self.stored_bytes = Gauge("naiad_p2p_stored_bytes", "Bytes in the piece store", registry=r)
        self.upload_refused = Counter("naiad_p2p_upload_refused", "Piece requests refused: no upload slot",
                                      registry=r)


class SchedulerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.peers = Gauge("naiad_scheduler_peers", "Live peers", registry=r)
        self.tasks = Gauge("naiad_scheduler_tasks", "Known tasks", registry=r)
        self.active_tasks = Gauge("naiad_scheduler_active_tasks", "Tasks with pieces being downloaded",
                                  registry=r)
        self.decisions = Counter("naiad_scheduler_decisions", "Piece decisions by kind",
                                 ["kind"], registry=r)
        self.source_bytes = Counter("naiad_scheduler_source_bytes", "Bytes peers report from registries",
                                    registry=r)
        self.peer_bytes = Counter("naiad_scheduler_peer_bytes", "Bytes peers report from other peers",
                                  registry=r)
        self.bad_pieces = Counter("naiad_scheduler_corrupt_reports", "Pieces reported corrupt", registry=r)


def metrics_handler(registry: CollectorRegistry):
    async def handle(_request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handle
