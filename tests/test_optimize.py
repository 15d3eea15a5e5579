"""`naiad optimize`: a recorded access trace becomes a prefetch list and a hot blob.

The app is a shell script in a tiny image (this machine's /bin/sh, /bin/cat and their
libraries); it reads two of the image's many files. The optimized image must hold the
same tree, share the untouched blobs with the original, put exactly the chunks the app
read into one new blob in read order (recompressed harder, never larger), and a mount
of it must prefetch that blob and nothing else before any read.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from treecmp import compare_trees

from naiad.format.bootstrap import Bootstrap
from naiad.format.spec import MEDIA_TYPE_BLOB

WAIT = 120.0
SCRIPT = "cat /data/big/wanted.bin /data/small/wanted.txt > /dev/null; echo done"


def naiad(home: Path, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "naiad", *map(str, args)], capture_output=True, text=True,
                          timeout=WAIT, env={**os.environ, "NAIAD_HOME": str(home)})


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr
    return proc


def _libraries(program: str) -> list[str]:
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    return [line.split("=>")[-1].split()[0] for line in out.splitlines() if "/" in line]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[Path, str]:
    if os.geteuid() != 0 or shutil.which("runc") is None:
        pytest.skip("needs root and runc")
    base = tmp_path_factory.mktemp("optimize")
    root = base / "rootfs"
    for program in ("/bin/sh", "/bin/cat"):
        for path in [program, *_libraries(program)]:
            dest = root / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(path), dest)
    rng = random.Random(5)
    for d in ("big", "small", "other"):
        (root / "data" / d).mkdir(parents=True)
    (root / "data/big/wanted.bin").write_bytes(rng.randbytes(3 << 20))
    (root / "data/small/wanted.txt").write_bytes(b"hello\n" * 100)
    for i in range(40):
        (root / f"data/other/f{i}").write_bytes(rng.randbytes(100_000))
    config = base / "config.json"
    config.write_text(json.dumps({"config": {"Entrypoint": ["/bin/sh", "-c", SCRIPT]}}))
    layout = base / "layout"
    ok(naiad(base / "home", "build", "--chunk-size", "256K", root, f"oci:{layout}:app", "--config", config))
    return root, f"oci:{layout}:app"


def manifest(layout_ref: str) -> dict:
    path, tag = layout_ref.removeprefix("oci:").rsplit(":", 1)
    index = json.loads(Path(path, "index.json").read_text())
    desc = next(m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    return json.loads(Path(path, "blobs/sha256", desc["digest"][7:]).read_text())


def bootstrap_of(home: Path, layout_ref: str) -> Bootstrap:
    from naiad.oci.image import source_for
    from naiad.oci.reference import parse_reference
    from naiad.storage.image import NaiadImage

    os.environ["NAIAD_HOME"] = str(home)
    with source_for(parse_reference(layout_ref)) as src:
        img = NaiadImage.open(src)
        return Bootstrap(img.bootstrap.path)


def test_optimize_records_the_working_set(image, tmp_path):
    root, ref = image
    home = tmp_path / "home"
    out = f"oci:{tmp_path}/opt:app-opt"
    report = json.loads(ok(naiad(home, "optimize", "--json", ref, out)).stdout)
    assert report["command_exit_code"] == 0
    assert report["prefetch_files"] >= 2  # the two data files, plus the programs and libraries
    bs = bootstrap_of(home, out)
    listed = {bs.path_of(ino) for ino, _ in bs.prefetch_list()}
    assert {"/data/big/wanted.bin", "/data/small/wanted.txt", "/bin/sh"} <= listed
    assert not any(p.startswith("/data/other/") for p in listed)

    # The hot blob holds exactly the prefetched chunks, in prefetch order, back to back.
    hot = report["hot_blob"]["digest"]
    blob_id = next(b.id for b in bs.blobs() if b.digest == hot)
    chunks = bs.prefetch_chunks()
    assert [c.blob for c in chunks] == [blob_id] * len(chunks)
    assert [c.offset for c in chunks] == sorted(c.offset for c in chunks)
    assert chunks[0].offset == 0
    assert sum(c.csize for c in chunks) == report["hot_blob"]["size"]
    # Recompressed harder where that pays (the libraries do), never larger than before.
    before = {c.digest: c.csize for c in bootstrap_of(home, ref).chunks()}
    assert all(c.csize <= before[c.digest] for c in chunks)
    assert sum(c.csize for c in chunks) < sum(before[c.digest] for c in chunks)

    # Same tree; the original's other blobs are shared, not copied.
    orig, new = manifest(ref), manifest(out)
    blobs = [set(d["digest"] for d in m["layers"] if d["mediaType"] == MEDIA_TYPE_BLOB) for m in (orig, new)]
    assert blobs[1] - {hot} <= blobs[0]
    ok(naiad(home, "check", out))
    ok(naiad(home, "unpack", out, tmp_path / "unpacked"))
    assert compare_trees(root, tmp_path / "unpacked", ignore_mtime_of=("/",)) == []


def test_prefetch_list_file_and_reproducibility(image, tmp_path):
    _, ref = image
    home = tmp_path / "home"
    listing = tmp_path / "list"
    listing.write_text("/data/small/wanted.txt\n/data/big/wanted.bin\n/no/such/file\n")
    digests = []
    for i in range(2):
        report = json.loads(ok(naiad(home, "optimize", "--json", "--prefetch-list", listing, ref,
                                     f"oci:{tmp_path}/o{i}:x")).stdout)
        digests.append(report["manifest_digest"])
        assert report["not_found"] == ["/no/such/file"]
        assert report["prefetch_files"] == 2 and report["prefetch_bytes"] == 600 + (3 << 20)
    assert digests[0] == digests[1]


def test_from_hints_prefetches_what_the_entrypoint_loads_without_a_run(image, tmp_path):
    root, ref = image
    home = tmp_path / "home"
    out = f"oci:{tmp_path}/hinted:x"
    report = json.loads(ok(naiad(home, "optimize", "--json", "--from-hints", ref, out)).stdout)
    assert report["command_exit_code"] is None and report["not_found"] == []
    bs = bootstrap_of(home, out)
    listed = [bs.path_of(ino) for ino, _ in bs.prefetch_list()]
    assert listed[0] == "/bin/sh"  # what runs first, then what its start loads
    libraries = {"/" + str(p.relative_to(root)) for p in root.rglob("*.so*")}
    assert set(_libraries("/bin/sh")) <= set(listed) <= {"/bin/sh"} | libraries
    hot = next(b.id for b in bs.blobs() if b.digest == report["hot_blob"]["digest"])
    assert {c.blob for c in bs.prefetch_chunks()} == {hot}
    ok(naiad(home, "unpack", out, tmp_path / "unpacked"))
    assert compare_trees(root, tmp_path / "unpacked", ignore_mtime_of=("/",)) == []

    # Nothing to run with it, and no second source of the list.
    both = naiad(home, "optimize", "--from-hints", ref, f"oci:{tmp_path}/b:x", "--", "true")
    assert both.returncode == 1 and "--from-hints runs none" in both.stderr and "Traceback" not in both.stderr
    listing = tmp_path / "list"
    listing.write_text("/bin/sh\n")
    both = naiad(home, "optimize", "--from-hints", "--prefetch-list", listing, ref, f"oci:{tmp_path}/b:x")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_from_hints_needs_a_program_the_image_holds(image, tmp_path):
    root, _ = image
    home = tmp_path / "home"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"config": {"Entrypoint": ["/no/such/program"]}}))
    ref = f"oci:{tmp_path}/layout:noprog"
    ok(naiad(home, "build", root, ref, "--config", config))
    bad = naiad(home, "optimize", "--from-hints", ref, f"oci:{tmp_path}/out:x")
    assert bad.returncode == 1 and "predicts no start" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_hot_level_trades_build_time_for_bytes(image, tmp_path):
    root, ref = image
    home = tmp_path / "home"
    listing = tmp_path / "list"
    listing.write_text("".join(f"{p}\n" for p in _libraries("/bin/sh")))  # code: it compresses
    sizes = {}
    for level in ("1", None):  # None: the default
        out = f"oci:{tmp_path}/o{level}:x"
        args = ["--hot-level", level] if level else []
        report = json.loads(ok(naiad(home, "optimize", "--json", *args, "--prefetch-list", listing, ref,
                                     out)).stdout)
        sizes[level] = report["hot_blob"]["size"]
        ok(naiad(home, "unpack", out, tmp_path / f"unpacked{level}"))
        assert compare_trees(root, tmp_path / f"unpacked{level}", ignore_mtime_of=("/",)) == []
    assert sizes[None] < sizes["1"]
    bad = naiad(home, "optimize", "--hot-level", "23", "--prefetch-list", listing, ref, f"oci:{tmp_path}/b:x")
    assert bad.returncode == 2 and "invalid zstd level '23'" in bad.stderr and "Traceback" not in bad.stderr


def test_mount_prefetches_the_hot_blob_only(image, tmp_path, registry):
    _, ref = image
    home = tmp_path / "home"
    target = f"{registry.host}/optimize/app:opt"
    report = json.loads(ok(naiad(home, "optimize", "--json", ref, target)).stdout)
    hot = report["hot_blob"]["digest"]
    shutil.rmtree(home / "cache", ignore_errors=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    since = len(registry.requests())
    ok(naiad(home, "mount", target, mnt))
    try:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            stats = json.loads(ok(naiad(home, "stats", "--json", mnt)).stdout)
            if stats["prefetch"]["finished"]:
                break
            time.sleep(0.2)
        assert stats["prefetch"]["finished"]
        gets = [e for e in registry.requests()[since:] if e.method == "GET" and "/blobs/" in e.path]
        blobs = {e.path.rsplit("/", 1)[1] for e in gets}
        m = registry_manifest(target)
        metadata = {d["digest"] for d in m["layers"] if d["mediaType"] != MEDIA_TYPE_BLOB}  # bootstrap, EROFS
        assert blobs - metadata - {m["config"]["digest"]} == {hot}
        assert (mnt / "data/small/wanted.txt").read_bytes() == b"hello\n" * 100
    finally:
        naiad(home, "umount", mnt)


def registry_manifest(target: str) -> dict:
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{target}"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(raw)
