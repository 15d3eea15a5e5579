"""Tests of the oracle's own tools: imagegen, corpus and treecmp.

They keep the oracle honest: the corpus images are valid OCI (skopeo reads and copies
them), umoci unpacks each one to exactly the tree an independent model of the OCI layer
rules predicts, the comparator reports every kind of difference it claims to check (so a
naiad test cannot pass vacuously), and shuffling tar entries changes nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import corpus
import imagegen as ig
import pytest
import treecmp as tc

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("umoci") and shutil.which("skopeo")),
    reason="needs root, umoci and skopeo",
)


# --------------------------------------------------------------------------------------
# An independent model of the layer rules, to check umoci and the corpus against
# --------------------------------------------------------------------------------------


class _Node:
    """An inode of the model; hard links share one."""

    def __init__(self, entry: ig.Entry, ident: int) -> None:
        self.entry, self.ident = entry, ident


def _key(path: str) -> str:
    p = ig._norm(path)
    return "/" if p in ("", ".") else "/" + p


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def model_tree(layers: Sequence[Sequence[ig.Entry]]) -> dict[str, tc.Attrs]:
    """What an OCI runtime must produce from `layers`, as treecmp snapshots it.

    Whiteouts and opaque markers of a layer are applied first, since by the spec they
    only hide what lower layers made; then entries in order. An entry of another type
    replaces (a directory with its subtree); a directory over a directory updates
    metadata; a hard link shares its target's inode and ignores its own header.
    """
    tree: dict[str, _Node] = {}
    ids = iter(range(1, 1 << 30))

    def drop_below(d: str) -> None:
        for p in [p for p in tree if p.startswith(d.rstrip("/") + "/")]:
            del tree[p]

    for layer in layers:
        for e in layer:
            k = _key(e.path)
            name = k.rsplit("/", 1)[1]
            if name == ig.OPAQUE_NAME:
                drop_below(_parent(k))
            elif name.startswith(ig.WHITEOUT_PREFIX):
                victim = f"{_parent(k).rstrip('/')}/{name[len(ig.WHITEOUT_PREFIX):]}"
                tree.pop(victim, None)
                drop_below(victim)
        for e in layer:
            k = _key(e.path)
            if k.rsplit("/", 1)[1].startswith(ig.WHITEOUT_PREFIX):
                continue
            old = tree.get(k)
            if isinstance(e, ig.Hardlink):
                tree[k] = tree[_key(e.target)]
                continue
            if old is not None and isinstance(old.entry, ig.Dir) and not isinstance(e, ig.Dir):
                drop_below(k)
            tree[k] = _Node(e, next(ids))

    out = {}
    for path, node in tree.items():
        e = node.entry
        kind = {ig.File: "file", ig.Dir: "dir", ig.Symlink: "symlink", ig.CharDev: "chardev",
                ig.BlockDev: "blockdev", ig.Fifo: "fifo"}[type(e)]
        content = e.content()
        xattrs = tuple(sorted(
            (k, v if isinstance(v, bytes) else v.encode()) for k, v in e.xattrs.items() if v))
        out[path] = tc.Attrs(
            kind=kind,
            mode=None if kind == "symlink" else e.mode,
            uid=e.uid, gid=e.gid,
            size=content.size if content is not None else None,
            sha256=content.sha256() if content is not None else None,
            mtime_ns=e.mtime_ns,
            target=e.target if isinstance(e, ig.Symlink) else None,
            rdev=(e.major, e.minor) if isinstance(e, ig.CharDev) else None,
            xattrs=xattrs,
            inode=(0, node.ident),
        )
    return out


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("oracle")


@pytest.fixture(scope="module")
def layouts(work: Path) -> dict[str, ig.ImageInfo]:
    return corpus.write_corpus(work / "layouts")


@pytest.fixture(scope="module")
def roots(work: Path, layouts: dict[str, ig.ImageInfo]) -> dict[str, Path]:
    return {name: tc.umoci_unpack(info.path, info.tag, work / "unpacked" / name)
            for name, info in layouts.items()}


@pytest.fixture(scope="module")
def everything_snapshot(roots: dict[str, Path]) -> dict[str, tc.Attrs]:
    return tc.snapshot_tree(roots["everything"])


def _skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, check=False)


# --------------------------------------------------------------------------------------
# The corpus is valid OCI, deterministic, and unpacks to what the model predicts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", corpus.ALL_IMAGES)
def test_corpus_image_is_valid_oci(name: str, layouts: dict[str, ig.ImageInfo],
                                   work: Path) -> None:
    info = layouts[name]
    raw = _skopeo("inspect", "--raw", info.ref)
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout) == info.manifest
    blob = (info.path / "blobs" / "sha256" / info.manifest_digest[7:]).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == info.manifest_digest[7:]
    cfg = _skopeo("inspect", "--config", "--raw", info.ref)
    assert json.loads(cfg.stdout)["rootfs"]["diff_ids"] == info.diff_ids
    (work / "copies").mkdir(exist_ok=True)
    copy = _skopeo("copy", "--quiet", info.ref, f"oci:{work / 'copies' / name}:copied")
    assert copy.returncode == 0, copy.stderr
    copied = json.loads(_skopeo("inspect", "--raw",
                                f"oci:{work / 'copies' / name}:copied").stdout)
    assert [ly["digest"] for ly in copied["layers"]] == info.layer_digests
    # diff_ids must be the digests of the uncompressed tars, or runtimes reject the image.
    for blob_digest, diff_id in zip(info.layer_digests, info.diff_ids, strict=True):
        blob = (info.path / "blobs" / "sha256" / blob_digest[7:]).read_bytes()
        assert ig.sha256_digest(gzip.decompress(blob)) == diff_id


@pytest.mark.parametrize("name", corpus.ALL_IMAGES)
def test_umoci_unpack_matches_model(name: str, roots: dict[str, Path]) -> None:
    layers = corpus.image(name)
    assert ig.implicit_dirs(layers) == set(), "corpus dirs must all have entries"
    diffs = tc.compare_snapshots(model_tree(layers), tc.snapshot_tree(roots[name]))
    assert diffs == []


def test_focused_images_are_subtrees_of_everything(
        roots: dict[str, Path], everything_snapshot: dict[str, tc.Attrs]) -> None:
    for name, prefix in corpus.PREFIX.items():
        sub = {p: a for p, a in everything_snapshot.items()
               if p == "/" or p.startswith(f"/{prefix}/") or p == f"/{prefix}"}
        assert tc.compare_snapshots(tc.snapshot_tree(roots[name]), sub) == [], name


def test_generation_is_deterministic(work: Path, layouts: dict[str, ig.ImageInfo]) -> None:
    again = ig.write_oci_layout(work / "again", corpus.everything())
    assert again.manifest_digest == layouts["everything"].manifest_digest
    docker_a = ig.write_docker_archive(work / "a.tar", corpus.image("hardlinks"))
    ig.write_docker_archive(work / "b.tar", corpus.image("hardlinks"))
    assert (work / "a.tar").read_bytes() == (work / "b.tar").read_bytes()
    assert docker_a.diff_ids == layouts["hardlinks"].diff_ids


def test_corpus_size_stays_modest(layouts: dict[str, ig.ImageInfo]) -> None:
    info = layouts["everything"]
    total = sum(ly["size"] for ly in info.manifest["layers"])
    assert total < 40 * ig.MiB


def test_expected_features_are_present(everything_snapshot: dict[str, tc.Attrs],
                                       roots: dict[str, Path]) -> None:
    """Spot checks in plain words, so that the model test cannot agree with umoci on
    something vacuous (e.g. both seeing an empty tree)."""
    s, root = everything_snapshot, roots["everything"]
    # whiteouts and opaque dirs
    assert "/wh/keep" in s and "/wh/never" not in s and "/wh/made-in-1" not in s
    assert (root / "wh/gone").read_bytes() == b"upper gone, back again\n"
    assert sorted(p for p in s if p.startswith("/wh/gonedir")) == [
        "/wh/gonedir", "/wh/gonedir/fresh"]
    assert [p for p in s if p.startswith("/wh/opq/")] == []
    assert sorted(p for p in s if p.startswith("/wh/opq2/")) == ["/wh/opq2/y"]
    assert s["/wh/opq"].mode == 0o750
    # type changes
    assert s["/rp/f2d"].kind == "file" and s["/rp/d2f"].kind == "dir"
    assert s["/rp/d2f/new"].kind == "file" and "/rp/d2f/a" not in s
    assert s["/rp/l2f"].target == "d2f/new" and s["/rp/wd2f"].kind == "file"
    # hard links
    groups = tc.link_groups(s)
    assert groups["/hl/a"] == {"/hl/a", "/hl/b", "/hl/sub/c"}
    assert groups["/hl/big"] == {"/hl/big", "/hl/big-link", "/hl/cross"}
    assert "/hl/grp/x" not in groups and "/hl/grp/z" not in s
    assert groups["/hl/sym"] == {"/hl/sym", "/hl/sym-link"} and s["/hl/sym"].kind == "symlink"
    assert os.lstat(root / "hl/a").st_ino == os.lstat(root / "hl/sub/c").st_ino
    # symlinks
    assert s["/sl/abs"].target == "/etc/passwd" and s["/sl/dangling"].target == "does/not/exist"
    assert len(s["/sl/long"].target or "") == 407
    assert s["/sl/owned"].uid == 1000 and s["/sl/owned"].mtime_ns == 1_600_000_000_250_000_000
    # devices
    assert s["/dev/null"].kind == "chardev" and s["/dev/null"].rdev == (1, 3)
    assert s["/dev/bigminor"].kind == "blockdev" and s["/dev/bigminor"].rdev == (259, 1048575)
    assert s["/dev/fifo"].kind == "fifo"
    # modes and owners
    assert s["/md/setuid-user"].mode == 0o4750 and s["/md/setuid-user"].uid == 1000
    assert s["/md/all-bits"].mode == 0o7777 and s["/md/tmp"].mode == 0o1777
    assert s["/md/private"].mode == 0o700 and s["/md/nobody"].gid == 65534
    assert s["/md/huge-ids"].uid == 4_000_000
    assert (s["/md/shared"].mode, s["/md/shared"].uid) == (0o3770, 65534)
    # xattrs
    many = dict(s["/xa/many"].xattrs)
    assert many["user.binary"] == bytes(range(256)) and len(many["user.long"]) == 3000
    assert "user.empty" not in many
    assert dict(s["/xa/cap"].xattrs) == {"security.capability": corpus.CAP_NET_BIND_SERVICE}
    assert dict(s["/xa"].xattrs) == {"user.dir": b"on a directory"}
    assert dict(s["/xa/plain"].xattrs) == {"user.changed": b"upper layer"}
    # sizes
    assert s["/sz/chunk"].size == ig.MiB and s["/sz/chunk-plus-one"].size == ig.MiB + 1
    assert s["/sz/empty"].size == 16
    assert s["/sz/big"].sha256 == s["/sz/big-copy"].sha256
    assert s["/sz/big"].inode != s["/sz/big-copy"].inode
    assert (root / "sz/sparse").read_bytes().count(0) > 3 * ig.MiB - 4096 - 100
    # names
    assert "/nm/" + "n" * 200 in s and "/nm/new\nline" in s and "/nm/🐳" in s
    assert max(p.count("/") for p in s if p.startswith("/nm/deep")) == 43
    assert "/nm/.whatever" in s and "/nm/.wh" in s
    assert sum(1 for p in s if p.startswith("/mn/many/")) == 3000
    # mtimes, including dirs whose children changed in a later layer
    assert s["/mt/ns"].mtime_ns == 1_600_000_000_123_456_789
    assert s["/mt/pre-1970"].mtime_ns == -1_500_000_000
    assert s["/mt/year-2255"].mtime_ns == 9_000_000_000 * 10**9
    assert s["/mt/link"].mtime_ns == 1_500_000_000_000_000_500
    assert s["/mt/sub"].mtime_ns == 1_400_000_000_750_000_000
    assert s["/mt"].mtime_ns == 1_700_000_000_987_654_321
    assert s["/"].mtime_ns == corpus.ROOT.mtime_ns
    assert s["/hl/grp"].mtime_ns == ig.DEFAULT_MTIME * 10**9  # a child was whited out above it


def test_umoci_xattr_filtering(work: Path) -> None:
    """The xattr facts treecmp's docstring states about umoci."""
    layers = [[corpus.ROOT, ig.File(path="f", xattrs={
        "security.selinux": b"system_u:object_r:etc_t:s0", "trusted.overlay.opaque": b"y",
        "trusted.naiad": b"kept", "user.empty": b"", "user.kept": b"1"})]]
    info = ig.write_oci_layout(work / "xattr-filter", layers)
    root = tc.umoci_unpack(info.path, info.tag, work / "xattr-filter-out")
    assert dict(tc.attrs_of(root / "f").xattrs) == {"trusted.naiad": b"kept",
                                                    "user.kept": b"1"}


