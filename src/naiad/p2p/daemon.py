"""Running the daemons: bind, print where they listen, serve until SIGTERM or SIGINT, shut down cleanly.

Port 0 binds a free port; the first line on stderr names the real
addresses, so scripts and tests can start daemons without guessing ports.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

from aiohttp import web

from naiad.p2p.mirror import Mirror
from naiad.p2p.peer import Peer, PeerConfig
from naiad.p2p.pieces import P2PError
from naiad.p2p.scheduler import Scheduler
from naiad.p2p.security import is_loopback

log = logging.getLogger(__name__)


async def _serve(app: web.Application, host: str, port: int, what: str) -> tuple[web.AppRunner, str]:
    # In-flight requests (long polls, piece uploads) get a second to finish on shutdown, not a minute.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=512, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise P2PError(f"{what}: cannot listen on {host}:{port}: {e.strerror}") from None
    sockets = runner.addresses
    bound = sockets[0][1] if sockets else port
    return runner, f"{host}:{bound}"


async def _until_signalled(cleanup: Callable[[], Awaitable[None]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await cleanup()


async def _scheduler_main(host: str, port: int, token: str, source_limit: int) -> None:
    scheduler = Scheduler(token, source_limit=source_limit)
    runner, addr = await _serve(scheduler.app(), host, port, "scheduler")
    print(f"naiad scheduler: listening on {addr}", file=sys.stderr, flush=True)
    await _until_signalled(runner.cleanup)


def run_scheduler(host: str, port: int, token: str, source_limit: int = 1) -> None:
    asyncio.run(_scheduler_main(host, port, token, source_limit))


async def _peer_main(config: PeerConfig, listen: tuple[str, int], proxy: tuple[str, int],
                     default_registry: str | None) -> None:
    peer = Peer(config)
    pieces, listen_addr = await _serve(peer.piece_app(), *listen, "piece server")
    if config.advertise.endswith(":0"):
        config.advertise = config.advertise.rpartition(":")[0] + ":" + listen_addr.rpartition(":")[2]
    mirror = Mirror(peer, config.allow, default_registry)
    try:
        mirror_runner, proxy_addr = await _serve(mirror.app(), *proxy, "mirror")
    except P2PError:
        await pieces.cleanup()
        raise
    await peer.start()
    print(f"naiad peer {peer.id}: pieces on {listen_addr} (as {config.advertise}), mirror on {proxy_addr}, "
          f"{len(peer.store.tasks)} tasks in store", file=sys.stderr, flush=True)

    async def cleanup() -> None:
        await mirror_runner.cleanup()
        await pieces.cleanup()
        await peer.close()

    await _until_signalled(cleanup)


def run_peer(config: PeerConfig, listen: tuple[str, int], proxy: tuple[str, int],
             default_registry: str | None) -> None:
    if not is_loopback(proxy[0]):
        # The mirror takes no token: on another interface it would serve the cluster's blobs to anyone.
        raise P2PError(f"--proxy {proxy[0]}: bind the mirror to a loopback address (127.0.0.1)")
    if config.advertise.split(":")[0] in ("0.0.0.0", "::", ""):
        raise P2PError("--listen on a wildcard address needs --advertise HOST:PORT (how peers reach it)")
    asyncio.run(_peer_main(config, listen, proxy, default_registry))
