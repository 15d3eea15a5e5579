"""The lazy filesystem (issue 3): real FUSE mounts of images on the real `docker-registry`.

Every test gets its own NAIAD_HOME (so its own chunk cache and mount state)
and its own mount points, and the `node` fixture unmounts whatever a test
mounted, even when it failed: `naiad umount`, then `umount -l`, then SIGKILL
for a daemon still alive. The `naiad` commands run as the real command line
in subprocesses, so `naiad mount` starts a real mount daemon.

- the oracle: every corpus image, converted and pushed, mounted from the
  registry, is the tree `umoci unpack` makes of the source (types, modes,
  owners, sizes, contents, mtimes, link targets, devices, xattrs, hard-link
  inode sharing);
- lazy is lazy: reading one 10 KB file of a 200 MB image costs the registry
  < 1% of the blob bytes (its access log and `naiad stats` agree);
- integrity: a chunk tampered with on the registry's disk gives EIO, never
  reaches the cache, and reads fine once the blob is restored;
- faults: the registry stopped mid-way (EIO in bounded time, then the same
  read succeeds), the daemon killed -9 during prefetch (the cache stays
  consistent), 16 concurrent readers of overlapping ranges;
- the shared chunk cache: dedup across images, gc that spares mounted
  images, prune, LRU order;
- prefetch: the image's list, nothing without one, everything with
  `--prefetch-all`;
- the mount lifecycle: usable when `naiad mount` returns, one-line errors,
  SIGTERM, busy umount, statfs, EROFS.

Reads that could hang when something is wrong run in a child process with a
timeout, so a bug fails the test instead of blocking the run.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from corpus import ALL_IMAGES, write_corpus
from registry_server import RegistryServer
from treecmp import compare_trees, umoci_unpack

from naiad.format.bootstrap import Bootstrap
from naiad.fs import daemon
from naiad.fs.kernel import erofs_available

KiB, MiB = 1 << 10, 1 << 20
WAIT = 60.0  # bound on every wait for something asynchronous; tests never sleep for a fixed time


# --- the command line, mounts and what they leave ------------------------------------------


def naiad(home: Path, *args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NAIAD_CREDS"}
    env["NAIAD_HOME"] = str(home)
    env["DOCKER_CONFIG"] = str(home.parent / "no-docker-config")
    return subprocess.run([sys.executable, "-m", "naiad", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr
    return proc


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("naiad: error: "), proc.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"
    return lines[0]


def mounted(path: Path) -> bool:
    """From the mount table: os.path.ismount says False for a mount whose daemon died."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(pred: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


