"""A network lab: a real registry behind a shaped link, in network namespaces of its own.

`lab()` is a context manager that builds, per lab (names carry a random token,
so labs of concurrent runs never collide):

    netns naiadlab-TOKEN-reg                      netns naiadlab-TOKEN-node
    docker-registry on 10.77.0.1:5000             the client side: naiad, skopeo
    nl-TOKEN-r (10.77.0.1/24) ──── veth ──── nl-TOKEN-n (10.77.0.2/24)
    egress: tc tbf rate R (or none)          egress: tbf too with shape_node() (pushes)

The registry is Debian's `docker-registry` (the CNCF distribution server)
with filesystem storage in a temporary directory. Client commands run in the
node namespace with `lab.node_argv(argv)`: `nsenter --net=...` switches the
network namespace only, so FUSE mounts made there are ordinary mounts of the
caller's mount namespace. `lab.shape(rate)` puts a token bucket filter on the
registry's egress (this kernel has tbf, no netem: no added latency),
`lab.shape_node(rate)` one on the node's egress (for pushes);
`lab.registry_tx_bytes()` and `lab.registry_rx_bytes()` read the registry
veth's `tx_bytes` and `rx_bytes` counters.

Everything is torn down on exit, also on an exception, Ctrl-C, SIGTERM or
SIGHUP: the registry and any other process left in the two namespaces are
ended, the namespaces (and so the veth pair) deleted, the storage removed.
Only the lab's 10.77.0.x addresses and loopback are used; the host's network
is not touched (except that `ip netns add` mounts `/run/netns` once per boot,
as it always does).

Try it: `python -m bench.netlab [--rate 100mbit]` starts a lab, pushes nothing,
prints its addresses and the registry's /v2/ answer, and tears it down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bench import BenchError
from bench.harness import end_process, require_tools

REGISTRY_ADDR = "10.77.0.1"
NODE_ADDR = "10.77.0.2"
PREFIX_LEN = 24
REGISTRY_PORT = 5000
START_TIMEOUT = 30.0

REGISTRY_CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {addr}
"""


def parse_rate(text: str | None) -> int | None:
    """'100mbit', '1gbit', '500kbit' or a number of bits per second; None or 'none' for unshaped."""
    if text is None or text.lower() in ("", "none", "unshaped"):
        return None
    units = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3, "bit": 1}
    low = text.lower()
    for unit, factor in units.items():
        if low.endswith(unit):
            return int(float(low.removesuffix(unit)) * factor)
    return int(low)


def rate_name(rate: int | None) -> str:
    """A network's label in tables: 'unshaped', '100 Mbit/s', '1 Gbit/s'."""
    if rate is None:
        return "unshaped"
    for factor, unit in ((10**9, "Gbit/s"), (10**6, "Mbit/s"), (10**3, "kbit/s")):
        if rate >= factor:
            return f"{rate / factor:g} {unit}"
    return f"{rate} bit/s"


@dataclasses.dataclass
class Lab:
    """A running lab. Use `lab()` to make one; its methods are valid inside the `with` only."""

    token: str
    registry_ns: str
    node_ns: str
    registry_dev: str
    node_dev: str
    storage: Path
    log_path: Path
    rate: int | None = None  # current egress limit of the registry, bits per second
    node_rate: int | None = None  # current egress limit of the node, bits per second
    registry_proc: subprocess.Popen | None = None

    @property
    def registry(self) -> str:
        """host:port of the registry, as seen from the node namespace."""
        return f"{REGISTRY_ADDR}:{REGISTRY_PORT}"

    def node_argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run in the node's network namespace (the caller's mount namespace is kept)."""
        return ["nsenter", f"--net=/run/netns/{self.node_ns}", "--", *argv]

    def registry_tx_bytes(self) -> int:
        """Bytes the registry's veth has sent so far (all traffic: headers and payload)."""
        out = _ip_out("netns", "exec", self.registry_ns, "cat",
                      f"/sys/class/net/{self.registry_dev}/statistics/tx_bytes")
        return int(out)

    def registry_cpu(self) -> float:
        """CPU seconds (user + sys) the registry process has used so far."""
        return process_cpu(self.registry_proc.pid) if self.registry_proc else 0.0

    def registry_rx_bytes(self) -> int:
        """Bytes the registry's veth has received so far (all traffic: headers and payload)."""
        out = _ip_out("netns", "exec", self.registry_ns, "cat",
                      f"/sys/class/net/{self.registry_dev}/statistics/rx_bytes")
        return int(out)

    def shape(self, rate: int | None) -> None:
        """Limit the registry's egress to `rate` bits/s with tbf, or remove the limit (None)."""
        _tbf(self.registry_ns, self.registry_dev, rate)
        self.rate = rate

    def shape_node(self, rate: int | None) -> None:
        """Limit the node's egress (what it sends the registry, e.g. a push) to `rate` bits/s, or unlimit."""
        _tbf(self.node_ns, self.node_dev, rate)
        self.node_rate = rate


