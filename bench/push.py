"""Push of a rebuilt image: plain OCI (`skopeo copy`) vs naiad with a chunk dictionary, on a shaped link.

The workload is torchapp as a team rebuilds it: v1 (the reference image) and v2
= `torchapp.sh` run again with `NUMPY_VERSION=2.3.5 APP_TAG=v2` (built once into
`$NAIAD_BENCH_CACHE/torchapp-v2`). Like a CI rebuild, v2's venv and app layers
get new digests although almost all of their files are unchanged. `--quick`
uses two small synthetic one-layer images (a few hundred files; v2 changes one
50 KB file, so its layer digest is new).

Each method and repetition gets a fresh lab (`bench/netlab.py`) with an empty
registry. v1 is pushed untimed and unshaped; then the registry's egress and the
node's egress (the push direction) are limited with tbf (100 Mbit/s; `--quick`:
unshaped) and only the v2 push is timed:

- `oci`: `skopeo copy oci:V1 docker://REG/app:v1`, then `skopeo copy oci:V2
  docker://REG/app:v2` timed (skopeo skips only layers with identical digests).
- `naiad-dict`: `naiad push` of naiad v1 (converted to an OCI layout once), then
  `naiad push --json oci:V2N REG/app:v2-naiad` timed, where V2N is `naiad
  convert --chunk-dict REG/app:v1-naiad oci:V2 oci:V2N` (converted once, in the
  first such lab, against v1 on the registry).
- `naiad-nodict`: the same with v2 converted without a dictionary: what the
  dictionary buys.

Conversions run once, apart, and are reported on their own. Bytes are what the
registry's veth received during the v2 push (`rx_bytes`: payload plus HTTP and
TCP/IP headers) and what the tool reports (`naiad push --json`: `bytes_sent`;
for skopeo: the v2 blobs v1 lacks). The reference is the bytes of the files
that really changed: v1's and v2's unpacked rootfs are compared, and the files
v2 added or whose content differs are summed (raw, and zstd each, at a build's level).
"""

from __future__ import annotations

import dataclasses
import filecmp
import os
import random
import shutil
import subprocess
from pathlib import Path

from bench import BenchError, Context, Table, benchmark
from bench.harness import (
    Run,
    count,
    has_tag,
    manifest,
    mb,
    median,
    naiad_argv,
    pass_fail,
    require_tools,
    run_measured,
    scratch,
    spread,
)
from bench.images import TORCHAPP_TAG, Image, torchapp, warm_page_cache
from bench.netlab import Lab, lab, rate_name

RATE_FULL = 100 * 10**6
METHODS = ("oci", "naiad-dict", "naiad-nodict")
LABELS = {
    "oci": "oci: skopeo copy (layer digests)",
    "naiad-dict": "naiad push, v2 converted with --chunk-dict v1",
    "naiad-nodict": "naiad push, v2 converted without dictionary",
}
REPO = "app"
QUICK_TAG = "app"
# Issue 4's targets for naiad's v2 push.
TARGET_BYTES_FACTOR = 2.0  # ≤ 2 × (changed files + bootstrap)
TARGET_SPEEDUP = 20.0  # ≥ 20× faster than oci


@dataclasses.dataclass(frozen=True)
class Version:
    image: Image
    rootfs: Path


@dataclasses.dataclass
class Sample:
    method: str
    run: Run  # the timed v2 push
    rx_bytes: int  # received by the registry's veth during it
    reported: int  # bytes the tool says it sent (skopeo: v2 blobs v1 lacks)
    blobs: str  # "sent/total" (+ mounted)
    registry_cpu: float = 0.0  # CPU seconds of the lab registry during it

    @property
    def background(self) -> float:
        """Cores busy with work other than the push and the registry receiving it."""
        r = self.run
        return max(0.0, r.machine_busy - r.cpu - self.registry_cpu) / r.wall if r.wall else 0.0


@dataclasses.dataclass
class Converted:
    v2_source: str  # the OCI v2 image
    v1: str  # oci:PATH:TAG of naiad v1
    nodict: str
    with_dict: str | None = None  # made in the first naiad-dict lab
    runs: dict[str, Run] = dataclasses.field(default_factory=dict)
    json: dict[str, dict] = dataclasses.field(default_factory=dict)