class Node:
    """One machine's naiad state (NAIAD_HOME) and the mounts a test made on it."""

    def __init__(self, root: Path):
        self.root = root.resolve()  # as the mount table spells it
        self.home = self.root / "home"
        self.mountpoints: list[Path] = []

    def naiad(self, *args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return naiad(self.home, *args, timeout=timeout)

    def mountpoint(self, name: str = "mnt") -> Path:
        path = self.root / name
        path.mkdir()
        self.mountpoints.append(path)
        return path

    def mount(self, ref: str, *options: object, name: str = "mnt") -> Path:
        path = self.mountpoint(name)
        ok(self.naiad("mount", ref, path, *options))
        return path

    def state(self, mnt: Path, name: str = "state.json") -> dict:
        for p in (self.home / "mounts").glob("*/state.json"):
            if json.loads(p.read_text())["mountpoint"] == str(mnt):
                return json.loads((p.parent / name).read_text())
        raise AssertionError(f"no state for {mnt}")

    def pid(self, mnt: Path) -> int:
        return int(self.state(mnt)["pid"])

    def stats(self, mnt: Path) -> dict:
        """`naiad stats --json`, once the daemon has refreshed them after this call (every second)."""
        asked = time.time()
        self.wait_stats(mnt, lambda s: s["updated"] > asked, "fresh stats")
        return json.loads(ok(self.naiad("stats", mnt, "--json")).stdout)

    def wait_stats(self, mnt: Path, pred: Callable[[dict], object], what: str) -> dict:
        """Stats once `pred` holds (the daemon rewrites them every second)."""
        out: dict = {}

        def check() -> bool:
            with contextlib.suppress(FileNotFoundError, ValueError, AssertionError):
                out.update(self.state(mnt, "stats.json"))
                return bool(pred(out))
            return False

        wait_for(check, what)
        return out

    def umount(self, mnt: Path) -> None:
        ok(self.naiad("umount", mnt))
        assert not mounted(mnt)

    def cache_rows(self) -> dict[bytes, tuple[str, int, int]]:
        """digest -> (blob, uoffset, usize): the chunk cache's index."""
        path = self.home / "cache" / "index.db"
        if not path.exists():
            return {}
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return {r[0]: tuple(r[1:]) for r in db.execute("SELECT digest, blob, uoffset, usize FROM chunks")}
        finally:
            db.close()

    def assert_cache_consistent(self) -> None:
        """Every chunk the index names has exactly its bytes in its cache file."""
        for digest, (blob, uoffset, usize) in self.cache_rows().items():
            with open(self.home / "cache" / "blobs" / blob.removeprefix("sha256:"), "rb") as f:
                f.seek(uoffset)
                data = f.read(usize)
            assert hashlib.sha256(data).digest() == digest, f"torn chunk {digest.hex()} in {blob}"

    def bootstrap(self) -> Bootstrap:
        """The bootstrap the (only) image mounted on this node fetched."""
        (path,) = (self.home / "bootstraps").glob("*.db")
        return Bootstrap(str(path))

    def cleanup(self) -> None:
        for mnt in reversed(self.mountpoints):
            pid = None
            with contextlib.suppress(Exception):
                pid = self.pid(mnt)
            if mounted(mnt):
                with contextlib.suppress(Exception):
                    self.naiad("umount", mnt, timeout=60)
            if mounted(mnt):
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
            if pid is not None and pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def drop_page_cache(path: Path) -> None:
    """Make the next read of `path` reach the filesystem again (the mount lets the kernel cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


_READER = """\
import hashlib, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    h = hashlib.sha256()
    off = 0
    while block := os.pread(fd, 1 << 20, off):
        h.update(block)
        off += len(block)
    print("ok", h.hexdigest())
except OSError as e:
    print("errno", e.errno)
"""


def read_in_child(path: Path, timeout: float = WAIT) -> tuple[str, str]:
    """("ok", sha256 hex) or ("errno", N): a whole-file read that cannot hang the test."""
    proc = subprocess.run([sys.executable, "-c", _READER, str(path)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    kind, value = proc.stdout.split()
    return kind, value


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- images ------------------------------------------------------------------------------


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def rand(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def publish(home: Path, tree: Path, registry: RegistryServer | str, *options: object,
            name: str = "img") -> tuple[str, dict]:
    """`naiad build` TREE onto the registry; (docker:// reference, the build's JSON report)."""
    host = registry if isinstance(registry, str) else registry.host
    ref = f"docker://{host}/mount/{name}-{uuid.uuid4().hex[:8]}:v1"
    report = json.loads(ok(naiad(home, "build", "--json", *options, tree, ref)).stdout)
    return ref, report


def registry_blob(registry: RegistryServer, digest: str) -> Path:
    hexd = digest.removeprefix("sha256:")
    return registry.root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def blob_gets(registry: RegistryServer, since: int) -> dict[str, int]:
    """Bytes the registry sent per blob digest for GETs after access-log entry `since`."""
    out: dict[str, int] = {}
    for entry in registry.requests()[since:]:
        if entry.method == "GET" and "/blobs/sha256:" in entry.path:
            digest = entry.path.rsplit("/", 1)[1]
            out[digest] = out.get(digest, 0) + entry.size
    return out


# --- 1. the oracle ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference_rootfs(corpus, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """umoci's unpack of each corpus image, made once for the module."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = umoci_unpack(corpus[name].path, "latest", tmp_path_factory.mktemp("umoci") / name)
        return made[name]

    return get


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_mount_equals_umoci(name: str, corpus, reference_rootfs, registry: RegistryServer,
                            node: Node) -> None:
    ref = f"docker://{registry.host}/mount/oracle-{name}:v1"
    ok(node.naiad("convert", corpus[name].ref, ref))
    mnt = node.mount(ref)
    assert compare_trees(reference_rootfs(name), mnt) == []
    if name == "hardlinks":
        # Hard links share an inode number inside the mount, not just contents.
        groups: dict[int, set[str]] = {}
        for p in mnt.rglob("*"):
            st = p.lstat()
            if st.st_nlink > 1 and not p.is_dir():
                groups.setdefault(st.st_ino, set()).add(p.name)
        assert any(len(g) > 1 for g in groups.values())
    node.umount(mnt)


# --- 2. lazy is lazy -----------------------------------------------------------------------


def test_reading_one_small_file_fetches_under_one_percent(registry: RegistryServer, node: Node) -> None:
    tree = node.root / "tree"
    tree.mkdir()
    for i in range(20):
        (tree / f"big-{i:02d}").write_bytes(os.urandom(10 * MiB))  # incompressible
    small = os.urandom(10 * KiB)
    (tree / "small").write_bytes(small)
    ref, built = publish(node.home, tree, registry, name="lazy")
    shutil.rmtree(tree)  # 200 MB the run need not keep
    data_blobs = {b["digest"]: b["size"] for b in built["blobs"]}
    blob_bytes = sum(data_blobs.values())
    assert blob_bytes > 200 * MiB

    since = len(registry.requests())
    mnt = node.mount(ref)
    assert (mnt / "small").read_bytes() == small
    stats = node.stats(mnt)
    assert 0 < stats["bytes_fetched"] < blob_bytes / 100, (stats["bytes_fetched"], blob_bytes)
    assert stats["files_read"] == 1
    sent: dict[str, int] = {}

    def data_sent() -> int:
        sent.update(blob_gets(registry, since))
        return sum(n for d, n in sent.items() if d in data_blobs)

    # The registry logs a request once it has answered it: maybe a moment after we got the bytes.
    wait_for(lambda: data_sent() >= stats["bytes_fetched"], "the registry's access log")
    assert data_sent() == stats["bytes_fetched"]  # the registry and the mount agree
    bootstrap_sent = sent.get(built["bootstrap"]["digest"], 0)
    assert bootstrap_sent == built["bootstrap"]["size"]  # fetched once, whole, and counted apart


# --- 3. integrity ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fuse", pytest.param("kernel", marks=pytest.mark.skipif(
    erofs_available() is not None, reason=f"kernel mode: {erofs_available()}"))])
