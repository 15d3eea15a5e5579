"""The kernel fast path: EROFS metadata images and kernel-mode mounts (real EROFS over real FUSE).

- the oracle: every corpus image mounted with `--mode kernel` (the kernel serves
  the tree from the generated EROFS image; blobfs serves the blob files) is the
  tree `umoci unpack` makes, attribute for attribute, hard-link inodes included;
- lazy: reading one small file fetches a small fraction of the blobs;
- integrity: a tampered chunk gives EIO to the files using it only, never
  reaches the cache, and reads fine once the blob is restored;
- passthrough: a blob whose chunks are all cached is read by the kernel from the
  cache file (FUSE passthrough), byte for byte the same, with no read in Python;
- lifecycle: `naiad umount` and SIGTERM leave neither EROFS nor blobfs mounted,
  a busy mount is refused and kept, `--mode auto` picks the kernel here;
- the image itself: `fsck.erofs` accepts it, and it is the same bytes when
  written twice.

Skipped where EROFS file-backed mounts cannot be made (not root, no erofs);
that is exactly where `--mode auto` serves with FUSE.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import urllib.request
from pathlib import Path

import pytest
import test_mount
from corpus import ALL_IMAGES
from registry_server import RegistryServer
from test_mount import (
    KiB,
    MiB,
    Node,
    blob_gets,
    mounted,
    ok,
    one_line_error,
    pid_alive,
    publish,
    rand,
    registry_blob,
    wait_for,
    write_tree,
)
from treecmp import compare_trees

from naiad.format.bootstrap import Bootstrap, BootstrapWriter
from naiad.format.erofs import erofs_image, write_erofs
from naiad.fs.kernel import erofs_available, mount_erofs, read_ahead_file, umount

# The mount tests' module fixtures: the corpus images and umoci's unpack of each.
corpus = test_mount.corpus
reference_rootfs = test_mount.reference_rootfs

pytestmark = pytest.mark.skipif(erofs_available() is not None, reason=f"{erofs_available()}")


def kernel_mount(node: Node, ref: str, *options: object) -> Path:
    mnt = node.mount(ref, "--mode", "kernel", *options)
    assert fs_type(mnt) == "erofs"
    return mnt


def fs_type(path: Path) -> str | None:
    with open("/proc/self/mounts") as f:
        types = [line.split()[2] for line in f if line.split()[1] == str(path)]
    return types[-1] if types else None


def blob_dir(node: Node, mnt: Path) -> Path:
    """Where the mount's daemon serves blobfs (naiad.fs.daemon.state_dir, under the node's home)."""
    return node.home / "mounts" / hashlib.sha256(str(mnt).encode()).hexdigest()[:16] / "blobs"


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_kernel_mount_equals_umoci(name: str, corpus, reference_rootfs, registry: RegistryServer,
                                   node: Node) -> None:
    ref = f"docker://{registry.host}/erofs/oracle-{name}:v1"
    ok(node.naiad("convert", corpus[name].ref, ref))
    mnt = kernel_mount(node, ref)
    assert compare_trees(reference_rootfs(name), mnt) == []
    if name == "hardlinks":
        groups: dict[int, set[str]] = {}
        for p in mnt.rglob("*"):
            st = p.lstat()
            if st.st_nlink > 1 and not p.is_dir():
                groups.setdefault(st.st_ino, set()).add(p.name)
        assert any(len(g) > 1 for g in groups.values())
    node.umount(mnt)
    assert not mounted(blob_dir(node, mnt))


def test_kernel_mode_reads_one_small_file_lazily(registry: RegistryServer, node: Node) -> None:
    tree = node.root / "tree"
    tree.mkdir()
    for i in range(12):
        (tree / f"big-{i:02d}").write_bytes(os.urandom(8 * MiB))  # incompressible
    small = os.urandom(10 * KiB)
    (tree / "small").write_bytes(small)
    ref, built = publish(node.home, tree, registry, name="erofs-lazy")
    shutil.rmtree(tree)
    blob_bytes = sum(b["size"] for b in built["blobs"])
    since = len(registry.requests())
    mnt = kernel_mount(node, ref)
    assert (mnt / "small").read_bytes() == small
    stats = node.stats(mnt)
    assert stats["mode"] == "kernel" and stats["files_read"] == 1
    data_blobs = {b["digest"] for b in built["blobs"]}

    def data_fetched() -> int:  # the bootstrap is not counted by the mount
        return sum(size for digest, size in blob_gets(registry, since).items() if digest in data_blobs)

    # The registry writes a request's access-log line after the client has its bytes, and the
    # daemon refreshes its stats every second: wait until both have caught up and agree.
    wait_for(lambda: 0 < data_fetched() == node.stats(mnt)["bytes_fetched"],
             "the registry's access log and the mount's stats to agree")
    fetched = data_fetched()
    # The small file's chunk, plus what read amplification (1 MiB) and the kernel's readahead
    # on the blob file pull in: a few MB of 96.
    assert fetched < 0.05 * blob_bytes, (fetched, blob_bytes)


EROFS_LAYER = "application/vnd.oci.image.layer.naiad.erofs.v1+zstd"


def erofs_layer(registry: RegistryServer, ref: str) -> dict:
    """The EROFS view's descriptor in the manifest of `ref` (docker://HOST/REPO:TAG)."""
    repo, tag = ref.removeprefix(f"docker://{registry.host}/").rsplit(":", 1)
    request = urllib.request.Request(f"http://{registry.host}/v2/{repo}/manifests/{tag}",
                                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(request) as answer:
        layers = json.load(answer)["layers"]
    (view,) = [la for la in layers if la["mediaType"] == EROFS_LAYER]
    return view


def test_kernel_mount_takes_the_view_the_image_ships(registry: RegistryServer, node: Node) -> None:
    files = {"etc/hello": b"hello\n", "bin/tool": rand(300 * KiB, 71)}
    ref, _ = publish(node.home, write_tree(node.root / "tree", files), registry, name="shipped")
    view = erofs_layer(registry, ref)
    since = len(registry.requests())
    mnt = kernel_mount(node, ref)
    assert (mnt / "bin/tool").read_bytes() == files["bin/tool"]
    wait_for(lambda: view["digest"] in blob_gets(registry, since), "the registry's access log")
    assert blob_gets(registry, since)[view["digest"]] == view["size"]  # fetched once, whole
    assert "generating the EROFS view here" not in daemon_log(node, mnt)
    node.umount(mnt)


def test_a_tampered_view_is_not_mounted_the_node_makes_its_own(registry: RegistryServer, node: Node) -> None:
    files = {"etc/hello": b"hello\n", "bin/tool": rand(300 * KiB, 72)}
    ref, _ = publish(node.home, write_tree(node.root / "tree", files), registry, name="badview")
    blob = registry_blob(registry, erofs_layer(registry, ref)["digest"])
    original = blob.read_bytes()
    blob.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    try:
        mnt = kernel_mount(node, ref)
        assert (mnt / "bin/tool").read_bytes() == files["bin/tool"]
        assert (mnt / "etc/hello").read_bytes() == b"hello\n"
        assert "generating the EROFS view here" in daemon_log(node, mnt)
        expected = node.root / "expected.erofs"
        with node.bootstrap() as bs:
            write_erofs(bs, str(expected))
            assert Path(bs.path).with_suffix(".erofs").read_bytes() == expected.read_bytes()
        node.umount(mnt)
    finally:
        blob.write_bytes(original)


def test_kernel_mount_sets_the_read_ahead(small_image, node: Node) -> None:
    ref, files = small_image
    mnt = kernel_mount(node, ref)
    assert Path(read_ahead_file(str(mnt))).read_text().strip() == "512"  # the default, not the kernel's 128
    node.umount(mnt)
    mnt = node.mount(ref, "--mode", "kernel", "--read-ahead", "2M", name="mnt2")
    assert Path(read_ahead_file(str(mnt))).read_text().strip() == "2048"
    assert (mnt / "bin/tool").read_bytes() == files["bin/tool"]
    node.umount(mnt)


def test_a_fully_cached_blob_is_read_by_the_kernel_from_the_cache(registry: RegistryServer,
                                                                  node: Node) -> None:
    files = {"etc/hello": b"hello\n", "bin/tool": rand(300 * KiB, 73), "lib/big": rand(3 * MiB, 74)}
    ref, built = publish(node.home, write_tree(node.root / "tree", files), registry, name="passthrough")
    mnt = node.mount(ref, "--mode", "kernel", "--amplify", "0", name="first")
    assert (mnt / "etc/hello").read_bytes() == files["etc/hello"]
    node.umount(mnt)
    # Some chunks of the blob are not cached: the daemon serves its reads.
    mnt = node.mount(ref, "--mode", "kernel", name="second")
    assert node.stats(mnt)["passthrough"] == 0
    for path, data in files.items():
        assert (mnt / path).read_bytes() == data
    node.umount(mnt)
    # Every chunk is: the kernel reads the cache file itself, the daemon sees no read.
    mnt = node.mount(ref, "--mode", "kernel", name="third")
    assert node.stats(mnt)["passthrough"] == len(built["blobs"]) == 1
    for path, data in files.items():
        assert (mnt / path).read_bytes() == data
    done = node.stats(mnt)["updated"]
    stats = node.wait_stats(mnt, lambda s: s["updated"] > done, "the stats to be written again")
    assert stats["reads"] == 0 and stats["requests"] == 0
    assert "passthrough    1 blob files" in ok(node.naiad("stats", mnt)).stdout
    node.umount(mnt)


def daemon_log(node: Node, mnt: Path) -> str:
    return (blob_dir(node, mnt).parent / "daemon.log").read_text()


def test_umount_and_sigterm_leave_nothing_mounted(small_image, node: Node) -> None:
    ref, files = small_image
    mnt = kernel_mount(node, ref)
    blobs = blob_dir(node, mnt)
    assert mounted(blobs)
    busy = subprocess.Popen(["sleep", "300"], cwd=mnt / "etc")
    try:
        one_line_error(node.naiad("umount", mnt), "busy")
        assert mounted(mnt) and mounted(blobs) and pid_alive(node.pid(mnt))
        assert (mnt / "bin/tool").read_bytes() == files["bin/tool"]
    finally:
        busy.kill()
        busy.wait()
    pid = node.pid(mnt)
    node.umount(mnt)
    wait_for(lambda: not pid_alive(pid), "the daemon to exit")
    assert not mounted(mnt) and not mounted(blobs)

    mnt = node.mount(ref, name="again")  # auto: the kernel, here
    assert fs_type(mnt) == "erofs" and node.state(mnt)["mode"] == "kernel"
    assert (mnt / "etc/hello").read_bytes() == b"hello\n"
    pid = node.pid(mnt)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), "the daemon to exit")
    assert not mounted(mnt) and not mounted(blob_dir(node, mnt))
    assert os.listdir(mnt) == []


