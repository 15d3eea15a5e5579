"""The oracle: what naiad converts and unpacks is the rootfs the OCI layers produce.

Every corner-case image of tests/corpus.py is converted, unpacked with
`naiad unpack`, and compared attribute by attribute with `umoci unpack` of
the source. Also: the direct build, docker archives, platforms, chunk sizes
and compressors, reproducible digests, and a round trip through a real
registry.
"""

from __future__ import annotations

import hashlib
import io
import json
import py_compile
import random
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from corpus import ALL_IMAGES, image, write_corpus
from imagegen import (
    SIMPLE_LAYER,
    File,
    encode_layer,
    make_layer_tar,
    write_docker_archive,
    write_multiplatform_layout,
    write_oci_layout,
    write_oci_layout_blobs,
)
from treecmp import compare_trees, umoci_unpack

from naiad.cli import main
from naiad.format.bootstrap import Bootstrap
from naiad.format.erofs import write_erofs


@pytest.fixture(autouse=True)
def naiad_home(tmp_path, monkeypatch):
    home = tmp_path / "naiad-home"
    monkeypatch.setenv("NAIAD_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference_rootfs(corpus, tmp_path_factory):
    """umoci's unpack of each corpus image, made once."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = umoci_unpack(corpus[name].path, "latest", tmp_path_factory.mktemp("umoci") / name)
        return cache[name]

    return get


def naiad(*args: str) -> int:
    return main([str(a) for a in args])


def naiad_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert naiad(*args, "--json") == 0
    return json.loads(capsys.readouterr().out)


def convert_and_unpack(src: str, tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "naiad-layout"
    assert naiad("convert", *extra, src, f"oci:{out}:img") == 0
    assert naiad("check", f"oci:{out}:img") == 0
    dest = tmp_path / "naiad-rootfs"
    assert naiad("unpack", f"oci:{out}:img", dest) == 0
    return dest


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_unpack_equals_umoci(name, corpus, reference_rootfs, tmp_path):
    dest = convert_and_unpack(corpus[name].ref, tmp_path)
    assert compare_trees(reference_rootfs(name), dest) == []


@pytest.mark.parametrize("extra", [("--chunk-size", "4K", "--compressor", "lz4"),
                                   ("--chunk-size", "64K", "--compressor", "none")])
def test_chunk_sizes_and_compressors(extra, corpus, reference_rootfs, tmp_path):
    dest = convert_and_unpack(corpus["sizes"].ref, tmp_path, *extra)
    assert compare_trees(reference_rootfs("sizes"), dest) == []


def test_zstd_source_layers(reference_rootfs, tmp_path):
    info = write_oci_layout(tmp_path / "zstd", image("everything"), compression="zstd")
    dest = convert_and_unpack(info.ref, tmp_path)
    assert compare_trees(reference_rootfs("everything"), dest) == []


def test_docker_archive_source(reference_rootfs, tmp_path):
    archive = tmp_path / "image.tar"
    write_docker_archive(archive, image("hardlinks"), repo_tag="naiad-test/hl:1")
    dest = convert_and_unpack(f"docker-archive:{archive}:naiad-test/hl:1", tmp_path)
    assert compare_trees(reference_rootfs("hardlinks"), dest) == []


def _tar_without_end(entries) -> tuple[bytes, int]:
    """A tar of `entries` cut right after its last member's data; and where that data starts."""
    tar = make_layer_tar(entries)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        last = tf.getmembers()[-1]
    assert last.isreg() and last.size % 512, "the last member must be a file with padding"
    return tar[: last.offset_data + last.size], last.offset_data


def test_layer_without_padding_and_end_blocks(tmp_path, capsys):
    """umoci's `insert` writes such layers and containerd takes them: so does naiad; cut data it refuses."""
    tar, data_start = _tar_without_end([*SIMPLE_LAYER, File(path="tail", data=b"t" * 1000)])
    info = write_oci_layout_blobs(tmp_path / "src", [encode_layer(tar)], "t")
    dest = convert_and_unpack(info.ref, tmp_path)
    assert compare_trees(umoci_unpack(tmp_path / "src", "t", tmp_path / "ref"), dest) == []

    cut = write_oci_layout_blobs(tmp_path / "cut", [encode_layer(tar[: data_start + 1])], "t")
    capsys.readouterr()
    assert naiad("convert", cut.ref, f"oci:{tmp_path / 'out'}:t") == 1
    assert "truncated" in capsys.readouterr().err


def test_direct_build_equals_directory(reference_rootfs, tmp_path, capsys):
    src = reference_rootfs("everything")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architecture": "amd64", "os": "linux",
                                  "config": {"Entrypoint": ["/bin/true"]}}))
    layout = tmp_path / "built"
    assert naiad("build", "--config", config, src, f"oci:{layout}:b") == 0
    dest = tmp_path / "out"
    assert naiad("unpack", f"oci:{layout}:b", dest) == 0
    assert compare_trees(src, dest) == []
    manifest = _manifest(layout, "b")
    built_config = json.loads((layout / "blobs/sha256" / manifest["config"]["digest"][7:]).read_bytes())
    assert built_config["config"] == {"Entrypoint": ["/bin/true"]}
    assert len(built_config["rootfs"]["diff_ids"]) == len(manifest["layers"])


