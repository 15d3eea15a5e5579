"""Cold start: time from the first command to the app's ready line, plain OCI beside naiad, in a network lab.

A lab (`bench/netlab.py`) runs a real registry in a network namespace of its
own, behind a veth whose egress is limited with tbf; the client commands run
in a node namespace. Each workload (`WORKLOADS`; `--workload` picks some) is
pushed once as an OCI image (`skopeo copy`, `REPO:v1`) and as a naiad image
(`naiad convert`, `REPO:v1-naiad`) into a lab of its own. Then, per network
(torchapp: unshaped, 100 Mbit/s, 1 Gbit/s; the other workloads: unshaped and
100 Mbit/s; `--quick`: unshaped; `--networks` overrides) and repetition, each
method runs once, in an order rotated every repetition. Every run is cold: its
content and caches are removed and the page cache dropped (`sync; echo 3 >
/proc/sys/vm/drop_caches`) right before it.

- `oci`: a private containerd (`tests/containerd_server.py`: own root, state and
  socket, fresh for every run, so no content, snapshots or images survive) in
  the node namespace with the overlayfs snapshotter: `ctr image pull
  --plain-http REG/REPO:v1`, then `ctr run --rm` until the ready line. The pull
  is split at its "unpacking" line into fetch and unpack; run is timed apart.
- `naiad-containerd`: the same containerd with the naiad snapshotter as a proxy
  plugin (`naiad snapshotter --address SOCK --root DIR --plain-http`, started
  for the run with a NAIAD_HOME of its own): `ctr-remote image rpull
  --plain-http --snapshotter naiad REG/REPO:v1-naiad`, then `ctr run
  --snapshotter naiad --rm`; skipped with a note while `naiad snapshotter` is
  not built.
- `naiad-lazy`: `naiad run --plain-http REG/REPO:v1-naiad` (a runc container
  on an overlay of the lazy mount) when `naiad run` exists; else the mount path:
- `naiad-mountd`: `naiad run` as above with `naiad mountd` resident in the node
  (started untimed before the page cache is dropped, as containerd is for
  `oci`): the mount daemon is forked from it, its code already loaded, instead
  of a new Python process.
- `naiad-mount`: `naiad mount --plain-http REF MNT` and the entrypoint run
  chrooted (below) on an overlayfs (lower: the read-only lazy mount; upper: a
  temp dir); with `naiad stats` of the mount. Measured beside `naiad run` too,
  for its statistics and to show what the container runtime costs.
- `naiad-optimized`: the same on the image `naiad optimize` wrote (prefetch
  list from a recorded run); skipped with a note while that command is absent.
- `naiad-hinted`: the same on the image `naiad optimize --from-hints` wrote
  (prefetch list from the access hints' walk from the entrypoint: no run).
- `floor`: the app chrooted into a rootfs unpacked beforehand (`umoci raw
  unpack`), warm (page cache hot after one untimed run) and cold (after
  dropping the page cache).

A chrooted run is `unshare --mount --propagation private` + a shell that
mounts the overlay (naiad) and rbinds /dev, /proc and /sys into the root, then
`unshare --root=ROOT --wd=WORKDIR` (chroot + chdir) execs the image's
entrypoint with the image's environment: every mount dies with that private
mount namespace, whatever happens. Registry bytes are the registry veth's
`tx_bytes` (headers included) from the first command to the ready line; naiad's
own `bytes_fetched` etc. come from `naiad stats --json` a moment later.

Workloads (`bench/images.py`): torchapp (entrypoint `/opt/venv/bin/python
/app/main.py`), nodeapp (an Express app on Debian's Node.js) and djangoapp
(Django + sympy + botocore from Debian packages: many small files read at start);
`--quick` the quickapp image (the standard library plus this Python's
interpreter; it imports a few modules and prints `ready`). Each declares its
ready line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import select
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import BenchError, Context, Table, benchmark
from bench.harness import (
    end_process,
    machine_busy_seconds,
    mb,
    median,
    naiad_argv,
    pass_fail,
    require_tools,
    run_measured,
    scratch,
    spread,
)
from bench.images import (
    DEBIAN_APPS,
    TORCHAPP_TAG,
    Image,
    debian_app,
    image_config,
    layer_sizes,
    quickapp,
    torchapp,
)
from bench.netlab import ClusterLab, Lab, cluster_lab, lab, parse_rate, process_cpu, rate_name
from bench.p2p import PROXY_PORT, PeerCluster
from tests.containerd_server import PROXY_PLUGIN, Containerd

READY_TIMEOUT = 900.0  # seconds from a method's start to its ready line
AFTER_READY_TIMEOUT = 60.0  # how long the app may keep running after its ready line
STATS_SETTLE = 1.2  # naiad mount daemons refresh stats.json every second
SNAPSHOTTER_MOUNTD_WAIT = 5.0  # s, for the snapshotter's mountd to listen
SNAPSHOTTER_START_TIMEOUT = 30.0  # seconds for `naiad snapshotter` to make its socket

METHODS = ("oci", "naiad-containerd", "naiad-lazy", "naiad-nohints", "naiad-mountd", "naiad-mount",
           "naiad-mount-fuse", "naiad-optimized", "naiad-hinted", "floor-warm", "floor-cold")
RUN_LABEL = "`naiad run`"
MOUNT_LABEL = "`naiad mount` + chroot on overlayfs"
LABELS = {
    "oci": "oci: containerd, overlayfs: `ctr image pull` + `ctr run --rm`",
    "naiad-containerd": "naiad-containerd: `ctr-remote image rpull` + `ctr run`, naiad snapshotter",
    "naiad-lazy": "naiad-lazy: {how}",
    "naiad-nohints": "naiad-nohints: `naiad run --no-hints` (pure lazy: no access hints followed)",
    "naiad-mountd": "naiad-mountd: `naiad run`, its mount daemon forked by a resident `naiad mountd`",
    "naiad-mount": f"naiad-mount: {MOUNT_LABEL} (no runc; for its stats)",
    "naiad-mount-fuse": "naiad-mount-fuse: the same with `--mode fuse` (Python serves the whole tree)",
    "naiad-optimized": "naiad-optimized: {how} of the optimized image",
    "naiad-hinted": "naiad-hinted: {how} of the image `naiad optimize --from-hints` wrote (no run)",
    "floor-warm": "floor-warm: chroot run on the unpacked rootfs",
    "floor-cold": "floor-cold: the same after drop_caches",
}
# What `--methods` selects: METHODS' names (floor: both floor rows) and the N-node one.
SELECTABLE = ("oci", "naiad-containerd", "naiad-lazy", "naiad-nohints", "naiad-mountd", "naiad-mount",
              "naiad-mount-fuse", "naiad-optimized", "naiad-hinted", "floor", "naiad-p2p")
P2P_NODES, P2P_NODES_QUICK = 4, 2  # nodes starting the image at once in naiad-p2p (`--p2p-nodes`)
SWARM_LABELS = {
    True: "naiad-p2p: `naiad run --p2p-proxy` through each node's peer",
    False: "baseline: `naiad run`, each node straight to the registry",
}
NETWORKS_FULL: tuple[int | None, ...] = (None, 100 * 10**6, 10**9)
NETWORKS_QUICK: tuple[int | None, ...] = (None,)
NETWORKS_EXTRA: tuple[int | None, ...] = (None, 100 * 10**6)  # workloads beside torchapp: keep the run short
# Issue 3's targets for naiad lazy on torchapp.
TARGET_SECONDS = {None: 2.5, 100 * 10**6: 8.0}
TARGET_BYTES_SHARE = 0.25
TARGET_SPEEDUP = 5.0


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    """A workload the benchmark knows: how to get its image, its ready line, the networks it runs on."""

    image: Callable[[Context], Image]
    ready: str
    networks: tuple[int | None, ...]


def _debian_spec(name: str) -> WorkloadSpec:
    return WorkloadSpec(lambda ctx: debian_app(ctx, name), DEBIAN_APPS[name].ready, NETWORKS_EXTRA)


WORKLOADS: dict[str, WorkloadSpec] = {  # the full run's, in order
    TORCHAPP_TAG: WorkloadSpec(torchapp, "ready", NETWORKS_FULL),
    **{name: _debian_spec(name) for name in DEBIAN_APPS},
}
QUICK_WORKLOADS: dict[str, WorkloadSpec] = {"quickapp": WorkloadSpec(quickapp, "ready", NETWORKS_QUICK)}


@dataclasses.dataclass(frozen=True)
class Workload:
    """An image and how to run it: entrypoint, environment and working dir from its config."""

    name: str
    image: Image
    argv: list[str]
    env: dict[str, str]
    cwd: str
    ready: str  # the start of the line the app prints when it is ready


@dataclasses.dataclass
class Sample:
    """One cold start of one method."""

    method: str
    network: int | None
    ready: float  # seconds from the first command to the ready line
    parts: dict[str, float] = dataclasses.field(default_factory=dict)  # e.g. fetch/unpack/run
    registry_bytes: int | None = None  # sent by the registry until the ready line
    settled_bytes: int | None = None  # ... until the stats were read (a moment later)
    stats: dict | None = None  # `naiad stats --json` of the mount
    daemon_cpu: float | None = None  # CPU seconds of the mount daemon (oci: containerd + ctr) by ready
    background: float | None = None  # cores busy with work not ours meanwhile (None: unknown)


class CpuMeter:
    """Busy CPU of the whole machine beside our own (this process, reaped children, the lab registry).

    What is left is other work on the machine: `background()` gives it as average cores busy
    since the meter started. Work we cannot see (a daemon not reaped by us) is passed as `extra`;
    kernel threads (writeback, softirq) count as other work, so the figure is approximate.
    """

    def __init__(self, the_lab: Lab):
        self.lab = the_lab
        self.t0 = time.perf_counter()
        self.busy0 = machine_busy_seconds()
        self.own0 = self._own()

    def _own(self) -> float:
        c, me = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
        return c.ru_utime + c.ru_stime + me.ru_utime + me.ru_stime + self.lab.registry_cpu()

    def background(self, extra: float = 0.0) -> float:
        wall = time.perf_counter() - self.t0
        other = machine_busy_seconds() - self.busy0 - (self._own() - self.own0) - extra
        return max(0.0, other) / wall if wall > 0 else 0.0


@dataclasses.dataclass
class Swarm:
    """One run of all N nodes starting the same image at the same moment, with or without peers."""

    peers: bool
    network: int | None
    ready: list[float]  # per node: seconds from the common start to its ready line
    registry_bytes: int  # sent by the registry from the start until every node's app had exited
    peer_served: int | None = None  # bytes the peers' mirrors served their clients (None: no peers)
    busy_cores: float = 0.0  # the machine's average busy cores meanwhile (all work, not only ours)


@dataclasses.dataclass
class Setup:
    """What was pushed to the lab, and which naiad paths exist."""

    oci_ref: str
    naiad_ref: str
    optimized_ref: str | None  # None: not measured, `skipped` says why
    hinted_ref: str | None  # likewise, `naiad optimize --from-hints`'s image
    use_snapshotter: bool  # `naiad snapshotter` and ctr-remote exist: naiad-containerd is measured
    skipped: dict[str, str]  # method -> why it was not measured
    oci_bytes: int  # compressed layers of the OCI image
    naiad_bytes: int  # data blobs + bootstrap of the naiad image
    uncompressed: int
    files: int  # regular files in the image, and their bytes (from `naiad inspect`)
    file_bytes: int
    use_run: bool  # `naiad run` exists (else: naiad mount + chroot on overlayfs)
    notes: list[str]


@benchmark("coldstart", "Cold start to the ready line: containerd vs naiad lazy, on a shaped network")
def run(ctx: Context) -> list[Table]:
    require_tools("skopeo", "umoci", "unshare", "mount", "fusermount3", "containerd", "ctr", "runc", "curl",
                  why="the coldstart benchmark")
    if os.geteuid() != 0:
        raise BenchError("the coldstart benchmark needs root (network namespaces, mounts, drop_caches)")
    selected = selected_workloads(ctx)
    unknown = [m for m in ctx.methods if m not in SELECTABLE]
    if unknown:
        raise BenchError(f"unknown method {', '.join(unknown)}; known: {', '.join(SELECTABLE)}")
    rates = tuple(parse_rate(n) for n in ctx.networks)
    # Every image first (built when absent): a failing build should not come after a long run.
    loaded = [(workload(ctx, name, spec), rates or spec.networks) for name, spec in selected.items()]
    tables: list[Table] = []
    for wl, networks in loaded:
        ctx.log(f"coldstart: workload {wl.name}, networks {', '.join(map(rate_name, networks))}")
        tables += run_workload(ctx, wl, networks)
    return tables


def wants(ctx: Context, method: str) -> bool:
    """Whether `method` (a SELECTABLE name) is to run: `--methods` names it, or was not given."""
    return not ctx.methods or method in ctx.methods


def selected_workloads(ctx: Context) -> dict[str, WorkloadSpec]:
    """`--workload`'s choice, else all of WORKLOADS (`--quick`: quickapp)."""
    known = {**WORKLOADS, **QUICK_WORKLOADS}
    if not ctx.workloads:
        return QUICK_WORKLOADS if ctx.quick else WORKLOADS
    unknown = [w for w in ctx.workloads if w not in known]
    if unknown:
        raise BenchError(f"unknown workload {', '.join(unknown)}; known: {', '.join(known)}")
    return {w: known[w] for w in ctx.workloads}


