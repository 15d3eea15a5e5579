"""Benchmark input images, built once into `$NAIAD_BENCH_CACHE` and reused.

- `torchapp`: the PyTorch inference reference image (3 gzip layers, ~356 MB
  compressed, ~1.17 GB uncompressed), built by `../shared/images/torchapp.sh`
  (root, debootstrap, umoci, the Debian mirror). `$NAIAD_BENCH_TORCHAPP` may
  point at an already built OCI layout instead.
- `small`: one layer holding this Python's standard library, built with umoci
  in seconds; what `--quick` converts.
- `quickapp`: `small` plus a second layer with this Python's interpreter and
  the shared libraries it links (from `ldd`), whose entrypoint imports a few
  modules and prints `ready`: a runnable image for `--quick` cold starts.
- `nodeapp`, `djangoapp` (`DEBIAN_APPS`): workloads of other shapes, built like
  torchapp from Debian packages by `bench/images/debapp.sh` (debootstrap
  minbase, `apt-get install` in the chroot, the app from `bench/images/NAME/`):
  an Express app on Node.js (25,000 files of 10 kB on average), and a Django +
  sympy + botocore app whose start reads many small files (~3,000, 27 kB on
  average, against torchapp's ~2,000 files and 146 MB).

`layer_sizes()` returns each layer's compressed and uncompressed (tar) size;
the uncompressed size is found by decompressing the layer once and is cached
by digest in `$NAIAD_BENCH_CACHE/layer-sizes.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zlib
from pathlib import Path

from bench import BenchError, Context
from bench.harness import blob_path, has_tag, manifest, require_tools

TORCHAPP_TAG = "torchapp"
SMALL_TAG = "small"
QUICKAPP_TAG = "quickapp"
IMAGES_DIR = Path(__file__).resolve().parent / "images"  # build scripts and the apps' files
QUICKAPP_CODE = "import argparse, decimal, email.message, http.client, json; print('ready', flush=True)"


@dataclasses.dataclass(frozen=True)
class Image:
    layout: Path
    tag: str

    @property
    def ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


@dataclasses.dataclass(frozen=True)
class Layer:
    digest: str
    media_type: str
    compressed: int
    uncompressed: int


def torchapp(ctx: Context) -> Image:
    """The reference image: `$NAIAD_BENCH_TORCHAPP`, else $NAIAD_BENCH_CACHE/torchapp/oci (or build it)."""
    override = os.environ.get("NAIAD_BENCH_TORCHAPP")
    if override:
        layout = Path(override)
        if not has_tag(layout, TORCHAPP_TAG):
            raise BenchError(f"$NAIAD_BENCH_TORCHAPP={override} is not an OCI layout "
                             f"with tag {TORCHAPP_TAG!r}")
        return Image(layout, TORCHAPP_TAG)
    outdir = ctx.cache / "torchapp"
    layout = outdir / "oci"
    if has_tag(layout, TORCHAPP_TAG):
        return Image(layout, TORCHAPP_TAG)
    script = Path(os.environ.get("NAIAD_TORCHAPP_SCRIPT", ctx.repo.parent / "shared/images/torchapp.sh"))
    if not script.is_file():
        raise BenchError(f"cannot build the torchapp image: {script} not found (set $NAIAD_TORCHAPP_SCRIPT, "
                         "or $NAIAD_BENCH_TORCHAPP to a built OCI layout)")
    return _build_with_script(ctx, "torchapp", [str(script), str(outdir)], layout, TORCHAPP_TAG,
                              "or set $NAIAD_BENCH_TORCHAPP to an OCI layout built by it")


@dataclasses.dataclass(frozen=True)
class DebianApp:
    """A workload image built from Debian packages by `images/debapp.sh`, its app from `images/NAME/`."""

    name: str
    packages: tuple[str, ...]
    entrypoint: tuple[str, ...]
    ready: str  # the start of the line the app prints when it is ready


DEBIAN_APPS = {app.name: app for app in (
    DebianApp("nodeapp", ("nodejs", "node-express", "node-lodash", "node-js-yaml", "node-semver",
                          "node-commander", "node-debug"),
              ("/usr/bin/node", "/app/main.js"), "ready nodeapp"),
    DebianApp("djangoapp", ("python3", "python3-django", "python3-sympy", "python3-botocore", "python3-yaml",
                            "python3-jinja2", "python3-babel", "python3-pygments"),
              ("/usr/bin/python3", "-u", "/app/main.py"), "ready"),
)}


def debian_app(ctx: Context, name: str) -> Image:
    """A `DEBIAN_APPS` workload from $NAIAD_BENCH_CACHE/NAME/oci, built there when absent (minutes)."""
    app = DEBIAN_APPS[name]
    layout = ctx.cache / name / "oci"
    if has_tag(layout, name):
        return Image(layout, name)
    script = IMAGES_DIR / "debapp.sh"
    # One debootstrap for all of them: the same base layer, as images built on one base share it.
    env = {**os.environ, "DEBAPP_CACHE": str(ctx.cache / "debian-base")}
    return _build_with_script(ctx, name, [str(script), str(layout.parent), name, str(IMAGES_DIR / name),
                                          " ".join(app.packages), *app.entrypoint], layout, name, env=env)


def _build_with_script(ctx: Context, name: str, argv: list[str], layout: Path, tag: str,
                       alternative: str = "", env: dict[str, str] | None = None) -> Image:
    """Run an image build script that writes `layout` (as root; log: $NAIAD_BENCH_CACHE/NAME-build.log)."""
    if os.geteuid() != 0:
        hint = f"; {alternative}" if alternative else ""
        raise BenchError(f"building the {name} image needs root ({argv[0]}){hint}")
    require_tools("debootstrap", "umoci", why=f"building the {name} image")
    log = ctx.cache / f"{name}-build.log"
    ctx.log(f"building the {name} image into {layout.parent} (several minutes; log: {log})")
    layout.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        rc = subprocess.run(["bash", *argv], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0 or not has_tag(layout, tag):
        raise BenchError(f"{' '.join(argv[:2])} failed (exit {rc}); see {log}")
    return Image(layout, tag)


def small(ctx: Context) -> Image:
    """A one-layer image of the standard library (~50 MB of files), built with umoci."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    layout = ctx.cache / "small" / "oci"
    if has_tag(layout, SMALL_TAG):
        return Image(layout, SMALL_TAG)
    require_tools("umoci", why="building the small image")
    ctx.log(f"building the small image from {stdlib} into {layout}")
    work = ctx.cache / "small"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tmp_layout, bundle = work / "oci.tmp", work / "bundle"
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    try:
        _umoci("init", "--layout", str(tmp_layout))
        _umoci("new", "--image", f"{tmp_layout}:{SMALL_TAG}")
        _umoci("unpack", *rootless, "--image", f"{tmp_layout}:{SMALL_TAG}", str(bundle))
        dest = bundle / "rootfs" / stdlib.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(stdlib, dest, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "site-packages", "dist-packages"))
        _umoci("repack", "--history.created_by", f"copy of {stdlib}", "--image", f"{tmp_layout}:{SMALL_TAG}",
               str(bundle))
        _umoci("gc", "--layout", str(tmp_layout))
        tmp_layout.rename(layout)
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.rmtree(tmp_layout, ignore_errors=True)
    return Image(layout, SMALL_TAG)


