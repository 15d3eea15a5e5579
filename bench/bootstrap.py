"""Bootstrap at scale: build a 100,000-file tree, then open and query its bootstrap.

The tree is deterministic (seeded): 10 top directories × 100 subdirectories ×
100 files of 4 B to 4 KiB (log-uniform sizes, hex text), every 10th file
executable, plus `links/` with 100 symlinks and 100 hard links; all mtimes
fixed. `--quick` makes 10 × 10 × 100 = 10,000 files.

`naiad build DIR oci:OUT:tree` is timed like a conversion. The bootstrap layer
(the manifest's last layer, zstd-compressed SQLite) is then decompressed and
probed in a fresh child process (`python -m bench.bootstrap probe ...`), so
that its RSS is clean: VmRSS is read after the imports and the path list are
loaded, then after the first open, 10,000 `resolve()` of random full paths,
10,000 `getattr()`, 10,000 `file_chunks()` and 1,000 `readdir()`. The open time
is the median of many open+close cycles (the file is in the page cache).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

from bench import Context, Table, benchmark
from bench.harness import (
    background_note,
    blob_path,
    count,
    manifest,
    naiad_argv,
    pass_fail,
    run_measured,
    scratch,
)

OPEN_TARGET_MS = 50.0
RSS_TARGET_MB = 30.0
LOOKUPS = 10_000
OPENS = 200
MTIME = 1_700_000_000
SEED = 20240601


def make_tree(root: Path, top: int, sub: int, files: int, seed: int = SEED) -> list[str]:
    """Write the tree under `root`; return the relative paths of all its entries."""
    rng = random.Random(seed)
    paths: list[str] = []
    dirs: list[Path] = []
    lo, hi = math.log(4), math.log(4096)
    for t in range(top):
        for s in range(sub):
            d = root / f"d{t:02d}" / f"s{s:03d}"
            d.mkdir(parents=True)
            dirs.append(d)
            paths.append(f"d{t:02d}/s{s:03d}")
            for i in range(files):
                name = f"f{i:04d}.{'sh' if i % 10 == 0 else 'txt'}"
                size = int(math.exp(rng.uniform(lo, hi)))
                data = rng.randbytes((size + 1) // 2).hex()[:size].encode()
                p = d / name
                with open(p, "wb") as f:
                    f.write(data)
                os.chmod(p, 0o755 if i % 10 == 0 else 0o644)
                os.utime(p, (MTIME, MTIME))
                paths.append(f"d{t:02d}/s{s:03d}/{name}")
        dirs.append(root / f"d{t:02d}")
        paths.append(f"d{t:02d}")
    links = root / "links"
    links.mkdir()
    file_paths = [p for p in paths if "/f" in p]
    for i in range(100):
        target = rng.choice(file_paths)
        os.symlink(f"../{target}", links / f"sl{i:03d}")
        os.utime(links / f"sl{i:03d}", (MTIME, MTIME), follow_symlinks=False)
        os.link(root / rng.choice(file_paths), links / f"hl{i:03d}")
        paths += [f"links/sl{i:03d}", f"links/hl{i:03d}"]
    paths.append("links")
    for d in [*dirs, links, root]:
        os.utime(d, (MTIME, MTIME))
    return paths


def extract_bootstrap(layout: Path, tag: str, dest: Path) -> tuple[int, int]:
    """Decompress the image's bootstrap layer to `dest`; return (compressed, uncompressed) sizes."""
    import zstandard

    from naiad.format.spec import MEDIA_TYPE_BOOTSTRAP

    layer = manifest(layout, tag)["layers"][-1]
    if layer["mediaType"] != MEDIA_TYPE_BOOTSTRAP:
        raise RuntimeError(f"last layer of {layout}:{tag} is {layer['mediaType']}, not the bootstrap")
    with open(blob_path(layout, layer["digest"]), "rb") as src, open(dest, "wb") as out:
        zstandard.ZstdDecompressor().copy_stream(src, out)
    return layer["size"], dest.stat().st_size