def test_tampered_chunk_gives_eio_and_never_reaches_the_cache(mode: str, registry: RegistryServer,
                                                              node: Node) -> None:
    """In both modes: EIO to the files a bad chunk belongs to only, and never a bad byte in the cache."""
    files = {"etc/bad": rand(200 * KiB, 1), "etc/good": rand(200 * KiB, 2), "etc/text": b"text\n" * 1000}
    tree = write_tree(node.root / "tree", files)
    # Stored raw: the registry's bytes are the file's bytes, so a flipped byte is easy to place.
    ref, _ = publish(node.home, tree, registry, "--compressor", "none", "--chunk-size", "64K",
                         name="tamper")
    mnt = node.mount(ref, "--mode", mode)
    with node.bootstrap() as bs:
        blobs = {b.id: b.digest for b in bs.blobs()}
        bad_chunk = bs.file_chunks(bs.resolve("/etc/bad"))[1]
    blob = registry_blob(registry, blobs[bad_chunk.blob])
    original = blob.read_bytes()
    at = bad_chunk.offset + bad_chunk.csize // 2
    with open(blob, "r+b") as f:
        f.seek(at)
        f.write(bytes([original[at] ^ 0xFF]))
    try:
        assert read_in_child(mnt / "etc/bad") == ("errno", str(errno.EIO))
        for rel in ("etc/good", "etc/text"):
            assert read_in_child(mnt / rel) == ("ok", sha256(files[rel]))
        # A failed read is not remembered: asking again asks the registry again.
        assert read_in_child(mnt / "etc/bad") == ("errno", str(errno.EIO))
        rows = node.cache_rows()
        assert bad_chunk.digest not in rows
        assert rows  # the good chunks are cached
        node.assert_cache_consistent()
        stats = node.stats(mnt)
        assert stats["errors"] >= 2
    finally:
        blob.write_bytes(original)
    assert read_in_child(mnt / "etc/bad") == ("ok", sha256(files["etc/bad"]))
    assert bad_chunk.digest in node.cache_rows()
    node.assert_cache_consistent()


