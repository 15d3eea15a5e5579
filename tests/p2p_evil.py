"""A misbehaving peer for fault tests: it announces every piece of one blob and serves them corrupt.

    python tests/p2p_evil.py SCHEDULER TOKEN_FILE BLOB_FILE

It registers with the scheduler as a live peer (heartbeats), announces the
right piece digests (so the scheduler names it as a parent), and answers
every piece request with the right length of wrong bytes. It prints
"evil ready on ADDR" once up, and "served INDEX" per piece it corrupted.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

from naiad.p2p.pieces import piece_count, piece_hash, piece_size_for, piece_span


async def main(scheduler: str, token_file: str, blob_file: str) -> None:
    headers = {"Authorization": f"Bearer {Path(token_file).read_text().strip()}"}
    data = Path(blob_file).read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    psize = piece_size_for(len(data))
    pieces = {}
    for i in range(piece_count(len(data), psize)):
        off, n = piece_span(len(data), psize, i)
        pieces[str(i)] = piece_hash(data[off:off + n])

    async def serve(request: web.Request) -> web.Response:
        index = int(request.match_info["index"])
        off, n = piece_span(len(data), psize, index)
        print(f"served {index}", flush=True)
        return web.Response(body=bytes(b ^ 0xFF for b in data[off:off + 64]) + data[off + 64:off + n])

    app = web.Application()
    app.router.add_get("/api/v1/pieces/{digest}/{index}", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    addr = f"127.0.0.1:{runner.addresses[0][1]}"
    async with aiohttp.ClientSession() as session:
        announced = False
        while True:
            body = {"id": "evil", "addr": addr, "slots": 16, "free": 16}
            async with session.post(f"http://{scheduler}/api/v1/peers", json=body, headers=headers) as r:
                known = (await r.json())["known"]
            if not known or not announced:
                holdings = {"peer": "evil", "tasks": [{"task": digest, "size": len(data), "pieces": pieces}]}
                async with session.post(f"http://{scheduler}/api/v1/holdings", json=holdings,
                                        headers=headers) as r:
                    r.raise_for_status()
                if not announced:
                    print(f"evil ready on {addr}", flush=True)
                announced = True
            await asyncio.sleep(0.5)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
