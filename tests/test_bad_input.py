"""Bad input (issue 2, section 6): a one-line error, a non-zero exit, no traceback, no debris.

Every case runs the real `naiad` command line in a subprocess, with its own
NAIAD_HOME, and then looks at what is left: the target OCI layout must hold
exactly what it held before (no new blob, no `.naiad-staging-*` dir, the same
index.json), a registry must hold no manifest and no open upload session, and
NAIAD_HOME/tmp must be empty.

The inputs:

- every malformed image of imagegen.BAD_KINDS (corrupt or truncated gzip/tar,
  a layer whose digest does not match, entries escaping the root by `..`, an
  absolute path or a symlink, a hard link to nothing), into a fresh layout and
  into one that already holds an image;
- a full target disk: a 2 MiB tmpfs, filled while chunks are spooled, while a
  blob is assembled (after an earlier blob was already in place) and while the
  bootstrap is written; and `naiad unpack` into one;
- a registry that answers 500 to everything, to blob uploads only, or to the
  manifest only, one that is not there, and one whose connection drops in the
  middle of a blob (the client resumes with a Range request; when every
  attempt drops without progress it gives up cleanly);
- a naiad image tampered with after conversion: a flipped byte in a data blob,
  other bytes under the bootstrap's digest, a missing data blob;
- wrong references and options.

The registry is the real `docker-registry` of conftest.py. The only fake is
faultproxy.FaultProxy, the fault-injecting proxy placed in front of it. The
subprocesses shorten the registry client's backoff (its module constants, as
tests/test_registry.py does), but keep its real number of attempts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from faultproxy import FaultProxy
from imagegen import (
    BAD_KINDS,
    Concat,
    Dir,
    File,
    ImageInfo,
    Random,
    write_bad_layout,
    write_oci_layout,
)
from registry_server import RegistryServer, free_port

from naiad.oci import registry as registry_mod

# The real CLI, with the registry client's backoff cut to milliseconds.
_CLI = (
    "import sys\n"
    "from naiad.oci import registry\n"
    "registry.BACKOFF, registry.BACKOFF_MAX = 0.01, 0.05\n"
    "from naiad.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
RETRIES = registry_mod.RETRIES
KiB = 1 << 10

# A small image whose chunks are easy to find again: /etc/a is one incompressible
# chunk stored raw at the start of the data blob, /usr/b a compressible one after it.
FILE_A = Random(300_000, seed=11)
FILE_B = Concat(b"naiad " * 4000)
GOOD_LAYERS = [[Dir(path="etc"), File(path="etc/a", data=FILE_A), Dir(path="usr"),
                File(path="usr/b", data=FILE_B)]]


# --- running the CLI and checking what it left --------------------------------------


def naiad(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NAIAD_CREDS"}
    env["NAIAD_HOME"] = str(home)
    env["DOCKER_CONFIG"] = str(home.parent / "no-docker-config")
    return subprocess.run([sys.executable, "-c", _CLI, *args], capture_output=True, text=True,
                          env=env, timeout=120)


def assert_error(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 1 and one stderr line `naiad: error: ...` holding every one of `words`."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("naiad: error: "), line
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in {line!r}"
    return line


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root`: "dir", "-> TARGET" for a symlink, else the file's sha256."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_empty_layout(root: Path) -> None:
    """What a failed write into a layout that did not exist may leave: an empty layout."""
    assert sorted(snapshot(root)) == ["blobs", "blobs/sha256", "index.json", "oci-layout"]
    assert json.loads((root / "index.json").read_text())["manifests"] == []


def assert_no_tmp(home: Path) -> None:
    tmp = home / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir()), sorted(tmp.rglob("*"))


def manifest_layers(layout: Path, tag: str) -> list[dict]:
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    blob = layout / "blobs" / "sha256" / desc["digest"].split(":", 1)[1]
    return json.loads(blob.read_bytes())["layers"]


def blob_file(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture(scope="module")
def good_naiad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A layout holding GOOD_LAYERS as a naiad image tagged "v1" (copy it before changing it)."""
    root = tmp_path_factory.mktemp("good")
    write_oci_layout(root / "src", GOOD_LAYERS)
    proc = naiad(root / "home", "convert", f"oci:{root}/src:latest", f"oci:{root}/naiad:v1")
    assert proc.returncode == 0, proc.stderr
    return root / "naiad"


