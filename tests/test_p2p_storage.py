"""The lazy filesystem's P2P backend: chunk range reads through the node's peer, auth challenges included."""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path

import pytest
from p2p_cluster import Cluster, metric, push_blob, registry_blob_bytes

from naiad.errors import RegistryError
from naiad.oci.image import Descriptor, RegistryOptions
from naiad.oci.reference import parse_reference
from naiad.oci.registry import RegistryClient
from naiad.storage.p2p import PeerSource, via_peer

MIB = 1 << 20


class _NoSource:
    """An inner source that must not be used: range reads go through the peer."""


def test_range_reads_go_through_the_peer(tmp_path: Path, registry) -> None:
    data = secrets.token_bytes(9 * MIB)
    repo = f"p2p/storage-{secrets.token_hex(3)}"
    digest = push_blob(registry.host, repo, data)
    ref = parse_reference(f"{registry.host}/{repo}:v1")
    with Cluster(tmp_path, registry.host) as cluster:
        cluster.start_scheduler()
        peer = cluster.peer("node")
        with via_peer(_NoSource(), ref, RegistryOptions(), proxy=peer.proxy) as source:  # type: ignore[arg-type]
            assert isinstance(source, PeerSource)
            assert source.read_range(digest, 5 * MIB - 3, 1000) == data[5 * MIB - 3: 5 * MIB + 997]
            assert source.read_range(digest, len(data) - 10, 100) == data[-10:]
        # Each read got its bytes first; the rest of its piece follows. In all: pieces 1 and 2, once.
        deadline = time.monotonic() + 15
        while registry_blob_bytes(registry, digest) < 5 * MIB and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        assert registry_blob_bytes(registry, digest) == 5 * MIB
    # Without a proxy (and no $NAIAD_P2P_PROXY), or for a local layout, the source is left alone.
    inner = _NoSource()
    with via_peer(inner, ref, proxy="") as same:  # type: ignore[arg-type]
        assert same is inner
    with via_peer(inner, parse_reference("oci:/x:y"), proxy="127.0.0.1:1") as same:  # type: ignore[arg-type]
        assert same is inner


def test_token_auth_passes_through_the_mirror(tmp_path: Path, auth_registry_token) -> None:
    reg = auth_registry_token
    creds = f"{reg.username}:{reg.password}"
    data = secrets.token_bytes(MIB + 7)
    repo = f"p2p/private-{secrets.token_hex(3)}"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with RegistryClient(reg.host, RegistryOptions(creds=creds), push=True) as client:
        client.push_blob_bytes(repo, data, Descriptor("application/octet-stream", digest, len(data)))
    ref = parse_reference(f"{reg.host}/{repo}:v1")
    with Cluster(tmp_path, reg.host) as cluster:
        cluster.start_scheduler()
        # The peer's own credentials (for back-to-source) come from the environment, never the log.
        peer = cluster.peer("node", env={"NAIAD_CREDS": creds})
        anonymous = PeerSource(_NoSource(), ref, peer.proxy)  # type: ignore[arg-type]
        try:
            with pytest.raises(RegistryError, match="credentials required"):
                anonymous.read_range(digest, 0, 10)
        finally:
            anonymous.close()
        source = PeerSource(_NoSource(), ref, peer.proxy, RegistryOptions(creds=creds))  # type: ignore[arg-type]
        try:
            assert source.read_range(digest, 100, 5000) == data[100:5100]
        finally:
            source.close()
        assert reg.password not in (tmp_path / "node.log").read_text()


def test_mount_reads_chunks_through_the_peer(tmp_path: Path, registry, node) -> None:
    """`naiad mount --p2p-proxy`: the bootstrap comes from the registry, file data through the peer."""
    from test_mount import publish, rand

    tree = tmp_path / "tree"
    tree.mkdir()
    data = rand(3 * MIB + 5, seed=11)
    (tree / "file").write_bytes(data)
    ref, _ = publish(node.home, tree, registry)
    (tmp_path / "p2p").mkdir()
    with Cluster(tmp_path / "p2p", registry.host) as cluster:
        cluster.start_scheduler()
        peer = cluster.peer("node")
        mnt = node.mount(ref, "--p2p-proxy", peer.proxy)
        assert (mnt / "file").read_bytes() == data
        # Every chunk byte the mount fetched came to it through the peer's mirror.
        fetched = node.stats(mnt)["bytes_fetched"]
        assert fetched > 0
        assert metric(f"http://{peer.proxy}/metrics", "naiad_p2p_client_bytes_total") == fetched
