"""The snapshotter: containerd's snapshot semantics over directories, overlayfs and lazy mounts.

Plain snapshots follow containerd's overlayfs snapshotter: `snapshots/<id>/fs` (the upper dir)
and `work/`; a snapshot with no parent is a bind mount of its `fs`, an active one with parents an
overlay of its `fs` on its parents', a view of one parent a read-only bind mount of it.

A Prepare that carries `containerd.io/snapshot.ref` (the chain id of the layer being pulled)
and names a layer of a naiad image is answered ALREADY_EXISTS, after committing a snapshot
`<namespace>/naiad/<chain id>` with the same parent and labels; containerd then finds it
with List and downloads nothing. The namespace (the first element of the key containerd's
metadata layer sends, `ns/N/name`) is part of the name so that each namespace owns its own
snapshots and garbage collection in one never removes what another uses. Data-blob layers
become empty snapshots (left out of overlay lower dirs); the bootstrap layer's snapshot is
the image's lazy mount.

Every change is one store transaction; the directory of a new snapshot is made under a
temporary name and renamed into place before the transaction commits, and a removed one is
deleted after it; whatever a crash leaves between the two, `cleanup()` removes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence

from naiad.errors import NaiadError
from naiad.snapshotter.filters import compile_filters
from naiad.snapshotter.lazy import LazyMounts
from naiad.snapshotter.locks import KeyedLocks
from naiad.snapshotter.remote import (
    LABEL_NAIAD_IMAGE,
    LABEL_NAIAD_LAYER,
    LABEL_SNAPSHOT_REF,
    NaiadLayer,
    Resolver,
    inheritable,
)
from naiad.snapshotter.store import Kind, Snapshot, Store, Tx

log = logging.getLogger(__name__)


class SnapshotError(NaiadError):
    """A request containerd's semantics refuse; the subclass names the gRPC status."""


class NotFound(SnapshotError):
    pass


class AlreadyExists(SnapshotError):
    pass


class FailedPrecondition(SnapshotError):
    pass


class InvalidArgument(SnapshotError):
    pass


@dataclasses.dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


