"""The mount daemon's data path, in isolation: time to ready and daemon CPU, cold and warm chunk cache.

    .venv/bin/python bench/datapath.py REF --mode kernel --reps 3 [--label before] [--amplify 1M]
        [--read-ahead 128K] [--mount-arg=--no-hints] [--src DIR]

REF is a naiad image of torchapp on a local registry (plain HTTP). Every repetition:

- cold: a fresh NAIAD_HOME whose only content is the `bootstraps/` of a first, untimed
  mount (so the bootstrap and its EROFS image are neither fetched nor generated: the
  figures are the data path's), page cache dropped, `naiad mount`, then the app chrooted
  into the mount in a private mount namespace until it prints `ready`;
- warm: unmount, drop the page cache, mount again on the same home (chunk cache full),
  the same run.

Printed per run: wall seconds from the mount command to `ready`, from the mount being up
to `ready`, daemon CPU seconds (utime + stime of the daemon, all threads) at `ready`, and
the daemon's fetch statistics. The last line is a JSON summary (medians) for the log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAIAD = [str(ROOT / ".venv/bin/naiad")]
APP = ("mount --rbind /dev {m}/dev && mount -t proc proc {m}/proc"
       " && chroot {m} /opt/venv/bin/python /app/main.py")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def daemon_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def mount(ref: str, mnt: Path, env: dict[str, str], mode: str, amplify: str | None,
          read_ahead: str | None = None, extra: tuple[str, ...] = ()) -> int:
    argv = [*NAIAD, "mount", "--plain-http", "--mode", mode, *extra, ref, str(mnt)]
    if amplify:
        argv += ["--amplify", amplify]
    if read_ahead:
        argv += ["--read-ahead", read_ahead]
    subprocess.run(argv, env=env, check=True)
    state = json.loads(Path(env["NAIAD_HOME"], "mounts").glob("*/state.json").__next__().read_text())
    return int(state["pid"])


def umount(mnt: Path, env: dict[str, str]) -> dict:
    stats = json.loads(next(Path(env["NAIAD_HOME"], "mounts").glob("*/stats.json")).read_text())
    subprocess.run([*NAIAD, "umount", str(mnt)], env=env, check=True)
    return stats


def run_app(mnt: Path, timeout: float = 120.0) -> float:
    """Run the app until its ready line; the monotonic time of that line."""
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", APP.format(m=mnt)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            if "ready" in line:
                return time.monotonic()
            if time.monotonic() > deadline:
                break
        raise RuntimeError("the app ended without its ready line")
    finally:
        proc.kill()
        proc.wait()


def one(ref: str, mnt: Path, env: dict[str, str], mode: str, amplify: str | None,
        read_ahead: str | None, extra: tuple[str, ...] = ()) -> dict:
    drop_caches()
    t0 = time.monotonic()
    pid = mount(ref, mnt, env, mode, amplify, read_ahead, extra)
    t1 = time.monotonic()
    t_ready = run_app(mnt)
    cpu = daemon_cpu(pid)
    time.sleep(1.2)  # stats.json is written every second
    stats = umount(mnt, env)
    return {"total_s": round(t_ready - t0, 2), "run_s": round(t_ready - t1, 2), "cpu_s": round(cpu, 2),
            "requests": stats["requests"], "chunks_fetched": stats["chunks_fetched"],
            "fetched_mb": round(stats["bytes_fetched"] / 1e6, 1),
            "served_mb": round(stats["bytes_served"] / 1e6, 1), "reads": stats.get("reads"),
            "amplify_k": (stats.get("amplify") or 0) >> 10, "link": stats.get("link"),
            "hinted_mb": round((stats.get("hints") or {}).get("bytes", 0) / 1e6, 1),
            "misses": stats.get("misses"), "joined": stats.get("joined"),
            "miss_wait_s": stats.get("miss_wait_s"), "join_wait_s": stats.get("join_wait_s")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ref")
    ap.add_argument("--mode", default="kernel", choices=["kernel", "fuse"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--label", default="")
    ap.add_argument("--amplify")
    ap.add_argument("--read-ahead")
    ap.add_argument("--mount-arg", action="append", default=[], help="more for `naiad mount` (repeat)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/naiad-datapath"))
    ap.add_argument("--src", help="import naiad from this src dir (a snapshot of another commit)")
    args = ap.parse_args()
    if args.src:
        os.environ["PYTHONPATH"] = args.src
    work = args.work
    mnt, seed, home = work / "mnt", work / "seed", work / "home"
    mnt.mkdir(parents=True, exist_ok=True)
    if not (seed / "bootstraps").is_dir():  # an untimed first mount fetches the bootstrap
        env = {**os.environ, "NAIAD_HOME": str(seed)}
        mount(args.ref, mnt, env, args.mode, None)
        umount(mnt, env)
    results: dict[str, list[dict]] = {"cold": [], "warm": []}
    for rep in range(args.reps):
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        shutil.copytree(seed / "bootstraps", home / "bootstraps")
        env = {**os.environ, "NAIAD_HOME": str(home)}
        for kind in ("cold", "warm"):
            r = one(args.ref, mnt, env, args.mode, args.amplify, args.read_ahead, tuple(args.mount_arg))
            results[kind].append(r)
            print(f"{args.label} {args.mode} rep {rep} {kind}: {r}", flush=True)
    summary = {kind: {k: statistics.median(r[k] for r in rs) for k in rs[0]
                      if isinstance(rs[0][k], (int, float))} for kind, rs in results.items()}
    print(json.dumps({"label": args.label, "mode": args.mode, "amplify": args.amplify, **summary}))


if __name__ == "__main__":
    sys.exit(main())