@contextlib.contextmanager
def lab(rate: int | None = None, log: Callable[[str], None] | None = None) -> Iterator[Lab]:
    """Build a lab with an empty registry (egress limited to `rate` bits/s, None: unshaped); tear it down."""
    require_tools("ip", "tc", "nsenter", "docker-registry", why="the network lab")
    if os.geteuid() != 0:
        raise BenchError("the network lab needs root (ip netns, tc, mounts)")
    token = secrets.token_hex(3)
    work = Path(tempfile.mkdtemp(prefix=f"naiad-lab-{token}-"))
    the_lab = Lab(token=token, registry_ns=f"naiadlab-{token}-reg", node_ns=f"naiadlab-{token}-node",
                  registry_dev=f"nl-{token}-r", node_dev=f"nl-{token}-n", storage=work / "storage",
                  log_path=work / "registry.log")
    with _signals_raise():
        try:
            _build(the_lab)
            the_lab.shape(rate)
            _start_registry(the_lab, work, lambda argv: ["ip", "netns", "exec", the_lab.registry_ns, *argv],
                            the_lab.node_argv)
            if log:
                log(f"lab {token}: registry {the_lab.registry} in netns {the_lab.registry_ns}, "
                    f"node netns {the_lab.node_ns}, egress {rate_name(rate)}")
            yield the_lab
        finally:
            problems = _teardown(the_lab)
            shutil.rmtree(work, ignore_errors=True)
            if log:
                log(f"lab {token}: torn down" + (f" (problems: {'; '.join(problems)})" if problems else ""))


def _tbf(ns: str, dev: str, rate: int | None) -> None:
    """Put a token bucket filter of `rate` bits/s on `dev`'s egress in netns `ns`, or remove it (None)."""
    if rate is None:
        subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"],
                       capture_output=True)  # fails harmlessly when there is no qdisc
    else:
        # Burst: 10 ms worth of bytes (at least 64 KiB, so GSO packets pass whole);
        # queue: 50 ms worth of bytes.
        burst = max(rate // 8 // 100, 64 * 1024)
        _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
              "rate", f"{rate}bit", "burst", str(burst), "latency", "50ms"])


