"""The P2P network end to end: real `naiad scheduler` / `naiad peer` processes, a real docker-registry.

Registry egress is read from the registry's own access log (bytes it sent
in answers to blob GETs), so "pulled from the registry once" is measured
where it happens.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from p2p_cluster import Cluster, Daemon, blob_url, get, metric, push_blob, registry_blob_bytes
from registry_server import free_port

from naiad.oci.image import Descriptor
from naiad.oci.registry import RegistryClient

MIB = 1 << 20
PIECE = 4 * MIB


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def cluster(tmp_path: Path, registry) -> Cluster:
    with Cluster(tmp_path, registry.host) as c:
        c.start_scheduler()
        yield c


def wait_for(predicate, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _task(cluster: Cluster, digest: str) -> dict:
    return next((t for t in cluster.status()["tasks"] if t["digest"] == digest), {"holders": {}})


def _holders(cluster: Cluster, digest: str) -> dict[str, int]:
    return _task(cluster, digest)["holders"]


def unique_repo(name: str) -> str:
    return f"p2p/{name}-{secrets.token_hex(3)}"


def test_five_peers_pull_one_blob_from_the_registry_about_once(cluster: Cluster, registry) -> None:
    data = secrets.token_bytes(100 * MIB)
    repo = unique_repo("swarm")
    digest = push_blob(registry.host, repo, data)
    peers = [cluster.peer(f"node{i}") for i in range(5)]
    cluster.wait_peers(5)

    def pull(peer):
        h = hashlib.sha256()
        with httpx.stream("GET", blob_url(peer, registry.host, repo, digest), timeout=300) as r:
            assert r.status_code == 200, r.read()
            for block in r.iter_bytes(1 << 20):
                h.update(block)
        return "sha256:" + h.hexdigest()

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        digests = list(pool.map(pull, peers))
    assert digests == [digest] * 5, cluster.logs()
    egress = registry_blob_bytes(registry, digest)
    assert egress <= 1.2 * len(data), f"registry sent {egress} bytes for a {len(data)}-byte blob"
    # Every peer checked the whole-blob digest and said so (reports trail the last bytes a little).
    wait_for(lambda: len(_task(cluster, digest)["complete"]) == 5, "5 peers to complete the task")
    # The pieces went between peers: the scheduler saw peer-to-peer edges.
    peer_bytes = sum(e["bytes"] for e in _task(cluster, digest)["edges"] if e["parent"] != "source")
    assert peer_bytes >= 3 * len(data)


def test_range_reads_are_exact_and_go_back_to_source_at_once(cluster: Cluster, registry) -> None:
    data = secrets.token_bytes(6 * PIECE + 12345)
    repo = unique_repo("range")
    digest = push_blob(registry.host, repo, data)
    a, b = cluster.peer("a"), cluster.peer("b")
    cluster.wait_peers(2)
    url_a, url_b = blob_url(a, registry.host, repo, digest), blob_url(b, registry.host, repo, digest)
    for start, end in [(0, 1), (PIECE - 10, PIECE + 10), (3 * PIECE + 5, 5 * PIECE + 7),
                       (len(data) - 100, len(data))]:
        r = get(url_a, start, end)
        assert r.status_code == 206
        assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{len(data)}"
        assert r.content == data[start:end]
    suffix = httpx.get(url_a, headers={"Range": "bytes=-77"}, timeout=30)
    assert suffix.status_code == 206 and suffix.content == data[-77:]

    # The pieces those reads started are complete (their rest came in the background).
    wait_for(lambda: _holders(cluster, digest).get(a.id) == 6, "a to hold pieces 0, 1, 3, 4, 5, 6")
    # Piece 2 is held by nobody: the read goes to the registry at once, and only for that piece.
    before = registry_blob_bytes(registry, digest)
    t0 = time.monotonic()
    r = get(url_b, 2 * PIECE + 100, 2 * PIECE + 100 + MIB)
    elapsed = time.monotonic() - t0
    assert r.content == data[2 * PIECE + 100: 2 * PIECE + 100 + MIB]
    assert elapsed < 5.0, f"a lazy miss took {elapsed:.1f} s"
    # The reader got its bytes first; the rest of the piece follows, then b announces it.
    wait_for(lambda: _holders(cluster, digest).get(b.id) == 1, "b to announce piece 2")
    assert registry_blob_bytes(registry, digest) - before == PIECE
    # ... and is then served to other peers: a's read of piece 2 costs the registry nothing.
    before = registry_blob_bytes(registry, digest)
    r = get(url_a, 2 * PIECE, 3 * PIECE)
    assert r.content == data[2 * PIECE: 3 * PIECE]
    assert registry_blob_bytes(registry, digest) == before
    wait_for(lambda: {"child": a.id, "parent": b.id, "bytes": PIECE} in _task(cluster, digest)["edges"],
             "a's report of piece 2 from b")

    assert httpx.get(url_a, headers={"Range": f"bytes={len(data)}-"}, timeout=30).status_code == 416
    head = httpx.head(url_a, timeout=30)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
    assert head.headers["docker-content-digest"] == digest


def _push_image(registry: str, repo: str) -> tuple[str, list[bytes]]:
    """A small OCI image (config + 2 layers of random bytes) pushed by tag; returns (tag, blobs)."""
    layers = [secrets.token_bytes(5 * MIB + 17), secrets.token_bytes(300_000)]
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [
        sha(x) for x in layers]}}).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config),
                           "size": len(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(x),
                            "size": len(x)} for x in layers]}
    with RegistryClient(registry) as client:
        for blob in [config, *layers]:
            client.push_blob_bytes(repo, blob, Descriptor("application/octet-stream", sha(blob), len(blob)))
        client.put_manifest(repo, json.dumps(manifest).encode(), manifest["mediaType"], "v1")
    return "v1", [config, *layers]


def test_skopeo_through_the_mirror_gives_the_same_image(cluster: Cluster, registry, tmp_path: Path) -> None:
    repo = unique_repo("skopeo")
    tag, blobs = _push_image(registry.host, repo)
    peer = cluster.peer("node")

    def copy(host: str, dest: Path) -> None:
        subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{host}/{repo}:{tag}",
                        f"oci:{dest}:{tag}"], check=True, capture_output=True, timeout=120)

    copy(registry.host, tmp_path / "direct")
    copy(peer.proxy, tmp_path / "mirror")

    def files(layout: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}

    assert files(tmp_path / "mirror") == files(tmp_path / "direct")
    # (skopeo gzips these made-up layers on the way; it does so alike on both paths.)
    # Every blob came through the peer.
    assert metric(f"http://{peer.proxy}/metrics", "naiad_p2p_client_bytes_total") == sum(map(len, blobs))
    index = "index.json"
    assert (tmp_path / "mirror" / index).read_bytes() == (tmp_path / "direct" / index).read_bytes()


def test_preheat_puts_an_image_on_the_seed_before_nodes_ask(cluster: Cluster, registry) -> None:
    repo = unique_repo("preheat")
    tag, blobs = _push_image(registry.host, repo)
    seed = cluster.peer("seed", "--seed")
    node = cluster.peer("node")
    cluster.wait_peers(2)
    out = subprocess.run([sys.executable, "-m", "naiad", "preheat", f"{registry.host}/{repo}:{tag}",
                          "--scheduler", cluster.scheduler_addr, "--token-file", str(cluster.token_file),
                          "--json", "--timeout", "60"], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr + cluster.logs()
    result = json.loads(out.stdout)
    assert result["done"] and result["blobs"] == 3 and set(result["seeds"].values()) == {seed.id}
    before = {sha(b): registry_blob_bytes(registry, sha(b)) for b in blobs}
    assert all(before[sha(b)] == len(b) for b in blobs)  # the seed fetched each once
    for blob in blobs:
        r = get(blob_url(node, registry.host, repo, sha(blob)))
        assert r.content == blob
        # From the seed, not the registry.
        assert registry_blob_bytes(registry, sha(blob)) == before[sha(blob)]


def test_restart_keeps_the_store_and_the_scheduler_relearns_it(cluster: Cluster, registry) -> None:
    data = secrets.token_bytes(3 * PIECE)
    repo = unique_repo("restart")
    digest = push_blob(registry.host, repo, data)
    peer = cluster.peer("node")
    assert get(blob_url(peer, registry.host, repo, digest)).content == data
    fetched = registry_blob_bytes(registry, digest)
    peer.stop()
    # Bit rot while it was down: one stored piece is corrupt; it must never reach a client.
    piece = next(p for p in (peer.data / "tasks" / digest[7:]).iterdir() if p.name.startswith("1."))
    raw = bytearray(piece.read_bytes())
    raw[100] ^= 1
    piece.write_bytes(bytes(raw))
    # The scheduler restarts too (same address): its state comes back from the peer's announcement.
    addr = cluster.scheduler_addr
    cluster.scheduler.stop()
    cluster.start_scheduler(addr)
    peer.start()
    # The corrupt piece is caught by the start-up check of the whole blob (or its first read).
    wait_for(lambda: _holders(cluster, digest).get(peer.id, 0) >= 2, "the scheduler to relearn the pieces")
    assert get(blob_url(peer, registry.host, repo, digest)).content == data
    # Only the corrupt piece was fetched again.
    assert registry_blob_bytes(registry, digest) - fetched == PIECE


def test_parent_dying_mid_piece_does_not_fail_the_read(cluster: Cluster, registry) -> None:
    data = secrets.token_bytes(2 * PIECE)
    repo = unique_repo("parentdies")
    digest = push_blob(registry.host, repo, data)
    parent = cluster.peer("parent", "--upload-rate", "1M")  # a 4 MiB piece takes ~3 s to upload
    child = cluster.peer("child")
    cluster.wait_peers(2)
    assert get(blob_url(parent, registry.host, repo, digest)).content == data
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(get, blob_url(child, registry.host, repo, digest), 0, PIECE)
        time.sleep(1.0)
        parent.kill()
        r = future.result(timeout=60)
    assert r.status_code == 206 and r.content == data[:PIECE], cluster.logs()


def test_corrupt_parent_is_detected_reported_and_avoided(cluster: Cluster, registry, tmp_path: Path) -> None:
    data = secrets.token_bytes(2 * PIECE)
    repo = unique_repo("corrupt")
    digest = push_blob(registry.host, repo, data)
    (tmp_path / "blob").write_bytes(data)
    with open(tmp_path / "evil.log", "w") as log:
        evil = subprocess.Popen([sys.executable, str(Path(__file__).with_name("p2p_evil.py")),
                                 cluster.scheduler_addr, str(cluster.token_file), str(tmp_path / "blob")],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while "evil ready" not in (tmp_path / "evil.log").read_text():
            assert time.monotonic() < deadline and evil.poll() is None, (tmp_path / "evil.log").read_text()
            time.sleep(0.1)
        child = cluster.peer("child")
        r = get(blob_url(child, registry.host, repo, digest), 0, PIECE)
        assert r.content == data[:PIECE]  # the corrupt bytes never reached the client
        assert "served 0" in (tmp_path / "evil.log").read_text()
        evil_peer = next(p for p in cluster.status()["peers"] if p["id"] == "evil")
        assert evil_peer["banned"]
        # The scheduler no longer names it: the next piece comes from the source, untouched.
        r = get(blob_url(child, registry.host, repo, digest), PIECE, 2 * PIECE)
        assert r.content == data[PIECE:]
        assert "served 1" not in (tmp_path / "evil.log").read_text()
    finally:
        evil.kill()
        evil.wait()


def test_scheduler_down_peers_fall_back_to_the_registry(cluster: Cluster, registry) -> None:
    data = secrets.token_bytes(2 * PIECE + 5)
    repo = unique_repo("nosched")
    digest = push_blob(registry.host, repo, data)
    peer = cluster.peer("node")
    cluster.scheduler.kill()
    t0 = time.monotonic()
    r = get(blob_url(peer, registry.host, repo, digest))
    assert r.status_code == 200 and r.content == data
    assert time.monotonic() - t0 < 20


def test_registry_down_gives_a_clear_502(cluster: Cluster, fault_proxy, registry) -> None:
    data = secrets.token_bytes(PIECE + 5)
    repo = unique_repo("noreg")
    digest = push_blob(registry.host, repo, data)
    dead = f"127.0.0.1:{free_port()}"
    peer = cluster.peer("node", "--allow-registry", f"{dead},{fault_proxy.host}")
    t0 = time.monotonic()
    r = get(f"http://{peer.proxy}/v2/{repo}/blobs/{digest}?ns={dead}")
    assert r.status_code == 502 and "UNAVAILABLE" in r.text and dead in r.text
    r = get(f"http://{peer.proxy}/v2/{repo}/manifests/v1?ns={dead}")
    assert r.status_code == 502
    # The registry answers HEAD but fails every blob GET: bounded retries, then 502.
    fault_proxy.fail_next(100, 503, method="GET", path_contains="/blobs/")
    r = get(f"http://{peer.proxy}/v2/{repo}/blobs/{digest}?ns={fault_proxy.host}", 0, 10)
    assert r.status_code == 502, r.text
    assert time.monotonic() - t0 < 40


def test_cluster_token_and_allow_list_are_enforced(cluster: Cluster, registry) -> None:
    data = secrets.token_bytes(1000)
    repo = unique_repo("auth")
    digest = push_blob(registry.host, repo, data)
    peer = cluster.peer("node")
    assert get(blob_url(peer, registry.host, repo, digest)).content == data
    piece = f"http://{peer.listen}/api/v1/pieces/{digest}/0"
    wrong = ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": cluster.token})
    for headers in wrong:
        assert httpx.get(piece, headers=headers).status_code == 401
        assert httpx.get(f"http://{cluster.scheduler_addr}/api/v1/status", headers=headers).status_code == 401
    good = {"Authorization": f"Bearer {cluster.token}"}
    assert httpx.get(piece, headers=good).content == data
    # Only pieces of held tasks, by digest: nothing else is reachable through the piece server.
    assert httpx.get(f"http://{peer.listen}/api/v1/pieces/{sha(b'x')}/0", headers=good).status_code == 404
    # The mirror refuses registries outside its allow-list, and anything but reads.
    r = httpx.get(f"http://{peer.proxy}/v2/{repo}/blobs/{digest}?ns=example.com")
    assert r.status_code == 403 and "allow-registry" in r.text
    assert httpx.get(f"http://{peer.proxy}/v2/{repo}/manifests/v1?ns=evil.example:443").status_code == 403
    assert httpx.post(f"http://{peer.proxy}/v2/{repo}/blobs/uploads/").status_code == 405
    assert httpx.get(f"http://{peer.proxy}/v2/{repo}/blobs/sha256:abc").status_code == 400
    assert httpx.get(f"http://{peer.proxy}/v2/../../etc/passwd").status_code == 404
    assert metric(f"http://{peer.proxy}/metrics", "naiad_p2p_source_bytes_total") == 1000


def test_bad_flags_are_one_line_errors(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("short\n")
    token.chmod(0o600)

    def naiad(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "naiad", *argv], capture_output=True, text=True,
                              timeout=30)

    out = naiad("scheduler", "--listen", "127.0.0.1:0", "--token-file", str(token))
    assert out.returncode == 1 and "at least 16 characters" in out.stderr and "Traceback" not in out.stderr
    token.write_text(secrets.token_hex(16))
    token.chmod(0o644)
    out = naiad("scheduler", "--listen", "127.0.0.1:0", "--token-file", str(token))
    assert out.returncode == 1 and "chmod 600" in out.stderr
    token.chmod(0o600)
    out = naiad("scheduler", "--listen", "nowhere", "--token-file", str(token))
    assert out.returncode == 1 and "HOST:PORT" in out.stderr
    base = ["peer", "--listen", "127.0.0.1:0", "--scheduler", "127.0.0.1:1", "--token-file", str(token),
            "--data", str(tmp_path / "d"), "--allow-registry", "127.0.0.1:5000"]
    out = naiad(*base, "--proxy", "0.0.0.0:0")
    assert out.returncode == 1 and "loopback" in out.stderr and "Traceback" not in out.stderr
    out = naiad("p2p", "status", "--scheduler", f"127.0.0.1:{free_port()}", "--token-file", str(token))
    assert out.returncode == 1 and out.stderr.startswith("naiad: error: scheduler")


def test_status_shows_peers_tasks_and_who_downloaded_from_whom(cluster: Cluster, registry) -> None:
    data = secrets.token_bytes(PIECE + 1)
    repo = unique_repo("status")
    digest = push_blob(registry.host, repo, data)
    a, b = cluster.peer("a"), cluster.peer("b")
    cluster.wait_peers(2)
    get(blob_url(a, registry.host, repo, digest))
    get(blob_url(b, registry.host, repo, digest))
    argv = [sys.executable, "-m", "naiad", "p2p", "status", "--scheduler", cluster.scheduler_addr,
            "--token-file", str(cluster.token_file)]
    status = json.loads(subprocess.run([*argv, "--json"], capture_output=True, text=True, check=True).stdout)
    assert {p["id"] for p in status["peers"]} == {a.id, b.id}
    task = next(t for t in status["tasks"] if t["digest"] == digest)
    assert {"child": b.id, "parent": a.id, "bytes": len(data)} in task["edges"]
    text = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert f"{b.id} <- {a.id}" in text
    assert metric(f"http://{cluster.scheduler_addr}/metrics", "naiad_scheduler_peer_bytes_total") == len(data)


def test_upload_slots_and_rate_limit_what_a_peer_serves(cluster: Cluster, registry) -> None:
    data = secrets.token_bytes(2 * PIECE)
    repo = unique_repo("limits")
    digest = push_blob(registry.host, repo, data)
    peer = cluster.peer("node", "--upload-slots", "1", "--upload-rate", "2M")
    assert get(blob_url(peer, registry.host, repo, digest)).content == data
    good = {"Authorization": f"Bearer {cluster.token}"}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        t0 = time.monotonic()
        url = f"http://{peer.listen}/api/v1/pieces/{digest}"
        first = pool.submit(httpx.get, f"{url}/0", headers=good, timeout=30)
        # The first upload holds the only slot (4 MiB at 2 MiB/s: about 1.5 s) once it sends.
        wait_for(lambda: metric(f"http://{peer.proxy}/metrics", "naiad_p2p_served_bytes_total") > 0,
                 "the first upload to start", timeout=10)
        second = httpx.get(f"{url}/1", headers=good, timeout=30)
        assert second.status_code == 503 and second.headers["retry-after"] == "1"
        assert first.result().content == data[:PIECE]
        assert time.monotonic() - t0 >= 1.0  # the 1 MiB burst, then 2 MiB/s
    assert metric(f"http://{peer.proxy}/metrics", "naiad_p2p_upload_refused_total") == 1


def test_two_schedulers_split_tasks_by_consistent_hashing(cluster: Cluster, registry) -> None:
    from naiad.p2p.client import Ring

    first = cluster.scheduler_addr
    argv = ["scheduler", "--listen", "127.0.0.1:0", "--token-file", str(cluster.token_file)]
    second = Daemon("scheduler2", argv, cluster.root / "scheduler2.log", re.compile(r"listening on (\S+)"))
    cluster.daemons.append(second)
    second.start()
    both = f"{first},{second.match[1]}"
    a, b = cluster.peer("a", scheduler=both), cluster.peer("b", scheduler=both)
    ring = Ring([first, second.match[1]])
    repo = unique_repo("ring")
    per_scheduler: dict[str, dict[str, bytes]] = {first: {}, second.match[1]: {}}
    while min(map(len, per_scheduler.values())) < 2:  # two blobs owned by each scheduler
        data = secrets.token_bytes(100_000)
        per_scheduler[ring.owner(sha(data))][sha(data)] = data
    blobs = {d: data for group in per_scheduler.values() for d, data in group.items()}
    for data in blobs.values():
        push_blob(registry.host, repo, data)
    for digest, data in blobs.items():
        for peer in (a, b):
            assert get(blob_url(peer, registry.host, repo, digest)).content == data
        assert registry_blob_bytes(registry, digest) == len(data)  # b got it from a

    def tasks_on(addr: str) -> set[str]:
        r = httpx.get(f"http://{addr}/api/v1/status", headers={"Authorization": f"Bearer {cluster.token}"})
        return {t["digest"] for t in r.json()["tasks"]}

    for addr in (first, second.match[1]):
        assert tasks_on(addr) == {d for d in blobs if ring.owner(d) == addr}