# --- 4. faults -------------------------------------------------------------------------------


@pytest.fixture
def own_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """A registry of this test's own, to stop and start."""
    server = RegistryServer(tmp_path / "own-registry").start()
    try:
        yield server
    finally:
        server.stop()


def test_registry_down_gives_eio_then_recovers(own_registry: RegistryServer, node: Node) -> None:
    files = {"first": rand(100 * KiB, 3), "second": rand(3 * MiB, 4)}
    ref, _ = publish(node.home, write_tree(node.root / "tree", files), own_registry, "--chunk-size", "256K")
    # No amplification: reading "first" must leave "second" to be fetched later.
    mnt = node.mount(ref, "--amplify", "0")
    assert read_in_child(mnt / "first") == ("ok", sha256(files["first"]))
    own_registry.stop()
    t0 = time.monotonic()
    assert read_in_child(mnt / "second", timeout=WAIT) == ("errno", str(errno.EIO))
    assert time.monotonic() - t0 < WAIT
    assert mounted(mnt) and (mnt / "first").read_bytes() == files["first"]  # cached data still reads
    own_registry.start()
    assert read_in_child(mnt / "second") == ("ok", sha256(files["second"]))
    node.assert_cache_consistent()


def test_kill_during_prefetch_leaves_a_consistent_cache(registry: RegistryServer, node: Node) -> None:
    files = {f"d/f{i}": os.urandom(4 * MiB) for i in range(8)}
    ref, _ = publish(node.home, write_tree(node.root / "tree", files), registry, "--chunk-size", "256K")
    mnt = node.mount(ref, "--prefetch-all", "--prefetch-rate", "4M")
    node.wait_stats(mnt, lambda s: s["prefetch"]["done_bytes"] >= 4 * MiB, "some prefetch progress")
    pid = node.pid(mnt)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), "the daemon to die")
    assert mounted(mnt)  # stale: the kernel still has it
    cached_before = node.cache_rows()
    assert cached_before and len(cached_before) < 8 * 16  # killed part-way
    node.umount(mnt)  # `naiad umount` copes with a dead daemon
    node.assert_cache_consistent()

    ok(node.naiad("mount", ref, mnt))
    for rel, data in files.items():
        assert read_in_child(mnt / rel) == ("ok", sha256(data))
    stats = node.stats(mnt)
    assert stats["chunks_from_cache"] >= len(cached_before)  # what survived was used, not refetched
    assert stats["bytes_fetched"] < sum(map(len, files.values()))
    node.assert_cache_consistent()