def _build(lab: Lab) -> None:
    reg, node = lab.registry_ns, lab.node_ns
    _run(["ip", "netns", "add", reg])
    _run(["ip", "netns", "add", node])
    # Made inside the registry namespace, the peer moved straight into the node's: the names
    # never appear in the host's namespace.
    _run(["ip", "-n", reg, "link", "add", lab.registry_dev, "type", "veth",
          "peer", "name", lab.node_dev, "netns", node])
    for ns, dev, addr in ((reg, lab.registry_dev, REGISTRY_ADDR), (node, lab.node_dev, NODE_ADDR)):
        _run(["ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", dev])
        _run(["ip", "-n", ns, "link", "set", dev, "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])


def _start_registry(lab: Lab | ClusterLab, work: Path, in_registry_ns: Callable[[list[str]], list[str]],
                    in_node_ns: Callable[[list[str]], list[str]]) -> None:
    """Start docker-registry in the registry's namespace; return once a node reaches its /v2/."""
    lab.storage.mkdir()
    config = work / "config.yml"
    config.write_text(REGISTRY_CONFIG.format(root=lab.storage, addr=lab.registry))
    with open(lab.log_path, "wb") as logf:
        # Set before waiting: the lab's teardown must end it if it never answers.
        lab.registry_proc = subprocess.Popen(
            in_registry_ns(["docker-registry", "serve", str(config)]),
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
    probe = in_node_ns([sys.executable, "-c", "import urllib.request; "
                        f"urllib.request.urlopen('http://{lab.registry}/v2/', timeout=2)"])
    deadline = time.monotonic() + START_TIMEOUT
    while subprocess.run(probe, capture_output=True).returncode != 0:
        if lab.registry_proc.poll() is not None:
            raise BenchError(f"the lab registry exited with {lab.registry_proc.returncode}; "
                             f"see {lab.log_path}: {_tail(lab.log_path)}")
        if time.monotonic() > deadline:
            raise BenchError(f"the lab registry did not answer on {lab.registry} within "
                             f"{START_TIMEOUT:.0f} s: {_tail(lab.log_path)}")
        time.sleep(0.1)


def _teardown(lab: Lab) -> list[str]:
    """Undo everything `lab()` made, as far as it got; returns what could not be undone."""
    # Processes still in the namespaces were started by this lab (e.g. a mount daemon).
    return _teardown_namespaces([lab.node_ns, lab.registry_ns], lab.registry_proc)


# --- several nodes on a bridge (the P2P benchmark) -------------------------------------

CLUSTER_NET = "10.78.0"
CLUSTER_REGISTRY = f"{CLUSTER_NET}.1"
CLUSTER_SCHEDULER = f"{CLUSTER_NET}.2"


@dataclasses.dataclass
class ClusterLab:
    """A registry, a scheduler host and `nodes` node hosts, each in its own netns, on one bridge.

    The bridge lives in a namespace of its own (`np2p-TOKEN-sw`); every host
    is joined to it by a veth pair. Egress of the registry is limited to
    `registry_rate`; every node's link to `node_rate` both ways (tbf on both
    ends of its veth), as a switch port would be.
    """

    token: str
    nodes: int
    storage: Path
    log_path: Path
    registry_proc: subprocess.Popen | None = None

    def ns(self, host: str) -> str:
        return f"np2p-{self.token}-{host}"

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(h) for h in ("sw", "reg", "sch", *(f"n{i}" for i in range(self.nodes)))]

    @property
    def registry(self) -> str:
        return f"{CLUSTER_REGISTRY}:{REGISTRY_PORT}"

    def node_addr(self, i: int) -> str:
        return f"{CLUSTER_NET}.{10 + i}"

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """`argv` run in host's network namespace ("reg", "sch", "n0", "n1", ...)."""
        return ["nsenter", f"--net=/run/netns/{self.ns(host)}", "--", *argv]

    def registry_tx_bytes(self) -> int:
        out = _ip_out("netns", "exec", self.ns("reg"), "cat", "/sys/class/net/reg0/statistics/tx_bytes")
        return int(out)

    def shape(self, rate: int | None) -> None:
        """Limit the registry's egress to `rate` bits/s with tbf, or remove the limit (None)."""
        _tbf(self.ns("reg"), "reg0", rate)


@contextlib.contextmanager
def cluster_lab(nodes: int, registry_rate: int | None, node_rate: int | None,
                log: Callable[[str], None] | None = None) -> Iterator[ClusterLab]:
    """Build a ClusterLab with an empty registry; tear everything down on the way out."""
    require_tools("ip", "tc", "nsenter", "docker-registry", why="the P2P network lab")
    if os.geteuid() != 0:
        raise BenchError("the network lab needs root (ip netns, tc)")
    token = secrets.token_hex(3)
    work = Path(tempfile.mkdtemp(prefix=f"naiad-p2plab-{token}-"))
    the_lab = ClusterLab(token, nodes, work / "storage", work / "registry.log")
    with _signals_raise():
        try:
            _build_cluster(the_lab, registry_rate, node_rate)
            _start_registry(the_lab, work, lambda argv: the_lab.argv("reg", argv),
                            lambda argv: the_lab.argv("n0", argv))
            if log:
                log(f"p2p lab {token}: registry {the_lab.registry} ({rate_name(registry_rate)}), "
                    f"{nodes} nodes ({rate_name(node_rate)} links) on a bridge")
            yield the_lab
        finally:
            problems = _teardown_namespaces(the_lab.namespaces, the_lab.registry_proc)
            shutil.rmtree(work, ignore_errors=True)
            if log:
                trouble = f" (problems: {'; '.join(problems)})" if problems else ""
                log(f"p2p lab {token}: torn down{trouble}")


def _build_cluster(lab: ClusterLab, registry_rate: int | None, node_rate: int | None) -> None:
    sw = lab.ns("sw")
    _run(["ip", "netns", "add", sw])
    _run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
    _run(["ip", "-n", sw, "link", "set", "br0", "up"])
    hosts = [("reg", CLUSTER_REGISTRY, registry_rate, None), ("sch", CLUSTER_SCHEDULER, None, None)]
    hosts += [(f"n{i}", lab.node_addr(i), node_rate, node_rate) for i in range(lab.nodes)]
    for host, addr, egress, ingress in hosts:
        ns = lab.ns(host)
        _run(["ip", "netns", "add", ns])
        # Made in the switch namespace, one end moved straight into the host's: no names in the host's.
        _run(["ip", "-n", sw, "link", "add", f"p-{host}", "type", "veth", "peer", "name", f"{host}0",
              "netns", ns])
        _run(["ip", "-n", sw, "link", "set", f"p-{host}", "master", "br0", "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", f"{host}0"])
        _run(["ip", "-n", ns, "link", "set", f"{host}0", "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        if egress is not None:
            _tbf(ns, f"{host}0", egress)
        if ingress is not None:
            _tbf(sw, f"p-{host}", ingress)  # what the switch sends the host: its download link


def _teardown_namespaces(namespaces: Sequence[str], proc: subprocess.Popen | None) -> list[str]:
    """End `proc` and every process left in `namespaces`, then delete the namespaces."""
    problems: list[str] = []
    if proc is not None:
        end_process(proc, timeout=5)
    existing = set(_ip_out("netns", "list").split()) if shutil.which("ip") else set()
    for ns in namespaces:
        if ns not in existing:
            continue
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = _netns_pids(ns)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while pids and _netns_pids(ns) and time.monotonic() < deadline:
                time.sleep(0.05)
        r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
        if r.returncode != 0:
            problems.append(f"ip netns del {ns}: {r.stderr.strip()}")
    return problems


def process_cpu(pid: int) -> float:
    """CPU seconds (user + sys, all threads) of a running process; 0.0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _netns_pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split() if p.isdigit() and int(p) != os.getpid()]


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit while the lab is up, so that teardown runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _run(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"`{' '.join(argv)}` failed: {r.stderr.strip()}")


def _ip_out(*args: str) -> str:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"`ip {' '.join(args)}` failed: {r.stderr.strip()}")
    return r.stdout.strip()


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.netlab", description=__doc__.splitlines()[0])
    parser.add_argument("--rate", help="registry egress limit, e.g. 100mbit (default: unshaped)")
    parser.add_argument("--hold", type=float, default=0, help="keep the lab up this many seconds")
    args = parser.parse_args(argv)
    with lab(parse_rate(args.rate), log=lambda m: print(m, file=sys.stderr)) as the_lab:
        answer = subprocess.run(the_lab.node_argv(["curl", "-si", f"http://{the_lab.registry}/v2/"]),
                                capture_output=True, text=True).stdout.splitlines()[:1]
        print(f"registry {the_lab.registry}: {answer}; tx_bytes {the_lab.registry_tx_bytes()}")
        time.sleep(args.hold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
