"""P2P distribution: N nodes pull the same blob, straight from the registry or through naiad peers.

A network lab (`bench/netlab.py: cluster_lab`) puts the registry, a scheduler
host and 16 node hosts in network namespaces on one bridge; tbf limits the
registry's egress to 100 Mbit/s and each node's link to 1 Gbit/s both ways.

Swarm: for N = 1, 4, 8, 16 (`--quick`: 1, 4) the first N nodes fetch the same
200 MB blob (`--quick`: 20 MB) at the same moment with curl, (a) from the
registry, (b) from their node's `naiad peer` mirror (fresh peers, fresh
scheduler per N). Reported: completion time p50 and max over the nodes,
registry egress (its veth's tx_bytes, headers included) over the blob size,
and for (b) the physical bound max(size/registry_bw, size/node_bw). A peer
checks the whole-blob digest before it hands out the last bytes, so a curl
that completes got the right blob.

Lazy: 1,000 random 1 MiB Range reads (`--quick`: 100) of a 500 MB blob
(`--quick`: 60 MB), one at a time as a lazy filesystem issues them: (a)
straight from the registry, (b) through a peer when no peer holds the data,
(c) through another peer while the peer of (b) holds what it read.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import BenchError, Context, Table, benchmark
from bench.harness import end_process, mb, naiad_argv, pass_fail, require_tools, scratch
from bench.netlab import CLUSTER_SCHEDULER, ClusterLab, cluster_lab, parse_rate, rate_name

REGISTRY_RATE = parse_rate("100mbit")
NODE_RATE = parse_rate("1gbit")
PEER_PORT, PROXY_PORT, SCHEDULER_PORT = 7001, 5001, 7000
READ_SIZE = 1 << 20
START_TIMEOUT = 60.0
_READY_RE = re.compile(r"naiad peer \S+: pieces on")


def _blob(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(os.urandom(n))
            left -= n


def _push(lab: ClusterLab, path: Path, repo: str) -> str:
    out = subprocess.run(lab.argv("n0", [sys.executable, "-m", "bench.p2p", "push", str(path), lab.registry,
                                         repo]), capture_output=True, text=True)
    if out.returncode != 0:
        raise BenchError(f"pushing the test blob failed: {out.stderr.strip()[-500:]}")
    return out.stdout.strip()


class PeerCluster:
    """A scheduler and one peer per node, started fresh; everything stopped on exit."""

    def __init__(self, lab: ClusterLab, work: Path, nodes: list[int]):
        self.lab, self.work, self.nodes = lab, work, nodes
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> PeerCluster:
        token = self.work / "token"
        token.write_text(secrets.token_hex(16))
        token.chmod(0o600)
        sched = f"{CLUSTER_SCHEDULER}:{SCHEDULER_PORT}"
        self._start("sch", ["scheduler", "--listen", sched, "--token-file", str(token),
                            "--log-level", "warning"])
        logs = []
        for i in self.nodes:
            data = self.work / f"peer-n{i}-{secrets.token_hex(2)}"
            logs.append(self._start(f"n{i}", [
                "peer", "--listen", f"{self.lab.node_addr(i)}:{PEER_PORT}",
                "--proxy", f"127.0.0.1:{PROXY_PORT}",
                "--scheduler", sched, "--token-file", str(token), "--data", str(data),
                "--allow-registry", self.lab.registry, "--insecure-registry", self.lab.registry,
                "--log-level", "warning"]))
        deadline = time.monotonic() + START_TIMEOUT
        for log in logs:
            while not _READY_RE.search(log.read_text(errors="replace")):
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    raise BenchError(f"a peer did not start: {log.read_text()[-500:]}")
                time.sleep(0.1)
        time.sleep(1.5)  # a heartbeat: every peer is known to the scheduler
        return self

    def _start(self, host: str, argv: list[str]) -> Path:
        log = self.work / f"{host}-{len(self.procs)}.log"
        with open(log, "wb") as f:
            self.procs.append(subprocess.Popen(self.lab.argv(host, naiad_argv(*argv)), stdout=f, stderr=f,
                                               start_new_session=True))
        return log

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:  # all at once, then wait for each: they stop in parallel
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            end_process(p)


def _pull_all(lab: ClusterLab, urls: dict[int, str], size: int) -> list[float]:
    """Start one curl per node at once; each node's completion time in seconds."""
    fmt = "%{http_code} %{size_download} %{time_total}"
    procs = {i: subprocess.Popen(lab.argv(f"n{i}", ["curl", "-sS", "-o", "/dev/null", "-w", fmt, url]),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, url in urls.items()}
    times = []
    for i, p in procs.items():
        out, err = p.communicate(timeout=3600)
        parts = out.split()
        if p.returncode != 0 or len(parts) != 3 or parts[0] != "200" or int(parts[1]) != size:
            raise BenchError(f"node {i}: pull failed: {out.strip()} {err.strip()[-300:]}")
        times.append(float(parts[2]))
    return times


def _swarm(ctx: Context, lab: ClusterLab, work: Path, counts: list[int],
           size: int) -> tuple[Table, list[dict]]:
    blob = work / "swarm.blob"
    _blob(blob, size)
    digest = _push(lab, blob, "bench/swarm")
    blob.unlink()
    rows, points = [], []
    bound = max(size * 8 / REGISTRY_RATE, size * 8 / NODE_RATE)
    for n in counts:
        for method in ("registry", "naiad-p2p"):
            before = lab.registry_tx_bytes()
            if method == "registry":
                urls = {i: f"http://{lab.registry}/v2/bench/swarm/blobs/{digest}" for i in range(n)}
                times = _pull_all(lab, urls, size)
            else:
                with PeerCluster(lab, work, list(range(n))):
                    url = f"http://127.0.0.1:{PROXY_PORT}/v2/bench/swarm/blobs/{digest}?ns={lab.registry}"
                    times = _pull_all(lab, dict.fromkeys(range(n), url), size)
            egress = lab.registry_tx_bytes() - before
            point = {"n": n, "method": method, "p50": statistics.median(times), "max": max(times),
                     "egress": egress / size}
            points.append(point)
            ctx.log(f"p2p swarm N={n} {method}: p50 {point['p50']:.1f} s, max {point['max']:.1f} s, "
                    f"egress {point['egress']:.2f}x")
    for n in counts:
        a = next(p for p in points if p["n"] == n and p["method"] == "registry")
        b = next(p for p in points if p["n"] == n and p["method"] == "naiad-p2p")
        ok = b["egress"] <= 1.1 and (n < 16 or (b["max"] <= 1.5 * bound and a["max"] >= 8 * b["max"]))
        rows.append([str(n), f"{a['p50']:.1f} / {a['max']:.1f}", f"{a['egress']:.2f}x",
                     f"{b['p50']:.1f} / {b['max']:.1f}", f"{b['egress']:.2f}x", f"{bound:.1f}",
                     f"{b['max'] / bound:.2f}", f"{a['max'] / b['max']:.1f}x", pass_fail(ok)])
    table = Table(
        f"N nodes pull one {mb(size)} MB blob (registry {rate_name(REGISTRY_RATE)}, "
        f"nodes {rate_name(NODE_RATE)})",
        ["N", "registry p50/max s", "registry egress", "p2p p50/max s", "p2p egress", "bound s",
         "p2p max/bound", "speed-up (max)", "targets"], rows,
        notes=["egress: bytes the registry's veth sent (headers included) / blob size. bound: "
               "max(size/registry_bw, size/node_bw), without scheduling overhead. Targets: p2p egress "
               "<= 1.1x for every N; at N = 16 also p2p max <= 1.5x bound and >= 8x faster than the "
               "registry."])
    return table, points


def _lazy(ctx: Context, lab: ClusterLab, work: Path, size: int, reads: int) -> Table:
    blob = work / "lazy.blob"
    _blob(blob, size)
    digest = _push(lab, blob, "bench/lazy")
    blob.unlink()
    results = {}

    def run(host: str, url: str) -> dict[str, float]:
        out = subprocess.run(lab.argv(host, [sys.executable, "-m", "bench.p2p", "reads", url, str(size),
                                             str(reads), "7"]), capture_output=True, text=True)
        if out.returncode != 0:
            raise BenchError(f"lazy reads via {url} failed: {out.stderr.strip()[-500:]}")
        return json.loads(out.stdout)

    results["(a) registry"] = run("n0", f"http://{lab.registry}/v2/bench/lazy/blobs/{digest}")
    with PeerCluster(lab, work, [1, 2]):
        url = f"http://127.0.0.1:{PROXY_PORT}/v2/bench/lazy/blobs/{digest}?ns={lab.registry}"
        before = lab.registry_tx_bytes()
        results["(b) peer, no peer has it"] = run("n1", url)
        time.sleep(2)  # the pieces (b) started are complete and announced
        results["(c) peer, another has it"] = run("n2", url)
        egress = lab.registry_tx_bytes() - before
    base = results["(a) registry"]["p99"]
    rows = []
    for name, r in results.items():
        ratio = r["p99"] / base
        rows.append([name, f"{r['p50'] * 1000:.1f}", f"{r['p99'] * 1000:.1f}", f"{ratio:.2f}",
                     pass_fail(ratio <= 2.0) if name != "(a) registry" else ""])
        ctx.log(f"p2p lazy {name}: p50 {r['p50'] * 1000:.1f} ms, p99 {r['p99'] * 1000:.1f} ms")
    return Table(f"{reads} random 1 MiB Range reads of a {mb(size)} MB blob, one at a time",
                 ["path", "p50 ms", "p99 ms", "p99 / p99(a)", "target <= 2x"], rows,
                 notes=[f"Registry egress during (b) and (c): {egress / size:.2f}x the blob size "
                        f"(pieces are 4 MiB; the reader's bytes come first, the rest of the piece after)."])


def _plot(path: Path, points: list[dict], bound: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, style in (("registry", "o-"), ("naiad-p2p", "s-")):
        pts = [p for p in points if p["method"] == method]
        ns = [p["n"] for p in pts]
        left.plot(ns, [p["max"] for p in pts], style, label=f"{method} (max)")
        right.plot(ns, [p["egress"] for p in pts], style, label=method)
    ns = sorted({p["n"] for p in points})
    left.plot(ns, [bound] * len(ns), "k--", label="physical bound")
    left.set(xlabel="nodes pulling at once", ylabel="completion time (s)", yscale="log", xticks=ns)
    right.plot(ns, [1.1] * len(ns), "k:", label="target 1.1x")
    right.set(xlabel="nodes pulling at once", ylabel="registry egress / blob size", yscale="log", xticks=ns)
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@benchmark("p2p", "P2P distribution: N nodes, one blob; lazy reads through peers")
def run(ctx: Context) -> list[Table]:
    require_tools("curl", why="the P2P benchmark")
    counts = [1, 4] if ctx.quick else [1, 4, 8, 16]
    size = 20 * 10**6 if ctx.quick else 200 * 10**6
    with scratch("p2p") as work, cluster_lab(max(*counts, 3), REGISTRY_RATE, NODE_RATE, ctx.log) as lab:
        swarm, points = _swarm(ctx, lab, work, counts, size)
        lazy = _lazy(ctx, lab, work, 60 * 10**6 if ctx.quick else 500 * 10**6, 100 if ctx.quick else 1000)
    plot = ctx.artifact("p2p.png")
    if plot is not None:
        try:
            _plot(plot, points, max(size * 8 / REGISTRY_RATE, size * 8 / NODE_RATE))
            swarm.notes.append(f"Plot: {plot.name}")
        except ImportError:
            swarm.notes.append("(no plot: matplotlib is not installed: pip install -e '.[bench]')")
    return [swarm, lazy]


# --- helpers run inside the lab's namespaces --------------------------------------------------

def _cmd_push(path: str, registry: str, repo: str) -> None:
    import hashlib

    from naiad.oci.image import Descriptor, RegistryOptions
    from naiad.oci.registry import RegistryClient

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    digest = "sha256:" + h.hexdigest()
    with RegistryClient(registry, RegistryOptions(plain_http=True), push=True) as client:
        desc = Descriptor("application/octet-stream", digest, os.path.getsize(path))
        client.push_blob_file(repo, path, desc)
    print(digest)


def _cmd_reads(url: str, size: int, count: int, seed: int) -> None:
    import httpx

    rng = random.Random(seed)
    latencies = []
    with httpx.Client(timeout=120) as client:
        for _ in range(count):
            start = rng.randrange(0, size - READ_SIZE)
            t0 = time.perf_counter()
            r = client.get(url, headers={"Range": f"bytes={start}-{start + READ_SIZE - 1}"})
            if r.status_code != 206 or len(r.content) != READ_SIZE:
                raise SystemExit(f"read at {start}: HTTP {r.status_code}, {len(r.content)} bytes")
            latencies.append(time.perf_counter() - t0)
    latencies.sort()
    print(json.dumps({"p50": latencies[len(latencies) // 2],
                      "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}))


if __name__ == "__main__":
    if sys.argv[1] == "push":
        _cmd_push(*sys.argv[2:5])
    elif sys.argv[1] == "reads":
        _cmd_reads(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
