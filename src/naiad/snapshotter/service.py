"""The gRPC side: containerd.services.snapshots.v1.Snapshots on a unix socket, until SIGTERM.

Each RPC translates its request, calls the `Snapshotter`, and turns the snapshotter's refusals
into the status codes containerd's errdefs expect (NOT_FOUND, ALREADY_EXISTS, ...); other naiad
errors (a registry that cannot be reached) become UNAVAILABLE, and bugs INTERNAL with their
traceback in the log. Requests run concurrently on a thread pool.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from naiad.errors import NaiadError
from naiad.fs import mountd
from naiad.oci.image import Platform, RegistryOptions
from naiad.snapshotter import snapshots as sn
from naiad.snapshotter.api import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from naiad.snapshotter.remote import Resolver
from naiad.snapshotter.store import Snapshot

log = logging.getLogger(__name__)

LIST_BATCH = 100  # Info messages per List response (containerd's own server sends 100)
WORKERS = 32
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL

_CODES: dict[type[sn.SnapshotError], grpc.StatusCode] = {
    sn.NotFound: grpc.StatusCode.NOT_FOUND,
    sn.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    sn.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    sn.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
}

F = TypeVar("F", bound=Callable[..., Any])


def _status(method: F) -> F:
    """Abort the RPC with the status code matching what the snapshotter raised."""

    @functools.wraps(method)
    def wrapper(self: Service, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except sn.SnapshotError as e:
            context.abort(_CODES.get(type(e), grpc.StatusCode.UNKNOWN), str(e))
        except NaiadError as e:
            log.warning("%s: %s", method.__name__, e)
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except Exception as e:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    return wrapper  # type: ignore[return-value]


def _mounts(mounts: list[sn.Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def _info(s: Snapshot) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(name=s.name, parent=s.parent, kind=int(s.kind), labels=s.labels,
                              created_at=_timestamp(s.created), updated_at=_timestamp(s.updated))


class Service(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: sn.Snapshotter):
        self.sn = snapshotter

    @_status
    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self.sn.prepare(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @_status
    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self.sn.view(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(mounts))

    @_status
    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        return snapshots_pb2.MountsResponse(mounts=_mounts(self.sn.mounts(request.key)))

    @_status
    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.sn.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_status
    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.sn.remove(request.key)
        return empty_pb2.Empty()

    @_status
    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        return snapshots_pb2.StatSnapshotResponse(info=_info(self.sn.stat(request.key)))

    @_status
    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = self.sn.update(request.info.name, dict(request.info.labels), list(request.update_mask.paths))
        return snapshots_pb2.UpdateSnapshotResponse(info=_info(info))

    @_status
    def List(self, request: Any, context: grpc.ServicerContext) -> Any:
        # Resolved before streaming, so that a bad filter aborts with INVALID_ARGUMENT.
        found = self.sn.list(list(request.filters))
        return _batches(found)

    @_status
    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        size, inodes = self.sn.usage(request.key)
        return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    @_status
    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.sn.cleanup()
        return empty_pb2.Empty()


def _batches(found: list[Snapshot]) -> Iterator[Any]:
    for i in range(0, len(found), LIST_BATCH):
        yield snapshots_pb2.ListSnapshotsResponse(info=[_info(s) for s in found[i:i + LIST_BATCH]])


def _claim_socket(address: str) -> None:
    """Remove a socket file left by a snapshotter that died; refuse if one still listens there."""
    if len(os.fsencode(os.path.abspath(address))) > UNIX_PATH_MAX:
        raise NaiadError(f"socket path {address} is too long (at most {UNIX_PATH_MAX} bytes)")
    os.makedirs(os.path.dirname(address) or ".", exist_ok=True)
    try:
        mode = os.lstat(address).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise NaiadError(f"{address} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(address)
            return
    raise NaiadError(f"something already listens on {address}")


def serve(snapshotter: sn.Snapshotter, address: str) -> None:
    """Serve on the unix socket `address` until SIGTERM or SIGINT; the lazy mounts stay up."""
    _claim_socket(address)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="rpc"))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(Service(snapshotter), server)
    if server.add_insecure_port(f"unix://{os.path.abspath(address)}") == 0:
        raise NaiadError(f"cannot listen on {address}")
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        os.chmod(address, 0o660)  # containerd runs as root; nobody else needs the socket
        log.info("serving on %s", address)
        while not stop.wait(1.0):  # a timeout, so that the signal handler gets to run promptly
            pass
        log.info("stopping")
        server.stop(grace=5).wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)


def run(address: str, root: str, registry: RegistryOptions, insecure_hosts: frozenset[str],
        platform: Platform, prefetch_all: bool = False, with_mountd: bool = True) -> None:
    """Open (or recover) the snapshotter at `root` and serve it on `address` until signalled.

    `with_mountd`: start a `naiad mountd` of its own (fs/mountd.py, unless one serves this
    NAIAD_HOME already), so that every image's mount daemon is forked with its code loaded:
    a container's start waits for that daemon.
    """
    companion = mountd.start_companion() if with_mountd else None  # first: it forks
    try:
        resolver = Resolver(registry, insecure_hosts, platform)
        snapshotter = sn.Snapshotter(root, resolver, prefetch_all=prefetch_all)
        try:
            snapshotter.recover()
            serve(snapshotter, address)
        finally:
            snapshotter.close()
    finally:
        if companion is not None:
            mountd.stop_companion(companion)