def test_platform_selection(tmp_path, capsys):
    from corpus import image as img

    layout = tmp_path / "multi"
    write_multiplatform_layout(layout, {("linux", "amd64"): img("symlinks"),
                                        ("linux", "arm64"): img("devices")})
    for arch in ("amd64", "arm64"):
        out = tmp_path / f"out-{arch}"
        assert naiad("convert", "--platform", f"linux/{arch}", f"oci:{layout}:latest", f"oci:{out}:x") == 0
        dest = tmp_path / f"rootfs-{arch}"
        assert naiad("unpack", f"oci:{out}:x", dest) == 0
        assert (dest / "platform").read_text() == f"linux/{arch}\n"
    capsys.readouterr()
    assert naiad("convert", "--platform", "linux/s390x", f"oci:{layout}:latest", f"oci:{tmp_path}/o:x") == 1
    assert "no manifest for platform linux/s390x" in capsys.readouterr().err


def _manifest(layout: Path, tag: str) -> dict:
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    return json.loads((layout / "blobs/sha256" / desc["digest"][7:]).read_text())


def test_config_and_manifest(corpus, tmp_path):
    out = tmp_path / "out"
    assert naiad("convert", corpus["xattrs"].ref, f"oci:{out}") == 0
    manifest = _manifest(out, "latest-naiad")  # default tag: TAG-naiad
    layers = manifest["layers"]
    assert layers[-1]["mediaType"] == "application/vnd.oci.image.layer.naiad.bootstrap.v1.sqlite+zstd"
    assert layers[-2]["mediaType"] == "application/vnd.oci.image.layer.naiad.erofs.v1+zstd"
    assert all(la["mediaType"] == "application/vnd.oci.image.layer.naiad.blob.v1" for la in layers[:-2])
    assert manifest["annotations"]["dev.naiad.source.manifest"] == corpus["xattrs"].manifest_digest
    config = json.loads((out / "blobs/sha256" / manifest["config"]["digest"][7:]).read_bytes())
    source = dict(corpus["xattrs"].config)
    assert {k: v for k, v in config.items() if k != "rootfs"} == {
        k: v for k, v in source.items() if k != "rootfs"}
    diff_ids = config["rootfs"]["diff_ids"]
    assert diff_ids[:-2] == [la["digest"] for la in layers[:-2]]

    # The shipped EROFS view is exactly what a node would generate from the bootstrap.
    def unpacked(layer: dict, diff_id: str) -> Path:
        raw = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO((out / "blobs/sha256" / layer["digest"][7:]).read_bytes())).read()
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == diff_id
        path = tmp_path / diff_id[7:]
        path.write_bytes(raw)
        return path

    view = unpacked(layers[-2], diff_ids[-2])
    bs = Bootstrap(str(unpacked(layers[-1], diff_ids[-1])))
    write_erofs(bs, str(tmp_path / "here.erofs"))
    bs.close()
    assert (tmp_path / "here.erofs").read_bytes() == view.read_bytes()


def test_dedup_across_layers(corpus, tmp_path, capsys):
    # "sizes" holds the same 3 MiB file in two layers: stored once.
    out = tmp_path / "out"
    assert naiad("convert", corpus["sizes"].ref, f"oci:{out}:x") == 0
    stats = naiad_json(capsys, "inspect", f"oci:{out}:x")
    assert stats["unique_chunks"] < stats["chunks"]
    assert stats["dedup_ratio"] > 1.0
    assert sum(b["size"] for b in stats["blobs"]) == stats["stored_bytes"]