def test_umount_during_a_paced_prefetch_does_not_wait_for_it(registry: RegistryServer, node: Node) -> None:
    files = {f"d/f{i}": os.urandom(4 * MiB) for i in range(8)}
    ref, _ = publish(node.home, write_tree(node.root / "tree", files), registry, "--chunk-size", "256K")
    # 32 MiB at 1 MiB/s: the prefetch alone would take half a minute.
    mnt = node.mount(ref, "--prefetch-all", "--prefetch-rate", "1M")
    stats = node.wait_stats(mnt, lambda s: s["prefetch"]["done_bytes"] > 0, "some prefetch progress")
    assert stats["prefetch"]["total_bytes"] == 32 * MiB
    pid = node.pid(mnt)
    node.umount(mnt)
    wait_for(lambda: not pid_alive(pid), "the daemon to exit")
    assert not mounted(mnt)
    node.assert_cache_consistent()
    # The batch in flight finished and no later one started: a daemon that waited for the whole
    # prefetch before it exited would have cached all 8 * 16 chunks.
    assert len(node.cache_rows()) < 8 * 16


def test_concurrent_readers_get_correct_bytes(registry: RegistryServer, node: Node) -> None:
    files = {f"f{i}": rand(3 * MiB + 12345 * i, 10 + i) for i in range(4)}
    ref, _ = publish(node.home, write_tree(node.root / "tree", files), registry, "--chunk-size", "64K")
    mnt = node.mount(ref)
    names = sorted(files)
    barrier = threading.Barrier(16)
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        fds = {n: os.open(mnt / n, os.O_RDONLY) for n in names}
        try:
            barrier.wait(timeout=WAIT)
            for i in range(40):
                name = names[rng.randrange(2)] if i < 20 else rng.choice(names)  # overlap hard first
                data = files[name]
                off = rng.randrange(len(data))
                size = rng.choice([1, 4096, 65536, 100_000, 1 << 20])
                got = os.pread(fds[name], size, off)
                if got != data[off:off + size]:
                    errors.append(f"reader {seed}: {name} [{off}, +{size}) wrong")
                if i % 10 == 9:  # go through the filesystem (and its cache) again
                    os.posix_fadvise(fds[name], 0, 0, os.POSIX_FADV_DONTNEED)
        except Exception as e:
            errors.append(f"reader {seed}: {e!r}")
        finally:
            for fd in fds.values():
                os.close(fd)

    threads = [threading.Thread(target=reader, args=(s,), daemon=True) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads), "a reader hung"
    assert errors == []
    node.assert_cache_consistent()
    stats = node.stats(mnt)
    assert stats["errors"] == 0
    # Concurrent readers of one chunk share a fetch: nothing was fetched twice.
    assert stats["bytes_fetched"] <= sum(map(len, files.values()))


# --- 5. the chunk cache ------------------------------------------------------------------------


