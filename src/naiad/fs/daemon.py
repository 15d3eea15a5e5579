"""Mount daemons: one process per lazy mount, its state under `$NAIAD_HOME/mounts/`.

`spawn()` starts `naiad mount --foreground` as a process of its own (so it
outlives the command that started it, and later the snapshotter) and waits
until the filesystem is up or reports why not; `start()` returns at once
with the daemon's pid, and `wait()` waits later. A running `naiad mountd`
(fs/mountd.py) forks the daemon, its code already imported; else a
single-threaded command forks it from itself, else it is a new interpreter.
`started.json` records its pid at once (a forked daemon's command line is
its starter's). The daemon writes `image-config.json` (the image's OCI
config, for `naiad run`) and `state.json` (pid, ref, mountpoint), refreshes
`stats.json` every second, and writes `trace.json` (files in first-read
order) when it stops. SIGTERM and SIGINT unmount cleanly. In kernel mode
(`state.json` says `"mode": "kernel"`) there are two mounts: EROFS on the
mount point and the daemon's blobfs under its state dir; `umount()` takes
EROFS down first and then stops the daemon, which unmounts blobfs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from naiad.errors import NaiadError
from naiad.fs import mountd
from naiad.paths import naiad_home

log = logging.getLogger(__name__)
READY_TIMEOUT = 300.0
IMAGE_CONFIG = "image-config.json"  # in the state dir: the mounted image's OCI config, before "ready"
STARTED = "started.json"  # in the state dir: the daemon's pid and start time, as soon as it has one


def state_dir(mountpoint: str) -> str:
    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(naiad_home(), "mounts", key)


def write_json(path: str, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.rename(tmp, path)


def read_state(mountpoint: str, name: str = "state.json") -> dict[str, Any]:
    try:
        with open(os.path.join(state_dir(mountpoint), name)) as f:
            return json.load(f)
    except FileNotFoundError:
        raise NaiadError(f"{mountpoint} is not a naiad mount (no {name})") from None


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs. A zombie does not: a daemon whose starter exited is reaped by
    init whenever init gets to it, and waiting for that made every umount slow."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, IndexError):
        return False


def is_mounted(path: str) -> bool:
    """Whether something is mounted on `path`, from the mount table.

    Not os.path.ismount: it stats the path, which fails (ENOTCONN) on a FUSE
    mount whose daemon died, and then says False although the mount is there.
    """
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                field = line.split()[4]
                # Spaces, tabs, newlines and backslashes are written as octal escapes.
                target = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field)
                if target == os.fsencode(path):
                    return True
    except FileNotFoundError:  # no /proc: fall back to what stat tells
        return os.path.ismount(path)
    return False


class Starting:
    """A mount daemon on its way up. `wait()` returns its pid once it is mounted."""

    def __init__(self, pid: int, pipe: int, log_path: str, reap: Callable[[], int] | None):
        # `reap` waits for the daemon's exit status if it is this process's child (not mountd's).
        self.pid, self._pipe, self.log_path, self._reap = pid, pipe, log_path, reap

    def wait(self, timeout: float = READY_TIMEOUT) -> int:
        """Wait until the daemon is mounted (its pid) or has failed (NaiadError: its reason)."""
        deadline = time.monotonic() + timeout
        buf = b""
        with os.fdopen(self._pipe, "rb") as pipe:
            while time.monotonic() < deadline:
                line = pipe.readline()
                if not line:
                    break
                buf += line
                if line.startswith(b"ready"):
                    return self.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        message = buf.decode(errors="replace").strip().removeprefix("error: ")
        if not message:
            status = f"status {self._reap()}" if self._reap is not None else "forked by mountd"
            message = f"mount daemon exited ({status}); see {self.log_path}"
        raise NaiadError(message)


def start(argv: list[str], mountpoint: str, *, fork: bool = False) -> Starting:
    """Start `naiad mount --foreground` ARGV as a daemon, and return at once: its pid is known
    before it is up (a caller interrupted while it comes up can stop it).

    A running `naiad mountd` forks it (fs/mountd.py). Else, with `fork`, this process forks it,
    if it runs one thread: a command like `naiad run` or `naiad mount`, whose interpreter and
    imports the daemon then need not start again (0.1 s of a cold start). Else it is a new process.
    """
    state = state_dir(mountpoint)
    os.makedirs(state, exist_ok=True)
    log_path = os.path.join(state, "daemon.log")
    r, w = os.pipe()
    try:
        with open(log_path, "ab") as logf:
            pid = mountd.fork_daemon(argv, w, logf.fileno())
            reap: Callable[[], int] | None = None
            if pid is None and fork and mountd.can_fork():
                pid = mountd.fork_mount_daemon(argv, w, logf.fileno())
                reap = functools.partial(_reap, pid)
            if pid is None:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "naiad", "mount", "--foreground", "--notify-fd", str(w), *argv],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(w,),
                    start_new_session=True,
                )
                pid, reap = proc.pid, proc.wait
        # Who to stop should the starter die before the daemon is up: forked, it has the starter's
        # command line, not its own.
        write_json(os.path.join(state, STARTED), {"pid": pid, "start": process_start(pid)})
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return Starting(pid, r, log_path, reap)


def _reap(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def started_daemon(mountpoint: str) -> int | None:
    """The pid of the daemon start() started for `mountpoint`, if it still runs."""
    try:
        with open(os.path.join(state_dir(mountpoint), STARTED)) as f:
            started = json.load(f)
        pid = int(started["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # A pid is reused once its process is gone; the start time tells the two apart.
    return pid if pid_alive(pid) and process_start(pid) == started.get("start") else None


def process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot, to tell a live process from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data.rpartition(")")[2].split()[19]


def spawn(argv: list[str], mountpoint: str, timeout: float = READY_TIMEOUT, *, fork: bool = False) -> int:
    """Start `naiad mount --foreground` ARGV as a daemon; wait until it is mounted. Returns its pid."""
    return start(argv, mountpoint, fork=fork).wait(timeout)


def umount(mountpoint: str, timeout: float = 30.0) -> None:
    """Unmount a naiad mount and wait for its daemon to exit."""
    state = read_state(mountpoint)
    pid = int(state["pid"])
    if state.get("mode") == "kernel":
        _umount_kernel(mountpoint, pid)
    elif is_mounted(mountpoint):
        proc = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
        if proc.returncode != 0:
            if pid_alive(pid):
                raise NaiadError(f"cannot unmount {mountpoint}: {proc.stderr.strip() or 'busy'}")
            # The daemon died: the mount is stale and nothing can use it; detach it.
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)
            if is_mounted(mountpoint):
                raise NaiadError(f"cannot unmount {mountpoint} (its daemon, pid {pid}, is gone): "
                                 f"{proc.stderr.strip()}")
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)


def _umount_kernel(mountpoint: str, pid: int) -> None:
    """Kernel mode: EROFS first (refused while busy, unless the daemon is gone), then the daemon
    unmounts its blob files and exits (it is told by SIGTERM)."""
    from naiad.fs import kernel

    alive = pid_alive(pid)
    if is_mounted(mountpoint):
        try:
            kernel.umount(mountpoint)
        except NaiadError:
            if alive:
                raise
            kernel.umount(mountpoint, detach=True)  # its data is gone with the daemon anyway
    if alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    else:
        blobs = os.path.join(state_dir(mountpoint), "blobs")
        if is_mounted(blobs):
            kernel.umount(blobs, detach=True)