def run_workload(ctx: Context, wl: Workload, networks: Sequence[int | None]) -> list[Table]:
    """Every method on every network, `ctx.reps` times, for one workload in a lab of its own."""
    samples: list[Sample] = []
    swarms: list[Swarm] = []
    with scratch("coldstart") as tmp:
        try:
            with lab(log=ctx.log) as the_lab:
                setup = push_images(ctx, the_lab, wl, tmp)
                floor_root = tmp / "floor"
                methods: dict[str, Callable[[Path], list[Sample]]] = {
                    "oci": lambda w: [measure_containerd(the_lab, wl, setup.oci_ref, w, "oci")],
                    "naiad-lazy": lambda w: [measure_naiad(the_lab, wl, setup.naiad_ref, setup.use_run, w,
                                                           "naiad-lazy")],
                    "floor": lambda w: measure_floor(the_lab, wl, floor_root),
                }
                if setup.use_run:
                    methods["naiad-nohints"] = lambda w: [measure_naiad(
                        the_lab, wl, setup.naiad_ref, True, w, "naiad-nohints", run_options=("--no-hints",))]
                if setup.use_run and has_command("mountd"):
                    methods["naiad-mountd"] = lambda w: [measure_naiad(the_lab, wl, setup.naiad_ref, True, w,
                                                                       "naiad-mountd", mountd=True)]
                if setup.use_snapshotter:
                    methods["naiad-containerd"] = lambda w: [
                        measure_containerd(the_lab, wl, setup.naiad_ref, w, "naiad-containerd")]
                if setup.use_run:  # the mount path too: it has stats, and shows what runc costs
                    methods["naiad-mount"] = lambda w: [measure_naiad(the_lab, wl, setup.naiad_ref, False, w,
                                                                      "naiad-mount")]
                    methods["naiad-mount-fuse"] = lambda w: [measure_naiad(
                        the_lab, wl, setup.naiad_ref, False, w, "naiad-mount-fuse", ("--mode", "fuse"))]
                for method, ref in (("naiad-optimized", setup.optimized_ref),
                                    ("naiad-hinted", setup.hinted_ref)):
                    if ref:
                        methods[method] = naiad_on(the_lab, wl, ref, setup.use_run, method)
                methods = {k: f for k, f in methods.items() if wants(ctx, k)}
                if "floor" in methods:
                    unpack(f"{wl.image.layout}:{wl.image.tag}", floor_root)
                for rate in networks:
                    the_lab.shape(rate)
                    for rep in range(ctx.reps):
                        names = list(methods)
                        k = rep % len(names)
                        for name in names[k:] + names[:k]:  # rotate the order every repetition
                            work = tmp / "run"
                            work.mkdir()
                            try:
                                results = methods[name](work)
                            finally:
                                remove_tree(work)
                            for s in results:
                                s.network = rate
                                samples.append(s)
                                ctx.log(f"  {rate_name(rate)}, rep {rep + 1}/{ctx.reps}: {s.method} "
                                        f"{s.ready:.2f} s" + (f", registry {mb(s.registry_bytes)} MB"
                                                              if s.registry_bytes is not None else ""))
            if wants(ctx, "naiad-p2p"):
                swarms = run_swarms(ctx, wl, networks, tmp)
        finally:
            cleanup_mounts(tmp)
    return report(ctx, wl, setup, networks, samples, swarms)