@benchmark("push", "Push of a rebuilt image (v2 onto v1 in the registry): OCI vs naiad with a chunk dict")
def run(ctx: Context) -> list[Table]:
    require_tools("skopeo", "umoci", why="the push benchmark")
    v1, v2 = quick_images(ctx) if ctx.quick else torchapp_versions(ctx)
    rate = None if ctx.quick else RATE_FULL
    ctx.log(f"push: v1 {v1.image.ref}, v2 {v2.image.ref}, links {rate_name(rate)}")
    changed = changed_files(v1.rootfs, v2.rootfs)
    ctx.log(f"push: {changed['files']} files changed, {mb(changed['bytes'])} MB "
            f"({mb(changed['zstd'])} MB zstd)")
    samples: list[Sample] = []
    with scratch("push") as tmp:
        conv = convert_once(ctx, v1, v2, tmp)
        for p in (v1.image.layout, v2.image.layout):
            warm_page_cache(Image(p, v1.image.tag))
        for rep in range(ctx.reps):
            order = METHODS[rep % len(METHODS):] + METHODS[:rep % len(METHODS)]
            for method in order:
                with lab(None, log=ctx.log) as the_lab:
                    if method == "oci":
                        s = push_oci(the_lab, v1, v2, rate)
                    else:
                        s = push_naiad(ctx, the_lab, conv, method, rate, tmp)
                samples.append(s)
                ctx.log(f"  rep {rep + 1}/{ctx.reps} {method}: {s.run.wall:.2f} s, "
                        f"registry rx {mb(s.rx_bytes)} MB")
        return report(ctx, v1, v2, rate, changed, conv, samples)  # reads the layouts in tmp


# --- images --------------------------------------------------------------------


def torchapp_versions(ctx: Context) -> tuple[Version, Version]:
    """torchapp v1 (the harness's) and v2 (built once into $NAIAD_BENCH_CACHE/torchapp-v2)."""
    v1 = torchapp(ctx)
    v1_rootfs = v1.layout.parent / "rootfs"
    v1_cache = v1.layout.parent / "cache"
    outdir = ctx.cache / "torchapp-v2"
    layout = outdir / "oci"
    if not has_tag(layout, TORCHAPP_TAG) or not (outdir / "rootfs").is_dir():
        script = Path(os.environ.get("NAIAD_TORCHAPP_SCRIPT", ctx.repo.parent / "shared/images/torchapp.sh"))
        if not script.is_file():
            raise BenchError(f"cannot build torchapp v2: {script} not found (set $NAIAD_TORCHAPP_SCRIPT)")
        if os.geteuid() != 0:
            raise BenchError(f"building torchapp v2 needs root ({script})")
        require_tools("debootstrap", why="building torchapp v2")
        log = ctx.cache / "torchapp-v2-build.log"
        ctx.log(f"building torchapp v2 into {outdir} (minutes; log: {log})")
        outdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "NUMPY_VERSION": "2.3.5", "APP_TAG": "v2", "TORCHAPP_CACHE": str(v1_cache)}
        with open(log, "wb") as f:
            rc = subprocess.run(["bash", str(script), str(outdir)], stdout=f, stderr=subprocess.STDOUT,
                                env=env).returncode
        if rc != 0 or not has_tag(layout, TORCHAPP_TAG):
            raise BenchError(f"{script} {outdir} (v2) failed (exit {rc}); see {log}")
    if not v1_rootfs.is_dir():
        raise BenchError(f"torchapp v1's rootfs {v1_rootfs} is missing (torchapp.sh leaves it beside oci/); "
                         "it is needed for the changed-files reference")
    return Version(v1, v1_rootfs), Version(Image(layout, TORCHAPP_TAG), outdir / "rootfs")


