"""`naiad mountd`: a resident parent that forks mount daemons instead of starting new interpreters.

A mount daemon spends 0.15-0.3 s importing its code from a cold page cache
before it mounts anything (more as a new interpreter), and a container start
waits for that. `naiad mountd` imports the code once and waits on a Unix
socket in $NAIAD_HOME; `daemon.start()` asks it first, and it forks a daemon
that starts mounting at once. A forked daemon is what a started one is: a
session of its own, its log file, its notify pipe, its state; it outlives
mountd, and `naiad umount` stops it like any other. Without mountd (no
socket, nobody answering, or another user's or namespace's), daemons are
started as before: forked by a single-threaded caller
(`fork_mount_daemon()`, the same child as mountd's), else a new interpreter.

A long-lived caller (the containerd snapshotter) starts one of its own with
`start_companion()`, unless one answers already: it ends with its parent
(PR_SET_PDEATHSIG), so a restarted snapshotter, after an upgrade say, forks
from its own code.

Only the user mountd runs as may ask (SO_PEERCRED), and only from mountd's
own mount and network namespaces: a daemon mounts, and reaches registries,
from mountd's. mountd answers one request at a time and has no thread, so
forking it is safe. It serves the code it imported: restart it after an
upgrade.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from naiad.errors import NaiadError
from naiad.paths import naiad_home

_REQUEST_MAX = 1 << 20  # argv and environment, JSON
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
_PR_SET_PDEATHSIG = 1


def socket_path() -> str:
    return os.path.join(naiad_home(), "mountd.sock")


def fork_daemon(argv: list[str], notify_fd: int, log_fd: int) -> int | None:
    """Have mountd fork `naiad mount --foreground --notify-fd N ARGV`: its pid, or None if no mountd
    can (start the daemon yourself then). NaiadError if mountd took the request but did not say."""
    path = socket_path()
    if not os.path.exists(path):
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.settimeout(10)
        try:
            conn.connect(path)
            pid, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                           _PEERCRED.size))
            if uid != os.getuid() or not _same_namespaces(pid):
                return None
            umask = os.umask(0)
            os.umask(umask)
            request = {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "umask": umask}
            socket.send_fds(conn, [json.dumps(request).encode()], [notify_fd, log_fd])
        except OSError:
            return None  # a socket left by a mountd that is gone
        try:
            return int(json.loads(conn.recv(4096))["pid"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            # It may have forked a daemon for this mount point: starting another would race it.
            raise NaiadError(f"naiad mountd ({path}) took the request but did not answer: {e}") from None


def start_companion() -> subprocess.Popen[bytes] | None:
    """Start `naiad mountd` as a child that ends with this process, unless a mountd answers on
    this NAIAD_HOME's socket already (a service of its own): None then. Call it before starting
    threads (it forks). Its output goes where this process's goes; the caller need not wait for
    it: until it listens, daemons start as new processes."""
    if _answers(socket_path()):
        return None
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)

    def end_with_parent() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it ended before the prctl
            os._exit(0)

    return subprocess.Popen([sys.executable, "-m", "naiad", "mountd"], stdin=subprocess.DEVNULL,
                            preexec_fn=end_with_parent)


def stop_companion(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a mountd start_companion() started; the daemons it forked go on."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _answers(path: str) -> bool:
    """Whether something listens on the socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _same_namespaces(pid: int) -> bool:
    try:
        return all(os.stat(f"/proc/{pid}/ns/{ns}").st_ino == os.stat(f"/proc/self/ns/{ns}").st_ino
                   for ns in ("mnt", "net"))
    except OSError:
        return False


def serve(ready: Any = None) -> None:
    """Import the daemon's code, then fork a mount daemon for each request until SIGTERM/SIGINT.

    `ready()` is called once the socket listens.
    """
    for module in ("naiad.cli", "naiad.fs.mount"):  # the point of mountd: loaded once, before any fork
        importlib.import_module(module)
    if not can_fork():
        raise NaiadError(f"naiad mountd cannot fork safely: {threading.active_count()} threads run")

    path = socket_path()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        if os.path.exists(path):
            _claim_stale(path)
        umask = os.umask(0o177)  # the socket: 0600
        try:
            listener.bind(path)
        finally:
            os.umask(umask)
        listener.listen(16)
        # Daemons are reaped by the kernel; mountd never waits for one.
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, _stop)
        if ready is not None:
            ready()
        try:
            while True:
                conn, _ = listener.accept()
                with conn:
                    _answer(conn, listener)
        except _Stop:
            pass
        finally:
            os.unlink(path)


class _Stop(Exception):
    pass


def _stop(signum: int, _frame: Any) -> None:
    raise _Stop


def _claim_stale(path: str) -> None:
    """Remove a socket nobody listens on; refuse to take over one that a mountd serves."""
    if _answers(path):
        raise NaiadError(f"a naiad mountd already serves {path}")
    os.unlink(path)


def _answer(conn: socket.socket, listener: socket.socket) -> None:
    _pid, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    if uid != os.getuid():
        return
    fds: list[int] = []
    try:
        # A caller that hangs up mid-request costs it its answer, not mountd its life.
        msg, fds, _flags, _addr = socket.recv_fds(conn, _REQUEST_MAX, 2)
        if len(fds) != 2:
            return
        pid = _fork(json.loads(msg), fds[0], fds[1], [conn, listener])
        conn.send(json.dumps({"pid": pid}).encode())
    except (ValueError, KeyError, TypeError, OSError) as e:
        print(f"naiad mountd: bad request: {e}", file=sys.stderr)
    finally:
        for fd in fds:
            os.close(fd)


def _fork(request: dict, notify_fd: int, log_fd: int, sockets: list[socket.socket]) -> int:
    argv = [str(a) for a in request["argv"]]
    env = {str(k): str(v) for k, v in request["env"].items()}
    cwd, umask = str(request["cwd"]), int(request["umask"])

    def as_the_caller() -> None:
        for s in sockets:
            s.close()
        os.chdir(cwd)
        os.umask(umask)
        os.environ.clear()
        os.environ.update(env)

    return fork_mount_daemon(argv, notify_fd, log_fd, as_the_caller)


def can_fork() -> bool:
    """Whether this process may fork a daemon: it runs one thread. A lock that another thread
    holds at the fork would stay held in the child for good."""
    return threading.active_count() == 1


def fork_mount_daemon(argv: list[str], notify_fd: int, log_fd: int,
                      prepare: Callable[[], None] | None = None) -> int:
    """Fork this process into `naiad mount --foreground --notify-fd N ARGV`; the child's pid.

    The child, after `prepare()`, is a session of its own whose stdin is /dev/null and whose
    output goes to `log_fd`, with no other descriptor of this process but `notify_fd`; it never
    returns. Only a process that can_fork() may call it.
    """
    if not can_fork():
        raise NaiadError(f"cannot fork a mount daemon: {threading.active_count()} threads run")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        if prepare is not None:
            prepare()
        os.setsid()
        # The starter's handlers (naiad run's, mountd's) are not the daemon's.
        for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.closerange(3, notify_fd)
        os.closerange(notify_fd + 1, os.sysconf("SC_OPEN_MAX"))
        from naiad.cli import main

        code = main(["mount", "--foreground", "--notify-fd", str(notify_fd), *argv])
    except BaseException:  # the child must never return into its parent's code
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