def test_fuse_mode_is_still_there(small_image, node: Node) -> None:
    ref, files = small_image
    mnt = node.mount(ref, "--mode", "fuse")
    assert fs_type(mnt) == "fuse.naiad" and node.state(mnt)["mode"] == "fuse"
    assert (mnt / "bin/tool").read_bytes() == files["bin/tool"]


def test_kernel_mount_statfs_and_read_only(small_image, node: Node) -> None:
    ref, files = small_image
    mnt = kernel_mount(node, ref)
    st = os.statvfs(mnt)
    assert st.f_bsize == 4096 and st.f_bavail == 0
    assert st.f_blocks * st.f_frsize >= sum(map(len, files.values()))
    # EROFS reports no inode limit: f_files is all ones, and f_ffree is that minus the inodes.
    assert (st.f_files - st.f_ffree) % (1 << 64) == 5  # /, /bin, /bin/tool, /etc, /etc/hello
    for write in (lambda: open(mnt / "etc/hello", "r+b"), lambda: os.mkdir(mnt / "dir"),  # noqa: SIM115
                  lambda: os.setxattr(mnt / "etc/hello", "user.x", b"1")):
        with pytest.raises(OSError) as e:
            write()
        assert e.value.errno == errno.EROFS


def test_fsck_accepts_the_image_and_it_is_reproducible(corpus, registry: RegistryServer, node: Node) -> None:
    ref = f"docker://{registry.host}/erofs/fsck:v1"
    ok(node.naiad("convert", corpus["xattrs"].ref, ref))
    mnt = kernel_mount(node, ref)
    (image,) = (node.home / "bootstraps").glob("*.erofs")
    devices = sorted(blob_dir(node, mnt).iterdir(), key=lambda p: int(p.name))
    out = node.root / "extracted"
    proc = subprocess.run(["fsck.erofs", *(f"--device={d}" for d in devices), f"--extract={out}", str(image)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with node.bootstrap() as bs:
        again = node.root / "again.erofs"
        write_erofs(bs, str(again))
        assert again.read_bytes() == image.read_bytes()
        assert erofs_image(bs) == str(image)  # the cached one is current: kept, not rewritten
    for path in mnt.rglob("*"):
        if path.is_file() and not path.is_symlink():
            rel = path.relative_to(mnt)
            assert (out / rel).read_bytes() == path.read_bytes(), rel
    node.umount(mnt)


def test_many_blobs_and_holes_without_blobfs(tmp_path: Path) -> None:
    """The writer alone, mounted over plain files: 40 blobs (the device table outgrows block 0),
    files spanning chunks in two blobs, a chunk with no row (a hole: zeros), 64 KiB chunks."""
    chunk = 64 * KiB
    path = str(tmp_path / "bs.db")
    w = BootstrapWriter(path, chunk)
    blobs = 40
    inodes = [(1, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 1_700_000_000, 7, 0, None)]
    dentries, chunks, file_chunks = [], [], []
    device_bytes = {b: bytearray() for b in range(1, blobs + 1)}
    expected: dict[str, bytes] = {}
    for i in range(blobs):
        ino, blob, other = i + 2, i + 1, (i + 1) % blobs + 1
        parts = [rand(chunk, 3 * i), None, rand(1000 + i, 3 * i + 1)]  # chunk 1 has no row: zeros
        data = parts[0] + bytes(chunk) + parts[2]
        mtime = 1_600_000_000 + i
        inodes.append((ino, stat.S_IFREG | 0o644, 1, 1000 + i, 2000 + i, len(data), mtime, i, 0, None))
        dentries.append((1, f"f{i:02d}".encode(), ino))
        for index, (part, home) in enumerate(zip(parts, (blob, None, other), strict=True)):
            if part is None:
                continue
            store = device_bytes[home]
            store += bytes(-len(store) % 4096)
            cid = len(chunks) + 1
            chunks.append((cid, hashlib.sha256(part).digest(), home, 0, len(part), len(part), len(store)))
            file_chunks.append((ino, index * chunk, cid))
            store += part
        expected[f"f{i:02d}"] = data
    w.add_inodes(inodes)
    w.add_dentries(dentries)
    w.add_blobs([(b, f"sha256:{b:064x}", len(device_bytes[b]), "none") for b in device_bytes])
    w.add_chunks(chunks)
    w.add_file_chunks(file_chunks)
    w.finish()
    devices = []
    for b, data in device_bytes.items():
        devices.append(tmp_path / f"dev{b}")
        # Whole blocks, as blobfs serves them: EROFS takes a short read of the last block for EIO.
        devices[-1].write_bytes(bytes(data) + bytes(-len(data) % 4096))
    image = tmp_path / "image.erofs"
    with Bootstrap(path) as bs:
        write_erofs(bs, str(image))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_erofs(str(image), [str(d) for d in devices], str(mnt))
    try:
        for name, data in expected.items():
            st = (mnt / name).lstat()
            i = int(name[1:])
            mtime_ns = (1_600_000_000 + i) * 10**9 + i
            assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (1000 + i, 2000 + i, mtime_ns)
            assert (mnt / name).read_bytes() == data, name
        assert os.lstat(mnt).st_mtime_ns == 1_700_000_000 * 10**9 + 7
    finally:
        umount(str(mnt))