# --- setup -------------------------------------------------------------------


def workload(ctx: Context, name: str, spec: WorkloadSpec) -> Workload:
    image = spec.image(ctx)
    config = image_config(image)
    argv = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
    if not argv:
        raise BenchError(f"{image.ref} has neither Entrypoint nor Cmd")
    env = dict(e.split("=", 1) for e in config.get("Env") or [] if "=" in e)
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return Workload(name, image, argv, env, config.get("WorkingDir") or "/", spec.ready)


def push_images(ctx: Context, the_lab: Lab, wl: Workload, tmp: Path) -> Setup:
    """Push the OCI image and its naiad conversion into the lab's registry (unshaped, from the node)."""
    notes: list[str] = []
    reg = the_lab.registry
    oci_ref, naiad_ref = f"{reg}/{wl.name}:v1", f"{reg}/{wl.name}:v1-naiad"
    home = tmp / "setup-home"
    env = {**os.environ, "NAIAD_HOME": str(home)}
    t0 = time.perf_counter()
    run_measured(the_lab.node_argv(["skopeo", "--insecure-policy", "copy", "--quiet",
                                    "--dest-tls-verify=false", wl.image.ref, f"docker://{oci_ref}"]))
    t1 = time.perf_counter()
    run_measured(the_lab.node_argv(naiad_argv("convert", "--plain-http", "--json", wl.image.ref, naiad_ref)),
                 env=env)
    t2 = time.perf_counter()
    inspect = run_measured(the_lab.node_argv(naiad_argv("inspect", "--plain-http", "--json", naiad_ref)),
                           env=env).json()
    ctx.log(f"coldstart: pushed {oci_ref} ({t1 - t0:.1f} s) and converted to {naiad_ref} ({t2 - t1:.1f} s)")
    layers = layer_sizes(ctx, wl.image)
    oci_bytes = sum(layer.compressed for layer in layers)
    naiad_bytes = inspect["stored_bytes"] + inspect["bootstrap"]["size"]

    skipped: dict[str, str] = {}
    use_snapshotter = has_command("snapshotter") and shutil.which("ctr-remote") is not None
    if use_snapshotter and wants(ctx, "naiad-containerd"):
        notes.append(f"naiad-containerd: `naiad snapshotter --address SOCK --root DIR --plain-http` (own "
                     f"NAIAD_HOME, started per run, untimed) as containerd's proxy snapshotter "
                     f"{PROXY_PLUGIN!r}; `ctr-remote image rpull --plain-http --snapshotter {PROXY_PLUGIN} "
                     f"{naiad_ref}` + `ctr run --snapshotter {PROXY_PLUGIN} --rm`.")
    elif wants(ctx, "naiad-containerd"):
        why = ("`naiad snapshotter --help` fails in this checkout" if not has_command("snapshotter")
               else "ctr-remote is not installed")
        skipped["naiad-containerd"] = "skipped: " + ("not built yet" if "naiad" in why else why)
        notes.append(f"naiad-containerd: skipped, {why}.")
    use_run = has_command("run")
    notes.append("naiad-lazy ran as `naiad run --plain-http REF` (the image's entrypoint in a runc "
                 "container); naiad-mount is the mount path beside it." if use_run else
                 "naiad-lazy ran as `naiad mount --plain-http REF MNT` + the chrooted run on an overlayfs "
                 "over MNT (`naiad run` does not exist yet in this checkout).")
    optimized_ref = optimize(ctx, the_lab, env, naiad_ref, f"{reg}/{wl.name}:v1-naiad-opt", "naiad-optimized",
                             ["--", *wl.argv], skipped, notes)
    hinted_ref = optimize(ctx, the_lab, env, naiad_ref, f"{reg}/{wl.name}:v1-naiad-hinted", "naiad-hinted",
                          ["--from-hints"], skipped, notes)
    cleanup_mounts(home)
    shutil.rmtree(home, ignore_errors=True)
    return Setup(oci_ref, naiad_ref, optimized_ref, hinted_ref, use_snapshotter, skipped, oci_bytes,
                 naiad_bytes, sum(layer.uncompressed for layer in layers), inspect["files"],
                 inspect["file_bytes"], use_run, notes)