def quick_images(ctx: Context) -> tuple[Version, Version]:
    """Two one-layer images of 300 files (~10 MB); v2 rewrites one 50 KB file."""
    work = ctx.cache / "push-quick"
    versions = tuple(Version(Image(work / v / "oci", QUICK_TAG), work / v / "rootfs") for v in ("v1", "v2"))
    if all(has_tag(v.image.layout, QUICK_TAG) and v.rootfs.is_dir() for v in versions):
        return versions  # type: ignore[return-value]
    ctx.log(f"building the quick push images into {work}")
    shutil.rmtree(work, ignore_errors=True)
    rng = random.Random(4)
    files = {f"data/d{i // 30:02d}/f{i:03d}.bin": rng.randbytes(rng.randint(5_000, 30_000)) * 2
             for i in range(300)}
    files["data/d00/f000.bin"] = rng.randbytes(25_000) * 2  # 50 KB
    for n, v in enumerate(versions):
        if n == 1:
            files["data/d00/f000.bin"] = rng.randbytes(25_000) * 2  # v2: one 50 KB file changed
        for rel, data in files.items():
            path = v.rootfs / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        # unpack + repack, not `umoci insert`: umoci 0.4.7's insert wrote a truncated tar here.
        layout, bundle = v.image.layout, v.rootfs.parent / "bundle"
        _umoci("init", "--layout", str(layout))
        _umoci("new", "--image", f"{layout}:{QUICK_TAG}")
        _umoci("unpack", "--image", f"{layout}:{QUICK_TAG}", str(bundle))
        shutil.copytree(v.rootfs, bundle / "rootfs", dirs_exist_ok=True)
        _umoci("repack", "--history.created_by", f"files v{n + 1}", "--image", f"{layout}:{QUICK_TAG}",
               str(bundle))
        _umoci("gc", "--layout", str(layout))
        shutil.rmtree(bundle)
    return versions  # type: ignore[return-value]


def _umoci(*args: str) -> None:
    proc = subprocess.run(["umoci", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"umoci {' '.join(args)} failed: {proc.stderr.strip()}")


def changed_files(old: Path, new: Path) -> dict[str, int]:
    """Regular files of `new` that `old` lacks or whose content differs: count, bytes, zstd bytes."""
    import zstandard

    from naiad.format.compression import ZSTD_LEVEL

    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)  # as a build compresses them
    files = size = zsize = 0
    for root, _, names in os.walk(new):
        for name in names:
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            twin = os.path.join(old, os.path.relpath(path, new))
            if os.path.isfile(twin) and not os.path.islink(twin) and filecmp.cmp(path, twin, shallow=False):
                continue
            data = Path(path).read_bytes()
            files += 1
            size += len(data)
            zsize += len(cctx.compress(data))
    return {"files": files, "bytes": size, "zstd": zsize}


def new_blob_bytes(v1: Image, v2: Image) -> tuple[int, int, int]:
    """Bytes and count of v2's config and layers that v1 lacks (what skopeo uploads), and v2's blob count."""
    m1, m2 = manifest(v1.layout, v1.tag), manifest(v2.layout, v2.tag)
    have = {d["digest"] for d in [m1["config"], *m1["layers"]]}
    blobs = [m2["config"], *m2["layers"]]
    new = [d for d in blobs if d["digest"] not in have]
    return sum(d["size"] for d in new), len(new), len(blobs)


# --- conversions and pushes ------------------------------------------------------


def convert_once(ctx: Context, v1: Version, v2: Version, tmp: Path) -> Converted:
    """naiad v1 and v2 (no dictionary) into OCI layouts, timed apart; v2 with the dictionary comes later."""
    conv = Converted(v2_source=v2.image.ref, v1=f"oci:{tmp / 'v1n'}:v1-naiad",
                     nodict=f"oci:{tmp / 'v2n'}:v2-naiad")
    for key, src, dst in (("v1", v1.image.ref, conv.v1), ("v2 no dict", v2.image.ref, conv.nodict)):
        env = {**os.environ, "NAIAD_HOME": str(tmp / f"home-convert-{key.replace(' ', '-')}")}
        r = run_measured(naiad_argv("convert", "--json", src, dst), env=env)
        conv.runs[key], conv.json[key] = r, r.json()
        ctx.log(f"push: naiad convert {key}: {r.wall:.1f} s")
    return conv


