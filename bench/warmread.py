"""Warm reads: a big file and find+stat over a many-file tree, on a naiad mount beside the unpacked tree.

Issue 3 asks how a mount compares with a local directory once nothing has to
cross the network: that names the next bottleneck. The input is built here,
deterministically: one file of seeded random bytes (1 GiB; `--quick` 64 MiB;
random, so chunks are stored raw as model weights nearly are) and the tree of
the `bootstrap` benchmark (100,000 files; `--quick` 10,000). `naiad build`
makes an image of it in a local layout, `naiad unpack` the reference directory
on the same disk.

Each mount mode (`fuse`; `kernel` too when `naiad mount --mode` offers it) is
mounted with `--prefetch-all`, and measured once its prefetch has finished:
every chunk is then in naiad's chunk cache. Kernel mode is then mounted again
on that full cache: its blob files pass through to their cache files (FUSE
passthrough), which is how a node that holds the whole image serves it. Per repetition, for the mount and
the unpacked directory alike:

- *page-cold*: `sync; echo 3 > /proc/sys/vm/drop_caches`, then the measure:
  data comes from the disk in both cases (naiad's cache files, the unpacked
  files);
- *page-hot*: the same measure again right after.

Measures: `dd if=BIG of=/dev/null bs=1M` (MB/s), and `find TREE -ls` (lstat of
every entry; seconds). The mount daemon's CPU seconds during the measures come
from /proc/PID/stat. Needs root (drop_caches, FUSE).
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

from bench import BenchError, Context, Table, benchmark
from bench.bootstrap import make_tree
from bench.harness import MB, MIB, count, median, naiad_argv, require_tools, run_measured, scratch, spread

PREFETCH_TIMEOUT = 1800.0


def _make_big_file(path: Path, size: int) -> None:
    rng = random.Random(20261129)
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(rng.randbytes(MIB))


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _mount_modes() -> list[str]:
    """`fuse`, plus `kernel` when this naiad's mount command offers a kernel mode."""
    help_text = subprocess.run(naiad_argv("mount", "--help"), capture_output=True, text=True).stdout
    return ["fuse", "kernel"] if "--mode" in help_text and "kernel" in help_text else ["fuse"]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_prefetched(mnt: Path, env: dict[str, str]) -> dict:
    deadline = time.monotonic() + PREFETCH_TIMEOUT
    while time.monotonic() < deadline:
        stats = run_measured(naiad_argv("stats", "--json", str(mnt)), env=env).json()
        if stats.get("prefetch", {}).get("finished"):
            return stats
        time.sleep(1)
    raise BenchError(f"prefetch of the mount at {mnt} did not finish in {PREFETCH_TIMEOUT:.0f} s")


def _measure(root: Path, big: str, reps: int) -> dict[str, list[float]]:
    """MB/s of reading `big` and seconds of `find -ls` over tree/, page-cold and page-hot."""
    out: dict[str, list[float]] = {k: [] for k in ("read_cold", "read_hot", "find_cold", "find_hot")}
    size = os.path.getsize(root / big)
    for _ in range(reps):
        for temp in ("cold", "hot"):
            if temp == "cold":
                _drop_caches()
            r = run_measured(["dd", f"if={root / big}", "of=/dev/null", "bs=1M"])
            out[f"read_{temp}"].append(size / MB / r.wall)
        for temp in ("cold", "hot"):
            if temp == "cold":
                _drop_caches()
            r = run_measured(["sh", "-c", f"find '{root / 'tree'}' -ls | wc -l"])
            out[f"find_{temp}"].append(r.wall)
    return out


