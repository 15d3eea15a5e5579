"""Shared helpers: measured child processes, statistics, formatting, OCI layouts, machine facts.

A measured child is started with `subprocess.Popen` and reaped with `os.wait4`,
which returns the child's own resource usage: user+sys CPU time (all its
threads, and any children it waited for) and its peak RSS (`ru_maxrss`).
The machine's busy CPU time (/proc/stat) is sampled around it too, so that a
report can show how much other work ran at the same time (`Run.background`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench import BenchError

MB = 1_000_000  # throughput and sizes are in decimal MB (10^6 bytes)
MIB = 1 << 20


@dataclasses.dataclass
class Run:
    """One finished child process."""

    argv: list[str]
    returncode: int
    wall: float  # seconds
    cpu: float  # user + sys seconds of the child
    maxrss: int  # peak resident set size, bytes
    stdout: str
    stderr: str
    machine_busy: float = 0.0  # busy CPU seconds of the whole machine while it ran (incl. steal)

    @property
    def background(self) -> float:
        """Average number of cores busy with other work (other processes, the kernel) while it ran."""
        return max(0.0, self.machine_busy - self.cpu) / self.wall if self.wall else 0.0

    def json(self) -> dict:
        try:
            return json.loads(self.stdout)
        except ValueError as e:
            raise BenchError(f"{self.argv[0]} did not print JSON ({e}): {self.stdout[:500]!r}") from None


def run_measured(argv: Sequence[str], env: dict[str, str] | None = None, cwd: str | Path | None = None,
                 check: bool = True) -> Run:
    """Run `argv`, wait for it with wait4 and return its wall time, CPU time and peak RSS."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        busy0 = machine_busy_seconds()
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=env, cwd=cwd,
                                    stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise BenchError(f"{argv[0]}: command not found") from None
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        busy = machine_busy_seconds() - busy0
        proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen the child is reaped
        out.seek(0)
        err.seek(0)
        run = Run(list(argv), proc.returncode, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024,
                  out.read().decode(errors="replace"), err.read().decode(errors="replace"), busy)
    if check and run.returncode != 0:
        tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-15:])
        raise BenchError(f"`{' '.join(run.argv)}` exited with {run.returncode}:\n{tail}")
    return run


def machine_busy_seconds() -> float:
    """Busy (non-idle, non-iowait) CPU seconds of all cores since boot, steal time included."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def background_note(runs: Sequence[Run]) -> str:
    """A line telling how busy the machine was with other work during `runs`."""
    loads = [r.background for r in runs]
    text = f"Background load during the timed runs (machine busy CPU − the child's): {spread(loads)} cores"
    if max(loads) > 0.25:
        text += " — **the machine was not quiet; timings are inflated**"
    return text + "."


def end_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM `proc` if it still runs, and SIGKILL it if it has not exited within `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def naiad_argv(*args: str) -> list[str]:
    """The naiad CLI of the Python running the harness (the project venv)."""
    return [sys.executable, "-m", "naiad", *args]


def require_tools(*tools: str, why: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise BenchError(f"{why} needs {', '.join(missing)} on PATH: apt-get install {' '.join(missing)}")


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary directory that is removed afterwards, whatever happens."""
    path = Path(tempfile.mkdtemp(prefix=f"naiad-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def dir_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_size
    return total


# --- statistics and formatting ---------------------------------------------


def spread(values: Sequence[float], fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    """'median (min–max)', or the single value when there is one."""
    vals = [v * scale for v in values]
    med = statistics.median(vals)
    if len(vals) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(vals))}–{fmt.format(max(vals))})"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def mb(n: float) -> str:
    return f"{n / MB:,.1f}"


def count(n: float) -> str:
    return f"{n:,.0f}"


def pass_fail(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# --- OCI layouts -------------------------------------------------------------


def read_blob(layout: Path, digest: str) -> bytes:
    algo, _, hexpart = digest.partition(":")
    return (layout / "blobs" / algo / hexpart).read_bytes()


def blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    return layout / "blobs" / algo / hexpart


def manifest(layout: Path, tag: str) -> dict:
    """The image manifest tagged `tag` in an OCI layout (the linux/amd64 one of an index)."""
    try:
        index = json.loads((layout / "index.json").read_text())
    except FileNotFoundError:
        raise BenchError(f"{layout} is not an OCI layout (no index.json)") from None
    for desc in index.get("manifests", []):
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            break
    else:
        raise BenchError(f"no image tagged {tag!r} in {layout}")
    doc = json.loads(read_blob(layout, desc["digest"]))
    if "manifests" in doc:  # an image index: take linux/amd64, else the first
        picks = [m for m in doc["manifests"] if m.get("platform", {}).get("architecture") == "amd64"]
        doc = json.loads(read_blob(layout, (picks or doc["manifests"])[0]["digest"]))
    return doc


def has_tag(layout: Path, tag: str) -> bool:
    try:
        manifest(layout, tag)
    except (BenchError, OSError, ValueError):
        return False
    return True


# --- machine facts -------------------------------------------------------------


def _cmd_output(argv: list[str], cwd: Path | None = None) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def machine_facts(repo: Path) -> list[tuple[str, str]]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
                break
    # Read-only git queries (--no-optional-locks: do not even refresh the index).
    commit = _cmd_output(["git", "--no-optional-locks", "rev-parse", "--short=12", "HEAD"], repo)
    dirty = _cmd_output(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"], repo)
    if commit != "?" and dirty not in ("", "?"):
        diff = subprocess.run(["git", "--no-optional-locks", "diff", "HEAD"], capture_output=True, cwd=repo)
        commit += f" + uncommitted changes to {len(dirty.splitlines())} files " \
                  f"(diff sha256 {hashlib.sha256(diff.stdout).hexdigest()[:12]})"
    try:
        import zstandard

        zstd = f"{zstandard.__version__} (libzstd {'.'.join(map(str, zstandard.ZSTD_VERSION))})"
    except ImportError:
        zstd = "not installed"
    try:
        import naiad

        naiad_version = getattr(naiad, "__version__", "?")
        where = Path(naiad.__file__).resolve().parent
        if not where.is_relative_to(repo.resolve()):  # e.g. PYTHONPATH=a snapshot of src/
            commit += f"; **naiad imported from {where}, not from this checkout**"
    except ImportError:
        naiad_version = "not installed"
    return [
        ("CPU", cpu),
        ("cores", str(os.cpu_count())),
        ("memory", mem),
        ("kernel", platform.release()),
        ("python", platform.python_version()),
        ("naiad", f"{naiad_version}, commit {commit}"),
        ("zstandard", zstd),
        ("skopeo", _cmd_output(["skopeo", "--version"]).removeprefix("skopeo version ")),
        ("umoci", _cmd_output(["umoci", "--version"]).removeprefix("umoci version ")),
    ]
