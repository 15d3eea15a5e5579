"""Conversion throughput: `naiad convert` beside `skopeo copy` of the same image, in the same run.

Both copy an OCI layout to a fresh OCI layout (naiad also with a fresh
`NAIAD_HOME`); repetitions alternate naiad, skopeo, naiad, ... after one
untimed read of the source blobs, so both see a warm page cache. Throughput is
MB/s (10^6 bytes) of uncompressed layer data: the summed size of the layers'
decompressed tars. Each child's CPU time (user+sys) and peak RSS come from wait4.

The full run converts the torchapp reference image; `--quick` a small
standard-library image, once.
"""

from __future__ import annotations

import os
import shutil

from bench import Context, Table, benchmark
from bench.harness import (
    Run,
    background_note,
    count,
    dir_size,
    mb,
    median,
    naiad_argv,
    require_tools,
    run_measured,
    scratch,
    spread,
)
from bench.images import layer_sizes, small, torchapp, warm_page_cache


@benchmark("convert", "Conversion throughput: naiad convert vs skopeo copy (OCI layout → OCI layout)")
def run(ctx: Context) -> list[Table]:
    require_tools("skopeo", why="the convert benchmark")
    image = small(ctx) if ctx.quick else torchapp(ctx)
    layers = layer_sizes(ctx, image)
    compressed = sum(layer.compressed for layer in layers)
    uncompressed = sum(layer.uncompressed for layer in layers)
    ctx.log(f"convert: {image.ref}: {len(layers)} layer(s), {mb(compressed)} MB compressed, "
            f"{mb(uncompressed)} MB uncompressed")
    warm_page_cache(image)

    naiad_runs: list[Run] = []
    skopeo_runs: list[Run] = []
    last: dict = {}
    inspect: dict = {}
    naiad_layout_bytes = 0
    with scratch("convert") as tmp:
        for rep in range(ctx.reps):
            out, home = tmp / f"naiad-{rep}", tmp / f"home-{rep}"
            env = {**os.environ, "NAIAD_HOME": str(home)}
            r = run_measured(naiad_argv("convert", "--json", image.ref, f"oci:{out}"), env=env)
            naiad_runs.append(r)
            last = r.json()
            if rep == ctx.reps - 1:
                inspect = run_measured(naiad_argv("inspect", "--json", last["target"]), env=env).json()
                naiad_layout_bytes = dir_size(out)
            ctx.log(f"  rep {rep + 1}/{ctx.reps}: naiad convert {r.wall:.2f} s")
            for p in (out, home):
                _rmtree(p)

            out2 = tmp / f"skopeo-{rep}"
            s = run_measured(["skopeo", "--insecure-policy", "copy", "--quiet", image.ref,
                              f"oci:{out2}:{image.tag}"])
            skopeo_runs.append(s)
            ctx.log(f"  rep {rep + 1}/{ctx.reps}: skopeo copy {s.wall:.2f} s")
            _rmtree(out2)

    def row(name: str, runs: list[Run]) -> list[str]:
        return [
            name,
            spread([r.wall for r in runs]),
            spread([uncompressed / r.wall / 1e6 for r in runs], "{:.1f}"),
            spread([r.cpu for r in runs]),
            spread([r.cpu / r.wall for r in runs], "{:.2f}"),
            spread([r.maxrss / 1e6 for r in runs], "{:.0f}"),
        ]

    ratio = median([r.wall for r in naiad_runs]) / median([r.wall for r in skopeo_runs])
    per_rep = [n.wall / s.wall for n, s in zip(naiad_runs, skopeo_runs, strict=True)]
    throughput = Table(
        f"{image.tag}: {len(layers)} layer{'s' if len(layers) != 1 else ''}, {mb(compressed)} MB compressed, "
        f"{mb(uncompressed)} MB uncompressed; {ctx.reps} repetition(s), median (min–max)",
        ["method", "wall s", "MB/s (uncompressed)", "CPU s (user+sys)", "CPU/wall", "peak RSS MB"],
        [row(f"naiad convert oci:SRC:{image.tag} oci:OUT", naiad_runs),
         row(f"skopeo copy oci:SRC:{image.tag} oci:OUT2:{image.tag}", skopeo_runs)],
        [f"Wall-time ratio naiad/skopeo: **{ratio:.2f}×** (median of each; per repetition "
         f"{spread(per_rep)}). skopeo copies the compressed blobs as they are; naiad decompresses, "
         "chunks, hashes and recompresses every file.",
         background_note(naiad_runs + skopeo_runs)],
    )

    bootstrap = inspect["bootstrap"]
    stored = last["stored_bytes"]
    total = stored + bootstrap["size"]
    sizes = Table(
        "Result size",
        ["what", "bytes", "MB", "vs source compressed"],
        [
            ["source layers, compressed", count(compressed), mb(compressed), "1.00"],
            ["source layers, uncompressed (tar)", count(uncompressed), mb(uncompressed),
             f"{uncompressed / compressed:.2f}"],
            ["file data read by naiad (`bytes_in`)", count(last["bytes_in"]), mb(last["bytes_in"]),
             f"{last['bytes_in'] / compressed:.2f}"],
            [f"naiad data blobs ({len(last['blobs'])})", count(stored), mb(stored),
             f"{stored / compressed:.2f}"],
            ["naiad bootstrap (zstd)", count(bootstrap["size"]), mb(bootstrap["size"]),
             f"{bootstrap['size'] / compressed:.4f}"],
            ["naiad blobs + bootstrap", count(total), mb(total), f"{total / compressed:.2f}"],
            ["naiad output layout on disk (all files)", count(naiad_layout_bytes), mb(naiad_layout_bytes),
             f"{naiad_layout_bytes / compressed:.2f}"],
        ],
    )
    figures = Table(
        "`naiad inspect --json` of the result",
        ["files", "dirs", "symlinks", "entries", "chunks", "unique chunks", "dedup ratio",
         "compression ratio", "bootstrap zstd MB", "bootstrap SQLite MB", "chunk size"],
        [[count(inspect["files"]), count(inspect["dirs"]), count(inspect["symlinks"]),
          count(inspect["entries"]), count(inspect["chunks"]), count(inspect["unique_chunks"]),
          f"{inspect['dedup_ratio']:.3f}",
          f"{inspect['compression_ratio']:.3f}", f"{bootstrap['size'] / 1e6:.2f}",
          f"{bootstrap['uncompressed_size'] / 1e6:.2f}", f"{inspect['chunk_size'] // 1024} KiB"]],
    )
    return [throughput, sizes, figures]


def _rmtree(path: os.PathLike[str]) -> None:
    shutil.rmtree(path, ignore_errors=True)