def test_cache_shared_between_images_gc_and_prune(registry: RegistryServer, node: Node) -> None:
    shared = rand(512 * KiB, 20)
    trees = {
        "x": {"shared": shared, "x-only": rand(128 * KiB, 21)},
        "y": {"shared": shared, "y-only": rand(128 * KiB, 22)},
    }
    refs = {k: publish(node.home, write_tree(node.root / f"tree-{k}", t), registry, "--chunk-size", "128K",
                       name=f"cache-{k}")[0] for k, t in trees.items()}
    mnts = {k: node.mount(ref, name=f"mnt-{k}") for k, ref in refs.items()}
    assert (mnts["x"] / "shared").read_bytes() == shared
    # x's reader is answered before its range is committed to the cache (fetcher.py); y's must find it.
    pieces = {hashlib.sha256(shared[i:i + 128 * KiB]).digest() for i in range(0, len(shared), 128 * KiB)}
    wait_for(lambda: pieces <= set(node.cache_rows()), "x's chunks in the cache")
    assert (mnts["y"] / "shared").read_bytes() == shared
    sy = node.stats(mnts["y"])
    assert sy["bytes_fetched"] == 0 and sy["chunks_from_cache"] >= 4  # y found x's chunks
    for k, t in trees.items():
        for rel, data in t.items():
            assert (mnts[k] / rel).read_bytes() == data
    rows = node.cache_rows()
    assert len(rows) == 4 + 1 + 1  # one row per distinct chunk: "shared" is stored once
    on_disk = sum(p.stat().st_blocks * 512 for p in (node.home / "cache" / "blobs").iterdir())
    assert on_disk < len(shared) + 2 * 128 * KiB + 64 * KiB
    fetched = {k: node.stats(m)["bytes_fetched"] for k, m in mnts.items()}

    # gc while mounted evicts nothing the mounts hold; their reads stay correct and local.
    gc = json.loads(ok(node.naiad("cache", "gc", "--max-size", "0", "--json")).stdout)
    assert gc["evicted_chunks"] == 0 and node.cache_rows() == rows
    for k, t in trees.items():
        for rel, data in t.items():
            drop_page_cache(mnts[k] / rel)
            assert read_in_child(mnts[k] / rel) == ("ok", sha256(data))
        assert node.stats(mnts[k])["bytes_fetched"] == fetched[k]
    node.assert_cache_consistent()

    for m in mnts.values():
        node.umount(m)
    pruned = json.loads(ok(node.naiad("cache", "prune", "--json")).stdout)
    assert pruned["evicted_chunks"] == 6 and pruned["chunks"] == 0
    listing = json.loads(ok(node.naiad("cache", "ls", "--json")).stdout)
    assert listing["chunks"] == 0 and listing["bytes"] == 0 and listing["blobs"] == []
    assert list((node.home / "cache" / "blobs").iterdir()) == []


def test_cache_gc_evicts_least_recently_used(registry: RegistryServer, node: Node) -> None:
    files = {"a": rand(64 * KiB, 30), "b": rand(64 * KiB, 31)}
    ref, _ = publish(node.home, write_tree(node.root / "tree", files), registry, "--chunk-size", "64K")
    mnt = node.mount(ref, "--amplify", "0")
    assert (mnt / "a").read_bytes() == files["a"]
    assert (mnt / "b").read_bytes() == files["b"]
    drop_page_cache(mnt / "a")
    assert (mnt / "a").read_bytes() == files["a"]  # a is now used after b
    node.umount(mnt)
    with node.bootstrap() as bs:
        digest = {n: bs.file_chunks(bs.resolve(n))[0].digest for n in files}
    assert set(node.cache_rows()) == set(digest.values())
    gc = json.loads(ok(node.naiad("cache", "gc", "--max-size", "64K", "--json")).stdout)
    assert gc["evicted_chunks"] == 1
    assert set(node.cache_rows()) == {digest["a"]}
    node.assert_cache_consistent()


# --- 6. prefetch -----------------------------------------------------------------------------


def test_prefetch_list_is_fetched_in_the_background(registry: RegistryServer, node: Node) -> None:
    files = {"app/main": rand(2 * MiB, 40), "app/lib": rand(MiB, 41), "data/other": rand(4 * MiB, 42)}
    tree = write_tree(node.root / "tree", files)
    listing = node.root / "prefetch.txt"
    listing.write_text("/app/main\n/app/lib\n")
    # Small chunks, so that read amplification would have room to pull in the neighbours.
    ref, _ = publish(node.home, tree, registry, "--prefetch-list", listing, "--chunk-size", "256K",
                     name="prefetch")
    mnt = node.mount(ref)
    stats = node.wait_stats(mnt, lambda s: s["prefetch"]["finished"], "the prefetch to finish")
    wanted = len(files["app/main"]) + len(files["app/lib"])
    assert stats["bytes_fetched"] >= wanted
    assert stats["prefetch"]["total_bytes"] == stats["prefetch"]["done_bytes"] == wanted
    assert stats["files_read"] == 0 and stats["bytes_served"] == 0  # nobody read anything
    with node.bootstrap() as bs:
        def digests(path: str) -> set[bytes]:
            return {c.digest for c in bs.file_chunks(bs.resolve(path))}

        listed = digests("/app/main") | digests("/app/lib")
        other = digests("/data/other")
    rows = set(node.cache_rows())
    assert listed <= rows
    assert not other & rows  # only the list, not its neighbours
    for rel, data in files.items():
        assert (mnt / rel).read_bytes() == data


