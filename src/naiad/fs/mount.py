"""Serving one lazy mount in the foreground: open the image, mount, prefetch, report.

This is the body of the mount daemon. Only the manifest and the bootstrap
are fetched before the filesystem is up; file data comes on first read, and
in the background from the prefetch list (then everything, with
`prefetch_all`) at a bounded rate, on its own small thread budget so that
reads on demand never queue behind it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time

import pyfuse3
import trio

from naiad.errors import NaiadError
from naiad.format.bootstrap import Bootstrap, Chunk
from naiad.fs.daemon import is_mounted, state_dir, write_json
from naiad.fs.lazyfs import LazyFS
from naiad.oci.image import Platform, RegistryOptions, source_for
from naiad.oci.reference import Reference
from naiad.storage.cache import ChunkCache
from naiad.storage.fetcher import DEFAULT_AMPLIFY, ChunkFetcher
from naiad.storage.image import NaiadImage

log = logging.getLogger(__name__)

PREFETCH_BATCH = 4 << 20


@dataclasses.dataclass(frozen=True)
class MountOptions:
    platform: Platform = dataclasses.field(default_factory=Platform)
    prefetch_all: bool = False
    prefetch_rate: int = 0  # bytes per second; 0 = unlimited
    amplify: int = DEFAULT_AMPLIFY
    allow_other: bool = True


class Prefetcher:
    """Fetches the prefetch list's files, then (optionally) all chunks, in blob order."""

    def __init__(self, bs: Bootstrap, fetcher: ChunkFetcher, options: MountOptions):
        self.bs, self.fetcher, self.options = bs, fetcher, options
        self.limiter = trio.CapacityLimiter(2)
        self.done_bytes = 0
        self.total_bytes = 0
        self.finished = False

    def _plan(self) -> list[list[Chunk]]:
        ordered = self.bs.prefetch_chunks()
        seen = {c.digest for c in ordered}
        if self.options.prefetch_all:
            for c in self.bs.chunks():
                if c.digest not in seen:
                    seen.add(c.digest)
                    ordered.append(c)
        batches: list[list[Chunk]] = []
        size = 0
        for c in ordered:
            if not batches or size + c.csize > PREFETCH_BATCH:
                batches.append([])
                size = 0
            batches[-1].append(c)
            size += c.csize
        self.total_bytes = sum(c.usize for c in ordered)
        return batches

    async def run(self) -> None:
        batches = self._plan()
        start = time.monotonic()
        for batch in batches:
            try:
                await trio.to_thread.run_sync(self.fetcher.prefetch, batch, limiter=self.limiter)
            except NaiadError as e:
                log.warning("prefetch: %s", e)  # on-demand reads will retry these chunks
            self.done_bytes += sum(c.usize for c in batch)
            rate = self.options.prefetch_rate
            if rate > 0:
                ahead = self.done_bytes / rate - (time.monotonic() - start)
                if ahead > 0:
                    await trio.sleep(ahead)
        self.finished = True


def serve(ref: Reference, mountpoint: str, registry: RegistryOptions, options: MountOptions,
          notify_fd: int | None = None) -> None:
    """Mount `ref` at `mountpoint` and serve it until unmounted or signalled."""
    # Resolve paths before mounting: afterwards, touching the mount point would
    # wait for this very process to answer.
    mountpoint = os.path.realpath(mountpoint)
    state = state_dir(mountpoint)
    os.makedirs(state, exist_ok=True)
    # The mount table first: a mount whose daemon died fails every stat with ENOTCONN.
    if is_mounted(mountpoint):
        raise NaiadError(f"{mountpoint} is already a mount point")
    if not os.path.lexists(mountpoint):
        raise NaiadError(f"mount point {mountpoint} does not exist")
    if not os.path.isdir(mountpoint):
        raise NaiadError(f"mount point {mountpoint} is not a directory")
    # FUSE 3 mounts over anything; files hidden under an image would confuse whoever looks later.
    if os.listdir(mountpoint):
        raise NaiadError(f"mount point {mountpoint} is not empty")
    with source_for(ref, registry) as source:
        img = NaiadImage.open(source, options.platform)
        cache = ChunkCache()
        fetcher = ChunkFetcher(img.bootstrap, source, cache, amplify=options.amplify)
        fs = LazyFS(img.bootstrap, fetcher)
        fuse_options = set(pyfuse3.default_options)
        fuse_options |= {"fsname=naiad", "subtype=naiad", "ro", "default_permissions"}
        if options.allow_other and os.geteuid() == 0:
            fuse_options.add("allow_other")
        pyfuse3.init(fs, mountpoint, fuse_options)
        write_json(os.path.join(state, "state.json"), {
            "pid": os.getpid(), "ref": str(ref), "mountpoint": mountpoint,
            "manifest_digest": img.image.manifest_digest, "started": time.time(),
        })
        prefetcher = Prefetcher(img.bootstrap, fetcher, options)
        if notify_fd is not None:
            os.write(notify_fd, b"ready\n")
            os.close(notify_fd)
        try:
            trio.run(_main, fs, prefetcher, state)
        finally:
            pyfuse3.close(unmount=True)
            _write_trace(state, fs, img.bootstrap)
            fetcher.close()
            cache.close()
            img.close()


async def _main(fs: LazyFS, prefetcher: Prefetcher, state: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, nursery)
        nursery.start_soon(_report, fs, prefetcher, state)
        nursery.start_soon(prefetcher.run)
        await pyfuse3.main(min_tasks=4, max_tasks=64)
        nursery.cancel_scope.cancel()


async def _stop_on_signal(nursery: trio.Nursery) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


async def _report(fs: LazyFS, prefetcher: Prefetcher, state: str) -> None:
    while True:
        write_json(os.path.join(state, "stats.json"), {
            **fs.fetcher.stats.snapshot(),
            "files_read": len(fs.files_read),
            "prefetch": {"done_bytes": prefetcher.done_bytes, "total_bytes": prefetcher.total_bytes,
                         "finished": prefetcher.finished},
            "updated": time.time(),
        })
        await trio.sleep(1)


def _write_trace(state: str, fs: LazyFS, bs: Bootstrap) -> None:
    """trace.json: [path, chunk index] for every chunk read, in first-read order."""
    paths = bs.paths_of(fs.files_read)
    write_json(os.path.join(state, "trace.json"),
               [[paths[ino], index] for ino, index in fs.trace if ino in paths])
