"""The layer-wise build cache of `naiad convert` ($NAIAD_HOME/layers/index.db).

v1 and v2 of an image share their two lower layers (identical blobs, with
xattrs, links, a device, a whiteout and an opaque directory) and differ in
the top one. Converting v2 after v1 takes the shared layers from the cache
without reading them: the result is byte for byte the image a convert
without the cache gives (with or without `--chunk-dict`), and unpacks to what
umoci makes of v2. An earlier output that is gone
(or lost a blob) makes a clean fallback with a warning; `--no-layer-cache`
neither reads nor writes the cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from imagegen import CharDev, Dir, File, Hardlink, Opaque, Random, Symlink, Whiteout, write_oci_layout
from treecmp import compare_trees, umoci_unpack

from naiad.cli import main

KiB = 1 << 10
CHUNK = ("--chunk-size", "64K")


@pytest.fixture(autouse=True)
def naiad_home(tmp_path, monkeypatch):
    home = tmp_path / "naiad-home"
    monkeypatch.setenv("NAIAD_HOME", str(home))
    return home


def base_layer() -> list:
    return [
        Dir(path="."), Dir(path="etc"), Dir(path="opt"), Dir(path="usr"), Dir(path="usr/lib"),
        File(path="usr/lib/big.so", data=Random(300 * KiB, seed=1), mode=0o755),
        File(path="usr/lib/attr.so", data=Random(10 * KiB, seed=2),
             xattrs={"user.note": "hello", "user.bin": b"\x00\xff\x01"}),
        Hardlink(path="usr/lib/attr-link.so", target="usr/lib/attr.so"),
        Symlink(path="usr/lib/libx.so", target="big.so"),
        File(path="etc/empty"), File(path="etc/old"),
        Symlink(path="opt/gone", target="/nowhere"),
        CharDev(path="etc/null", major=1, minor=3),
    ]


def middle_layer() -> list:
    return [
        Dir(path="etc"), Whiteout("etc/old"), Dir(path="opt"), Opaque("opt"),
        File(path="opt/tool", data=Random(70 * KiB, seed=3), mode=0o755, uid=1000, gid=1000),
    ]


def top_layer(version: int) -> list:
    return [Dir(path="app"),
            File(path="app/version", data=f"v{version}\n".encode()),
            File(path="app/model.bin", data=Random(200 * KiB, seed=10 + version))]


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[int, Path]:
    base = tmp_path_factory.mktemp("versions")
    infos = {v: write_oci_layout(base / f"v{v}", [base_layer(), middle_layer(), top_layer(v)], tag=f"v{v}")
             for v in (1, 2)}
    assert infos[1].layer_digests[:2] == infos[2].layer_digests[:2]
    assert infos[1].layer_digests[2] != infos[2].layer_digests[2]
    return {v: info.path for v, info in infos.items()}


@pytest.fixture(scope="module")
def umoci_v2(versions, tmp_path_factory) -> Path:
    return umoci_unpack(versions[2], "v2", tmp_path_factory.mktemp("umoci") / "v2")


def layer_digests(layout: Path) -> list[str]:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    return [d["digest"] for d in manifest["layers"]]


def convert(capsys, *args: str) -> tuple[dict, str]:
    """`naiad convert --json ARGS`: the report, and what went to stderr."""
    capsys.readouterr()
    assert main(["convert", "--json", *CHUNK, *[str(a) for a in args]]) == 0
    out = capsys.readouterr()
    return json.loads(out.out), out.err


def unpack(ref: str, dest: Path) -> Path:
    assert main(["check", ref]) == 0
    assert main(["unpack", ref, str(dest)]) == 0
    return dest


def test_second_convert_reuses_identical_layers(versions, umoci_v2, tmp_path, capsys):
    shared = layer_digests(versions[1])[:2]
    first, _ = convert(capsys, f"oci:{versions[1]}:v1", f"oci:{tmp_path / 'out1'}:v1")
    assert first["cached_layers"] == []

    # The shared layers must not be read at all: v2's source here does not even have them.
    source = tmp_path / "v2-partial"
    shutil.copytree(versions[2], source)
    for digest in shared:
        (source / "blobs" / "sha256" / digest[7:]).unlink()
    second, err = convert(capsys, f"oci:{source}:v2", f"oci:{tmp_path / 'out2'}:v2")
    assert second["cached_layers"] == shared
    assert "warning" not in err
    assert compare_trees(umoci_v2, unpack(f"oci:{tmp_path / 'out2'}:v2", tmp_path / "rootfs")) == []

    # Exactly what a convert without the cache gives: the cache never changes a digest.
    plain, _ = convert(capsys, "--no-layer-cache", f"oci:{versions[2]}:v2", f"oci:{tmp_path / 'out3'}:v2")
    assert plain["cached_layers"] == []
    assert second["manifest_digest"] == plain["manifest_digest"]
    assert second["bytes_in"] == plain["bytes_in"]

    # A third convert of the same source is served from the newest output, still identical.
    third, _ = convert(capsys, f"oci:{versions[2]}:v2", f"oci:{tmp_path / 'out4'}:v2")
    assert third["cached_layers"] == layer_digests(versions[2])


def test_deleted_earlier_output_falls_back(versions, umoci_v2, tmp_path, capsys):
    convert(capsys, f"oci:{versions[1]}:v1", f"oci:{tmp_path / 'out1'}:v1")
    shutil.rmtree(tmp_path / "out1")
    report, err = convert(capsys, f"oci:{versions[2]}:v2", f"oci:{tmp_path / 'out2'}:v2")
    assert report["cached_layers"] == []
    assert "naiad: warning: layer cache" in err
    assert compare_trees(umoci_v2, unpack(f"oci:{tmp_path / 'out2'}:v2", tmp_path / "rootfs")) == []
    plain, _ = convert(capsys, "--no-layer-cache", f"oci:{versions[2]}:v2", f"oci:{tmp_path / 'out3'}:v2")
    assert report["manifest_digest"] == plain["manifest_digest"]


def test_missing_blob_of_earlier_output_falls_back(versions, umoci_v2, tmp_path, capsys):
    first, _ = convert(capsys, f"oci:{versions[1]}:v1", f"oci:{tmp_path / 'out1'}:v1")
    for blob in first["blobs"]:
        (tmp_path / "out1" / "blobs" / "sha256" / blob["digest"][7:]).unlink()
    report, err = convert(capsys, f"oci:{versions[2]}:v2", f"oci:{tmp_path / 'out2'}:v2")
    assert report["cached_layers"] == []
    assert "lacks a blob" in err
    assert compare_trees(umoci_v2, unpack(f"oci:{tmp_path / 'out2'}:v2", tmp_path / "rootfs")) == []


def test_no_layer_cache_neither_reads_nor_writes(versions, tmp_path, capsys):
    convert(capsys, "--no-layer-cache", f"oci:{versions[1]}:v1", f"oci:{tmp_path / 'out1'}:v1")
    report, _ = convert(capsys, f"oci:{versions[2]}:v2", f"oci:{tmp_path / 'out2'}:v2")
    assert report["cached_layers"] == []  # nothing was recorded
    ignored, _ = convert(capsys, "--no-layer-cache", f"oci:{versions[2]}:v2", f"oci:{tmp_path / 'out3'}:v2")
    assert ignored["cached_layers"] == []
    assert ignored["manifest_digest"] == report["manifest_digest"]  # both built from the source alone


def test_other_chunk_size_compressor_or_level_is_a_miss(versions, tmp_path, capsys):
    convert(capsys, f"oci:{versions[1]}:v1", f"oci:{tmp_path / 'out1'}:v1")
    capsys.readouterr()
    others = (["--chunk-size", "128K"], ["--compressor", "lz4"], [*CHUNK, "--zstd-level", "9"])
    for i, extra in enumerate(others):
        out = f"oci:{tmp_path / f'o{i}'}:v2"
        assert main(["convert", "--json", *extra, f"oci:{versions[2]}:v2", out]) == 0
        assert json.loads(capsys.readouterr().out)["cached_layers"] == []


def test_zstd_level_is_the_builds_choice(tmp_path, capsys):
    """A higher level stores the same tree in fewer bytes; a layer cached at one level is not
    reused at another, so each convert is what it would be without the cache."""
    text = b"".join(p.read_bytes() for p in sorted(Path(json.__file__).parent.parent.glob("*.py"))[:40])
    src = write_oci_layout(tmp_path / "src", [[Dir(path="."), File(path="log", data=text)]], tag="t")
    reports = {}
    for level in ("1", "19"):
        reports[level], _ = convert(capsys, "--zstd-level", level, src.ref, f"oci:{tmp_path / level}:t")
        assert reports[level]["cached_layers"] == []
        plain, _ = convert(capsys, "--zstd-level", level, "--no-layer-cache", src.ref,
                           f"oci:{tmp_path}/p{level}:t")
        assert plain["manifest_digest"] == reports[level]["manifest_digest"]
        unpacked = unpack(f"oci:{tmp_path / level}:t", tmp_path / f"rootfs{level}")
        assert (unpacked / "log").read_bytes() == text
    assert reports["19"]["stored_bytes"] < reports["1"]["stored_bytes"]
    with pytest.raises(SystemExit) as exited:
        main(["convert", "--zstd-level", "0", src.ref, f"oci:{tmp_path}/bad:t"])
    assert exited.value.code == 2 and "invalid zstd level '0'" in capsys.readouterr().err


def test_layer_with_content_deleted_later_is_not_cached(tmp_path, capsys):
    """The image lacks the chunks of a file a later layer deletes: that layer cannot come from it."""
    lower = [Dir(path="."), File(path="tmp.bin", data=Random(100 * KiB, seed=7))]
    upper = [Whiteout("tmp.bin"), File(path="keep", data=b"x")]
    src = write_oci_layout(tmp_path / "src", [lower, upper], tag="t")
    convert(capsys, src.ref, f"oci:{tmp_path / 'out1'}:t")
    report, err = convert(capsys, src.ref, f"oci:{tmp_path / 'out2'}:t")
    assert report["cached_layers"] == [src.layer_digests[1]]
    assert "warning" not in err


def test_with_chunk_dict_equals_chunk_dict_build(versions, tmp_path, capsys):
    """With `--chunk-dict`, the cached layers' chunks the dictionary has are referenced as usual."""
    convert(capsys, f"oci:{versions[1]}:v1", f"oci:{tmp_path / 'out1'}:v1")
    base = write_oci_layout(tmp_path / "base", [base_layer()], tag="b")
    convert(capsys, "--no-layer-cache", base.ref, f"oci:{tmp_path / 'dict'}:b")
    chunk_dict = ("--chunk-dict", f"oci:{tmp_path / 'dict'}:b")
    cached, _ = convert(capsys, *chunk_dict, f"oci:{versions[2]}:v2", f"oci:{tmp_path / 'out2'}:v2")
    assert cached["cached_layers"] == layer_digests(versions[2])[:2]
    assert cached["dict_blobs"]
    by_dict, _ = convert(capsys, "--no-layer-cache", *chunk_dict, f"oci:{versions[2]}:v2",
                         f"oci:{tmp_path / 'out3'}:v2")
    assert cached["manifest_digest"] == by_dict["manifest_digest"]