def disk_usage(path: str) -> tuple[int, int]:
    """(bytes allocated, inodes) below `path`, hard links counted once, as containerd's fs.DiskUsage."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for top, dirs, files in os.walk(path):
        for name in [".", *dirs, *files] if top == path else [*dirs, *files]:
            try:
                st = os.lstat(os.path.join(top, name))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_blocks * 512
    return size, len(seen)


def _check_path(root: str) -> None:
    # overlayfs splits its options on "," and lowerdir on ":"; containerd passes them unescaped.
    if "," in root or ":" in root:
        raise NaiadError(f"snapshotter root {root} must not contain ',' or ':' (overlayfs options)")


class Snapshotter:
    def __init__(self, root: str, resolver: Resolver, prefetch_all: bool = False):
        self.root = os.path.realpath(root)
        _check_path(self.root)
        self.snapshots_dir = os.path.join(self.root, "snapshots")
        os.makedirs(self.snapshots_dir, exist_ok=True)
        # One snapshotter per root: two would each think the other's new directories are orphans.
        self._lockfile = open(os.path.join(self.root, "lock"), "w")  # noqa: SIM115 - held while serving
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            raise NaiadError(f"another snapshotter serves {self.root}") from None
        self.store = Store(os.path.join(self.root, "metadata.db"))
        self.resolver = resolver
        self.lazy = LazyMounts(self.root, self.store, resolver, resolver.platform, prefetch_all)
        self._remote_locks = KeyedLocks()

    def recover(self) -> None:
        """Before serving: drop half-made directories, re-attach to the lazy mounts or mount them again."""
        for entry in os.listdir(self.snapshots_dir):
            if entry.startswith("new-"):
                shutil.rmtree(os.path.join(self.snapshots_dir, entry), ignore_errors=True)
        self.lazy.recover()  # re-mounts continue in the background

    def close(self) -> None:
        self.store.close()
        self._lockfile.close()

    # --- paths and mounts ---

    def _dir(self, id_: int) -> str:
        return os.path.join(self.snapshots_dir, str(id_))

    def _fs(self, snap: Snapshot) -> str:
        if snap.content == "lazy" and snap.lazy:
            return self.lazy.mountpoint(snap.lazy)
        return os.path.join(self._dir(snap.id), "fs")

    def _mounts(self, snap: Snapshot, parents: list[Snapshot]) -> list[Mount]:
        for p in parents:
            if p.lazy:
                self.lazy.ensure(p.lazy)  # mounted again if its daemon died
        # Data-blob snapshots of naiad images are empty: overlayfs need not look through them.
        lowers = [self._fs(p) for p in parents if p.content != "empty"] or [self._fs(p) for p in parents]
        own = self._fs(snap)
        if not lowers:
            return [Mount("bind", own, ("ro" if snap.kind == Kind.VIEW else "rw", "rbind"))]
        if snap.kind == Kind.VIEW and len(lowers) == 1:
            return [Mount("bind", lowers[0], ("ro", "rbind"))]
        options = []
        if snap.kind == Kind.ACTIVE:
            options += [f"workdir={os.path.join(self._dir(snap.id), 'work')}", f"upperdir={own}"]
        options.append("lowerdir=" + ":".join(lowers))
        return [Mount("overlay", "overlay", tuple(options))]

    # --- the API ---

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        target = labels.get(LABEL_SNAPSHOT_REF)
        if target:
            layer = self.resolver.classify(labels)
            if layer is not None:
                name = self._commit_remote(key, parent, target, labels, layer)
                raise AlreadyExists(f"target snapshot {target!r} exists as {name!r}")
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def _parent(self, tx: Tx, parent: str) -> Snapshot | None:
        if not parent:
            return None
        p = tx.get(parent)
        if p is None:
            raise NotFound(f"parent snapshot {parent!r} does not exist")
        if p.kind != Kind.COMMITTED:
            raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
        return p

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        if not key:
            raise InvalidArgument("empty snapshot key")
        owner = self._owner_of(parent)
        tmp = tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir)
        path = None
        try:
            os.mkdir(os.path.join(tmp, "fs"), 0o755)
            if kind == Kind.ACTIVE:
                os.mkdir(os.path.join(tmp, "work"), 0o711)
            with self.store.transaction() as tx:
                if tx.get(key) is not None:
                    raise AlreadyExists(f"snapshot {key!r} already exists")
                p = self._parent(tx, parent)
                snap = tx.insert(key, p.id if p else None, kind, labels)
                parents = tx.chain(snap)
                if owner is not None:
                    os.lchown(os.path.join(tmp, "fs"), *owner)
                path = self._dir(snap.id)
                os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(path or tmp, ignore_errors=True)
            raise
        return self._mounts(snap, parents)

    def _owner_of(self, parent: str) -> tuple[int, int] | None:
        """(uid, gid) of the parent's root: a new layer's root gets them, as with containerd's overlayfs.

        Read before the transaction that creates the snapshot: a lazy parent may have to be
        mounted again first, which takes time and transactions of its own.
        """
        with self.store.transaction() as tx:
            p = self._parent(tx, parent)
        if p is None:
            return None
        if p.lazy:
            self.lazy.ensure(p.lazy)
        st = os.stat(self._fs(p))
        return st.st_uid, st.st_gid

    def _commit_remote(self, key: str, parent: str, target: str, labels: dict[str, str],
                       layer: NaiadLayer) -> str:
        """The committed snapshot of a naiad layer (made now unless it exists); its name."""
        namespace = key.split("/", 1)[0] + "/" if "/" in key else ""
        name = f"{namespace}naiad/{target}"
        new_labels = {**inheritable(labels), LABEL_SNAPSHOT_REF: target, LABEL_NAIAD_LAYER: layer.layer,
                      LABEL_NAIAD_IMAGE: str(layer.ref)}
        with self._remote_locks[name]:
            with self.store.transaction() as tx:
                if tx.get(name) is not None:
                    return name
                self._parent(tx, parent)
            if layer.bootstrap:
                with self.lazy.acquire(layer) as mount_key:
                    self._insert_committed(name, parent, new_labels, "lazy", mount_key)
            else:
                self._insert_committed(name, parent, new_labels, "empty", None)
        log.info("%s: %s layer %s of %s", name, "lazy" if layer.bootstrap else "empty", layer.layer,
                 layer.ref)
        return name

    def _insert_committed(self, name: str, parent: str, labels: dict[str, str], content: str,
                          lazy: str | None) -> None:
        with self.store.transaction() as tx:
            p = self._parent(tx, parent)
            snap = tx.insert(name, p.id if p else None, Kind.COMMITTED, labels, content, lazy)
            # An empty fs directory, so that a View of it (or a chown from it) works like any other.
            os.makedirs(os.path.join(self._dir(snap.id), "fs"), 0o755, exist_ok=True)

    def mounts(self, key: str) -> list[Mount]:
        with self.store.transaction() as tx:
            snap = self._get(tx, key)
            if snap.kind not in (Kind.ACTIVE, Kind.VIEW):
                raise FailedPrecondition(f"snapshot {key!r} is not active or a view")
            parents = tx.chain(snap)
        return self._mounts(snap, parents)

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        with self.store.transaction() as tx:
            snap = self._get(tx, key)
            if snap.kind != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is not active")
        # Outside the lock: a large layer takes a while to walk, and nothing writes it any more.
        size, inodes = disk_usage(self._fs(snap))
        with self.store.transaction() as tx:
            snap = self._get(tx, key)
            if snap.kind != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is not active")
            if tx.get(name) is not None:
                raise AlreadyExists(f"snapshot {name!r} already exists")
            tx.commit(snap.id, name, labels, size, inodes)

    def remove(self, key: str) -> None:
        with self.store.transaction() as tx:
            snap = self._get(tx, key)
            if tx.has_children(snap.id):
                raise FailedPrecondition(f"cannot remove snapshot {key!r}: it has children")
            tx.delete(snap.id)
        try:
            shutil.rmtree(self._dir(snap.id))
        except OSError as e:
            log.warning("removing %s: %s (cleanup will retry)", self._dir(snap.id), e)
        if snap.lazy:
            self.lazy.release(snap.lazy)

    def stat(self, key: str) -> Snapshot:
        with self.store.transaction() as tx:
            return self._get(tx, key)

    def update(self, name: str, labels: dict[str, str], paths: Sequence[str]) -> Snapshot:
        with self.store.transaction() as tx:
            snap = self._get(tx, name)
            new = dict(snap.labels)
            if not paths:
                new = dict(labels)
            for path in paths:
                if path == "labels":
                    new = dict(labels)
                elif path.startswith("labels."):
                    label = path.removeprefix("labels.")
                    if label in labels:
                        new[label] = labels[label]
                    else:
                        new.pop(label, None)
                else:
                    raise InvalidArgument(f"cannot update {path!r} of snapshot {name!r}")
            return tx.set_labels(snap.id, new)

    def list(self, filters: Sequence[str]) -> list[Snapshot]:
        try:
            match = compile_filters(filters)
        except NaiadError as e:
            raise InvalidArgument(str(e)) from None
        with self.store.transaction() as tx:
            snaps = tx.all()
        return [s for s in snaps if match(lambda path, s=s: _field(s, path))]

    def usage(self, key: str) -> tuple[int, int]:
        with self.store.transaction() as tx:
            snap = self._get(tx, key)
        if snap.kind == Kind.ACTIVE:
            return disk_usage(self._fs(snap))
        return snap.size, snap.inodes

    def cleanup(self) -> None:
        """Delete what no snapshot owns: directories left by crashes, unused lazy mounts."""
        # Listed before the ids are read: a directory renamed into place after the listing is
        # not seen, and one seen belongs to a transaction that has finished by the time ids are read.
        entries = os.listdir(self.snapshots_dir)
        with self.store.transaction() as tx:
            ids = tx.ids()
        for entry in entries:
            if entry.isdigit() and int(entry) in ids:
                continue
            if entry.startswith("new-"):
                continue  # a Prepare in flight (its transaction commits after the rename)
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(os.path.join(self.snapshots_dir, entry))
        self.lazy.cleanup()

    @staticmethod
    def _get(tx: Tx, key: str) -> Snapshot:
        snap = tx.get(key)
        if snap is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return snap


def _field(snap: Snapshot, path: tuple[str, ...]) -> str | None:
    """A field of `snap` as containerd's filters name it."""
    head = path[0]
    if head == "name":
        return snap.name
    if head == "parent":
        return snap.parent
    if head == "kind":
        return {Kind.ACTIVE: "active", Kind.VIEW: "view", Kind.COMMITTED: "committed"}.get(snap.kind)
    if head == "labels" and len(path) > 1:
        return snap.labels.get(".".join(path[1:]))
    return None