@benchmark("warmread", "Warm reads: a big file and find+stat over a many-file tree, mounted vs unpacked")
def run(ctx: Context) -> list[Table]:
    if os.geteuid() != 0:
        raise BenchError("warmread needs root (drop_caches, FUSE mounts)")
    require_tools("dd", "find", "fusermount3", why="warmread")
    big_size = (64 if ctx.quick else 1024) * MIB
    top, sub, files = (10, 10, 100) if ctx.quick else (10, 100, 100)
    results: dict[str, dict[str, list[float]]] = {}
    daemon_cpu: dict[str, float] = {}
    passthrough: dict[str, int] = {}  # blob files the kernel read from the cache itself
    with scratch("warmread") as tmp:
        src = tmp / "src"
        (src / "tree").mkdir(parents=True)
        _make_big_file(src / "big.bin", big_size)
        entries = len(make_tree(src / "tree", top, sub, files))
        env = {**os.environ, "NAIAD_HOME": str(tmp / "home")}
        ref = f"oci:{tmp / 'oci'}:warm"
        run_measured(naiad_argv("build", str(src), ref), env=env)
        run_measured(naiad_argv("unpack", ref, str(tmp / "unpacked")), env=env)
        ctx.log(f"warmread: built and unpacked a {big_size // MIB} MiB file + {count(entries)} entries")
        results["unpacked"] = _measure(tmp / "unpacked", "big.bin", ctx.reps)

        modes = _mount_modes()
        # The kernel mode twice: on the mount whose prefetch filled the cache (its blob files
        # were opened before, so the daemon serves them), then mounted again on the full cache
        # (every blob file passes through to its cache file: the kernel reads it itself).
        # Each mode fills a cache of its own (NAIAD_HOME), so that the first kernel mount finds
        # nothing cached and serves through the daemon.
        runs = [(mode, f"naiad {mode}", ["--prefetch-all"]) for mode in modes]
        if "kernel" in modes:
            runs.append(("kernel", "naiad kernel, mounted again", []))
        for mode, name, extra in runs:
            mnt = tmp / f"mnt-{len(results)}"
            mnt.mkdir()
            mode_args = ["--mode", mode] if len(modes) > 1 else []
            env = {**os.environ, "NAIAD_HOME": str(tmp / f"home-{mode}")}
            run_measured(naiad_argv("mount", *extra, *mode_args, ref, str(mnt)), env=env)
            try:
                stats = _wait_prefetched(mnt, env)
                cpu0 = _cpu_seconds(int(stats["pid"]))
                results[name] = _measure(mnt, "big.bin", ctx.reps)
                daemon_cpu[name] = _cpu_seconds(int(stats["pid"])) - cpu0
                passthrough[name] = int(stats.get("passthrough", 0))
            finally:
                run_measured(naiad_argv("umount", str(mnt)), env=env, check=False)
            ctx.log(f"  {name}: measured")

    base = results["unpacked"]
    rows = []
    for name, r in results.items():
        ratio = ("" if name == "unpacked" else
                 f"{median(r['read_cold']) / median(base['read_cold']):.2f} / "
                 f"{median(r['find_cold']) / median(base['find_cold']):.2f}")
        rows.append([name, spread(r["read_cold"], "{:.0f}"), spread(r["read_hot"], "{:.0f}"),
                     spread(r["find_cold"]), spread(r["find_hot"]), ratio,
                     f"{daemon_cpu[name]:.1f}" if name in daemon_cpu else "",
                     str(passthrough[name]) if name in passthrough else ""])
    table = Table(
        f"Warm reads ({big_size // MIB} MiB file; find -ls over {count(entries)} entries; median (min–max) "
        f"of {ctx.reps})",
        ["tree", "read MB/s page-cold", "read MB/s page-hot", "find -ls s page-cold", "find -ls s page-hot",
         "read ratio / find ratio vs unpacked (cold)", "daemon CPU s (all measures)",
         "blob files passed through"],
        rows,
        ["Every chunk was in naiad's cache (mounted with --prefetch-all, measured after it finished; "
         "'mounted again': a second mount on that full cache, whose blob files pass through); "
         "page-cold = after drop_caches, so both read the same disk. Ratio: read MB/s ÷ unpacked's "
         "(higher is better), find s ÷ unpacked's (lower is better)."],
    )
    return [table]

