"""The snapshotter's gRPC API against containerd's semantics, spoken to directly (no containerd).

Keys with spaces and slashes, parent chains and the mounts they give, status codes, List
filters as containerd writes them, Update masks, usage, concurrency, and what a kill -9
leaves behind.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from snapshotter_helpers import SnapshotterProcess, release_lazy_mounts

from naiad.oci.image import Platform, RegistryOptions
from naiad.oci.reference import parse_reference
from naiad.snapshotter import filters, remote
from naiad.snapshotter.api import snapshots_pb2 as pb
from naiad.snapshotter.api.snapshots_pb2_grpc import SnapshotsStub

COMMITTED, ACTIVE, VIEW = pb.COMMITTED, pb.ACTIVE, pb.VIEW


@pytest.fixture
def sn(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("the snapshotter needs root")
    proc = SnapshotterProcess(tmp_path / "root", str(tmp_path / "sn.sock"), tmp_path / "home").start()
    try:
        yield proc
    finally:
        code = proc.stop()
        release_lazy_mounts(proc.root, proc.home)
    assert code == 0, proc.log_tail()  # SIGTERM is a clean stop


@pytest.fixture
def stub(sn: SnapshotterProcess):
    channel, stub = sn.client()
    with channel:
        yield stub


def code_of(call, *args, **kw) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kw)
    return e.value.code()


def prepare(stub: SnapshotsStub, key: str, parent: str = "", **labels: str):
    return stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels)).mounts


def names(stub: SnapshotsStub, *filters_: str) -> set[str]:
    return {i.name for r in stub.List(pb.ListSnapshotsRequest(filters=list(filters_))) for i in r.info}


def test_filter_syntax():
    sels = filters.parse('labels."containerd.io/snapshot.ref"==sha256:abc,parent=="ns/1/a b"')
    assert sels == [filters.Selector(("labels", "containerd.io/snapshot.ref"), "==", "sha256:abc"),
                    filters.Selector(("parent",), "==", "ns/1/a b")]
    assert filters.parse("kind!=active,labels.x")[1] == filters.Selector(("labels", "x"), None, "")
    with pytest.raises(filters.FilterError):
        filters.parse('name=="unterminated')


def test_label_families_and_insecure_registries():
    stargz = {remote.LABEL_SNAPSHOT_REF: "sha256:chain", remote.STARGZ_REF: "10.0.0.5:5000/app:v1",
              remote.STARGZ_DIGEST: "sha256:layer", "containerd.io/snapshot/remote/stargz.layers": "x"}
    cri = {remote.CRI_REF: "10.0.0.5:5000/app:v1", remote.CRI_DIGEST: "sha256:layer",
           remote.CRI_MANIFEST: "sha256:manifest", "containerd.io/gc.root": "dropped"}
    assert remote.image_and_layer(stargz) == ("10.0.0.5:5000/app:v1", "sha256:layer", None)
    assert remote.image_and_layer(cri) == ("10.0.0.5:5000/app:v1", "sha256:layer", "sha256:manifest")
    assert remote.image_and_layer({remote.LABEL_SNAPSHOT_REF: "sha256:chain"}) is None
    assert "containerd.io/gc.root" not in remote.inheritable(cri)
    resolver = remote.Resolver(RegistryOptions(), frozenset({"10.0.0.5:5000"}), Platform())
    assert resolver.options_for(parse_reference("10.0.0.5:5000/app:v1")).plain_http is True
    assert resolver.options_for(parse_reference("10.0.0.6:5000/app:v1")).plain_http is None


def test_layers_mounts_and_status_codes(stub: SnapshotsStub, sn: SnapshotterProcess):
    base = "default/1/extract 123 sha256:aaa"  # as containerd's metadata layer names keys
    [m] = prepare(stub, base)
    assert (m.type, m.options) == ("bind", ["rw", "rbind"])
    assert m.source.startswith(str(sn.root / "snapshots")) and " " not in m.source
    Path(m.source, "hello").write_text("layer one\n")
    stub.Commit(pb.CommitSnapshotRequest(name="default/2/sha256:aaa", key=base, labels={"a": "1"}))
    assert code_of(stub.Stat, pb.StatSnapshotRequest(key=base)) == grpc.StatusCode.NOT_FOUND
    info = stub.Stat(pb.StatSnapshotRequest(key="default/2/sha256:aaa")).info
    assert (info.kind, info.parent, dict(info.labels)) == (COMMITTED, "", {"a": "1"})
    usage = stub.Usage(pb.UsageRequest(key="default/2/sha256:aaa"))
    assert usage.inodes == 2 and usage.size > 0

    [m] = prepare(stub, "default/3/container", "default/2/sha256:aaa")
    assert m.type == "overlay"
    opts = dict(o.split("=", 1) for o in m.options)
    assert opts["lowerdir"] == str(sn.root / "snapshots" / "1" / "fs")
    assert opts["upperdir"].endswith("/fs") and opts["workdir"].endswith("/work")
    [v] = stub.View(pb.ViewSnapshotRequest(key="default/4/view", parent="default/2/sha256:aaa")).mounts
    assert (v.type, v.source, v.options) == ("bind", opts["lowerdir"], ["ro", "rbind"])
    assert stub.Mounts(pb.MountsRequest(key="default/3/container")).mounts[0] == m

    assert names(stub) == {"default/2/sha256:aaa", "default/3/container", "default/4/view"}
    assert names(stub, "kind==committed") == {"default/2/sha256:aaa"}
    assert names(stub, 'parent=="default/2/sha256:aaa",kind==view') == {"default/4/view"}
    assert names(stub, 'labels."a"==1', "name~=cont") == {"default/2/sha256:aaa", "default/3/container"}
    assert code_of(lambda: list(stub.List(pb.ListSnapshotsRequest(filters=["name=="])))) \
        == grpc.StatusCode.INVALID_ARGUMENT

    upd = stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="default/2/sha256:aaa", labels={"b": "2"}),
                                               update_mask={"paths": ["labels.b", "labels.a"]})).info
    assert dict(upd.labels) == {"b": "2"}
    assert code_of(stub.Update, pb.UpdateSnapshotRequest(info=pb.Info(name="default/2/sha256:aaa"),
                                                         update_mask={"paths": ["parent"]})) \
        == grpc.StatusCode.INVALID_ARGUMENT

    codes = {
        "duplicate key": code_of(prepare, stub, "default/3/container"),
        "missing parent": code_of(prepare, stub, "x", "no such parent"),
        "active parent": code_of(prepare, stub, "y", "default/3/container"),
        "commit a view": code_of(stub.Commit, pb.CommitSnapshotRequest(name="n", key="default/4/view")),
        "commit over a name": code_of(stub.Commit, pb.CommitSnapshotRequest(name="default/2/sha256:aaa",
                                                                            key="default/3/container")),
        "remove a parent": code_of(stub.Remove, pb.RemoveSnapshotRequest(key="default/2/sha256:aaa")),
        "mounts of committed": code_of(stub.Mounts, pb.MountsRequest(key="default/2/sha256:aaa")),
        "stat missing": code_of(stub.Stat, pb.StatSnapshotRequest(key="nope")),
    }
    assert codes == {
        "duplicate key": grpc.StatusCode.ALREADY_EXISTS, "missing parent": grpc.StatusCode.NOT_FOUND,
        "active parent": grpc.StatusCode.INVALID_ARGUMENT,
        "commit a view": grpc.StatusCode.FAILED_PRECONDITION,
        "commit over a name": grpc.StatusCode.ALREADY_EXISTS,
        "remove a parent": grpc.StatusCode.FAILED_PRECONDITION,
        "mounts of committed": grpc.StatusCode.FAILED_PRECONDITION, "stat missing": grpc.StatusCode.NOT_FOUND,
    }
    for key in ("default/3/container", "default/4/view", "default/2/sha256:aaa"):
        stub.Remove(pb.RemoveSnapshotRequest(key=key))
    assert names(stub) == set()
    assert os.listdir(sn.root / "snapshots") == []


def test_concurrent_requests(stub: SnapshotsStub):
    prepare(stub, "base")
    stub.Commit(pb.CommitSnapshotRequest(name="parent", key="base"))
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        mounts = list(pool.map(lambda i: prepare(stub, f"ns/{i}/c {i}", "parent"), range(48)))
        assert len({m[0].options[1] for m in mounts}) == 48  # 48 distinct upper dirs

        def same_key(_: int) -> str:
            try:
                prepare(stub, "the same key")
                return "ok"
            except grpc.RpcError as e:
                return e.code().name

        assert sorted(pool.map(same_key, range(12))) == ["ALREADY_EXISTS"] * 11 + ["ok"]
    assert len(names(stub, "kind==active")) == 49


def test_state_survives_kill9_and_cleanup_removes_leftovers(sn: SnapshotterProcess):
    channel, stub = sn.client()
    with channel:
        prepare(stub, "a/1/layer")
        stub.Commit(pb.CommitSnapshotRequest(name="a/2/layer", key="a/1/layer"))
        prepare(stub, "a/3/rw", "a/2/layer")
    sn.kill9()
    # What a crash between mkdir and commit, or between delete and rmtree, would leave.
    (sn.root / "snapshots" / "999" / "fs").mkdir(parents=True)
    (sn.root / "snapshots" / "new-123").mkdir()
    sn.start()
    channel, stub = sn.client()
    with channel:
        assert names(stub) == {"a/2/layer", "a/3/rw"}
        assert sorted(os.listdir(sn.root / "snapshots")) == ["1", "2", "999"]
        stub.Cleanup(pb.CleanupRequest())
        assert sorted(os.listdir(sn.root / "snapshots")) == ["1", "2"]


def test_one_snapshotter_per_root_and_socket(sn: SnapshotterProcess, tmp_path: Path):
    env = {**os.environ, "NAIAD_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "naiad", "snapshotter"]
    same_root = subprocess.run([*cmd, "--address", str(tmp_path / "other.sock"), "--root", str(sn.root)],
                               capture_output=True, text=True, env=env, timeout=60)
    same_socket = subprocess.run([*cmd, "--address", sn.address, "--root", str(tmp_path / "other")],
                                 capture_output=True, text=True, env=env, timeout=60)
    assert (same_root.returncode, same_root.stderr) == (
        1, f"naiad: error: another snapshotter serves {sn.root}\n")
    assert (same_socket.returncode, same_socket.stderr) == (
        1, f"naiad: error: something already listens on {sn.address}\n")
    long_socket = str(tmp_path / ("s" * 120))
    too_long = subprocess.run([*cmd, "--address", long_socket, "--root", str(tmp_path / "third")],
                              capture_output=True, text=True, env=env, timeout=60)
    assert (too_long.returncode, too_long.stderr) == (
        1, f"naiad: error: socket path {long_socket} is too long (at most 107 bytes)\n")
    config = subprocess.run([*cmd, "--print-config", "--address", "/run/x.sock"], capture_output=True,
                            text=True, check=True).stdout
    assert '[proxy_plugins.naiad]\n  type = "snapshot"\n  address = "/run/x.sock"' in config
    assert "disable_snapshot_annotations = false" in config