def optimize(ctx: Context, the_lab: Lab, env: dict[str, str], naiad_ref: str, target: str, method: str,
             how: list[str], skipped: dict[str, str], notes: list[str]) -> str | None:
    """`naiad optimize --plain-http NAIAD_REF TARGET HOW...` (untimed setup), if `method` is
    measured: TARGET, or None with the reason in `skipped` and `notes`."""
    if not wants(ctx, method):
        return None
    if not has_command("optimize"):
        skipped[method] = "skipped: not built yet"
        notes.append(f"{method}: skipped, not built yet (`naiad optimize --help` fails in this checkout).")
        return None
    t0 = time.perf_counter()
    try:
        argv = naiad_argv("optimize", "--plain-http", naiad_ref, target, *how)
        run_measured(the_lab.node_argv(argv), env=env)
    except BenchError as e:
        skipped[method] = "skipped: `naiad optimize` failed"
        notes.append(f"{method}: skipped, `naiad optimize` failed: {' '.join(str(e).split())}")
        ctx.log(f"coldstart: naiad optimize failed: {e}")
        return None
    shown = "-- ENTRYPOINT" if how[:1] == ["--"] else " ".join(how)
    notes.append(f"{method}: `naiad optimize --plain-http {naiad_ref} {target} {shown}` "
                 f"({time.perf_counter() - t0:.1f} s, untimed setup), then measured like naiad-lazy.")
    ctx.log(f"coldstart: optimized into {target} ({time.perf_counter() - t0:.1f} s)")
    return target


def naiad_on(the_lab: Lab, wl: Workload, ref: str, use_run: bool, method: str
             ) -> Callable[[Path], list[Sample]]:
    """A method measuring a start of image `ref` like naiad-lazy."""
    return lambda work: [measure_naiad(the_lab, wl, ref, use_run, work, method)]


def has_command(name: str) -> bool:
    return run_measured(naiad_argv(name, "--help"), check=False).returncode == 0


# --- methods -----------------------------------------------------------------


def measure_containerd(the_lab: Lab, wl: Workload, ref: str, work: Path, method: str) -> Sample:
    """One cold start through a private containerd in the node namespace: pull, then `ctr run --rm`.

    `oci` pulls with `ctr image pull` into the overlayfs snapshotter, whose "unpacking" line splits
    the pull into fetch and unpack (ctr fetches every blob, then unpacks). `naiad-containerd` pulls
    with `ctr-remote image rpull` through a naiad snapshotter started for this run. containerd (and
    the snapshotter) start untimed with a fresh root, as daemons that run before any pull would.
    The background load is not known here: containerd, the shim and the app are not our children.
    For `oci`, `daemon_cpu` is what containerd and ctr used by the ready line (the shim, runc and
    the app not included), to tell work from waiting on a busy machine; for `naiad-containerd` it
    stays unknown (the snapshotter's mount daemons are not ours to measure).
    """
    naiad = method == "naiad-containerd"
    env = dict(os.environ)
    with contextlib.ExitStack() as stack:
        socket = stack.enter_context(naiad_snapshotter(the_lab, work)) if naiad else None
        ctrd = Containerd(work / "containerd", snapshotter_socket=socket, netns=the_lab.node_ns)
        try:
            stack.enter_context(ctrd)
        except RuntimeError as e:  # it did not come up: its log is in the message
            raise BenchError(str(e)) from None
        assert ctrd.proc is not None  # nsenter execs containerd: this is its pid
        pid = ctrd.proc.pid
        snapshotter = ["--snapshotter", PROXY_PLUGIN] if naiad else []
        drop_caches()
        cpu0 = process_cpu(pid) + children_cpu()
        tx0 = the_lab.registry_tx_bytes()
        start = time.perf_counter()
        if naiad:
            run_measured(ctrd.ctr_argv("image", "rpull", "--plain-http", *snapshotter, ref,
                                       tool="ctr-remote"))
            pulled = time.perf_counter()
            parts = {"pull": pulled - start}
        else:
            t_unpack = until_ready(ctrd.ctr_argv("image", "pull", "--plain-http", ref), env, "unpacking ",
                                   after=READY_TIMEOUT)
            pulled = time.perf_counter()
            parts = {"fetch": t_unpack - start, "unpack": pulled - t_unpack}
        t_ready = until_ready(ctrd.ctr_argv("run", "--rm", *snapshotter, ref, f"bench-{the_lab.token}"), env,
                              wl.ready)
        tx1 = the_lab.registry_tx_bytes()
        cpu = None if naiad else process_cpu(pid) + children_cpu() - cpu0
    parts["run"] = t_ready - pulled
    return Sample(method, None, t_ready - start, parts, tx1 - tx0, tx1 - tx0, daemon_cpu=cpu)