def test_no_list_no_background_fetch(registry: RegistryServer, node: Node) -> None:
    files = {"a": rand(2 * MiB, 50), "b": rand(2 * MiB, 51)}
    ref, built = publish(node.home, write_tree(node.root / "tree", files), registry)
    since = len(registry.requests())
    mnt = node.mount(ref)
    stats = node.wait_stats(mnt, lambda s: s["prefetch"]["finished"], "the (empty) prefetch to finish")
    assert stats["prefetch"]["total_bytes"] == 0
    assert stats["bytes_fetched"] == 0 and stats["requests"] == 0
    assert node.cache_rows() == {}
    data_blobs = {b["digest"] for b in built["blobs"]}
    assert not data_blobs & set(blob_gets(registry, since))


def test_prefetch_all_caches_every_chunk(registry: RegistryServer, node: Node) -> None:
    files = {f"f{i}": rand(MiB + i, 60 + i) for i in range(6)}
    ref, _ = publish(node.home, write_tree(node.root / "tree", files), registry, "--chunk-size", "256K")
    mnt = node.mount(ref, "--prefetch-all")
    stats = node.wait_stats(mnt, lambda s: s["prefetch"]["finished"], "the prefetch to finish")
    total = sum(map(len, files.values()))
    assert stats["prefetch"]["done_bytes"] == stats["prefetch"]["total_bytes"] == total
    with node.bootstrap() as bs:
        every = {c.digest for c in bs.chunks()}
    assert set(node.cache_rows()) == every
    node.assert_cache_consistent()
    fetched = stats["bytes_fetched"]
    for rel, data in files.items():
        assert (mnt / rel).read_bytes() == data
    after = node.stats(mnt)
    assert after["bytes_fetched"] == fetched  # all reads were local
    assert after["chunks_from_cache"] >= len(every)  # (counted per read, a chunk may take several)


# --- 7. the mount's lifecycle ------------------------------------------------------------------


def test_mount_is_usable_when_the_command_returns(small_image, node: Node) -> None:
    ref, files = small_image
    mnt = node.mount(ref)
    assert mounted(mnt)
    assert sorted(os.listdir(mnt)) == ["bin", "etc"]
    assert (mnt / "etc/hello").read_bytes() == files["etc/hello"]
    state = node.state(mnt)
    assert state["mountpoint"] == str(mnt) and pid_alive(state["pid"])
    text = ok(node.naiad("stats", mnt)).stdout
    assert "fetched" in text and "prefetch" in text
    # The command forked its daemon rather than start an interpreter: the daemon has the
    # command's command line, a session of its own, and started.json names it.
    pid = state["pid"]
    assert b"--foreground" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert os.getsid(pid) == pid
    assert node.state(mnt, "started.json")["pid"] == pid


def test_the_started_daemon_is_never_a_reused_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAIAD_HOME", str(tmp_path))
    mnt = str(tmp_path / "mnt")
    started = Path(daemon.state_dir(mnt), daemon.STARTED)
    started.parent.mkdir(parents=True)
    me = os.getpid()
    daemon.write_json(str(started), {"pid": me, "start": daemon.process_start(me)})
    assert daemon.started_daemon(mnt) == me
    daemon.write_json(str(started), {"pid": me, "start": "1"})  # a process that had this pid before
    assert daemon.started_daemon(mnt) is None
    started.write_text("{")
    assert daemon.started_daemon(mnt) is None