@benchmark("bootstrap", "Bootstrap at scale: build a many-file tree, open and query its bootstrap")
def run(ctx: Context) -> list[Table]:
    top, sub, files = (10, 10, 100) if ctx.quick else (10, 100, 100)
    nfiles = top * sub * files
    with scratch("bootstrap") as tmp:
        tree = tmp / "tree"
        tree.mkdir()
        t0 = time.perf_counter()
        paths = make_tree(tree, top, sub, files)
        ctx.log(f"bootstrap: made a {count(nfiles)}-file tree ({count(len(paths))} entries) "
                f"in {time.perf_counter() - t0:.1f} s")
        data_bytes = sum(os.lstat(tree / p).st_size for p in paths if "/f" in p)

        out = tmp / "oci"
        env = {**os.environ, "NAIAD_HOME": str(tmp / "home")}
        build = run_measured(naiad_argv("build", "--json", str(tree), f"oci:{out}:tree"), env=env)
        ctx.log(f"  naiad build: {build.wall:.2f} s")
        result = build.json()

        db = tmp / "bootstrap.sqlite"
        csize, usize = extract_bootstrap(out, "tree", db)
        rng = random.Random(SEED + 1)
        sample = tmp / "paths.json"
        sample.write_text(json.dumps(rng.choices(paths, k=LOOKUPS)))
        probe = run_measured([sys.executable, "-m", "bench.bootstrap", "probe", str(db), str(sample)],
                             cwd=ctx.repo).json()
        ctx.log(f"  probe: open {probe['open_ms_median']:.2f} ms, +{probe['rss_added'] / 1e6:.1f} MB RSS")

    entries = len(paths) + 1  # + the root
    build_table = Table(
        f"naiad build of a {count(nfiles)}-file tree ({count(entries)} entries, {data_bytes / 1e6:.1f} MB "
        "of file data)",
        ["command", "wall s", "files/s", "CPU s (user+sys)", "peak RSS MB", "data blobs MB"],
        [["naiad build DIR oci:OUT:tree", f"{build.wall:.2f}", count(nfiles / build.wall),
          f"{build.cpu:.2f}", f"{build.maxrss / 1e6:.0f}", f"{result['stored_bytes'] / 1e6:.1f}"]],
        [background_note([build])],
    )
    size_table = Table(
        "Bootstrap size",
        ["form", "bytes", "MB", "bytes per entry"],
        [["zstd (on the wire)", count(csize), f"{csize / 1e6:.2f}", f"{csize / entries:.1f}"],
         ["SQLite (uncompressed)", count(usize), f"{usize / 1e6:.2f}", f"{usize / entries:.1f}"]],
    )
    ms = probe["open_ms"]
    rss_mb = probe["rss_added"] / 1e6
    per_op = "{:.1f} µs/op".format
    query_table = Table(
        f"Bootstrap queries in a fresh process ({probe['opens']} opens; "
        f"{count(LOOKUPS)} random operations each)",
        ["measure", "value", "target", "result"],
        [
            ["open (median, min–max)", f"{probe['open_ms_median']:.2f} ms ({min(ms):.2f}–{max(ms):.2f})",
             f"< {OPEN_TARGET_MS:.0f} ms", pass_fail(probe["open_ms_median"] < OPEN_TARGET_MS)],
            ["first open", f"{probe['first_open_ms']:.2f} ms", "", ""],
            [f"{count(LOOKUPS)} × resolve(full path)",
             f"{probe['resolve_s']:.3f} s ({per_op(probe['resolve_s'] / LOOKUPS * 1e6)})", "", ""],
            [f"{count(LOOKUPS)} × getattr(ino)",
             f"{probe['getattr_s']:.3f} s ({per_op(probe['getattr_s'] / LOOKUPS * 1e6)})", "", ""],
            [f"{count(LOOKUPS)} × file_chunks(ino)",
             f"{probe['chunks_s']:.3f} s ({per_op(probe['chunks_s'] / LOOKUPS * 1e6)})", "", ""],
            [f"{count(probe['readdirs'])} × readdir(dir)",
             f"{probe['readdir_s']:.3f} s ({per_op(probe['readdir_s'] / probe['readdirs'] * 1e6)})", "", ""],
            ["RSS added (open + all queries)", f"{rss_mb:.1f} MB", f"< {RSS_TARGET_MB:.0f} MB",
             pass_fail(rss_mb < RSS_TARGET_MB)],
            ["process RSS after (VmRSS / VmHWM)",
             f"{probe['rss_after'] / 1e6:.1f} / {probe['hwm_after'] / 1e6:.1f} MB", "", ""],
        ],
        [f"RSS added = VmRSS after the queries − VmRSS before the first open (Python, sqlite3, naiad "
         f"and the path list already loaded: {probe['rss_before'] / 1e6:.1f} MB). Lookups: "
         f"{count(probe['found'])} of {count(LOOKUPS)} paths resolved."],
    )
    return [build_table, size_table, query_table]


# --- the probe, run in a child process -------------------------------------------


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(db: str, sample_file: str, opens: int = OPENS) -> dict:
    """Open the bootstrap at `db` and query it; return timings and RSS figures."""
    import stat

    from naiad.format.bootstrap import Bootstrap

    paths = json.loads(Path(sample_file).read_text())
    rss_before = _status_bytes("VmRSS")

    t = time.perf_counter()
    bs = Bootstrap(db)
    first_open = time.perf_counter() - t

    t = time.perf_counter()
    inos = [bs.resolve(p) for p in paths]
    resolve_s = time.perf_counter() - t
    found = [i for i in inos if i is not None]

    rng = random.Random(SEED + 2)
    picks = rng.choices(found, k=LOOKUPS)
    t = time.perf_counter()
    attrs = [bs.getattr(i) for i in picks]
    getattr_s = time.perf_counter() - t

    files = [a.ino for a in attrs if stat.S_ISREG(a.mode)]
    reg = rng.choices(files, k=LOOKUPS)
    t = time.perf_counter()
    for i in reg:
        bs.file_chunks(i, 0, -1)
    chunks_s = time.perf_counter() - t

    dirs = sorted({a.ino for a in attrs if stat.S_ISDIR(a.mode)} | {1})
    dir_picks = rng.choices(dirs, k=1000)
    t = time.perf_counter()
    for i in dir_picks:
        bs.readdir(i)
    readdir_s = time.perf_counter() - t

    rss_after = _status_bytes("VmRSS")
    hwm_after = _status_bytes("VmHWM")
    bs.close()

    times = []
    for _ in range(opens):
        t = time.perf_counter()
        b = Bootstrap(db)
        times.append(time.perf_counter() - t)
        b.close()
    times.sort()
    return {
        "opens": opens,
        "open_ms": [x * 1e3 for x in times],
        "open_ms_median": times[len(times) // 2] * 1e3,
        "first_open_ms": first_open * 1e3,
        "resolve_s": resolve_s,
        "found": len(found),
        "getattr_s": getattr_s,
        "chunks_s": chunks_s,
        "readdir_s": readdir_s,
        "readdirs": len(dir_picks),
        "rss_before": rss_before,
        "rss_after": rss_after,
        "hwm_after": hwm_after,
        "rss_added": rss_after - rss_before,
    }


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "probe":
        sys.exit("usage: python -m bench.bootstrap probe BOOTSTRAP.sqlite PATHS.json")
    print(json.dumps(probe(sys.argv[2], sys.argv[3])))