def test_implicit_dirs_get_unpack_time(work: Path) -> None:
    """Dirs without entries (and a root without "./") have no defined mtime."""
    layers = [[ig.File(path="a/b/c", data=b"c"), ig.Dir(path="a"),
               ig.File(path="x/y", data=b"y")]]
    assert ig.implicit_dirs(layers) == {"/", "/a/b", "/x"}
    info = ig.write_oci_layout(work / "implicit", layers)
    one = tc.umoci_unpack(info.path, info.tag, work / "implicit-1")
    two = tc.umoci_unpack(info.path, info.tag, work / "implicit-2")
    diffs = tc.compare_trees(one, two)
    assert diffs and all("mtime_ns" in d and d.split(":")[0] in {"/", "/a/b", "/x"}
                         for d in diffs)
    assert tc.compare_trees(one, two, ignore_mtime_of=ig.implicit_dirs(layers)) == []
    assert tc.snapshot_tree(one)["/a/b"].mode == 0o755


# --------------------------------------------------------------------------------------
# Variants of the same image: shuffled, ./-prefixed, zstd, docker-archive, multi-platform
# --------------------------------------------------------------------------------------


def _member_names(layout: Path, digest: str) -> list[str]:
    data = (layout / "blobs" / "sha256" / digest[7:]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tf:
        return tf.getnames()


def test_shuffled_copy_unpacks_to_equal_tree(work: Path, layouts: dict[str, ig.ImageInfo],
                                             everything_snapshot: dict[str, tc.Attrs]) -> None:
    ref = layouts["everything"]
    for seed, prefix in ((7, ""), (8, "./")):
        info = ig.write_oci_layout(work / "shuffled", corpus.everything(), tag=f"s{seed}",
                                   shuffle_seed=seed, prefix=prefix)
        assert set(info.layer_digests).isdisjoint(ref.layer_digests)
        before = _member_names(ref.path, ref.layer_digests[0])
        after = _member_names(info.path, info.layer_digests[0])
        assert before != after and sorted(before) == sorted(
            n.removeprefix("./") or "." for n in after)
        root = tc.umoci_unpack(info.path, info.tag, work / f"shuffled-out-{seed}")
        assert tc.compare_snapshots(everything_snapshot, tc.snapshot_tree(root)) == []


def test_valid_shuffle_keeps_parents_and_link_targets_first() -> None:
    for layer in corpus.everything():
        for seed in range(5):
            order = ig.valid_shuffle(layer, seed)
            assert sorted(order) == list(range(len(layer)))
            seen: set[str] = set()
            present = {ig._norm(e.path) for e in layer}
            for i in order:
                e = layer[i]
                p = ig._norm(e.path)
                parts = p.split("/")
                for k in range(1, len(parts)):
                    anc = "/".join(parts[:k])
                    assert anc not in present or anc in seen, (p, anc)
                if isinstance(e, ig.Hardlink) and ig._norm(e.target) in present:
                    assert ig._norm(e.target) in seen
                seen.add(p)


def test_zstd_layout(work: Path, everything_snapshot: dict[str, tc.Attrs],
                     layouts: dict[str, ig.ImageInfo]) -> None:
    info = ig.write_oci_layout(work / "zstd", corpus.everything(), compression="zstd")
    assert {ly["mediaType"] for ly in info.manifest["layers"]} == {ig.OCI_LAYER_ZSTD}
    assert info.diff_ids == layouts["everything"].diff_ids
    assert _skopeo("inspect", "--raw", info.ref).returncode == 0
    # umoci 0.4.7 cannot read zstd; umoci_unpack recompresses, which must be lossless.
    root = tc.umoci_unpack(info.path, info.tag, work / "zstd-out")
    assert tc.compare_snapshots(everything_snapshot, tc.snapshot_tree(root)) == []


def test_uncompressed_layout(work: Path, roots: dict[str, Path]) -> None:
    info = ig.write_oci_layout(work / "plain", corpus.image("whiteouts"), compression="none")
    assert info.layer_digests == info.diff_ids
    root = tc.umoci_unpack(info.path, info.tag, work / "plain-out")
    assert tc.compare_trees(roots["whiteouts"], root) == []


def test_docker_archive(work: Path, everything_snapshot: dict[str, tc.Attrs]) -> None:
    archive = work / "docker.tar"
    info = ig.write_docker_archive(archive, corpus.everything(), repo_tag="naiad/test:v1")
    with tarfile.open(archive) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
        assert manifest[0]["RepoTags"] == ["naiad/test:v1"]
        assert manifest[0]["Config"] == info.config_digest[7:] + ".json"
        for name, diff_id in zip(manifest[0]["Layers"], info.diff_ids, strict=True):
            layer = tf.extractfile(name).read()  # type: ignore[union-attr]
            assert ig.sha256_digest(layer) == diff_id
    cfg = _skopeo("inspect", "--config", "--raw", f"docker-archive:{archive}")
    assert cfg.returncode == 0, cfg.stderr
    assert json.loads(cfg.stdout)["rootfs"]["diff_ids"] == info.diff_ids
    tc.skopeo_copy(f"docker-archive:{archive}", f"oci:{work / 'from-docker'}:latest")
    root = tc.umoci_unpack(work / "from-docker", "latest", work / "from-docker-out")
    assert tc.compare_snapshots(everything_snapshot, tc.snapshot_tree(root)) == []


def test_multiplatform_layout(work: Path) -> None:
    layers = corpus.image("symlinks")
    ig.write_multiplatform_layout(work / "multi", {("linux", "arm64"): layers,
                                                   ("linux", "amd64"): layers})
    raw = json.loads(_skopeo("inspect", "--raw", f"oci:{work / 'multi'}:latest").stdout)
    assert raw["mediaType"] == ig.OCI_INDEX and len(raw["manifests"]) == 2
    amd = tc.umoci_unpack(work / "multi", "latest", work / "multi-amd64")
    arm = tc.umoci_unpack(work / "multi", "latest", work / "multi-arm64",
                          platform=("linux", "arm64"))
    assert (amd / "platform").read_text() == "linux/amd64\n"
    assert (arm / "platform").read_text() == "linux/arm64\n"


# --------------------------------------------------------------------------------------
# The comparator notices every kind of difference
# --------------------------------------------------------------------------------------


@pytest.fixture
def pair(work: Path, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """Two fresh umoci unpacks of a small image with every inode type and attribute."""
    dest = work / "pairs" / request.node.name.replace("/", "_")
    layers = corpus._with_root(corpus.merge([corpus.FOCUSED[n]() for n in (
        "hardlinks", "symlinks", "devices", "modes", "xattrs", "mtimes")]))
    info = ig.write_oci_layout(work / "pair-image", layers)
    a = tc.umoci_unpack(info.path, info.tag, dest / "a")
    b = tc.umoci_unpack(info.path, info.tag, dest / "b")
    assert tc.compare_trees(a, b) == []
    return a, b


@contextmanager
def _keeping_parent_mtime(path: Path) -> Iterator[None]:
    """Undo the parent-dir mtime change a create/delete causes, to isolate one diff."""
    st = os.lstat(path.parent)
    yield
    os.utime(path.parent, ns=(st.st_atime_ns, st.st_mtime_ns))


def _recreate(path: Path, make: Callable[[Path], None]) -> None:
    """Replace `path` by what `make` creates, copying owner, mode and times back."""
    st = os.lstat(path)
    xattrs = {k: os.getxattr(path, k, follow_symlinks=False)
              for k in os.listxattr(path, follow_symlinks=False)}
    with _keeping_parent_mtime(path):
        path.unlink()
        make(path)
    os.lchown(path, st.st_uid, st.st_gid)
    if not path.is_symlink():
        os.chmod(path, st.st_mode & 0o7777)
        for k, v in xattrs.items():
            os.setxattr(path, k, v)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _one_diff(a: Path, b: Path, path: str, what: str) -> str:
    diffs = tc.compare_trees(a, b)
    assert len(diffs) == 1, diffs
    assert diffs[0].startswith(f"{path}: {what}"), diffs
    return diffs[0]


def test_detects_mode(pair: tuple[Path, Path]) -> None:
    a, b = pair
    os.chmod(b / "md/setuid", 0o755)  # only the setuid bit lost
    assert _one_diff(a, b, "/md/setuid", "mode") == \
        "/md/setuid: mode expected 0o4755, actual 0o755"


def test_detects_sticky_bit_on_dir(pair: tuple[Path, Path]) -> None:
    a, b = pair
    os.chmod(b / "md/tmp", 0o777)
    _one_diff(a, b, "/md/tmp", "mode")


def test_detects_owner(pair: tuple[Path, Path]) -> None:
    a, b = pair
    os.lchown(b / "md/nobody", 65534, 65533)
    _one_diff(a, b, "/md/nobody", "gid")
    os.lchown(b / "sl/owned", 0, 1000)
    diffs = tc.compare_trees(a, b)
    assert any(d.startswith("/sl/owned: uid") for d in diffs), diffs


def _rewrite(path: Path, data: bytes) -> None:
    st = os.lstat(path)
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_detects_content_of_same_size(pair: tuple[Path, Path]) -> None:
    a, b = pair
    data = bytearray((b / "hl/big").read_bytes())
    data[ig.MiB] ^= 1  # the byte past the first chunk
    _rewrite(b / "hl/big", bytes(data))
    # Written in place, so all three names of the inode changed.
    diffs = tc.compare_trees(a, b)
    assert [d.split(": ")[:2] for d in diffs] == [
        [p, d.split(": ")[1]] for p, d in zip(["/hl/big", "/hl/big-link", "/hl/cross"], diffs,
                                                strict=True)]
    assert all(d.split(": ")[1].startswith("sha256 expected") for d in diffs), diffs


def test_detects_size(pair: tuple[Path, Path]) -> None:
    a, b = pair
    _rewrite(b / "xa/plain", b"x\n\n")
    _one_diff(a, b, "/xa/plain", "size expected 2, actual 3")


@pytest.mark.parametrize("path", ["mt/ns", "mt/sub", "mt/link", "dev/null"])
def test_detects_mtime_by_one_nanosecond(pair: tuple[Path, Path], path: str) -> None:
    a, b = pair
    st = os.lstat(b / path)
    os.utime(b / path, ns=(st.st_atime_ns, st.st_mtime_ns + 1), follow_symlinks=False)
    _one_diff(a, b, "/" + path, "mtime_ns")
    assert tc.compare_trees(a, b, ignore={"mtime_ns"}) == []
    assert tc.compare_trees(a, b, ignore_mtime_of={"/" + path}) == []


def test_detects_atime_not(pair: tuple[Path, Path]) -> None:
    """atime is deliberately not compared: reading files changes it."""
    a, b = pair
    st = os.lstat(b / "mt/ns")
    os.utime(b / "mt/ns", ns=(st.st_atime_ns + 10**9, st.st_mtime_ns))
    assert tc.compare_trees(a, b) == []


@pytest.mark.parametrize("change", ["value", "removed", "added", "capability", "on-dir"])
def test_detects_xattr(pair: tuple[Path, Path], change: str) -> None:
    a, b = pair
    path = {"capability": "xa/cap", "on-dir": "xa"}.get(change, "xa/many")
    if change == "value":
        os.setxattr(b / path, "user.a", b"2")
    elif change == "removed":
        os.removexattr(b / path, "user.long")
    elif change == "added":
        os.setxattr(b / path, "user.extra", b"")
    elif change == "capability":
        os.removexattr(b / path, "security.capability")
    else:
        os.setxattr(b / path, "user.dir", b"changed")
    _one_diff(a, b, "/" + path, "xattrs")


def test_detects_symlink_target(pair: tuple[Path, Path]) -> None:
    a, b = pair
    _recreate(b / "sl/rel", lambda p: os.symlink("sub/other", p))
    assert _one_diff(a, b, "/sl/rel", "target") == \
        "/sl/rel: target expected 'sub/file', actual 'sub/other'"


def test_detects_device_numbers(pair: tuple[Path, Path]) -> None:
    a, b = pair
    _recreate(b / "dev/sda1", lambda p: os.mknod(p, 0o660 | 0o060000, os.makedev(8, 2)))
    _one_diff(a, b, "/dev/sda1", "rdev expected (8, 1), actual (8, 2)")


def test_detects_type(pair: tuple[Path, Path]) -> None:
    a, b = pair
    _recreate(b / "dev/fifo", lambda p: p.write_bytes(b""))
    _one_diff(a, b, "/dev/fifo", "type expected fifo, actual file")


def test_detects_hardlink_split_and_join(pair: tuple[Path, Path]) -> None:
    a, b = pair
    # A copy identical in everything but the inode.
    _recreate(b / "hl/b", lambda p: p.write_bytes((a / "hl/b").read_bytes()))
    split = tc.compare_trees(a, b)
    assert split and all("hard-link group" in d for d in split), split
    assert "/hl/a: hard-link group expected ['/hl/a', '/hl/b', '/hl/sub/c'], " \
        "actual ['/hl/a', '/hl/sub/c']" in split
    joined = tc.compare_trees(b, a)
    assert joined and all("hard-link group" in d for d in joined), joined
    assert tc.compare_trees(a, b, ignore={"hardlinks"}) == []


def test_detects_hardlink_to_other_group(pair: tuple[Path, Path]) -> None:
    """Same group sizes, different members: a count of links would not notice."""
    a, b = pair
    with _keeping_parent_mtime(b / "hl/big-link"):
        (b / "hl/big-link").unlink()
        (b / "hl/big-link").hardlink_to(b / "hl/cross")  # same group, no change
    assert tc.compare_trees(a, b) == []
    with _keeping_parent_mtime(b / "xa/linked2"):
        (b / "xa/linked2").unlink()
        (b / "xa/linked2").hardlink_to(b / "hl/a")
    diffs = tc.compare_trees(a, b)
    assert any("hard-link group" in d for d in diffs), diffs


def test_detects_missing_and_extra(pair: tuple[Path, Path]) -> None:
    a, b = pair
    with _keeping_parent_mtime(b / "md/nobody"):
        (b / "md/nobody").unlink()
    with _keeping_parent_mtime(b / "md/new"):
        (b / "md/new").write_bytes(b"")
    assert tc.compare_trees(a, b) == ["/md/nobody: missing (expected file)",
                                      "/md/new: unexpected file"]


def test_detects_missing_subtree(pair: tuple[Path, Path]) -> None:
    a, b = pair
    with _keeping_parent_mtime(b / "sl/sub"):
        shutil.rmtree(b / "sl/sub")
    assert tc.compare_trees(a, b) == ["/sl/sub: missing (expected dir)",
                                      "/sl/sub/file: missing (expected file)"]


def test_does_not_follow_symlinks(pair: tuple[Path, Path]) -> None:
    """`sl/dir -> sub`: changing sub/file must be reported once, under its own name."""
    a, b = pair
    _rewrite(b / "sl/sub/file", b"TARGET\n")
    _one_diff(a, b, "/sl/sub/file", "sha256")


# --------------------------------------------------------------------------------------
# imagegen details
# --------------------------------------------------------------------------------------


def test_pax_mtime_is_exact() -> None:
    cases = {"1600000000.123456789": 1_600_000_000_123_456_789, 1.1: 1_100_000_000,
             "-1.5": -1_500_000_000, 0: 0, 9_000_000_000: 9_000_000_000 * 10**9}
    entries = [ig.File(path=f"f{i}", mtime=m) for i, m in enumerate(cases)]
    with tarfile.open(fileobj=io.BytesIO(ig.make_layer_tar(entries))) as tf:
        members = tf.getmembers()
    for m, (given, ns) in zip(members, cases.items(), strict=True):
        assert ig.mtime_to_ns(given) == ns
        pax = m.pax_headers.get("mtime")
        if ns % 10**9 or ns < 0 or ns >= 8**11 * 10**9:
            assert pax is not None and ig.mtime_to_ns(pax) == ns, (given, pax)
        else:
            assert pax is None and m.mtime == ns // 10**9


def test_entry_paths_are_written_verbatim() -> None:
    entries = [ig.Dir(path="."), ig.Dir(path="d"), ig.File(path="d/f"),
               ig.Hardlink(path="d/h", target="d/f"), ig.Whiteout("d/gone"), ig.Opaque("d")]
    for prefix, names in (("", [".", "d", "d/f", "d/h", "d/.wh.gone", "d/.wh..wh..opq"]),
                          ("./", [".", "./d", "./d/f", "./d/h", "./d/.wh.gone",
                                  "./d/.wh..wh..opq"])):
        with tarfile.open(fileobj=io.BytesIO(ig.make_layer_tar(entries, prefix=prefix))) as tf:
            assert tf.getnames() == names
            assert tf.getmember(names[3]).linkname == names[2]
    with pytest.raises(ValueError, match="permutation"):
        ig.make_layer_tar(entries, order=[0, 0, 1, 2, 3, 4])


def test_big_content_is_streamed_and_seeded() -> None:
    r = ig.Random(3 * ig.MiB + 5, seed=1)
    assert r.sha256() == ig.Random(3 * ig.MiB + 5, seed=1).sha256()
    assert r.sha256() != ig.Random(3 * ig.MiB + 5, seed=2).sha256()
    assert max(len(c) for c in r.chunks()) <= 1 << 16
    c = ig.Concat(b"ab", ig.Zeros(3), ig.Random(4, seed=0))
    assert c.size == 9 and c.read_all()[:5] == b"ab\0\0\0"


# --------------------------------------------------------------------------------------
# Bad inputs are bad in exactly the intended way
# --------------------------------------------------------------------------------------


def _layer_bytes(info: ig.ImageInfo, n: int = -1) -> bytes:
    return (info.path / "blobs" / "sha256" / info.layer_digests[n][7:]).read_bytes()


@pytest.mark.parametrize("kind", ig.BAD_KINDS)
def test_bad_layouts(kind: str, work: Path) -> None:
    info = ig.write_bad_layout(work / "bad" / kind, kind)
    # The manifest itself is always fine: the defect is in a layer.
    assert _skopeo("inspect", "--raw", info.ref).returncode == 0
    blob = _layer_bytes(info)
    (work / "bad-copy").mkdir(exist_ok=True)
    copy = _skopeo("copy", "--quiet", info.ref, f"oci:{work / 'bad-copy' / kind}:x")
    assert (copy.returncode != 0) == (kind == "digest-mismatch"), copy.stderr
    if kind == "digest-mismatch":
        assert ig.sha256_digest(blob) != info.layer_digests[-1]
        assert len(blob) == info.manifest["layers"][-1]["size"]
        return
    assert ig.sha256_digest(blob) == info.layer_digests[-1]
    if kind in ("truncated-gzip", "corrupt-gzip"):
        with pytest.raises((EOFError, OSError, zlib.error)):
            gzip.decompress(blob)
        return
    tar = gzip.decompress(blob)
    if kind in ("truncated-tar", "not-a-tar"):
        with pytest.raises(tarfile.TarError), tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            for m in tf:
                if m.isfile():
                    tf.extractfile(m).read()  # type: ignore[union-attr]
        return
    all_members = []
    for n in range(len(info.layer_digests)):
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(_layer_bytes(info, n)))) as tf:
            all_members += tf.getmembers()
    names = [m.name for m in all_members]
    expected = {
        "dotdot": "../naiad-escape", "nested-dotdot": "etc/../../naiad-escape",
        "absolute": "/etc/naiad-escape", "symlink-abs": "a/passwd",
        "symlink-dotdot": "a/passwd", "symlink-lower-layer": "a/passwd",
        "missing-hardlink": "link",
    }[kind]
    assert expected in names
    if kind.startswith("symlink"):
        link = next(m for m in all_members if m.name == "a")
        assert link.issym() and link.linkname in ("/etc", "..")
    if kind == "missing-hardlink":
        assert next(m for m in all_members if m.name == "link").linkname == "does/not/exist"


def test_umoci_on_bad_layouts(work: Path) -> None:
    """What the reference does: it rejects broken blobs and dangling hard links, and
    *confines* escaping paths to the rootfs rather than rejecting them."""
    for kind in ig.BAD_KINDS:
        info = ig.write_bad_layout(work / "bad-umoci" / kind, kind)
        dest = work / "bad-umoci-out" / kind
        if kind in ("truncated-gzip", "corrupt-gzip", "truncated-tar", "not-a-tar",
                    "digest-mismatch", "missing-hardlink"):
            with pytest.raises(RuntimeError, match="umoci unpack"):
                tc.umoci_unpack(info.path, info.tag, dest)
        else:
            root = tc.umoci_unpack(info.path, info.tag, dest)
            inside = {p for p in tc.snapshot_tree(root) if "escape" in p or "passwd" in p}
            assert inside, kind
            assert not Path("/naiad-escape").exists()
            assert not Path("/etc/naiad-escape").exists()
