"""The snapshotter under a real containerd + runc: pulls, runs, restarts, kills, removal.

One registry (behind a counting proxy, so that every blob request is seen) holds a two-layer
plain OCI image and its naiad conversion. Each test gets its own node: a snapshotter, a
private containerd that uses it, and a NAIAD_HOME, all undone afterwards.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from snapshotter_cri import CRIImages
from snapshotter_helpers import (
    APP_FILES,
    Node,
    app_file,
    daemons_of,
    lazy_mounts,
    make_images,
    skip_unless_possible,
)
from test_mount import wait_for
from test_mountd import mountd_answers

from naiad.snapshotter.store import Store

HELLO = "hello from naiad\n"
SLOW_READER = ["/bin/sh", "-c", "for f in /data/files/*; do cat $f; sleep 0.05; done"]


@pytest.fixture(scope="module")
def images(registry, tmp_path_factory: pytest.TempPathFactory):
    """(proxy, plain ref, naiad ref, the naiad image's data blob digests, its bootstrap digest).

    The naiad image's other layer, its EROFS view, is metadata like the bootstrap."""
    skip_unless_possible()
    # Built straight into the registry; pulled through the proxy, which counts requests.
    plain, naiad = make_images(tmp_path_factory.mktemp("sn-images"), registry.host)
    with FaultProxy(registry.host) as proxy:
        plain, naiad = (r.replace(registry.host, proxy.host, 1) for r in (plain, naiad))
        from naiad.oci.image import resolve_image, source_for
        from naiad.oci.reference import parse_reference

        with source_for(parse_reference(f"docker://{naiad}")) as source:
            layers = resolve_image(source).layers
        from naiad.format.spec import MEDIA_TYPE_BLOB

        data_blobs = [d.digest for d in layers if d.media_type == MEDIA_TYPE_BLOB]
        yield proxy, plain, naiad, data_blobs, layers[-1].digest


@contextlib.contextmanager
def running_node(base: Path, **kw: Any) -> Iterator[Node]:
    """A started node, closed afterwards; nothing of it may be left mounted or running."""
    skip_unless_possible()
    n = Node(base, **kw)
    try:
        n.start()
        yield n
    except BaseException:
        print(n.diagnostics())
        raise
    finally:
        n.close()
    assert lazy_mounts(n.root) == [] and daemons_of(n.home) == []
    assert not (n.home / "mountd.sock").exists()  # the snapshotter's mountd stopped with it


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    with running_node(tmp_path) as n:
        yield n


def _blob_gets(proxy: FaultProxy, digests: list[str]) -> list[tuple[str, str | None]]:
    """(digest, Range header) of every GET of these blobs since the proxy was reset."""
    return [(d, s.headers.get("Range") or s.headers.get("range"))
            for s in proxy.requests("GET", "/blobs/") for d in digests if s.path.endswith(d)]


def _forked_by_mountd(pid: int) -> bool:
    """A daemon mountd forked has mountd's command line; one started anew, `naiad mount ...`."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[2:4] == [b"naiad", b"mountd"]


def _lazy_keys(node: Node) -> list[str]:
    store = Store(str(node.root / "metadata.db"))
    try:
        with store.transaction() as tx:
            return tx.lazy_keys()
    finally:
        store.close()


def test_plain_oci_image_pull_and_run(images, node: Node):
    _, plain, _, _, _ = images
    node.containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "naiad", plain)
    assert node.run(plain, "plain-1") == HELLO
    # Through rpull too: the labels name a plain image, so the snapshotter lets containerd unpack it.
    node.containerd.ctr("image", "rm", "--sync", plain)
    node.rpull(plain)
    assert node.run(plain, "plain-2", "/bin/sh", "-c", "cat /data/files/f007") == app_file(7)
    assert lazy_mounts(node.root) == []


def test_naiad_image_is_pulled_without_its_data(images, node: Node):
    proxy, _, naiad, data_blobs, bootstrap = images
    proxy.reset()
    assert mountd_answers(node.home)  # started by the snapshotter
    node.rpull(naiad)
    assert _blob_gets(proxy, data_blobs) == []  # neither containerd nor the snapshotter fetched data
    assert [r for _, r in _blob_gets(proxy, [bootstrap])] == [None]  # the bootstrap, once
    assert len(lazy_mounts(node.root)) == 1 and len(daemons_of(node.home)) == 1
    [daemon] = daemons_of(node.home)
    assert _forked_by_mountd(daemon)  # its code was loaded before the pull: it mounts sooner

    assert node.run(naiad, "app-1") == HELLO
    assert node.run(naiad, "app-2", *SLOW_READER) == "".join(app_file(i) for i in range(APP_FILES))
    # Data came as chunk ranges, never as whole blobs; still one mount, shared by both containers.
    assert all(r and r.startswith("bytes=") for _, r in _blob_gets(proxy, data_blobs))
    assert len(lazy_mounts(node.root)) == 1 and len(daemons_of(node.home)) == 1


def test_kill9_snapshotter_while_a_container_reads(images, node: Node):
    _, _, naiad, _, _ = images
    node.rpull(naiad)
    [daemon] = daemons_of(node.home)
    reader = subprocess.Popen(
        node.containerd.ctr_argv("run", "--snapshotter", "naiad", "--rm", naiad, "reader", *SLOW_READER),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None
        first = reader.stdout.readline()  # the container runs and reads
        node.snapshotter.kill9()
        rest, err = reader.communicate(timeout=120)
        # The snapshotter's mountd ended with it (its daemons go on: this one serves the reader).
        wait_for(lambda: not (node.home / "mountd.sock").exists(), "the snapshotter's mountd to end")
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert first + rest == "".join(app_file(i) for i in range(APP_FILES)), err
    assert reader.returncode == 0, err

    node.start_snapshotter()
    assert daemons_of(node.home) == [daemon]  # re-attached, not re-mounted
    assert "re-attached to lazy mount" in node.snapshotter.log_tail(200)
    assert node.run(naiad, "after") == HELLO


def test_restarts_between_pull_and_run(images, node: Node):
    _, _, naiad, _, _ = images
    node.rpull(naiad)
    [daemon] = daemons_of(node.home)
    node.snapshotter.stop()
    # The daemon dies while the snapshotter is away: the restart mounts the image again.
    subprocess.run(["kill", "-9", str(daemon)], check=True)
    deadline = time.monotonic() + 10
    while daemons_of(node.home) and time.monotonic() < deadline:
        time.sleep(0.05)
    node.start_snapshotter()
    deadline = time.monotonic() + 60  # the re-mount runs in the background
    while "re-mounted lazy mount" not in node.snapshotter.log_tail(200) and time.monotonic() < deadline:
        time.sleep(0.1)
    [again] = daemons_of(node.home)
    assert again != daemon and "re-mounted lazy mount" in node.snapshotter.log_tail(200)
    assert node.run(naiad, "app-1") == HELLO
    node.containerd.restart()
    assert node.run(naiad, "app-2", "/bin/sh", "-c", "cat /data/files/f042") == app_file(42)
    # The daemon dies under a running snapshotter: the next container's Prepare mounts the image again.
    subprocess.run(["kill", "-9", str(again)], check=True)
    assert node.run(naiad, "app-3", "/bin/sh", "-c", "cat /data/files/f043") == app_file(43)
    assert len(daemons_of(node.home)) == 1 and again not in daemons_of(node.home)


def test_removing_the_image_releases_mounts_in_each_namespace(images, node: Node):
    _, _, naiad, _, _ = images
    node.rpull(naiad)
    node.containerd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "naiad", naiad,
                               namespace="other")
    # Two namespaces, one image: one mount shared by both namespaces' snapshots.
    assert len(lazy_mounts(node.root)) == 1 and len(_lazy_keys(node)) == 1
    assert node.run(naiad, "app") == HELLO

    node.containerd.ctr("image", "rm", "--sync", naiad)
    # The other namespace still has the image: its mount stays, and it still runs.
    assert len(lazy_mounts(node.root)) == 1
    out = node.containerd.ctr("run", "--snapshotter", "naiad", "--rm", naiad, "app", namespace="other").stdout
    assert out == HELLO

    node.containerd.ctr("image", "rm", "--sync", naiad, namespace="other")
    deadline = time.monotonic() + 30
    while (lazy_mounts(node.root) or daemons_of(node.home)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lazy_mounts(node.root) == [] and daemons_of(node.home) == [] and _lazy_keys(node) == []
    assert node.containerd.ctr("snapshots", "--snapshotter", "naiad", "ls").stdout.count("\n") <= 1


def test_cri_pull_skips_the_data_blobs(images, tmp_path: Path):
    proxy, _, naiad, data_blobs, _ = images
    mirror = (f'[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{proxy.host}"]\n'
              f'  endpoint = ["http://{proxy.host}"]\n')
    with running_node(tmp_path, cri=True, extra_config=mirror) as n:
        proxy.reset()
        with CRIImages(n.containerd.address) as cri:
            image_id = cri.pull(naiad)
            assert image_id.startswith("sha256:")
            assert _blob_gets(proxy, data_blobs) == []
            assert len(lazy_mounts(n.root)) == 1
            # The kubelet's namespace; the rootfs is the image's: its programs and every data file.
            out = n.containerd.ctr("run", "--snapshotter", "naiad", "--rm", naiad, "cri-app", *SLOW_READER,
                                   namespace="k8s.io").stdout
            assert out == "".join(app_file(i) for i in range(APP_FILES))
            cri.remove(naiad)
        # containerd collects the snapshots in the background after the image is gone.
        deadline = time.monotonic() + 60
        while lazy_mounts(n.root) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert lazy_mounts(n.root) == []