def quickapp(ctx: Context) -> Image:
    """`small` plus this Python's interpreter and the shared libraries it and its extension modules link;
    the entrypoint imports a few modules and prints `ready`."""
    layout = ctx.cache / "quickapp" / "oci"
    if has_tag(layout, QUICKAPP_TAG):
        return Image(layout, QUICKAPP_TAG)
    base = small(ctx)
    require_tools("umoci", "ldd", why="building the quickapp image")
    python = Path(sys.executable).resolve()
    ctx.log(f"building the quickapp image ({python} on top of {base.tag}) into {layout}")
    work = ctx.cache / "quickapp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tmp_layout, files = work / "oci.tmp", work / "files"
    try:
        shutil.copytree(base.layout, tmp_layout)
        # The interpreter and what it and its extension modules (lib-dynload) link.
        dynload = Path(sysconfig.get_paths()["stdlib"]).resolve() / "lib-dynload"
        libs = {lib for so in [python, *dynload.glob("*.so")] for lib in _shared_libraries(so)}
        for path in [python, *sorted(libs)]:
            dest = files / path.relative_to("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)  # follows symlinks: the loader looks the names up
        for d in ("dev", "proc", "sys", "tmp"):
            (files / d).mkdir(exist_ok=True)
        _umoci("insert", "--image", f"{tmp_layout}:{SMALL_TAG}", str(files), "/")
        _umoci("config", "--image", f"{tmp_layout}:{SMALL_TAG}", "--tag", QUICKAPP_TAG,
               "--config.entrypoint", str(python), "--config.entrypoint", "-c",
               "--config.entrypoint", QUICKAPP_CODE, "--config.workingdir", "/",
               "--config.env", "PATH=/usr/local/bin:/usr/bin:/bin", "--config.env", "PYTHONUNBUFFERED=1")
        _umoci("rm", "--image", f"{tmp_layout}:{SMALL_TAG}")
        _umoci("gc", "--layout", str(tmp_layout))
        tmp_layout.rename(layout)
    finally:
        shutil.rmtree(files, ignore_errors=True)
        shutil.rmtree(tmp_layout, ignore_errors=True)
    return Image(layout, QUICKAPP_TAG)


def _shared_libraries(binary: Path) -> list[Path]:
    """The shared objects `binary` loads (its dynamic loader included), as `ldd` finds them."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        words = line.split()
        target = words[words.index("=>") + 1] if "=>" in words[:-1] else ""
        if target.startswith("/"):
            libs.append(Path(target))
        elif "=>" not in words and words and words[0].startswith("/"):  # the loader: /lib64/ld-... (0x...)
            libs.append(Path(words[0]))
    return libs


def image_config(image: Image) -> dict:
    """The `config` object of an image's config blob (Entrypoint, Cmd, Env, WorkingDir)."""
    digest = manifest(image.layout, image.tag)["config"]["digest"]
    doc = json.loads(blob_path(image.layout, digest).read_text())
    return doc.get("config") or {}


def _umoci(*args: str) -> None:
    proc = subprocess.run(["umoci", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"umoci {' '.join(args)} failed: {proc.stderr.strip()}")


def layer_sizes(ctx: Context, image: Image) -> list[Layer]:
    """Compressed and uncompressed size of each layer of `image` (decompressed once, then cached)."""
    cache_file = ctx.cache / "layer-sizes.json"
    try:
        known: dict[str, int] = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    layers = []
    for desc in manifest(image.layout, image.tag)["layers"]:
        digest, media_type = desc["digest"], desc["mediaType"]
        if digest not in known:
            known[digest] = _uncompressed_size(blob_path(image.layout, digest), media_type)
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(known, indent=1, sort_keys=True))
        layers.append(Layer(digest, media_type, desc["size"], known[digest]))
    return layers


def _uncompressed_size(path: Path, media_type: str) -> int:
    total = 0
    with open(path, "rb") as f:
        if media_type.endswith("+zstd"):
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
            while chunk := reader.read(1 << 20):
                total += len(chunk)
        elif media_type.endswith("+gzip") or media_type.endswith(".gzip"):
            d = zlib.decompressobj(wbits=47)  # gzip or zlib header, several members
            while data := f.read(1 << 20):
                while data:
                    total += len(d.decompress(data))
                    if d.eof:  # another gzip member follows
                        data = d.unused_data
                        d = zlib.decompressobj(wbits=47)
                    else:
                        data = b""
            total += len(d.flush())
        else:  # uncompressed tar
            total = os.fstat(f.fileno()).st_size
    return total


def warm_page_cache(image: Image) -> None:
    """Read every blob once, so that the first timed repetition does not pay for the disk."""
    for p in (image.layout / "blobs").rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 22):
                    pass
