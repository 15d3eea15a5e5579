"""Dedup across a set of related images: OCI layer-level vs naiad chunk-level.

Image set (full run): torchapp v1 (the harness's image), torchapp v2 (the
rebuild of `bench/push.py`), and two small python apps built here (once, into
`$NAIAD_BENCH_CACHE/dedup`) from v1's first layer (the debootstrap base, same
digest) plus an app layer of a few MB copied from this Python's standard library
(the two app layers share some modules). `--quick`: synthetic images (into
`$NAIAD_BENCH_CACHE/dedup-quick`): a base layer of 300 files plus a per-image
app layer; the third image's base was "rebuilt": same files but other mtimes and
one changed file, so its layer digest is new.

- OCI: compressed bytes of every layer of every image, and unique bytes counting
  each distinct layer digest once (what a registry stores).
- naiad: each image converted alone (`naiad convert --json`, fresh NAIAD_HOME);
  unique bytes across the set = csize of the distinct chunk digests of all the
  images' bootstraps + every bootstrap; and the realistic variant, each image
  converted in order with `--chunk-dict` of all the previously converted ones,
  summing what each adds (`stored_bytes` + its bootstrap).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import sysconfig
import tarfile
from pathlib import Path

from bench import BenchError, Context, Table, benchmark
from bench.harness import blob_path, has_tag, manifest, mb, naiad_argv, run_measured, scratch
from bench.images import Image
from bench.push import torchapp_versions

APP_TAG = "app"
# Standard library packages copied into the two full-run app layers (asyncio and json in both).
APP_MODULES = {
    "pyapp-web": ("email", "http", "json", "xml", "urllib", "asyncio", "encodings"),
    "pyapp-worker": ("asyncio", "json", "unittest", "concurrent", "multiprocessing", "logging", "pydoc_data"),
}


@dataclasses.dataclass
class Converted:
    ref: str  # oci:PATH:TAG of the naiad image
    json: dict
    chunks: dict[bytes, int]  # digest -> csize

    @property
    def bootstrap(self) -> int:
        return self.json["bootstrap"]["size"]

    @property
    def stored(self) -> int:
        return self.json["stored_bytes"] + self.bootstrap


@benchmark("dedup", "Dedup across related images: OCI layer digests vs naiad chunks")
def run(ctx: Context) -> list[Table]:
    images = quick_images(ctx) if ctx.quick else full_images(ctx)
    ctx.log("dedup: " + ", ".join(f"{n} {i.ref}" for n, i in images))
    with scratch("dedup") as tmp:
        alone, chained = [], []
        for n, (name, image) in enumerate(images):
            alone.append(convert(tmp, n, image, "alone", []))
            chained.append(convert(tmp, n, image, "dict", [c.ref for c in chained]))
            ctx.log(f"dedup: {n + 1}/{len(images)} {name}: alone {mb(alone[-1].stored)} MB, "
                    f"with dict {mb(chained[-1].stored)} MB")
        return report(images, alone, chained)


# --- images --------------------------------------------------------------------


def full_images(ctx: Context) -> list[tuple[str, Image]]:
    v1, v2 = (v.image for v in torchapp_versions(ctx))
    base_desc = manifest(v1.layout, v1.tag)["layers"][0]
    base_diff = _config(v1)["rootfs"]["diff_ids"][0]
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    out = [("torchapp v1", v1), ("torchapp v2", v2)]
    for name, modules in APP_MODULES.items():
        layout = ctx.cache / "dedup" / name / "oci"
        if not has_tag(layout, APP_TAG):
            ctx.log(f"dedup: building {name} (torchapp v1's base layer + {', '.join(modules)}) into {layout}")
            files = {}
            for mod in modules:
                for path in sorted((stdlib / mod).rglob("*")):
                    if path.is_file() and not path.is_symlink() and "__pycache__" not in path.parts:
                        files[f"app/lib/{mod}/{path.relative_to(stdlib / mod)}"] = path.read_bytes()
            write_layout(layout, [(blob_path(v1.layout, base_desc["digest"]), base_diff), tar_layer(files)])
        out.append((name, Image(layout, APP_TAG)))
    return out


def quick_images(ctx: Context) -> list[tuple[str, Image]]:
    """Three images: base + app1, base + app2 (shares 10 files with app1), rebuilt base + app3."""
    work = ctx.cache / "dedup-quick"
    names = ("q1 base+app1", "q2 base+app2", "q3 rebuilt-base+app3")
    layouts = [work / f"q{i + 1}" / "oci" for i in range(3)]
    if all(has_tag(p, APP_TAG) for p in layouts):
        return [(n, Image(p, APP_TAG)) for n, p in zip(names, layouts, strict=True)]
    ctx.log(f"dedup: building the quick images into {work}")
    shutil.rmtree(work, ignore_errors=True)
    rng = random.Random(5)

    def blob(lo: int, hi: int) -> bytes:  # half compressible, like code
        return rng.randbytes(rng.randint(lo, hi)) * 2

    base = {f"usr/lib/base/d{i // 30:02d}/m{i:03d}.bin": blob(2_000, 15_000) for i in range(300)}
    rebuilt = dict(base)
    rebuilt["usr/lib/base/d00/m000.bin"] = blob(10_000, 10_000)  # one file changed, other mtimes
    shared = {f"app/shared/s{i:02d}.bin": blob(5_000, 30_000) for i in range(10)}
    apps = [{**shared, **{f"app/a{n}/f{i:02d}.bin": blob(5_000, 30_000) for i in range(30)}} for n in (1, 2)]
    apps.append({f"app/a3/f{i:02d}.bin": blob(5_000, 30_000) for i in range(40)})
    base_layer, rebuilt_layer = tar_layer(base), tar_layer(rebuilt, mtime=1_700_000_000)
    for layout, b, app in zip(layouts, (base_layer, base_layer, rebuilt_layer), apps, strict=True):
        write_layout(layout, [b, tar_layer(app)])
    return [(n, Image(p, APP_TAG)) for n, p in zip(names, layouts, strict=True)]


def _config(image: Image) -> dict:
    digest = manifest(image.layout, image.tag)["config"]["digest"]
    return json.loads(blob_path(image.layout, digest).read_bytes())


def tar_layer(files: dict[str, bytes], mtime: int = 0) -> tuple[bytes, str]:
    """A gzip tar layer of `files` (and their directories), deterministic; (blob, diff_id)."""
    dirs = sorted({str(p) for rel in files for p in Path(rel).parents if str(p) != "."})
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
            tar.addfile(info)
        for rel in sorted(files):
            info = tarfile.TarInfo(rel)
            info.size, info.mode, info.mtime = len(files[rel]), 0o644, mtime
            tar.addfile(info, io.BytesIO(files[rel]))
    data = raw.getvalue()
    return gzip.compress(data, mtime=0), f"sha256:{hashlib.sha256(data).hexdigest()}"


def write_layout(layout: Path, layers: list[tuple[bytes | Path, str]]) -> None:
    """An OCI layout tagged APP_TAG; `layers`: (blob bytes or a blob file to link, diff_id), base first."""
    tmp = layout.with_name(layout.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    blobs = tmp / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes | Path, media_type: str) -> dict:
        if isinstance(data, Path):
            digest = "sha256:" + data.name
            with contextlib.suppress(FileExistsError):
                try:
                    os.link(data, blobs / data.name)
                except OSError:
                    shutil.copyfile(data, blobs / data.name)
            size = data.stat().st_size
        else:
            digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
            (blobs / digest[7:]).write_bytes(data)
            size = len(data)
        return {"mediaType": media_type, "digest": digest, "size": size}

    layer_descs = [put(blob, "application/vnd.oci.image.layer.v1.tar+gzip") for blob, _ in layers]
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "WorkingDir": "/"},
              "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]},
              "history": [{"created_by": f"dedup bench layer {i}"} for i in range(len(layers))]}
    cfg = put(json.dumps(config, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json")
    man = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                          "config": cfg, "layers": layer_descs}).encode(),
              "application/vnd.oci.image.manifest.v1+json")
    man["annotations"] = {"org.opencontainers.image.ref.name": APP_TAG}
    (tmp / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [man]}))
    (tmp / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    shutil.rmtree(layout, ignore_errors=True)
    layout.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(layout)


# --- conversion ------------------------------------------------------------------


def convert(tmp: Path, n: int, image: Image, kind: str, chunk_dict: list[str]) -> Converted:
    slug = f"{kind}-{n}"
    ref = f"oci:{tmp / slug}:naiad"
    home = tmp / f"home-{slug}"
    argv = ["convert", "--json"]
    for d in chunk_dict:
        argv += ["--chunk-dict", d]
    r = run_measured(naiad_argv(*argv, image.ref, ref), env={**os.environ, "NAIAD_HOME": str(home)})
    return Converted(ref, r.json(), chunk_sizes(ref, home) if kind == "alone" else {})


def chunk_sizes(ref: str, home: Path) -> dict[bytes, int]:
    """digest -> csize of every chunk the naiad image `ref` lists."""
    from naiad.oci.image import source_for
    from naiad.oci.reference import parse_reference
    from naiad.storage.image import NaiadImage

    old = os.environ.get("NAIAD_HOME")
    os.environ["NAIAD_HOME"] = str(home)
    try:
        with source_for(parse_reference(ref)) as source:
            img = NaiadImage.open(source)
            try:
                return {c.digest: c.csize for c in img.bootstrap.chunks()}
            finally:
                img.close()
    except Exception as e:
        raise BenchError(f"cannot read the chunks of {ref}: {e}") from None
    finally:
        if old is None:
            os.environ.pop("NAIAD_HOME", None)
        else:
            os.environ["NAIAD_HOME"] = old


# --- report ----------------------------------------------------------------------


def report(images: list[tuple[str, Image]], alone: list[Converted], chained: list[Converted]) -> list[Table]:
    rows = []
    seen_layers: set[str] = set()
    seen_chunks: set[bytes] = set()
    oci_total = oci_unique = 0
    for (name, image), a, c in zip(images, alone, chained, strict=True):
        layers = manifest(image.layout, image.tag)["layers"]
        size = sum(d["size"] for d in layers)
        new = sum(d["size"] for d in layers if d["digest"] not in seen_layers)
        seen_layers |= {d["digest"] for d in layers}
        new_chunks = sum(s for d, s in a.chunks.items() if d not in seen_chunks) + a.bootstrap
        seen_chunks |= set(a.chunks)
        oci_total, oci_unique = oci_total + size, oci_unique + new
        rows.append([name, str(len(layers)), mb(size), mb(new), mb(a.stored), f"{len(a.chunks):,}",
                     mb(new_chunks), mb(c.stored)])
    naiad_total = sum(a.stored for a in alone)
    all_chunks: dict[bytes, int] = {}
    for a in alone:
        all_chunks.update(a.chunks)
    naiad_unique = sum(all_chunks.values()) + sum(a.bootstrap for a in alone)
    naiad_dict = sum(c.stored for c in chained)
    per_image = Table(
        "Per image, in order (MB = 10^6 bytes)",
        ["image", "layers", "OCI layers MB", "OCI new layers MB", "naiad stored MB", "chunks",
         "naiad new chunks MB", "naiad with --chunk-dict MB"],
        rows,
        ["OCI new layers: layers whose digest no earlier image has. naiad stored: the image converted alone "
         "(blobs + bootstrap). naiad new chunks: csize of its chunks whose digest no earlier image has, "
         "+ its bootstrap. naiad with --chunk-dict: `naiad convert --chunk-dict` of all earlier (so "
         "converted) images, stored_bytes + bootstrap; chunks of dictionary blobs it uses less than "
         "--min-blob-use (10%) of are copied, so stored again."],
    )

    def ratio(total: int, unique: int) -> str:
        return f"{total / unique:.2f}×" if unique else "–"

    totals = Table(
        "Totals across the set and dedup ratio (total / unique)",
        ["what", "MB", "dedup ratio", "vs OCI unique"],
        [["OCI: all layers of all images", mb(oci_total), "", ratio(oci_total, oci_unique)],
         ["OCI: unique by layer digest (registry)", mb(oci_unique), ratio(oci_total, oci_unique), "1.00×"],
         ["naiad: each image alone (blobs + bootstrap)", mb(naiad_total), "",
          ratio(naiad_total, oci_unique)],
         ["naiad: unique by chunk digest + bootstraps", mb(naiad_unique), ratio(naiad_total, naiad_unique),
          ratio(naiad_unique, oci_unique)],
         ["naiad: incremental, --chunk-dict of earlier images", mb(naiad_dict),
          ratio(naiad_total, naiad_dict), ratio(naiad_dict, oci_unique)],
         ["OCI all layers / naiad unique by chunk", "", ratio(oci_total, naiad_unique), ""]],
        [f"{len(images)} images; {len(all_chunks):,} distinct chunks. OCI layers are gzip, naiad chunks "
         "zstd, so compare the ratios, and the naiad rows with each other; "
         "'vs OCI unique' = MB / OCI unique MB. "
         "Config and manifest blobs not counted (OCI), bootstraps counted (naiad)."],
    )
    return [per_image, totals]