def test_mount_refuses_bad_mount_points(small_image, node: Node) -> None:
    ref, _ = small_image
    full = node.mountpoint("full")
    (full / "something").write_text("x")
    one_line_error(node.naiad("mount", ref, full), "not empty")
    assert not mounted(full)
    one_line_error(node.naiad("mount", ref, node.root / "nowhere"), "does not exist")
    mnt = node.mount(ref)
    one_line_error(node.naiad("mount", ref, mnt), "already")
    assert (mnt / "etc/hello").read_bytes() == b"hello\n"  # the first mount is untouched
    one_line_error(node.naiad("umount", node.root), "not a naiad mount")


@pytest.mark.parametrize("mode", ["fuse", pytest.param("kernel", marks=pytest.mark.skipif(
    erofs_available() is not None, reason=f"kernel mode: {erofs_available()}"))])
def test_sigterm_unmounts_cleanly(mode: str, small_image, node: Node) -> None:
    # Fuse mode's loop is pyfuse3's (trio) on the daemon's main thread; the signal is taken by
    # another thread, which stops it through the loop's token. Kernel mode has no trio at all.
    ref, files = small_image
    mnt = node.mount(ref, "--mode", mode)
    assert (mnt / "bin/tool").read_bytes() == files["bin/tool"]
    pid = node.pid(mnt)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), "the daemon to exit")
    assert not mounted(mnt)
    assert os.listdir(mnt) == []
    # The access trace: [path, chunk index] of each chunk read, in first-read order.
    assert node.state(mnt, "trace.json") == [["/bin/tool", 0]]


def test_umount_of_busy_mount_fails_and_keeps_it(small_image, node: Node) -> None:
    ref, _ = small_image
    mnt = node.mount(ref)
    busy = subprocess.Popen(["sleep", "300"], cwd=mnt / "etc")
    try:
        one_line_error(node.naiad("umount", mnt), "busy")
        assert mounted(mnt) and pid_alive(node.pid(mnt))
        assert (mnt / "etc/hello").read_bytes() == b"hello\n"
    finally:
        busy.kill()
        busy.wait()
    node.umount(mnt)


@pytest.mark.parametrize("mode", ["fuse", pytest.param("kernel", marks=pytest.mark.skipif(
    erofs_available() is not None, reason=f"kernel mode: {erofs_available()}"))])
def test_stats_right_after_mount(mode: str, small_image, node: Node) -> None:
    ref, _ = small_image
    mnt = node.mount(ref, "--mode", mode)
    stats = node.stats(mnt)  # no wait: the daemon wrote them before it said it was ready
    assert stats["mode"] == mode and stats["bytes_fetched"] == 0 and stats["files_read"] == 0


def test_statfs_and_read_only(small_image, node: Node) -> None:
    ref, files = small_image
    mnt = node.mount(ref, "--mode", "fuse")  # kernel mode's EROFS counts no f_files (test_erofs.py)
    st = os.statvfs(mnt)
    assert st.f_bsize == 4096
    assert st.f_blocks * st.f_frsize >= sum(map(len, files.values()))
    assert st.f_files == 5  # /, /bin, /bin/tool, /etc, /etc/hello
    assert st.f_bavail == 0
    writes: list[Callable[[], object]] = [
        lambda: open(mnt / "etc/hello", "r+b"),  # noqa: SIM115
        lambda: open(mnt / "etc/new", "wb"),  # noqa: SIM115
        lambda: os.mkdir(mnt / "dir"),
        lambda: os.unlink(mnt / "etc/hello"),
        lambda: os.rename(mnt / "etc/hello", mnt / "etc/moved"),
        lambda: os.chmod(mnt / "etc/hello", 0o777),
        lambda: os.symlink("x", mnt / "link"),
        lambda: os.setxattr(mnt / "etc/hello", "user.x", b"1"),
    ]
    for write in writes:
        with pytest.raises(OSError) as e:
            write()
        assert e.value.errno == errno.EROFS
    assert (mnt / "etc/hello").read_bytes() == b"hello\n"