@pytest.fixture(scope="module")
def other_naiad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another naiad image (other content), for its bootstrap."""
    root = tmp_path_factory.mktemp("other")
    write_oci_layout(root / "src", [[File(path="other", data=b"other\n")]])
    proc = naiad(root / "home", "convert", f"oci:{root}/src:latest", f"oci:{root}/naiad:v1")
    assert proc.returncode == 0, proc.stderr
    return root / "naiad"


# --- 1. malformed source images ----------------------------------------------------------

# What the message must name, beyond the layer: the problem and the offending path.
BAD_KIND_WORDS: dict[str, tuple[str, ...]] = {
    "truncated-gzip": ("truncated",),
    "corrupt-gzip": ("corrupt",),
    "truncated-tar": ("truncated",),
    "not-a-tar": ("corrupt",),
    "digest-mismatch": ("digest",),
    "dotdot": ("'../naiad-escape'", "escapes the root"),
    "nested-dotdot": ("'etc/../../naiad-escape'", "escapes the root"),
    "absolute": ("'/etc/naiad-escape'", "escapes the root"),
    "symlink-abs": ("'/a/passwd'", "escapes the root", "symlink '/a'"),
    "symlink-dotdot": ("'/a/passwd'", "escapes the root", "symlink '/a'"),
    "symlink-lower-layer": ("'/a/passwd'", "escapes the root", "symlink '/a'"),
    "missing-hardlink": ("hard link '/link'", "missing '/does/not/exist'"),
}


def test_every_bad_kind_has_expected_words() -> None:
    assert set(BAD_KIND_WORDS) == set(BAD_KINDS)


# Every kind into a layout that holds an image already; a few into a new layout (the
# failures all come before anything is written, so more would test the same path).
BAD_CASES = [(kind, "existing") for kind in BAD_KINDS] + [
    (kind, "new") for kind in ("truncated-gzip", "digest-mismatch", "symlink-lower-layer")]


@pytest.mark.parametrize(("kind", "target_state"), BAD_CASES)
def test_bad_layer_is_refused_and_leaves_nothing(
    kind: str, target_state: str, tmp_path: Path, home: Path, good_naiad: Path
) -> None:
    info: ImageInfo = write_bad_layout(tmp_path / "src", kind)
    target = tmp_path / "target"
    if target_state == "existing":
        shutil.copytree(good_naiad, target)
    before = snapshot(target)

    proc = naiad(home, "convert", info.ref, f"oci:{target}:bad")

    # The layer at fault is named by number and digest: the last one for a symlink
    # planted by a lower layer, the second one otherwise (see write_bad_layout).
    bad_layer = len(info.layer_digests)
    line = assert_error(proc, f"layer {bad_layer} ({info.layer_digests[-1]})", *BAD_KIND_WORDS[kind])
    if kind == "digest-mismatch":
        assert "expected " + info.layer_digests[-1] in line
    if target_state == "existing":
        assert snapshot(target) == before
    else:
        assert_empty_layout(target)
    assert_no_tmp(home)


# --- 2. a full target disk --------------------------------------------------------------

SMALL_DISK = 2 << 20

# Each fills the 2 MiB disk at another step of the conversion.
FULL_DISK_IMAGES = {
    # 3 MiB of incompressible chunks do not fit in the chunk spool.
    "spool": [[File(path="big", data=Random(3 << 20, seed=1))]],
    # Spools (1.2 MiB) and the first layer's blob fit; the second blob does not,
    # so the first, already in blobs/sha256, must be taken out again.
    "second-blob": [[File(path="a", data=Random(600 * KiB, seed=1))],
                    [File(path="b", data=Random(600 * KiB, seed=2))]],
    # Spool and blob (1.8 MiB) fit; the bootstrap of 1500 long names does not.
    "bootstrap": [[File(path="big", data=Random(900 * KiB, seed=1)), Dir(path="d"),
                   *(File(path=f"d/{i:04d}" + "x" * 200) for i in range(1500))]],
}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root, which the test suite runs as)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK},mode=0755", "tmpfs",
                           str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("step", FULL_DISK_IMAGES)
def test_full_target_disk(step: str, tmp_path: Path, home: Path, small_disk: Path) -> None:
    info = write_oci_layout(tmp_path / "src", FULL_DISK_IMAGES[step])
    proc = naiad(home, "convert", info.ref, f"oci:{small_disk}/layout:v1")
    assert_error(proc, "no space left on device")
    assert sorted(snapshot(small_disk)) == ["layout", *(f"layout/{p}" for p in (
        "blobs", "blobs/sha256", "index.json", "oci-layout"))]
    assert_empty_layout(small_disk / "layout")
    assert_no_tmp(home)


def test_unpack_onto_full_disk(tmp_path: Path, home: Path, small_disk: Path) -> None:
    info = write_oci_layout(tmp_path / "src", FULL_DISK_IMAGES["spool"])
    assert naiad(home, "convert", info.ref, f"oci:{tmp_path}/naiad:v1").returncode == 0
    proc = naiad(home, "unpack", f"oci:{tmp_path}/naiad:v1", str(small_disk / "rootfs"))
    assert_error(proc, "no space left on device")
    assert snapshot(small_disk) == {}


# --- 3. registries that fail -------------------------------------------------------------


def _repo() -> str:
    return f"bad-input/{uuid.uuid4().hex[:12]}"


def assert_no_image(registry: RegistryServer, repo: str, tag: str) -> None:
    assert registry.manifest_tags(repo) == []
    assert registry.upload_sessions(repo) == []
    response = httpx.get(f"{registry.url}/v2/{repo}/manifests/{tag}")
    assert response.status_code == 404


# fault name -> (how to arm the proxy, what the message must say)
REGISTRY_FAULTS = {
    "every-request": (dict(), ("ping /v2/",)),
    "blob-uploads": (dict(path_contains="/blobs/uploads/"), ("push blob",)),
    "manifest-put": (dict(method="PUT", path_contains="/manifests/"), ("PUT manifest",)),
}


@pytest.mark.parametrize("command", ["push", "convert"])
@pytest.mark.parametrize("fault", REGISTRY_FAULTS)
def test_registry_500s(command: str, fault: str, tmp_path: Path, home: Path, good_naiad: Path,
                       registry: RegistryServer, fault_proxy: FaultProxy) -> None:
    arm, words = REGISTRY_FAULTS[fault]
    fault_proxy.fail_next(10**6, 500, **arm)  # type: ignore[arg-type]
    repo = _repo()
    if command == "push":
        source = f"oci:{good_naiad}:v1"
    else:
        source = write_oci_layout(tmp_path / "src", GOOD_LAYERS).ref
    proc = naiad(home, command, source, f"{fault_proxy.host}/{repo}:v1")
    assert_error(proc, f"registry {fault_proxy.host}", *words, "HTTP 500",
                 f"after {RETRIES} attempts")
    failed = [s for s in fault_proxy.seen if s.fault == "fail"]
    # Bounded: the request that kept failing was tried RETRIES times, then the command stopped.
    assert len(failed) == RETRIES
    assert_no_image(registry, repo, "v1")
    assert_no_tmp(home)


def test_no_registry_there(tmp_path: Path, home: Path, good_naiad: Path) -> None:
    host = f"127.0.0.1:{free_port()}"
    proc = naiad(home, "push", f"oci:{good_naiad}:v1", f"{host}/{_repo()}:v1")
    assert_error(proc, f"registry {host}", "connection failed", f"after {RETRIES} attempts")


def test_tag_not_on_registry(tmp_path: Path, home: Path, registry: RegistryServer) -> None:
    dest = tmp_path / "rootfs"
    proc = naiad(home, "unpack", f"{registry.host}/{_repo()}:nope", str(dest))
    assert_error(proc, "manifest not found", ":nope")
    assert not dest.exists()
    assert_no_tmp(home)


BIG = Random(3_000_000, seed=5)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, registry: RegistryServer) -> tuple[str, str]:
    """(repo, data blob digest) of a naiad image with a 3 MB file, on the real registry."""
    root = tmp_path_factory.mktemp("pushed")
    info = write_oci_layout(root / "src", [[Dir(path="etc"), File(path="etc/big", data=BIG)]])
    repo = _repo()
    proc = naiad(root / "home", "convert", info.ref, f"oci:{root}/naiad:v1")
    assert proc.returncode == 0, proc.stderr
    proc = naiad(root / "home", "push", f"oci:{root}/naiad:v1", f"{registry.host}/{repo}:v1")
    assert proc.returncode == 0, proc.stderr
    return repo, manifest_layers(root / "naiad", "v1")[0]["digest"]


def _read_command(command: str, ref: str, dest: Path) -> list[str]:
    return [command, ref, str(dest)] if command == "unpack" else [command, ref]


@pytest.mark.parametrize("command", ["unpack", "check"])
def test_dropped_connection_mid_blob_resumes(command: str, tmp_path: Path, home: Path,
                                             pushed: tuple[str, str],
                                             fault_proxy: FaultProxy) -> None:
    repo, blob = pushed
    fault_proxy.drop_next(after=1_000_000, n=2, path_contains=blob)
    dest = tmp_path / "rootfs"
    proc = naiad(home, *_read_command(command, f"{fault_proxy.host}/{repo}:v1", dest))
    assert proc.returncode == 0, proc.stderr
    gets = fault_proxy.requests("GET", blob)
    assert [(g.fault, g.headers.get("range")) for g in gets] == [
        ("drop", None), ("drop", "bytes=1000000-"), (None, "bytes=2000000-")]
    if command == "unpack":
        assert hashlib.sha256((dest / "etc/big").read_bytes()).hexdigest() == BIG.sha256()
    else:
        assert "verified" in proc.stdout
    assert_no_tmp(home)


@pytest.mark.parametrize("command", ["unpack", "check"])
def test_connection_that_always_drops_fails_cleanly(command: str, tmp_path: Path, home: Path,
                                                    pushed: tuple[str, str],
                                                    fault_proxy: FaultProxy) -> None:
    repo, blob = pushed
    fault_proxy.drop_next(after=0, n=10**6, path_contains=blob)
    dest = tmp_path / "rootfs"
    proc = naiad(home, *_read_command(command, f"{fault_proxy.host}/{repo}:v1", dest))
    words = ("connection dropped at byte 0", blob)
    if command == "unpack":
        assert_error(proc, *words)
        assert not dest.exists()
    else:
        # check reports an unreadable blob as a problem of the files that use it.
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == ""
        assert proc.stdout.startswith("naiad: check: ") and "/etc/big" in proc.stdout
        assert all(w in proc.stdout for w in words), proc.stdout
    assert len(fault_proxy.requests("GET", blob)) == RETRIES
    assert_no_tmp(home)


# --- 4. tampered naiad images ----------------------------------------------------------------


@pytest.fixture
def tampered(tmp_path: Path, good_naiad: Path) -> Path:
    layout = tmp_path / "naiad"
    shutil.copytree(good_naiad, layout)
    return layout


@pytest.mark.parametrize(("where", "bad_file", "good_file"),
                         [(100, "/etc/a", "/usr/b"), (-10, "/usr/b", "/etc/a")])
def test_flipped_byte_in_data_blob(where: int, bad_file: str, good_file: str, tmp_path: Path,
                                   home: Path, tampered: Path) -> None:
    data = blob_file(tampered, manifest_layers(tampered, "v1")[0]["digest"])
    raw = bytearray(data.read_bytes())
    raw[where] ^= 0x01
    data.write_bytes(raw)
    ref = f"oci:{tampered}:v1"

    proc = naiad(home, "check", ref)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("naiad: check: chunk sha256:"), proc.stdout
    assert f"used by {bad_file})" in lines[0] and good_file not in lines[0]

    dest = tmp_path / "rootfs"
    assert_error(naiad(home, "unpack", ref, str(dest)), "chunk sha256:")
    assert not dest.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_error(naiad(home, "unpack", ref, str(empty)), "chunk sha256:")
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("how", ["other-bootstrap", "flipped-byte"])
def test_replaced_bootstrap(how: str, tmp_path: Path, home: Path, tampered: Path,
                            other_naiad: Path) -> None:
    digest = manifest_layers(tampered, "v1")[-1]["digest"]
    path = blob_file(tampered, digest)
    size = path.stat().st_size
    if how == "other-bootstrap":
        # A valid bootstrap of another image: it decompresses; its size gives it away.
        other = blob_file(other_naiad, manifest_layers(other_naiad, "v1")[-1]["digest"])
        path.write_bytes(other.read_bytes())
        words: tuple[str, ...] = (f"{other.stat().st_size} bytes, expected {size}",)
    else:
        # The same size: only the digest gives it away.
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(raw)
        words = ("digest is sha256:", f"expected {digest}")
    ref = f"oci:{tampered}:v1"
    dest = tmp_path / "rootfs"
    for args in (["inspect", ref], ["check", ref], ["unpack", ref, str(dest)]):
        assert_error(naiad(home, *args), f"bootstrap {digest}: ", *words)
    assert not dest.exists()
    # Nothing unverified was cached, not even under a temporary name.
    assert list((home / "bootstraps").iterdir()) == []


def test_missing_data_blob(tmp_path: Path, home: Path, tampered: Path) -> None:
    digest = manifest_layers(tampered, "v1")[0]["digest"]
    blob_file(tampered, digest).unlink()
    ref = f"oci:{tampered}:v1"

    proc = naiad(home, "check", ref)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.splitlines() == [
        f"naiad: check: {ref}: blob {digest} is missing from {tampered} (used by /etc/a)"]

    dest = tmp_path / "rootfs"
    assert_error(naiad(home, "unpack", ref, str(dest)), f"blob {digest} is missing")
    assert not dest.exists()


# --- 5. wrong references and options -------------------------------------------------------


@pytest.fixture
def source(tmp_path: Path) -> str:
    return write_oci_layout(tmp_path / "src", GOOD_LAYERS).ref


@pytest.mark.parametrize(("args", "words"), [
    (["foo:bar:baz"], ("'foo:bar:baz'", "invalid repository name")),
    (["oci:/nonexistent:tag"], ("/nonexistent is not an OCI image layout",)),
    (["{src}-missing-tag"], ("no image 'latest-missing-tag'",)),
    (["--chunk-size", "1000", "{src}"], ("chunk size 1000", "power of two")),
    (["--chunk-size", "lots", "{src}"], ("invalid size 'lots'",)),
])
def test_wrong_convert_arguments(args: list[str], words: tuple[str, ...], tmp_path: Path,
                                 home: Path, source: str) -> None:
    target = tmp_path / "target"
    args = [a.format(src=source) for a in args]
    assert_error(naiad(home, "convert", *args, f"oci:{target}:v1"), *words)
    assert not target.exists()


def test_unknown_compressor(tmp_path: Path, home: Path, source: str) -> None:
    target = tmp_path / "target"
    proc = naiad(home, "convert", "--compressor", "bogus", source, f"oci:{target}:v1")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("naiad convert: error: argument --compressor: "
                                                   "invalid choice: 'bogus'")
    assert not target.exists()


def test_unpack_into_non_empty_dir(tmp_path: Path, home: Path, good_naiad: Path) -> None:
    dest = tmp_path / "rootfs"
    dest.mkdir()
    (dest / "keep").write_text("mine\n")
    assert_error(naiad(home, "unpack", f"oci:{good_naiad}:v1", str(dest)),
                 f"{dest} exists and is not an empty directory")
    assert snapshot(dest) == {"keep": hashlib.sha256(b"mine\n").hexdigest()}


def test_unpack_of_plain_oci_image(tmp_path: Path, home: Path, source: str) -> None:
    dest = tmp_path / "rootfs"
    assert_error(naiad(home, "unpack", source, str(dest)), "is not a naiad image")
    assert not dest.exists()