def push_oci(the_lab: Lab, v1: Version, v2: Version, rate: int | None) -> Sample:
    reg = the_lab.registry

    def skopeo(src: Image, tag: str) -> Run:
        return run_measured(the_lab.node_argv(["skopeo", "--insecure-policy", "copy", "--quiet",
                                               "--dest-tls-verify=false", src.ref,
                                               f"docker://{reg}/{REPO}:{tag}"]))

    skopeo(v1.image, "v1")
    shape(the_lab, rate)
    rx0, cpu0 = the_lab.registry_rx_bytes(), the_lab.registry_cpu()
    r = skopeo(v2.image, "v2")
    rx, cpu = the_lab.registry_rx_bytes() - rx0, the_lab.registry_cpu() - cpu0
    shape(the_lab, None)
    new_bytes, new_blobs, total = new_blob_bytes(v1.image, v2.image)
    return Sample("oci", r, rx, new_bytes, f"{new_blobs}/{total}", cpu)


def push_naiad(ctx: Context, the_lab: Lab, conv: Converted, method: str, rate: int | None,
               tmp: Path) -> Sample:
    reg = the_lab.registry
    env = {**os.environ, "NAIAD_HOME": str(tmp / f"home-{the_lab.token}")}
    run_measured(the_lab.node_argv(naiad_argv("push", "--plain-http", "--json", conv.v1,
                                              f"{reg}/{REPO}:v1-naiad")), env=env)
    if method == "naiad-dict":
        if conv.with_dict is None:  # convert once, against v1 on this registry (unshaped)
            dst = f"oci:{tmp / 'v2d'}:v2-naiad"
            src = conv.v2_source
            r = run_measured(the_lab.node_argv(naiad_argv(
                "convert", "--plain-http", "--json", "--chunk-dict", f"{reg}/{REPO}:v1-naiad", src, dst)),
                env={**env, "NAIAD_HOME": str(tmp / "home-convert-dict")})
            conv.with_dict, conv.runs["v2 with dict"], conv.json["v2 with dict"] = dst, r, r.json()
            ctx.log(f"push: naiad convert v2 with dict: {r.wall:.1f} s")
        ref = conv.with_dict
    else:
        ref = conv.nodict
    shape(the_lab, rate)
    rx0, cpu0 = the_lab.registry_rx_bytes(), the_lab.registry_cpu()
    r = run_measured(the_lab.node_argv(naiad_argv("push", "--plain-http", "--json", ref,
                                                  f"{reg}/{REPO}:v2-naiad")), env=env)
    rx, cpu = the_lab.registry_rx_bytes() - rx0, the_lab.registry_cpu() - cpu0
    shape(the_lab, None)
    j = r.json()
    blobs = f"{j['blobs_sent']}/{j['blobs_total']}"
    if j.get("blobs_mounted"):
        blobs += f" (+{j['blobs_mounted']} mounted)"
    return Sample(method, r, rx, j["bytes_sent"], blobs, cpu)


def shape(the_lab: Lab, rate: int | None) -> None:
    """Both directions: the registry's egress (responses) and the node's (the pushed data)."""
    the_lab.shape(rate)
    the_lab.shape_node(rate)


# --- report ----------------------------------------------------------------------


def background_note(samples: list[Sample]) -> str:
    loads = [s.background for s in samples]
    text = ("Background load during the timed pushes (machine busy CPU − the push's − the registry's): "
            f"{spread(loads)} cores")
    if max(loads) > 0.25:
        text += " — **the machine was not quiet; timings may be inflated**"
    return text + "."


def mb2(n: float) -> str:
    return f"{n / 1e6:,.2f}"