def children_cpu() -> float:
    """CPU seconds (user + sys) of all reaped children of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def naiad_snapshotter(the_lab: Lab, work: Path) -> Iterator[str]:
    """`naiad snapshotter` for one run, in the node namespace (it reads the registry); yields its socket.

    It gets a NAIAD_HOME of its own under `work`, so no cache survives the run; it is ended (its
    whole session) afterwards, and the caller detaches whatever it left mounted under `work`.
    """
    home, root = work / "home", work / "snapshotter"
    sock, log = work / "snapshotter.sock", work / "snapshotter.log"
    home.mkdir(exist_ok=True)
    argv = the_lab.node_argv(naiad_argv("snapshotter", "--address", str(sock), "--root", str(root),
                                        "--plain-http"))
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, env={**os.environ, "NAIAD_HOME": str(home)}, stdin=subprocess.DEVNULL,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SNAPSHOTTER_START_TIMEOUT
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-10:])
                raise BenchError(f"`naiad snapshotter` made no socket {sock} (exit status {proc.poll()}): "
                                 f"{tail}")
            time.sleep(0.05)
        # Its mountd too (it forks the mount daemons), as on a node where the snapshotter ran
        # before the pull; a naiad that starts none (older, or --no-mountd) gets a few seconds.
        deadline = time.monotonic() + SNAPSHOTTER_MOUNTD_WAIT
        while not (home / "mountd.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield str(sock)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Its mount daemons outlive it (their own sessions, by design) and write their stats every
        # second: stopped here, or removing `work` races them.
        stop_mount_daemons(home)


def measure_naiad(the_lab: Lab, wl: Workload, ref: str, use_run: bool, work: Path, method: str,
                  mount_options: Sequence[str] = (), mountd: bool = False,
                  run_options: Sequence[str] = ()) -> Sample:
    home = work / "home"
    home.mkdir()
    env = {**os.environ, "NAIAD_HOME": str(home)}
    if use_run:
        with resident_mountd(the_lab, env) if mountd else contextlib.nullcontext():
            drop_caches()
            tx0 = the_lab.registry_tx_bytes()
            start = time.perf_counter()
            t_ready = until_ready(the_lab.node_argv(naiad_argv("run", "--plain-http", *run_options, ref)),
                                  env, wl.ready)
            tx1 = the_lab.registry_tx_bytes()
        return Sample(method, None, t_ready - start, {}, tx1 - tx0, tx1 - tx0)

    drop_caches()
    tx0 = the_lab.registry_tx_bytes()

    mnt, upper, wdir, root = work / "mnt", work / "upper", work / "ovl-work", work / "root"
    for d in (mnt, upper, wdir, root):
        d.mkdir()
    try:
        meter = CpuMeter(the_lab)
        start = time.perf_counter()
        mount = run_measured(the_lab.node_argv(naiad_argv("mount", "--plain-http", *mount_options, ref,
                                                          str(mnt))), env=env)
        pid = daemon_pid(home)
        t_ready = until_ready(chroot_argv(root, wl, overlay=(mnt, upper, wdir)), wl.env, wl.ready)
        daemon_cpu = process_cpu(pid)
        background = meter.background(extra=daemon_cpu)
        tx1 = the_lab.registry_tx_bytes()
        time.sleep(STATS_SETTLE)
        stats = run_measured(naiad_argv("stats", "--json", str(mnt)), env=env).json()
        tx2 = the_lab.registry_tx_bytes()
    finally:
        naiad_umount(mnt, env)
    return Sample(method, None, t_ready - start, {"mount": mount.wall, "run": t_ready - start - mount.wall},
                  tx1 - tx0, tx2 - tx0, stats, daemon_cpu, background)


@contextlib.contextmanager
def resident_mountd(the_lab: Lab, env: dict[str, str]) -> Iterator[None]:
    """`naiad mountd` in the node namespace on NAIAD_HOME env's, started untimed (a node daemon, as
    containerd is for oci) and stopped afterwards; the daemons it forked are stopped by their runs."""
    proc = subprocess.Popen(the_lab.node_argv(naiad_argv("mountd")), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        line = proc.stderr.readline()
        if not line.startswith("naiad mountd: serving"):
            raise BenchError(f"`naiad mountd` did not start: {line.strip() or proc.wait(10)}")
        yield
    finally:
        proc.terminate()
        proc.wait(15)


def measure_floor(the_lab: Lab, wl: Workload, rootfs: Path) -> list[Sample]:
    argv = chroot_argv(rootfs, wl)
    until_ready(argv, wl.env, wl.ready)  # untimed: warm the page cache
    samples = []
    for method in ("floor-warm", "floor-cold"):
        if method == "floor-cold":
            drop_caches()
        meter = CpuMeter(the_lab)
        start = time.perf_counter()
        ready = until_ready(argv, wl.env, wl.ready) - start
        samples.append(Sample(method, None, ready, background=meter.background()))
    return samples


def run_swarms(ctx: Context, wl: Workload, networks: Sequence[int | None], tmp: Path) -> list[Swarm]:
    """naiad-p2p: N nodes of a cluster lab start the lazy image at once, through peers and without.

    The cluster lab (`netlab.cluster_lab`: registry, scheduler host and N nodes on a bridge) is
    separate from the one-node lab, so the image is converted into its registry again (untimed).
    Only the registry's egress is shaped, as in the one-node lab; the nodes' links are not.
    """
    nodes = ctx.p2p_nodes or (P2P_NODES_QUICK if ctx.quick else P2P_NODES)
    swarms: list[Swarm] = []
    with cluster_lab(nodes, None, None, log=ctx.log) as cl:
        ref = f"{cl.registry}/{wl.name}:v1-naiad"
        home = tmp / "p2p-setup-home"
        run_measured(cl.argv("n0", naiad_argv("convert", "--plain-http", wl.image.ref, ref)),
                     env={**os.environ, "NAIAD_HOME": str(home)})
        shutil.rmtree(home, ignore_errors=True)
        for rate in networks:
            cl.shape(rate)
            for rep in range(ctx.reps):
                for peers in (True, False) if rep % 2 == 0 else (False, True):  # alternate which goes first
                    work = tmp / "swarm"
                    work.mkdir()
                    try:
                        swarm = measure_swarm(cl, wl, ref, work, peers)
                    finally:
                        remove_tree(work)
                    swarm.network = rate
                    swarms.append(swarm)
                    ctx.log(f"  {rate_name(rate)}, rep {rep + 1}/{ctx.reps}: {nodes} nodes "
                            f"{'with' if peers else 'without'} peers: p50 {median(swarm.ready):.2f} s, "
                            f"max {max(swarm.ready):.2f} s, registry {mb(swarm.registry_bytes)} MB")
    return swarms


def measure_swarm(cl: ClusterLab, wl: Workload, ref: str, work: Path, peers: bool) -> Swarm:
    """Every node of `cl` runs `naiad run REF` at the same moment (through its peer with `peers`).

    With `peers`, a scheduler and one peer per node start first, untimed, with empty piece stores
    (`PeerCluster`), as daemons that run before any start would. Every node gets an empty
    NAIAD_HOME; the page cache is dropped once for all (they share this machine's).
    """
    hosts = range(cl.nodes)
    proxy = ["--p2p-proxy", f"127.0.0.1:{PROXY_PORT}"] if peers else []  # each node's own loopback
    argvs = [cl.argv(f"n{i}", naiad_argv("run", "--plain-http", *proxy, ref)) for i in hosts]
    envs = []
    for i in hosts:
        home = work / f"home-n{i}"
        home.mkdir()
        envs.append({**os.environ, "NAIAD_HOME": str(home)})
    with contextlib.ExitStack() as stack:
        if peers:
            stack.enter_context(PeerCluster(cl, work, list(hosts)))
        drop_caches()
        tx0 = cl.registry_tx_bytes()
        busy0 = machine_busy_seconds()
        start = time.perf_counter()
        with ThreadPoolExecutor(cl.nodes) as pool:  # one waiter per node: they start together
            waits = [pool.submit(until_ready, argv, env, wl.ready)
                     for argv, env in zip(argvs, envs, strict=True)]
            ready = [w.result() - start for w in waits]
        tx1 = cl.registry_tx_bytes()
        busy = (machine_busy_seconds() - busy0) / (time.perf_counter() - start)
        # Did the reads go through the peers at all? Their counters tell (the registry bytes do not).
        served = sum(peer_counter(cl, i, "naiad_p2p_client_bytes_total") for i in hosts) if peers else None
    return Swarm(peers, None, ready, tx1 - tx0, served, busy)


def peer_counter(cl: ClusterLab, node: int, name: str) -> int:
    """A counter from the /metrics of node `node`'s peer (its mirror port, no token needed)."""
    out = run_measured(cl.argv(f"n{node}", ["curl", "-sSf", f"http://127.0.0.1:{PROXY_PORT}/metrics"]))
    for line in out.stdout.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    raise BenchError(f"node n{node}'s peer has no {name} in its /metrics")


def daemon_pid(home: Path) -> int:
    """The pid of the (only) mount daemon under NAIAD_HOME=`home`, from its state.json."""
    states = list((home / "mounts").glob("*/state.json"))
    if len(states) != 1:
        raise BenchError(f"expected one mount daemon state under {home}/mounts, found {len(states)}")
    return int(json.loads(states[0].read_text())["pid"])


# --- processes, mounts, caches ----------------------------------------------


def chroot_argv(root: Path, wl: Workload, overlay: tuple[Path, Path, Path] | None = None) -> list[str]:
    """Run `wl` chrooted into `root` in a private mount namespace with /dev, /proc and /sys bound in.

    With `overlay` (lower, upper, work), an overlayfs of them is mounted on `root` first. All
    these mounts belong to the private namespace and vanish with the app's process.
    """
    mount, mkdir, unshare = (shutil.which(t) or t for t in ("mount", "mkdir", "unshare"))
    q = shlex.quote
    lines = []
    if overlay:
        lower, upper, work = overlay
        options = f"lowerdir={lower},upperdir={upper},workdir={work}"
        lines.append(f"{mount} -t overlay overlay -o {q(options)} {q(str(root))}")
    for d in ("dev", "proc", "sys"):
        target = q(str(root / d))
        lines.append(f"{mkdir} -p {target} && {mount} --rbind /{d} {target}")
    lines.append(f"exec {unshare} --root={q(str(root))} --wd={q(wl.cwd)} -- {shlex.join(wl.argv)}")
    return [unshare, "--mount", "--propagation", "private", "--", "/bin/sh", "-ec", "\n".join(lines)]


def until_ready(argv: Sequence[str], env: dict[str, str], ready: str,
                timeout: float = READY_TIMEOUT, after: float = AFTER_READY_TIMEOUT) -> float:
    """Run `argv`; return the `time.perf_counter()` at which it printed a line starting with `ready`.

    The process may go on for up to `after` seconds after that; it must end with status 0.
    """
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    lines: list[str] = []
    buf = b""
    t_ready: float | None = None
    deadline = time.perf_counter() + timeout
    try:
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                if t_ready is not None:
                    break  # ready, and still running: good enough
                raise BenchError(f"no {ready!r} line within {timeout:.0f} s from `{shlex.join(argv)}`:\n"
                                 + "\n".join(lines[-15:]))
            if not select.select([fd], [], [], remaining)[0]:
                continue
            data = os.read(fd, 1 << 16)
            now = time.perf_counter()
            if not data:
                break
            buf += data
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                lines.append(raw.decode(errors="replace"))
                if t_ready is None and raw.startswith(ready.encode()):
                    t_ready = now
                    deadline = min(deadline, now + after)
        if t_ready is None:
            rc = proc.wait()
            raise BenchError(f"`{shlex.join(argv)}` exited with {rc} before printing {ready!r}:\n"
                             + "\n".join(lines[-15:]))
        rc = proc.wait(timeout=after)
        if rc != 0:
            raise BenchError(f"`{shlex.join(argv)}` printed {ready!r} but exited with {rc}:\n"
                             + "\n".join(lines[-15:]))
        return t_ready
    finally:
        end_process(proc)
        proc.stdout.close()


def unpack(image: str, rootfs: Path) -> float:
    """`umoci raw unpack` IMAGE (layout:tag) into ROOTFS; returns the wall time."""
    return run_measured(["umoci", "raw", "unpack", "--image", image, str(rootfs)]).wall


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise BenchError(f"cannot drop the page cache ({e}); the coldstart benchmark needs root") from None


def naiad_umount(mnt: Path, env: dict[str, str]) -> None:
    """Unmount a naiad mount and end its daemon; detach the mount if that fails."""
    if not os.path.ismount(mnt):
        return
    r = run_measured(naiad_argv("umount", str(mnt)), env=env, check=False)
    if r.returncode != 0 or os.path.ismount(mnt):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def stop_mount_daemons(home: Path) -> None:
    """SIGTERM the mount daemons of NAIAD_HOME `home` (those with a state.json) and wait for them."""
    pids = []
    for state in home.glob("mounts/*/state.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, ProcessLookupError):
            pid = int(json.loads(state.read_text())["pid"])
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
    deadline = time.monotonic() + 15
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: init reaps orphans when it gets to them)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def remove_tree(path: Path) -> None:
    """Detach what is mounted below `path` and remove it; a file a dying process still writes
    makes rmtree fail now and then, so it is tried again for a while before giving up."""
    deadline = time.monotonic() + 20
    while True:
        cleanup_mounts(path)
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        if time.monotonic() > deadline:
            left = sorted(str(p) for p in path.rglob("*"))[:5]
            raise BenchError(f"cannot remove {path}: {', '.join(left) or 'it stays'}")
        time.sleep(0.2)


def cleanup_mounts(under: Path) -> None:
    """Detach anything still mounted below `under` (deepest first); a safety net before removing it."""
    prefix = str(under.resolve()) + "/"
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        points = [line.split()[1].encode().decode("unicode_escape") for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


# --- report --------------------------------------------------------------------


def report(ctx: Context, wl: Workload, setup: Setup, networks: Sequence[int | None],
           samples: list[Sample], swarms: list[Swarm]) -> list[Table]:
    tables = []
    present = [m for m in METHODS if any(s.method == m for s in samples)]
    for rate in networks if present else ():
        by = {m: [s for s in samples if s.method == m and s.network == rate] for m in present}
        oci_median = median([s.ready for s in by["oci"]]) if by.get("oci") else None
        rows = []
        for m in present:
            runs = by[m]
            label = LABELS[m].format(how=RUN_LABEL if setup.use_run else MOUNT_LABEL)
            parts = " + ".join(f"{k} {spread([s.parts[k] for s in runs])}" for k in runs[0].parts)
            sent = [s.registry_bytes for s in runs if s.registry_bytes is not None]
            rows.append([
                label, spread([s.ready for s in runs]), parts or "–",
                f"{oci_median / median([s.ready for s in runs]):.2f}×" if oci_median else "–",
                spread([b / 1e6 for b in sent], "{:.1f}") if sent else "–",
                f"{100 * median(sent) / setup.oci_bytes:.1f}%" if sent else "–",
                f"{100 * median(sent) / setup.naiad_bytes:.1f}%" if sent else "–",
            ])
        rows += [[m, why, "–", "–", "–", "–", "–"] for m, why in setup.skipped.items()]
        tables.append(Table(
            f"{wl.name}, registry egress {rate_name(rate)}: time to the ready line, s, median (min–max) of "
            f"{ctx.reps}",
            ["method", "time to ready s", "parts s", "speedup vs oci", "registry MB by ready",
             "% of OCI image", "% of naiad image"],
            rows,
            [background_note([s for s in samples if s.network == rate]),
             containerd_cpu_note([s for s in samples if s.network == rate])],
        ))

    notes = [
        f"Images: OCI {mb(setup.oci_bytes)} MB compressed ({mb(setup.uncompressed)} MB uncompressed, "
        f"{setup.files:,} files of {mb(setup.file_bytes)} MB, "
        f"{setup.file_bytes / max(setup.files, 1) / 1e3:.1f} kB on average); "
        f"naiad {mb(setup.naiad_bytes)} MB (data blobs + bootstrap). Registry MB: the registry veth's "
        "tx_bytes from the first command to the ready line (HTTP and TCP/IP headers included). "
        "Floor rows do not touch the network.",
        *setup.notes,
        "Every run: content and caches removed, then `sync; echo 3 > /proc/sys/vm/drop_caches`; "
        "the order of methods rotates every repetition.",
    ]
    swarm = swarm_table(ctx, wl, networks, samples, swarms) if swarms else None
    if swarm and not tables:  # naiad-p2p alone: the image notes go under its table
        tables.append(swarm)
        swarm = None
    tables[-1].notes.extend(notes)
    if swarm:
        tables.append(swarm)

    naiad_runs = [s for s in samples if s.stats]
    if naiad_runs:
        rows = []
        for rate in networks:
            for m in ("naiad-lazy", "naiad-mount", "naiad-mount-fuse", "naiad-optimized", "naiad-hinted"):
                runs = [s for s in naiad_runs if s.method == m and s.network == rate]
                if not runs:
                    continue
                st = [s.stats for s in runs if s.stats]
                rows.append([
                    rate_name(rate), m,
                    spread([s.parts["mount"] for s in runs]),
                    stat_spread(st, "bytes_fetched", "{:.1f}", 1e-6),
                    stat_spread(st, "requests", "{:.0f}"),
                    stat_spread(st, "chunks_fetched", "{:.0f}"),
                    stat_spread(st, "bytes_served", "{:.1f}", 1e-6),
                    stat_spread(st, "files_read", "{:.0f}"),
                    stat_spread(st, "read_amplification"),
                    stat_spread(st, "fetch_ms_p50", "{:.0f}"),
                    stat_spread(st, "fetch_ms_p99", "{:.0f}"),
                    spread([s.settled_bytes / 1e6 for s in runs if s.settled_bytes is not None], "{:.1f}"),
                    spread([s.daemon_cpu or 0.0 for s in runs]),
                ])
        tables.append(Table(
            f"naiad mount statistics (`naiad stats --json` {STATS_SETTLE} s after the ready line), "
            "median (min–max)",
            ["network", "method", "mount s", "fetched MB", "requests", "chunks fetched", "served MB",
             "files read", "read amplification", "fetch p50 ms", "fetch p99 ms", "registry MB, settled",
             "daemon CPU s by ready"],
            rows,
            ["served: file bytes the FUSE mount returned to readers; fetched: compressed chunk bytes it "
             "got from the registry; daemon CPU: user+sys seconds of the mount daemon (all threads) from "
             "its start to the ready line."],
        ))

    goals = targets(setup, networks, samples) if wl.name == TORCHAPP_TAG else None
    if goals and goals.rows:  # no rows when naiad-lazy or oci was not measured (`--methods`)
        tables.append(goals)

    plot_path = ctx.artifact(f"coldstart-{wl.name}.png")
    if plot_path is not None and present:
        try:
            plot(plot_path, wl, networks, samples, present)
            tables[-1].notes.append(f"![time to ready per method and network]({plot_path.name})")
        except ImportError:
            tables[-1].notes.append("(no plot: matplotlib is not installed: pip install -e '.[bench]')")
    return tables


def swarm_table(ctx: Context, wl: Workload, networks: Sequence[int | None], samples: list[Sample],
                swarms: list[Swarm]) -> Table:
    """naiad-p2p beside its baseline per network: time to ready over nodes, registry egress, ratios."""
    nodes = len(swarms[0].ready)
    rows = []
    for rate in networks:
        runs = {p: [s for s in swarms if s.peers == p and s.network == rate] for p in (False, True)}
        if not runs[True] or not runs[False]:
            continue
        # One node alone (naiad-lazy in the one-node lab of this run), to compare the slowest node with.
        lazy = [s for s in samples if s.method == "naiad-lazy" and s.network == rate]
        one_time = median([s.ready for s in lazy]) if lazy else None
        one_bytes = median([s.registry_bytes or 0 for s in lazy]) if lazy else None
        medians = {}
        for peers in (False, True):
            p50s = [median(s.ready) for s in runs[peers]]
            maxes = [max(s.ready) for s in runs[peers]]
            sent = [s.registry_bytes for s in runs[peers]]
            medians[peers] = (median(p50s), median(maxes), median(sent))
            served = [s.peer_served for s in runs[peers] if s.peer_served is not None]
            rows.append([
                rate_name(rate), SWARM_LABELS[peers], spread(p50s), spread(maxes),
                spread([b / 1e6 for b in sent], "{:.1f}"),
                spread([b / 1e6 for b in served], "{:.1f}") if served else "–",
                f"{median(maxes) / one_time:.2f}×" if one_time else "–",
                f"{median(sent) / one_bytes:.2f}×" if one_bytes else "–",
                spread([s.busy_cores for s in runs[peers]], "{:.1f}"),
            ])
        (p50_a, max_a, sent_a), (p50_b, max_b, sent_b) = medians[False], medians[True]
        rows.append([rate_name(rate), "baseline / naiad-p2p", f"{p50_a / p50_b:.2f}×",
                     f"{max_a / max_b:.2f}×", f"{sent_a / sent_b:.2f}×", "", "", "", ""])
    bypassed = [s for s in swarms if s.peers and not s.peer_served]
    warning = (f"**In {len(bypassed)} of {sum(s.peers for s in swarms)} runs with peers the peers served "
               "nothing: `naiad run --p2p-proxy` read every chunk straight from the registry, so those runs "
               "measure no P2P at all.**" if bypassed else "")
    return Table(
        f"{wl.name}, naiad-p2p: {nodes} nodes start the lazy image at the same moment; time to each node's "
        f"ready line, s, median (min–max) of {ctx.reps}",
        ["network", "method", "p50 over nodes s", "max over nodes s", "registry MB by the last ready",
         "served by peers MB", "max / one node's time", "registry bytes / one node's",
         f"cores busy (of {os.cpu_count()})"],
        rows,
        [f"A cluster lab (`bench/netlab.py: cluster_lab`): the registry, a scheduler host and {nodes} node "
         "network namespaces on one bridge; the registry's egress shaped as above (tbf), the nodes' links "
         "not. The naiad image is converted into its registry again (untimed). Per run: every node gets an "
         "empty NAIAD_HOME; with peers, `naiad scheduler` and one `naiad peer --proxy 127.0.0.1:"
         f"{PROXY_PORT}` per node (default `--source-limit` 1, no seed) start first, untimed, with empty "
         "piece stores (`bench/p2p.py: PeerCluster`); the page cache is dropped; then all nodes start "
         f"`naiad run --plain-http [--p2p-proxy 127.0.0.1:{PROXY_PORT}] REF` at once. Manifest and "
         "bootstrap come from the registry either way (only chunk reads go through the peer). Registry "
         "MB: its veth's tx_bytes from the start until every node's app had exited (right after its "
         "ready line). One node: naiad-lazy's median in this run's one-node lab (`–`: not measured). "
         "The runs with and without peers alternate which goes first. All nodes share this machine's "
         "cores: N apps and N mount daemons start at once on 2 cores, so the CPU, not only the "
         "registry link, bounds the slowest node. Served by peers: the sum of the peers' "
         "`naiad_p2p_client_bytes_total` (what their mirrors gave `naiad run`) at the last ready. Cores "
         "busy: the machine's busy CPU seconds (/proc/stat, everyone's work, this benchmark's and "
         "others') over the run's wall time.",
         warning],
    )


def stat_spread(stats: Sequence[dict], key: str, fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    """Spread of a `naiad stats` field over runs; "–" where the mount does not know it (e.g.
    `files_read` in kernel mode, where the kernel answers reads)."""
    values = [float(x[key]) for x in stats if x.get(key) is not None]
    return spread(values, fmt, scale) if values else "–"


def containerd_cpu_note(samples: Sequence[Sample]) -> str:
    """CPU that containerd and ctr used in the `oci` runs by the ready line (fetch, decompress, unpack)."""
    cpu = [s.daemon_cpu for s in samples if s.method == "oci" and s.daemon_cpu is not None]
    if not cpu:
        return ""
    return (f"oci: containerd + ctr used {spread(cpu)} CPU s by the ready line (shim, runc and app not "
            "counted); wall time above that is waiting: for the network, the disk, or a busy CPU.")


def background_note(samples: Sequence[Sample]) -> str:
    loads = [s.background for s in samples if s.background is not None]
    if not loads:
        return ""
    text = ("Background load during the timed runs (machine busy CPU − this benchmark's own, approx.; "
            f"not known for `naiad run` and containerd, whose work runs in daemons): {spread(loads)} cores")
    if max(loads) > 0.25:
        text += " — **the machine was not quiet; timings are inflated**"
    return text + "."


def targets(setup: Setup, networks: Sequence[int | None], samples: list[Sample]) -> Table:
    """Issue 3's targets for naiad lazy on torchapp."""
    rows = []
    for rate in networks:
        lazy = [s for s in samples if s.method == "naiad-lazy" and s.network == rate]
        oci = [s for s in samples if s.method == "oci" and s.network == rate]
        if not lazy or not oci:
            continue
        t = median([s.ready for s in lazy])
        if rate in TARGET_SECONDS:
            goal = TARGET_SECONDS[rate]
            rows.append([rate_name(rate), "time to ready", f"≤ {goal:g} s", f"{t:.2f} s",
                         pass_fail(t <= goal)])
        speedup = median([s.ready for s in oci]) / t
        rows.append([rate_name(rate), "speedup vs oci", f"≥ {TARGET_SPEEDUP:g}×", f"{speedup:.2f}×",
                     pass_fail(speedup >= TARGET_SPEEDUP)])
        share = median([s.registry_bytes or 0 for s in lazy]) / setup.oci_bytes
        rows.append([rate_name(rate), "registry bytes by ready / OCI image", f"≤ {TARGET_BYTES_SHARE:.0%}",
                     f"{share:.1%}", pass_fail(share <= TARGET_BYTES_SHARE)])
    return Table("naiad lazy against the targets of issue 3", ["network", "what", "target", "measured", ""],
                 rows)


def plot(path: Path, wl: Workload, networks: Sequence[int | None], samples: list[Sample],
         methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        meds, lo, hi = [], [], []
        for rate in networks:
            vals = [s.ready for s in samples if s.method == m and s.network == rate] or [float("nan")]
            med = median(vals)
            meds.append(med)
            lo.append(med - min(vals))
            hi.append(max(vals) - med)
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(networks))]
        bars = ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=m)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(range(len(networks)), [rate_name(r) for r in networks])
    ax.set_ylabel("time to ready line, s (median, min–max)")
    ax.set_title(f"Cold start of {wl.name}: registry egress vs method")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
