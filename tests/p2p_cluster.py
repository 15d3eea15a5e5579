"""Real P2P daemons for tests: a scheduler and peers as `naiad` processes on loopback, and their clients.

Every daemon binds port 0 and reports its addresses on its first stderr line;
`Cluster` keeps the processes and kills every one of them on exit (a test
that fails half-way leaves nothing running). Logs are kept per daemon, and
shown by `Cluster.logs()` when a test wants to say why it failed.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from naiad.oci.image import Descriptor
from naiad.oci.registry import RegistryClient

START_TIMEOUT = 30.0
_SCHED_RE = re.compile(r"naiad scheduler: listening on (\S+)")
_PEER_RE = re.compile(r"naiad peer (\S+): pieces on (\S+) \(as \S+\), mirror on (\S+),")


class Daemon:
    def __init__(self, name: str, argv: list[str], log: Path, pattern: re.Pattern[str],
                 env: dict[str, str] | None = None):
        self.name, self.argv, self.log = name, argv, log
        self.env = env or {}
        self._pattern = pattern
        self.proc: subprocess.Popen[bytes] | None = None
        self.match: re.Match[str] | None = None

    def start(self) -> Daemon:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        seen = self.log.stat().st_size if self.log.exists() else 0  # a restart appends to the same log
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "naiad", *self.argv], stdout=log, stderr=log,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[seen:].decode(errors="replace")
            found = list(self._pattern.finditer(text))
            if found:
                self.match = found[-1]
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not start in {START_TIMEOUT} s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class Peer(Daemon):
    def __init__(self, name: str, argv: list[str], log: Path, data: Path, env: dict[str, str] | None = None):
        super().__init__(name, argv, log, _PEER_RE, env)
        self.data = data

    @property
    def id(self) -> str:
        assert self.match
        return self.match[1]

    @property
    def listen(self) -> str:
        assert self.match
        return self.match[2]

    @property
    def proxy(self) -> str:
        assert self.match
        return self.match[3]


class Cluster:
    """A scheduler and peers under `root`; all killed on exit."""

    def __init__(self, root: Path, registry: str):
        self.root = root
        self.registry = registry
        self.token = secrets.token_hex(16)
        self.token_file = root / "token"
        self.token_file.write_text(self.token + "\n")
        self.token_file.chmod(0o600)
        self.daemons: list[Daemon] = []
        self.scheduler: Daemon | None = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        for d in self.daemons:
            d.kill()

    @property
    def scheduler_addr(self) -> str:
        assert self.scheduler and self.scheduler.match
        return self.scheduler.match[1]

    def start_scheduler(self, listen: str = "127.0.0.1:0", *extra: str) -> Daemon:
        d = Daemon("scheduler", ["scheduler", "--listen", listen, "--token-file", str(self.token_file),
                                 *extra], self.root / "scheduler.log", _SCHED_RE)
        self.daemons.append(d)
        self.scheduler = d.start()
        return d

    def peer(self, name: str, *extra: str, scheduler: str | None = None, start: bool = True,
             env: dict[str, str] | None = None) -> Peer:
        data = self.root / name
        data.mkdir(exist_ok=True)
        argv = ["peer", "--listen", "127.0.0.1:0", "--proxy", "127.0.0.1:0", "--data", str(data),
                "--scheduler", scheduler or self.scheduler_addr, "--token-file", str(self.token_file),
                "--allow-registry", self.registry, "--default-registry", self.registry, *extra]
        p = Peer(name, argv, self.root / f"{name}.log", data, env)
        self.daemons.append(p)
        return p.start() if start else p

    def logs(self) -> str:
        return "\n".join(f"--- {d.name}\n{d.log.read_text(errors='replace')[-4000:]}" for d in self.daemons)

    def status(self) -> dict:
        r = httpx.get(f"http://{self.scheduler_addr}/api/v1/status",
                      headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
        r.raise_for_status()
        return r.json()

    def wait_peers(self, n: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(p["alive"] for p in self.status()["peers"]) >= n:
                return
            time.sleep(0.1)
        raise AssertionError(f"{n} peers did not register:\n{self.logs()}")


def push_blob(registry: str, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with RegistryClient(registry) as client:
        client.push_blob_bytes(repo, data, Descriptor("application/octet-stream", digest, len(data)))
    return digest


def blob_url(peer: Peer, registry: str, repo: str, digest: str) -> str:
    return f"http://{peer.proxy}/v2/{repo}/blobs/{digest}?ns={registry}"


def get(url: str, start: int | None = None, end: int | None = None, timeout: float = 120.0) -> httpx.Response:
    """GET (bytes [start, end) when given), the body read whole."""
    headers = {} if start is None else {"Range": f"bytes={start}-{'' if end is None else end - 1}"}
    return httpx.get(url, headers=headers, timeout=timeout)


def registry_blob_bytes(registry_server: object, digest: str) -> int:
    """Bytes the registry sent in answers to GETs of the blob, once its access log has settled.

    The registry writes a request's line after the client has its bytes, so the count is read
    until two reads 0.1 s apart agree.
    """
    def count() -> int:
        return sum(e.size for e in registry_server.requests()  # type: ignore[attr-defined]
                   if e.method == "GET" and e.path.split("?")[0].endswith(digest))

    last = count()
    while True:
        time.sleep(0.1)
        now = count()
        if now == last:
            return now
        last = now


def metric(url: str, name: str) -> float:
    """The value of sample `name` (no labels) on a daemon's /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    raise KeyError(name)