def report(ctx: Context, v1: Version, v2: Version, rate: int | None, changed: dict[str, int],
           conv: Converted, samples: list[Sample]) -> list[Table]:
    by = {m: [s for s in samples if s.method == m] for m in METHODS}
    t_oci = median([s.run.wall for s in by["oci"]])
    b_oci = median([s.rx_bytes for s in by["oci"]])
    rows = []
    for m in METHODS:
        ss = by[m]
        t, b = median([s.run.wall for s in ss]), median([s.rx_bytes for s in ss])
        rows.append([LABELS[m], spread([s.run.wall for s in ss]),
                     spread([s.rx_bytes for s in ss], "{:.1f}", 1e-6),
                     mb(median([s.reported for s in ss])), ss[-1].blobs,
                     f"{t_oci / t:.1f}×", f"{b_oci / b:.1f}×" if b else "∞"])
    reps = ctx.reps
    v2_layers = manifest(v2.image.layout, v2.image.tag)["layers"]
    pushes = Table(
        f"v2 push on a fresh registry holding v1; links {rate_name(rate)} both ways (tbf on the registry's "
        f"and the node's egress); {reps} repetition(s), median (min–max)",
        ["method", "v2 push s", "registry rx MB", "tool-reported MB sent", "blobs sent/total",
         "faster than oci", "fewer bytes than oci"],
        rows,
        [f"v2: {len(v2_layers)} layers, {mb(sum(d['size'] for d in v2_layers))} MB compressed. "
         "registry rx = the registry veth's rx_bytes during the push (payload + HTTP/TCP/IP headers); "
         "tool-reported: `naiad push --json` bytes_sent, for skopeo the v2 blobs v1 lacks.",
         *([] if reps > 1 else ["One repetition only."]),
         background_note(samples)],
    )

    dict_manifest = manifest(Path(conv.with_dict.split(":")[1]), "v2-naiad") if conv.with_dict else None
    bootstrap = dict_manifest["layers"][-1]["size"] if dict_manifest else 0
    budget = TARGET_BYTES_FACTOR * (changed["bytes"] + bootstrap)
    naiad_bytes = median([s.rx_bytes for s in by["naiad-dict"]])
    speedup = t_oci / median([s.run.wall for s in by["naiad-dict"]])
    floor_bytes = changed["zstd"] + bootstrap
    floor_s = floor_bytes * 8 / rate if rate else 0.0
    targets = Table(
        "Reference and issue 4's targets (naiad-dict)",
        ["what", "value", "target", "result"],
        [["files v2 added or changed (rootfs diff)",
          f"{count(changed['files'])} files, {mb2(changed['bytes'])} MB ({mb2(changed['zstd'])} MB zstd)",
          "", ""],
         ["naiad v2 bootstrap (zstd)", f"{mb2(bootstrap)} MB", "", ""],
         ["naiad-dict v2 push, registry rx", f"{mb2(naiad_bytes)} MB",
          f"≤ {TARGET_BYTES_FACTOR:g} × (changed + bootstrap) = {mb2(budget)} MB",
          f"{pass_fail(naiad_bytes <= budget)} ({naiad_bytes / (changed['bytes'] + bootstrap):.2f}×)"],
         ["naiad-dict v2 push time vs oci", f"{speedup:.1f}× faster", f"≥ {TARGET_SPEEDUP:g}×",
          pass_fail(speedup >= TARGET_SPEEDUP)]],
        [f"Changed files: regular files of v2's rootfs ({v2.rootfs}) absent from v1's ({v1.rootfs}) "
         "or with other content; deleted files not counted.",
         *([f"Floor: sending only the changed files zstd-compressed plus the bootstrap "
            f"({mb2(floor_bytes)} MB) takes {floor_s:.2f} s at {rate_name(rate)}, at most "
            f"{t_oci / floor_s:.1f}× faster than oci's {t_oci:.2f} s."] if rate else [])],
    )

    crow = []
    for key, r in conv.runs.items():
        j = conv.json[key]
        crow.append([key, f"{r.wall:.2f}", f"{r.cpu:.2f}", mb(j.get("stored_bytes", 0)),
                     str(len(j.get("blobs", [])))])
    convert = Table("naiad conversions (once each, untimed in the pushes; to OCI layouts)",
                    ["image", "wall s", "CPU s", "new stored MB", "blobs"], crow)
    return [pushes, targets, convert]