def test_reproducible_digests(tmp_path, capsys):
    layers = image("everything")
    plain = write_oci_layout(tmp_path / "plain", layers)
    shuffled = write_oci_layout(tmp_path / "shuffled", layers, shuffle_seed=7)
    assert plain.layer_digests != shuffled.layer_digests
    results = []
    for i, src in enumerate((plain, plain, shuffled)):
        results.append(naiad_json(capsys, "convert", src.ref, f"oci:{tmp_path}/out{i}:x"))
    assert results[0]["manifest_digest"] == results[1]["manifest_digest"]
    # The shuffled source has other layer digests (so another source annotation
    # and manifest), but the very same blobs and bootstrap.
    assert [b["digest"] for b in results[0]["blobs"]] == [b["digest"] for b in results[2]["blobs"]]
    assert results[0]["bootstrap"]["digest"] == results[2]["bootstrap"]["digest"]


def test_registry_round_trip(corpus, reference_rootfs, registry, tmp_path, capsys):
    repo = f"{registry.host}/oracle/everything"
    src = corpus["everything"].ref
    pushed = naiad_json(capsys, "convert", src, repo)
    digest = pushed["manifest_digest"]
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{repo}:latest-naiad"], capture_output=True, text=True, check=True)
    assert json.loads(raw.stdout)["layers"][-1]["mediaType"].endswith("bootstrap.v1.sqlite+zstd")
    # Pull back by digest, into a layout, and unpack; and unpack straight from the registry.
    pulled = tmp_path / "pulled"
    assert naiad("pull", f"{repo}@{digest}", f"oci:{pulled}:p") == 0
    for ref, dest in ((f"oci:{pulled}:p", tmp_path / "a"), (f"docker://{repo}@{digest}", tmp_path / "b")):
        assert naiad("unpack", ref, dest) == 0
        assert compare_trees(reference_rootfs("everything"), dest) == []
    assert naiad("check", f"{repo}@{digest}") == 0
    # skopeo, a plain OCI client, copies the naiad image intact.
    copied = tmp_path / "skopeo-copy"
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{repo}@{digest}",
                    f"oci:{copied}:c"], check=True)
    assert naiad("check", f"oci:{copied}:c") == 0
    # A second push sends nothing.
    again = naiad_json(capsys, "push", f"oci:{pulled}:p", f"{repo}:again")
    assert again["blobs_sent"] == 0 and again["manifest_digest"] == digest


def _bootstrap_of(layout: Path, tag: str, tmp_path: Path) -> Bootstrap:
    layer = _manifest(layout, tag)["layers"][-1]
    raw = zstandard.ZstdDecompressor().stream_reader(
        io.BytesIO((layout / "blobs/sha256" / layer["digest"][7:]).read_bytes())).read()
    path = tmp_path / "bootstrap.db"
    path.write_bytes(raw)
    return Bootstrap(str(path))


def test_checked_hash_bytecode_is_stored_right_before_its_source(tmp_path):
    # CPython reads a checked-hash pyc and then its source, on every import: stored side by side,
    # one read-ahead brings both. Timestamp bytecode (its source is never read) stays together
    # in __pycache__, after the directory's files, where the canonical walk puts it.
    root = tmp_path / "root"
    pkg = root / "pkg"
    pkg.mkdir(parents=True)
    rnd = random.Random(3)
    for name in ("checked", "stamped", "zz_filler"):
        body = "".join(f"V{i} = {rnd.getrandbits(64)!r}\n" for i in range(3000))
        (pkg / f"{name}.py").write_text(body)
    for name, mode in (("checked", py_compile.PycInvalidationMode.CHECKED_HASH),
                       ("stamped", py_compile.PycInvalidationMode.TIMESTAMP)):
        pyc = pkg / "__pycache__" / f"{name}.cpython-311.pyc"
        py_compile.compile(str(pkg / f"{name}.py"), cfile=str(pyc), invalidation_mode=mode, doraise=True)
    layout = tmp_path / "built"
    assert naiad("build", root, f"oci:{layout}:b") == 0
    bs = _bootstrap_of(layout, "b", tmp_path)

    def place(path: str) -> tuple[int, int]:
        [chunk] = bs.file_chunks(bs.resolve(path))
        return chunk.offset, chunk.offset + chunk.csize

    assert place("/pkg/__pycache__/checked.cpython-311.pyc")[1] == place("/pkg/checked.py")[0]
    stamped_pyc = place("/pkg/__pycache__/stamped.cpython-311.pyc")[0]
    assert stamped_pyc > max(place(f"/pkg/{n}.py")[0] for n in ("checked", "stamped", "zz_filler"))
    bs.close()
    dest = tmp_path / "out"
    assert naiad("unpack", f"oci:{layout}:b", dest) == 0
    assert compare_trees(root, dest) == []
