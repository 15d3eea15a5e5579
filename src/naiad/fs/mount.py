"""Serving one lazy mount in the foreground: open the image, mount, prefetch, report.

This is the body of the mount daemon. Only the manifest and the bootstrap
are fetched before the filesystem is up; file data comes on first read, and
in the background from the prefetch list (then everything, with
`prefetch_all`) at a bounded rate, on its own small thread budget so that
reads on demand never queue behind it.

Two ways to serve the tree (`MountOptions.mode`):

- `fuse`: LazyFS answers every lookup, getattr and read in Python. It also
  records the access trace (`trace.json`) that `naiad optimize` needs.
- `kernel`: the kernel serves the tree from an EROFS metadata image made
  from the bootstrap (cached beside it), mounted from that file with one
  extra device per blob; the devices are the files of a small FUSE
  filesystem (BlobFS, served by fusewire's threads, not pyfuse3) on
  `<state>/blobs`, so Python only sees data reads,
  once per chunk range, and warm reads never leave the kernel. Its trace is
  approximate (BlobFS.first_reads), so `naiad optimize` mounts with fuse.
- `auto` (the default): kernel when this machine allows it (root, erofs,
  file-backed mounts: probed with the image itself), else fuse.

In kernel mode the daemon mounts EROFS only once its FUSE loop runs (the
mount opens the blob files), and tears down in the other order: EROFS,
then blobfs. The FUSE loop has the main thread (pyfuse3's trio loop in
fuse mode, a wait in kernel mode, where no trio is loaded); mounting EROFS,
prefetch and stats run on threads, SIGTERM and SIGINT are taken by one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from naiad.errors import FormatError, NaiadError
from naiad.format.bootstrap import Bootstrap, Chunk
from naiad.format.erofs import erofs_image
from naiad.fs import kernel
from naiad.fs.blobfs import BlobFS
from naiad.fs.daemon import IMAGE_CONFIG, is_mounted, state_dir, write_json
from naiad.fs.fusewire import FuseWireServer
from naiad.oci.image import Platform, RegistryOptions, source_for
from naiad.oci.reference import Reference
from naiad.storage.cache import ChunkCache
from naiad.storage.fetcher import ChunkFetcher
from naiad.storage.hints import READ_AHEAD_CEILING, HintPrefetcher
from naiad.storage.image import NaiadImage
from naiad.storage.p2p import via_peer

# pyfuse3 (and LazyFS, built on it) are imported where fuse mode needs them, and trio with them:
# kernel mode never does (0.07 s and 0.09 s of every daemon's start on a cold page cache).
if TYPE_CHECKING:
    from naiad.fs.lazyfs import LazyFS

log = logging.getLogger(__name__)

PREFETCH_BATCH = 4 << 20
# The kernel's 128 KiB cuts a sequential read of a large file (model weights) into 128 KiB blob
# reads, each a FUSE round trip through Python. Measured on torchapp's 434 MB libtorch_cpu.so, all
# cached, page cache dropped: 0.38 s at 128 KiB, 0.28-0.38 s at 512 KiB, 0.28-0.30 s at 1 MiB; the
# app's start, cold cache: 5.4-5.5 s, 5.3-5.4 s, 5.5-5.7 s (1 MiB reads around every page fault of
# the mmapped libraries: 44% more bytes); warm cache: 3.1-3.3 s, 2.8-2.9 s, 2.9-3.1 s.
DEFAULT_READ_AHEAD = 512 << 10
PREFETCH_SLOTS = 2  # batches of the prefetch list in flight at once
# Range-read connections a mount opens before its app starts: the hints' workers and a few readers.
WARM_CONNECTIONS = 8
MODES = ("auto", "kernel", "fuse")
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclasses.dataclass(frozen=True)
class MountOptions:
    platform: Platform = dataclasses.field(default_factory=Platform)
    prefetch_all: bool = False
    prefetch_rate: int = 0  # bytes per second; 0 = unlimited
    amplify: int | None = None  # bytes; None: from the link (storage/link.py)
    allow_other: bool = True
    mode: str = "auto"  # one of MODES
    read_ahead: int = DEFAULT_READ_AHEAD  # bytes the kernel reads ahead in the mounted files (kernel mode)
    hints: bool = True  # fetch ahead by the image's access hints (storage/hints.py)


class Prefetcher:
    """Fetches the prefetch list's files, then (optionally) all chunks, in blob order."""

    def __init__(self, bs: Bootstrap, fetcher: ChunkFetcher, options: MountOptions):
        self.bs, self.fetcher, self.options = bs, fetcher, options
        self.done_bytes = 0
        self.total_bytes = 0
        self.finished = False
        self._cond = threading.Condition()
        self._free = PREFETCH_SLOTS  # slots no batch in flight holds
        self._stopped = False

    def _plan(self) -> list[tuple[list[Chunk], int]]:
        """Batches to fetch in order, each with the slots it takes: two of the list's may be in
        flight at once (the app is about to read them), one of the rest (it may never)."""
        listed = self.bs.prefetch_chunks()
        seen = {c.digest for c in listed}
        rest: list[Chunk] = []
        if self.options.prefetch_all:
            for c in self.bs.chunks():
                if c.digest not in seen:
                    seen.add(c.digest)
                    rest.append(c)
        self.total_bytes = sum(c.usize for c in (*listed, *rest))
        return [(b, 1) for b in _batches(listed)] + [(b, PREFETCH_SLOTS) for b in _batches(rest)]

    def run(self) -> None:
        """Fetch the plan, until done or stop() (batches in flight then finish)."""
        batches = self._plan()
        start = time.monotonic()
        rate = self.options.prefetch_rate
        started = 0
        # The list's batches two at a time, in order: one downloads while the other is decoded, so
        # the link is not idle between them (the list is the order the app reads in). The rest
        # (--prefetch-all) one at a time: on-demand reads must not wait behind a crowd.
        workers = []
        stopped = False
        for batch, slots in batches:
            ahead = started / rate - (time.monotonic() - start) if rate > 0 else 0
            if not self._take(slots, after=ahead):
                stopped = True
                break
            worker = threading.Thread(target=self._one, args=(batch, slots), name="naiad-prefetch",
                                      daemon=True)
            worker.start()
            workers.append(worker)
            started += sum(c.usize for c in batch)
        for worker in workers:
            worker.join()
        self.finished = not stopped

    def stop(self) -> None:
        """Start no more batches (from any thread): run() returns once those in flight are done."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _take(self, slots: int, *, after: float) -> bool:
        """Take `slots` slots, no sooner than `after` seconds from now (the rate's pace) and once
        that many are free; False if stopped meanwhile."""
        with self._cond:
            if after > 0:
                self._cond.wait_for(lambda: self._stopped, after)
            self._cond.wait_for(lambda: self._stopped or self._free >= slots)
            if self._stopped:
                return False
            self._free -= slots
            return True

    def _one(self, batch: list[Chunk], slots: int) -> None:
        try:
            self.fetcher.prefetch(batch)
        except NaiadError as e:
            log.warning("prefetch: %s", e)  # on-demand reads will retry these chunks
        finally:
            with self._cond:
                self._free += slots
                self._cond.notify_all()
        self.done_bytes += sum(c.usize for c in batch)


def _batches(chunks: list[Chunk]) -> list[list[Chunk]]:
    """`chunks` in order, cut into runs of at most PREFETCH_BATCH stored bytes."""
    batches: list[list[Chunk]] = []
    size = 0
    for c in chunks:
        if not batches or size + c.csize > PREFETCH_BATCH:
            batches.append([])
            size = 0
        batches[-1].append(c)
        size += c.csize
    return batches


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
    if options.mode not in MODES:
        raise NaiadError(f"mount mode {options.mode!r} is not one of {', '.join(MODES)}")
    signals = _Signals()  # before any thread starts: all of them must block the signals
    _import_http_client()
    with source_for(ref, registry) as inner, via_peer(inner, ref, registry) as source:
        img = NaiadImage.open(source, options.platform)
        write_json(os.path.join(state, IMAGE_CONFIG), img.image.config)
        cache = ChunkCache()
        fetcher = ChunkFetcher(img.bootstrap, source, cache, amplify=options.amplify)
        if (prewarm := getattr(source, "prewarm", None)) is not None:
            # The range reads' connections, opened before the app starts and fills the link.
            threading.Thread(target=prewarm, args=(WARM_CONNECTIONS,), name="naiad-prewarm",
                             daemon=True).start()
        image = _kernel_image(img, state, options.mode)
        mount = _Mount(mountpoint, state, fetcher, image, options.read_ahead)
        signals.mount = mount  # from here a signal stops the mount rather than the process
        if options.hints and img.bootstrap.has_hints:
            mount.hints = HintPrefetcher(img.bootstrap, fetcher)
            fetcher.on_miss = mount.hints.on_miss
            fetcher.link.ceiling = READ_AHEAD_CEILING
        if image is None:
            import pyfuse3

            from naiad.fs.lazyfs import LazyFS

            mount.fs = LazyFS(img.bootstrap, fetcher)
            fuse_options = {"fsname=naiad", "subtype=naiad", "ro", "default_permissions"}
            if options.allow_other and os.geteuid() == 0:
                fuse_options.add("allow_other")
            pyfuse3.init(mount.fs, mountpoint, fuse_options | set(pyfuse3.default_options))
        else:
            mount.fs = BlobFS(img.bootstrap, fetcher)
            mount.wire = FuseWireServer(mount.fs.flat_files(), mount.fs.read, backing=mount.fs.backing)
            mount.wire.mount(mount.prepare_blob_dir())
        info = {"pid": os.getpid(), "ref": str(ref), "mountpoint": mountpoint,
                "manifest_digest": img.image.manifest_digest, "started": time.time(),
                "mode": mount.mode}
        prefetcher = Prefetcher(img.bootstrap, fetcher, options)
        try:
            _run(mount, prefetcher, lambda: mount.up(info, prefetcher, notify_fd))
        finally:
            mount.stop_kernel(detach=True)
            mount.close_fuse()
            _write_trace(state, mount.fs, img.bootstrap)
            if mount.hints is not None:
                mount.hints.close()
            fetcher.close()
            cache.close()
            img.close()
        if mount.error is not None:
            raise mount.error


def _kernel_image(img: NaiadImage, state: str, mode: str) -> str | None:
    """The EROFS image to mount in kernel mode, or None to serve with FUSE (`auto` decides here).

    The one the image ships if it has one (a download of a fraction of a second), else one
    generated here from the bootstrap (about a second for 30,000 files).
    """
    if mode == "fuse":
        return None
    why_not = kernel.erofs_available()
    if why_not is None:
        try:
            img.fetch_erofs()
        except (NaiadError, OSError) as e:  # e.g. a full disk: the view is optional
            log.warning("generating the EROFS view here: the image's own cannot be had: %s", e)
        try:
            image = erofs_image(img.bootstrap)
        except FormatError as e:
            why_not = f"no EROFS image for this bootstrap: {e}"
    if why_not is None and mode == "auto":
        why_not = _probe(image, len(img.bootstrap.blobs()), state)
    if why_not is None:
        return image
    if mode == "kernel":
        raise NaiadError(f"kernel mode is not available: {why_not}")
    log.info("serving with FUSE: %s", why_not)
    return None


def _probe(image: str, devices: int, state: str) -> str | None:
    """Whether the kernel mounts `image` from its file with files as devices (it only opens them)."""
    target = os.path.join(state, "probe")
    os.makedirs(target, exist_ok=True)
    try:
        kernel.mount_erofs(image, [image] * devices, target)
    except NaiadError as e:
        return str(e)
    kernel.umount(target, detach=True)
    return None


class _Mount:
    """What one daemon serves: the FUSE filesystem, and in kernel mode the EROFS mount over it."""

    def __init__(self, mountpoint: str, state: str, fetcher: ChunkFetcher, image: str | None,
                 read_ahead: int):
        self.mountpoint, self.state, self.fetcher, self.image = mountpoint, state, fetcher, image
        self.read_ahead = read_ahead
        self.mode = "fuse" if image is None else "kernel"
        self.fs: LazyFS | BlobFS | None = None
        self.wire: FuseWireServer | None = None  # kernel mode's server of the blob files
        self.hints: HintPrefetcher | None = None
        self.error: Exception | None = None
        self.kernel_mounted = False
        self._stopping = False  # terminate() was called
        self._trio_token: Any = None  # fuse mode: of the loop pyfuse3 runs in, once it runs

    def serve_fuse(self) -> None:
        """Answer FUSE requests until unmounted or terminate()d: pyfuse3's trio loop on this
        thread in fuse mode, blobfs's own threads in kernel mode."""
        if self.wire is not None:
            if not self._stopping:  # else terminate() came before there was a server to stop
                self.wire.finished.wait()
            return
        import pyfuse3
        import trio

        async def main() -> None:
            self._trio_token = trio.lowlevel.current_trio_token()
            if not self._stopping:  # terminate() came first: it found no loop to stop
                await pyfuse3.main(min_tasks=4, max_tasks=64)

        trio.run(main)

    def terminate(self) -> None:
        """Stop serving; from any thread, even before serving began."""
        self._stopping = True  # set first: serve_fuse() sets the server up, then reads it
        if self.mode == "kernel":
            if self.wire is not None:
                self.wire.stop()
            return
        import pyfuse3
        import trio

        if self._trio_token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._trio_token.run_sync_soon(pyfuse3.terminate)

    def close_fuse(self) -> None:
        if self.wire is None:
            import pyfuse3

            pyfuse3.close(unmount=True)
        elif is_mounted(self.blob_dir):
            with contextlib.suppress(NaiadError):
                kernel.umount(self.blob_dir, detach=True)

    @property
    def blob_dir(self) -> str:
        return os.path.join(self.state, "blobs")

    def prepare_blob_dir(self) -> str:
        path = self.blob_dir
        if is_mounted(path):  # left by a daemon that was killed: nobody can be using it
            kernel.umount(path, detach=True)
        os.makedirs(path, exist_ok=True)
        return path

    def up(self, info: dict, prefetcher: Prefetcher, notify_fd: int | None) -> None:
        """Finish mounting (the FUSE loop runs now), then record state and tell the starter."""
        if self.image is not None:
            assert isinstance(self.fs, BlobFS)
            devices = self.fs.paths(self.blob_dir)
            kernel.mount_erofs(self.image, devices, self.mountpoint)
            self.kernel_mounted = True
            try:
                kernel.set_read_ahead(self.mountpoint, self.read_ahead >> 10)
            except NaiadError as e:
                log.warning("keeping the kernel's read-ahead: %s", e)
        # Both files exist before "ready": `naiad stats` right after `naiad mount` must work.
        write_json(os.path.join(self.state, "stats.json"), self.stats(prefetcher))
        write_json(os.path.join(self.state, "state.json"), info)
        if notify_fd is not None:
            os.write(notify_fd, b"ready\n")
            os.close(notify_fd)

    def stop_kernel(self, *, detach: bool) -> None:
        """Unmount EROFS (before blobfs, which it reads from), if it is still ours and mounted."""
        if self.kernel_mounted and is_mounted(self.mountpoint):
            with contextlib.suppress(NaiadError):
                kernel.umount(self.mountpoint, detach=detach)
        self.kernel_mounted = False

    def stats(self, prefetcher: Prefetcher) -> dict:
        fetcher = self.fetcher
        fit = fetcher.link.fit()
        return {
            **fetcher.stats.snapshot(),
            "amplify": fetcher.link.amplify() if fetcher.amplify is None else fetcher.amplify,
            "link": None if fit is None else {"latency_ms": round(fit[0] * 1000, 2),
                                              "throughput_mb_s": round(fit[1] / 1e6, 1)},
            "mode": self.mode,
            "files_read": self.fs.files_read() if isinstance(self.fs, BlobFS) else len(self.fs.files_read),
            # Blob files whose every chunk was cached at mount: the kernel reads their cache files.
            "passthrough": 0 if self.wire is None else self.wire.passed_through(),
            "prefetch": {"done_bytes": prefetcher.done_bytes, "total_bytes": prefetcher.total_bytes,
                         "finished": prefetcher.finished},
            "hints": None if self.hints is None else self.hints.snapshot(),
            "updated": time.time(),
        }


def _run(mount: _Mount, prefetcher: Prefetcher, up: Callable[[], None]) -> None:
    """Serve until unmounted or signalled (_Signals): FUSE on this thread, the rest on another."""
    stop = threading.Event()
    control = threading.Thread(target=_control, args=(mount, prefetcher, up, stop), name="naiad-control")
    control.start()
    try:
        mount.serve_fuse()
    finally:
        stop.set()
        control.join()


def _control(mount: _Mount, prefetcher: Prefetcher, up: Callable[[], None], stop: threading.Event) -> None:
    """Finish mounting, then prefetch and refresh stats.json every second until `stop`."""
    try:
        up()
    except Exception as e:  # serve() raises it once the filesystem is down
        mount.error = e
        mount.terminate()
        return
    prefetch = threading.Thread(target=prefetcher.run, name="naiad-prefetch", daemon=True)
    prefetch.start()
    while not stop.wait(1):
        if mount.kernel_mounted and not is_mounted(mount.mountpoint):
            # EROFS was unmounted (`naiad umount`, or plain umount): blobfs has nobody to serve.
            mount.kernel_mounted = False
            mount.terminate()
            break
        write_json(os.path.join(mount.state, "stats.json"), mount.stats(prefetcher))
    prefetcher.stop()
    prefetch.join()


class _Signals:
    """SIGTERM and SIGINT, blocked in every thread and taken by one of their own: before the
    filesystem serves they end the daemon, as they would by default; then they unmount it."""

    def __init__(self) -> None:
        self.mount: _Mount | None = None
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        threading.Thread(target=self._wait, name="naiad-signals", daemon=True).start()

    def _wait(self) -> None:
        signum = signal.sigwait(_STOP_SIGNALS)
        mount = self.mount
        if mount is None:
            os._exit(128 + signum)
        mount.stop_kernel(detach=True)
        mount.terminate()


def _import_http_client() -> None:
    """Import httpcore (httpx's transport) with trio and anyio kept out: it imports them for async
    backends, which naiad's registry client (synchronous) never uses, and trio alone is ~90 ms of a
    kernel-mode daemon's start on a cold page cache. A later `import trio` (pyfuse3's, in fuse
    mode) loads it as usual."""
    kept_out = [name for name in ("trio", "anyio") if name not in sys.modules]
    for name in kept_out:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError
    try:
        import httpcore  # noqa: F401
    finally:
        for name in kept_out:
            del sys.modules[name]


def _write_trace(state: str, fs: LazyFS | BlobFS | None, bs: Bootstrap) -> None:
    """trace.json: [path, chunk index] for every chunk read, in first-read order."""
    entries = fs.first_reads() if isinstance(fs, BlobFS) else list(fs.trace) if fs else []
    paths = bs.paths_of({ino for ino, _ in entries})
    write_json(os.path.join(state, "trace.json"),
               [[paths[ino], index] for ino, index in entries if ino in paths])
