"""Chunk dictionaries and incremental push (issue 4), on the real `docker-registry`.

- v1 and v2 of an image differ in one 50 KB file of a 500-file layer: v2
  built with `--chunk-dict` v1 makes the registry store < 2% of v1's bytes
  (measured in its storage), mounts the shared blobs from v1's repository,
  and unpacks to what `umoci unpack` makes of the source v2;
- v1's manifest deleted: v2 still checks and unpacks; a used blob deleted
  from the registry's storage: `naiad check` names it;
- --min-blob-use: one chunk of a 100-chunk dictionary blob is copied, not referenced;
- reproducibility, and a `naiad chunkdict build` file giving the same image as the reference;
- a lazy mount of v2 reads both the dictionary blob and the new blob correctly;
- one-line errors for a --chunk-dict that is not a naiad image or dictionary.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from imagegen import Dir, File, Random, write_oci_layout
from registry_server import RegistryServer
from test_mount import Node, ok, one_line_error
from treecmp import compare_trees, umoci_unpack

KiB = 1 << 10
FILES = 500
FILE_SIZE = 16 * KiB
CHANGED = "app/data/f-0250.bin"


def layer(version: int) -> list[File | Dir]:
    """500 files of a few KB, one of them 50 KB and different in each version."""
    files = [File(path=f"app/data/f-{i:04d}.bin", data=Random(FILE_SIZE, seed=i))
             for i in range(FILES) if f"app/data/f-{i:04d}.bin" != CHANGED]
    files.append(File(path=CHANGED, data=Random(50 * KiB, seed=100_000 + version)))
    dirs = [Dir(path=p, mode=0o755) for p in (".", "app", "app/data", "etc")]  # umoci dates implied ones now
    return [*dirs, File(path="etc/version", data=f"v{version}\n".encode()), *files]


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[int, Path]:
    base = tmp_path_factory.mktemp("versions")
    return {v: write_oci_layout(base / f"v{v}", [layer(v)], tag=f"v{v}").path for v in (1, 2)}


def js(proc: subprocess.CompletedProcess[str]) -> dict:
    return json.loads(ok(proc).stdout)


def manifest_of(node: Node, ref: str) -> dict:
    """The manifest of a naiad image (via `naiad inspect`'s digest and a skopeo-free read)."""
    if ref.startswith("oci:"):
        path, _, tag = ref[4:].rpartition(":")
        index = json.loads((Path(path) / "index.json").read_text())
        (desc,) = [m for m in index["manifests"]
                   if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
        return json.loads((Path(path) / "blobs" / "sha256" / desc["digest"][7:]).read_text())
    host, _, rest = ref.partition("/")
    repo, _, tag = rest.rpartition(":")
    r = httpx.get(f"http://{host}/v2/{repo}/manifests/{tag}",
                  headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    r.raise_for_status()
    return r.json()


def test_incremental_push_dictionary_deleted_and_missing_blob(versions, registry: RegistryServer,
                                                              node: Node, tmp_path: Path) -> None:
    v1, v2 = f"{registry.host}/dict/app:v1", f"{registry.host}/dict/other:v2"
    ok(node.naiad("convert", f"oci:{versions[1]}:v1", v1))
    v1_bytes = registry.stored_bytes()
    before = registry.stored_blobs()
    report = js(node.naiad("convert", "--json", "--chunk-dict", v1, f"oci:{versions[2]}:v2", v2))
    added = {d: s for d, s in registry.stored_blobs().items() if d not in before}
    uploaded = sum(added.values())
    print(f"v1 stored {v1_bytes} bytes; v2 with --chunk-dict stored {uploaded} more "
          f"({100 * uploaded / v1_bytes:.2f}%)")
    assert uploaded < 0.02 * v1_bytes
    push = report["push"]
    assert push["blobs_mounted"] == len(report["dict_blobs"]) >= 1
    assert push["bytes_sent"] == sum(s for d, s in added.items()
                                     if d != report["manifest_digest"])  # the manifest is not a blob
    manifest = manifest_of(node, v2)
    dict_digests = [d["digest"] for d in report["dict_blobs"]]
    assert [layer["digest"] for layer in manifest["layers"][:len(dict_digests)]] == dict_digests

    reference = umoci_unpack(versions[2], "v2", tmp_path / "umoci")
    ok(node.naiad("unpack", v2, tmp_path / "naiad"))
    assert compare_trees(reference, tmp_path / "naiad") == []

    # inspect: the bytes v2 uses of each blob, dictionary blob included.
    stats = js(node.naiad("inspect", "--json", v2))
    by_digest = {b["digest"]: b for b in stats["blobs"]}
    for d in dict_digests:
        assert 0 < by_digest[d]["used_bytes"] <= by_digest[d]["size"]

    # The dictionary image goes away (its manifest deleted): v2 is unaffected.
    v1_digest = js(node.naiad("inspect", "--json", v1))["manifest_digest"]
    httpx.delete(f"{registry.url}/v2/dict/app/manifests/{v1_digest}").raise_for_status()
    ok(node.naiad("check", v2))
    ok(node.naiad("unpack", v2, tmp_path / "naiad-again"))
    assert compare_trees(reference, tmp_path / "naiad-again") == []

    # A blob v2 uses is gone from the registry's storage: check names it.
    gone = dict_digests[0]
    blob_dir = registry.root / "docker/registry/v2/blobs/sha256" / gone[7:9] / gone[7:]
    shutil.rmtree(blob_dir)
    proc = node.naiad("check", v2)
    assert proc.returncode == 2, proc.stderr
    assert gone in proc.stdout + proc.stderr


def test_oci_target_copies_dictionary_blobs_and_is_reproducible(versions, registry: RegistryServer,
                                                                node: Node, tmp_path: Path) -> None:
    v1 = f"oci:{tmp_path / 'v1'}:v1"
    ok(node.naiad("convert", f"oci:{versions[1]}:v1", v1))
    dict_file = tmp_path / "base.dict"
    built = js(node.naiad("chunkdict", "build", "--json", v1, "-o", dict_file))
    assert built["chunks"] >= FILES
    digests = set()
    for i, chunk_dict in enumerate((v1, v1, str(dict_file))):
        out = f"oci:{tmp_path / f'v2-{i}'}:v2"
        report = js(node.naiad("convert", "--json", "--chunk-dict", chunk_dict, f"oci:{versions[2]}:v2", out))
        assert report["dict_blobs"]
        digests.add(report["manifest_digest"])
        # The layout is complete by itself: the dictionary blobs were copied in.
        ok(node.naiad("check", out))
    assert len(digests) == 1
    # The dictionary file names v1 as the source of its blobs: it works from a registry too.
    reg_v1 = f"{registry.host}/repro/app:v1"
    ok(node.naiad("push", v1, reg_v1))
    dict_file2 = tmp_path / "reg.dict"
    ok(node.naiad("chunkdict", "build", reg_v1, "-o", dict_file2))
    report = js(node.naiad("convert", "--json", "--chunk-dict", dict_file2, f"oci:{versions[2]}:v2",
                           f"{registry.host}/repro/next:v2"))
    assert report["manifest_digest"] in digests
    assert report["push"]["blobs_mounted"] >= 1


def test_min_blob_use_copies_a_barely_used_blob(node: Node, tmp_path: Path) -> None:
    chunk = 64 * KiB
    rng = random.Random(7)
    big = rng.randbytes(100 * chunk)
    (tmp_path / "dict-root").mkdir()
    (tmp_path / "dict-root" / "big.bin").write_bytes(big)
    (tmp_path / "new-root").mkdir()
    (tmp_path / "new-root" / "one.bin").write_bytes(big[:chunk])  # one of the 100 chunks
    (tmp_path / "new-root" / "own.bin").write_bytes(rng.randbytes(3 * chunk))
    base = f"oci:{tmp_path / 'dict'}:base"
    ok(node.naiad("build", "--chunk-size", "64K", tmp_path / "dict-root", base))

    copied = f"oci:{tmp_path / 'copied'}:img"
    report = js(node.naiad("build", "--json", "--chunk-size", "64K", "--chunk-dict", base,
                           tmp_path / "new-root", copied))
    assert report["dict_blobs"] == []
    assert len(manifest_of(node, copied)["layers"]) == 3  # one new blob, the EROFS view, the bootstrap
    assert report["stored_bytes"] >= 4 * chunk
    ok(node.naiad("check", copied))
    ok(node.naiad("unpack", copied, tmp_path / "out"))
    assert (tmp_path / "out" / "one.bin").read_bytes() == big[:chunk]

    # With no threshold the chunk is referenced in place: same files, the dictionary blob as a layer.
    referenced = f"oci:{tmp_path / 'referenced'}:img"
    report = js(node.naiad("build", "--json", "--chunk-size", "64K", "--chunk-dict", base,
                           "--min-blob-use", "0", tmp_path / "new-root", referenced))
    assert len(report["dict_blobs"]) == 1
    assert report["stored_bytes"] < 4 * chunk
    ok(node.naiad("check", referenced))


def test_lazy_mount_reads_dictionary_and_new_blobs(versions, registry: RegistryServer, node: Node) -> None:
    v1, v2 = f"{registry.host}/lazy/app:v1", f"{registry.host}/lazy/app:v2"
    ok(node.naiad("convert", f"oci:{versions[1]}:v1", v1))
    report = js(node.naiad("convert", "--json", "--chunk-dict", v1, f"oci:{versions[2]}:v2", v2))
    assert report["push"]["blobs_sent"] >= 1 and report["dict_blobs"]
    assert report["push"]["blobs_mounted"] == 0  # same repository: the registry already has them
    mnt = node.mount(v2)
    expected = {f.path: f.content().read_all() for f in layer(2) if isinstance(f, File)}
    for path in (CHANGED, "app/data/f-0000.bin", "app/data/f-0499.bin", "etc/version"):
        assert (mnt / path).read_bytes() == expected[path], path
    node.umount(mnt)


def test_bad_chunk_dict_is_a_one_line_error(versions, node: Node, tmp_path: Path) -> None:
    junk = tmp_path / "junk.dict"
    junk.write_bytes(b"not a dictionary")
    for chunk_dict in (f"oci:{versions[1]}:v1", str(junk)):  # a plain OCI image; a random file
        proc = node.naiad("convert", "--chunk-dict", chunk_dict, f"oci:{versions[2]}:v2",
                          f"oci:{tmp_path / 'out'}:x")
        one_line_error(proc, "--chunk-dict")
    one_line_error(node.naiad("chunkdict", "build", f"oci:{versions[1]}:v1", "-o", tmp_path / "d"),
                   "naiad image")
    proc = node.naiad("convert", "--min-blob-use", "2", f"oci:{versions[2]}:v2", f"oci:{tmp_path / 'o'}:x")
    assert proc.returncode == 2 and "fraction" in proc.stderr

