"""The lazy mounts behind naiad snapshots: one `naiad mount` daemon per image, shared, counted.

A mount lives at `<root>/lazy/<key>/mnt`; its row in `lazy_mounts` (the pinned image reference)
is written before the daemon starts, and the snapshots that present it reference it by key, so
the count of users is a query, never a counter to keep in step. The daemons are processes of
their own (`naiad.fs.daemon.spawn`, own session), so a snapshotter that stops or is killed -9
leaves running containers alone; a restarted one finds them through the daemons' state files
and re-attaches, and re-mounts those whose daemon died (a stale FUSE mount is detached first).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
from collections.abc import Iterator

from naiad.errors import NaiadError
from naiad.fs import daemon
from naiad.oci.image import Platform
from naiad.oci.reference import parse_reference
from naiad.snapshotter.locks import KeyedLocks
from naiad.snapshotter.remote import NaiadLayer, Resolver
from naiad.snapshotter.store import Store

log = logging.getLogger(__name__)


class LazyMounts:
    def __init__(self, root: str, store: Store, resolver: Resolver, platform: Platform,
                 prefetch_all: bool = False):
        self.base = os.path.join(root, "lazy")
        os.makedirs(self.base, exist_ok=True)
        self.store = store
        self.resolver = resolver
        self.platform = platform
        self.prefetch_all = prefetch_all
        self._locks = KeyedLocks()

    def mountpoint(self, key: str) -> str:
        return os.path.join(self.base, key, "mnt")

    def alive(self, key: str) -> bool:
        """Whether the mount is up and its daemon runs."""
        mnt = self.mountpoint(key)
        if not daemon.is_mounted(mnt):
            return False
        try:
            return daemon.pid_alive(int(daemon.read_state(mnt)["pid"]))
        except (NaiadError, KeyError, ValueError):
            return False

    @contextlib.contextmanager
    def acquire(self, layer: NaiadLayer) -> Iterator[str]:
        """Record and mount `layer`'s image; yields its key, for the caller to commit a snapshot using it.

        The key stays locked until the caller is done, so a concurrent release cannot unmount
        it in between; if the caller commits nothing, the mount is released again.
        """
        key = layer.mount_key
        with self._locks[key]:
            with self.store.transaction() as tx:
                tx.add_lazy(key, str(layer.ref))
            try:
                self._ensure(key)
                yield key
            finally:
                self._release(key)

    def ensure(self, key: str) -> str:
        """The mountpoint of `key`, mounting it again if its daemon is gone."""
        with self._locks[key]:
            return self._ensure(key)

    def _ensure(self, key: str) -> str:
        mnt = self.mountpoint(key)
        if self.alive(key):
            return mnt
        with self.store.transaction() as tx:
            ref = tx.lazy_ref(key)
        if ref is None:
            raise NaiadError(f"no lazy mount {key}")
        self._detach(mnt)
        os.makedirs(mnt, exist_ok=True)
        options = self.resolver.options_for(parse_reference(ref))
        argv = [ref, mnt, "--platform", str(self.platform)]
        if options.plain_http:
            argv.append("--plain-http")
        if not options.tls_verify:
            argv.append("--insecure-skip-tls-verify")
        if self.prefetch_all:
            argv.append("--prefetch-all")
        pid = daemon.spawn(argv, mnt)
        log.info("mounted %s at %s (pid %d)", ref, mnt, pid)
        return mnt

    def release(self, key: str) -> None:
        """Unmount `key` and forget it if no snapshot uses it any more."""
        with self._locks[key]:
            self._release(key)

    def _release(self, key: str) -> None:
        with self.store.transaction() as tx:
            if tx.lazy_users(key):
                return
            tx.delete_lazy(key)
        self._remove_dir(key)
        log.info("released lazy mount %s", key)

    def _remove_dir(self, key: str) -> None:
        mnt = self.mountpoint(key)
        self._detach(mnt)
        for path in (mnt, os.path.dirname(mnt)):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(path)

    def _detach(self, mnt: str) -> None:
        """Unmount `mnt` if mounted: cleanly if its daemon runs, lazily if the mount is stale."""
        if not daemon.is_mounted(mnt):
            return
        try:
            daemon.umount(mnt)
        except NaiadError as e:
            # No state file (it was lost) or busy: detach, so that nothing new opens it.
            log.warning("unmounting %s: %s; detaching it", mnt, e)
            subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)

    def recover(self) -> None:
        """At start: release mounts no snapshot uses, re-attach to the live ones; re-mount the dead ones
        in a background thread, so that a slow registry does not hold up serving."""
        with self.store.transaction() as tx:
            keys = [(k, tx.lazy_users(k)) for k in tx.lazy_keys()]
        dead = []
        for key, users in keys:
            if not users:
                self.release(key)
            elif self.alive(key):
                log.info("re-attached to lazy mount %s", key)
            else:
                dead.append(key)
        if dead:
            threading.Thread(target=self._remount, args=(dead,), name="remount", daemon=True).start()

    def _remount(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.ensure(key)
            except NaiadError as e:
                # The next Mounts or Prepare on a snapshot of it tries again.
                log.error("cannot mount lazy image %s again: %s", key, e)
                continue
            log.info("re-mounted lazy mount %s", key)

    def cleanup(self) -> None:
        """Release the mounts no snapshot uses, and directories no row names (left by a crash)."""
        with self.store.transaction() as tx:
            keys = tx.lazy_keys()
        for key in keys:
            self.release(key)
        for key in os.listdir(self.base):
            with self._locks[key]:
                with self.store.transaction() as tx:
                    known = tx.lazy_ref(key) is not None
                if not known:
                    self._remove_dir(key)
