"""`naiad run`: one container from a lazily mounted image, with runc, cleaned up whatever happens.

Everything a run owns lives in `$NAIAD_HOME/run/<id>/`:

    lower/        the lazy FUSE mount of the image (a `naiad mount` daemon)
    upper/ work/  the overlayfs upper and work dirs: the container's writes
    rootfs/       the overlay of upper on lower, runc's root
    config.json   the runtime spec (this dir is the OCI bundle)
    hosts, hostname, resolv.conf   bind-mounted over the image's /etc files
    runc.log      runc's own messages (JSON), to tell its failures from the app's
    owner.json    who runs it (pid and start time), so a later run can clean up after a killed one

runc keeps its state under `$NAIAD_HOME/runc` (`--root`), apart from other runc users.

Signals: SIGINT, SIGTERM and SIGHUP to naiad go to the container's init (`runc kill`), once;
if the container has not exited after the stop timeout, or a second signal comes, all its
processes get SIGKILL. The app is its namespace's PID 1, and the kernel drops signals PID 1 has
no handler for: a bare `sleep` stops only at the timeout, as under `docker run` without --init.

Exit code: the container's (128+N when a signal N ended it); 128+N when naiad had to kill it
after a signal N of its own; 127/126 when the command is missing/not executable; 125 when naiad
or runc failed otherwise.

Cleanup, on every path out: `runc delete --force`, unmount the overlay, unmount the lazy mount
(its daemon exits), remove the run dir (or, with `keep`, all of it but `upper/`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import logging
import os
import re
import resource
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from naiad.errors import NaiadError
from naiad.fs import daemon
from naiad.oci.image import Platform, RegistryOptions
from naiad.oci.reference import parse_reference
from naiad.paths import naiad_home
from naiad.runtime.spec import SpecOptions, build_spec, image_settings, resolve_user

log = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
MNT_DETACH = 2


class RunError(NaiadError):
    """naiad itself could not run the container (as opposed to the container failing)."""

    exit_code = 125  # what docker and podman use, so scripts can tell the two apart


@dataclasses.dataclass(frozen=True)
class RunOptions:
    env: Sequence[str] = ()  # "K=V", or "K" to pass this process's value of K
    workdir: str | None = None
    user: str | None = None
    entrypoint: str | None = None
    net: str = "host"
    prefetch_all: bool = False
    hints: bool = True  # the mount follows the image's access hints
    keep: bool = False
    stop_timeout: float = 10.0
    platform: Platform = dataclasses.field(default_factory=Platform)
    registry: RegistryOptions = dataclasses.field(default_factory=RegistryOptions)
    trace_to: str | None = None  # copy the lazy mount's first-read trace here (for optimize)


class _Interrupted(Exception):
    """A forwarded signal arrived before the container started."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def run(ref: str, command: Sequence[str] | None, options: RunOptions) -> int:
    """Run COMMAND (default: the image's) in a container of image REF; its exit code."""
    if os.geteuid() != 0:
        raise RunError("naiad run needs root (overlayfs and runc)")
    runc = shutil.which("runc")
    if runc is None:
        raise RunError("runc is not installed (apt-get install runc)")
    cleanup_stale()
    received: list[int] = []
    run: _RunDir | None = None

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        # Until the container runs, a signal aborts the setup (and cleanup follows); then
        # _supervise forwards it.
        if run is None or not run.container_started:
            raise _Interrupted(signum)

    previous = {s: signal.signal(s, on_signal) for s in FORWARDED_SIGNALS}
    try:
        try:
            run = _RunDir.create(keep=options.keep)
            run.trace_to = options.trace_to
            _prepare(run, ref, command, options)
            return _run_container(run, runc, options.stop_timeout, received)
        except _Interrupted as e:
            return 128 + e.signum
        except RunError:
            raise
        except NaiadError as e:
            raise RunError(str(e)) from e
    finally:
        # Cleanup must finish: a second Ctrl-C here would leave mounts behind.
        for s in FORWARDED_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        try:
            if run is not None:
                run.cleanup(keep_upper=options.keep)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _prepare(run: _RunDir, ref: str, command: Sequence[str] | None, options: RunOptions) -> None:
    """Mount the image lazily, put the overlay on top and write the bundle."""
    parsed = parse_reference(ref)  # a malformed reference fails here, before any daemon starts
    # The daemon resolves the image and leaves its config in its state: this process needs no
    # registry client (its import alone is 0.35 s on a cold page cache, on the critical path).
    run.start_lazy(ref, options).wait()
    try:
        image_config = daemon.read_state(run.lower, daemon.IMAGE_CONFIG)
    except NaiadError:  # a daemon of an older naiad (a `naiad mountd` not restarted since an upgrade)
        from naiad.oci.image import resolve_image, source_for

        with source_for(parsed, options.registry) as source:
            image_config = resolve_image(source, options.platform).config
    run.mount_overlay()
    user_spec = options.user if options.user is not None else image_settings(image_config).get("User")
    user = resolve_user(str(user_spec or ""), run.lower)
    net = options.net
    hostname = socket.gethostname() if net == "host" else run.container_id[:12]
    binds = run.write_etc_files(net, hostname)
    terminal = os.isatty(0)
    spec = build_spec(image_config, SpecOptions(
        command=command or None, entrypoint=options.entrypoint, env=_expand_env(options.env),
        workdir=options.workdir, net=net, terminal=terminal, hostname=hostname,
        rootfs=run.rootfs, binds=binds, cgroups_path=f"/naiad/{run.container_id}",
        # Raising the hard limit needs CAP_SYS_RESOURCE, which a sandboxed root may lack.
        nofile=min(SpecOptions.nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]),
    ), user)
    daemon.write_json(os.path.join(run.path, "config.json"), spec)
    run.terminal = terminal


def _expand_env(items: Sequence[str]) -> list[str]:
    """Docker's `-e K`: a bare name takes this process's value, or is dropped if it has none."""
    out = []
    for item in items:
        if "=" in item:
            out.append(item)
        elif item in os.environ:
            out.append(f"{item}={os.environ[item]}")
    return out


def _run_container(run: _RunDir, runc: str, stop_timeout: float, received: list[int]) -> int:
    # runc's own messages go to a JSON log as well, so that its failures can be told from the app's.
    runc_log = os.path.join(run.path, "runc.log")
    argv = [runc, "--root", run.runc_root, "--log", runc_log, "--log-format", "json",
            "run", "--bundle", run.path, run.container_id]
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    try:
        # From here on a signal is forwarded to the container rather than aborting the setup.
        run.container_started = True
        # With a terminal, runc must stay in our (foreground) process group to put the tty in raw
        # mode; keys then reach the container as bytes, not as signals. Without one, runc gets
        # its own group so that a Ctrl-C reaches the container once (through us), not twice.
        proc = subprocess.Popen(argv, process_group=None if run.terminal else 0)
        pidfd = os.pidfd_open(proc.pid)
        try:
            code = _supervise(run, runc, proc, pidfd, wake_r, stop_timeout, received)
        finally:
            os.close(pidfd)
    finally:
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)
    return _runc_failure_code(runc_log) or code


def _runc_failure_code(log_path: str) -> int | None:
    """Docker's codes when runc could not start the process: 127 not found, 126 not executable, 125.

    runc exits 1 then, which would be indistinguishable from the app's own exit 1. Its error
    is already on stderr; warnings only went to the log, so they are passed on.
    """
    code = None
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return None
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        msg, level = str(entry.get("msg", "")), entry.get("level")
        if level == "warning":
            print(f"naiad: runc: {msg}", file=sys.stderr)
        elif level in ("error", "fatal") and "runc run failed" in msg:
            if "exec: " in msg and "no such file or directory" in msg:
                code = 127
            elif "exec: " in msg and "permission denied" in msg:
                code = 126
            else:
                code = RunError.exit_code
    return code


def _supervise(run: _RunDir, runc: str, proc: subprocess.Popen[bytes], pidfd: int, wake_r: int,
               stop_timeout: float, received: list[int]) -> int:
    """Wait for runc; forward signals: the first to init, then SIGKILL to all after the timeout."""
    stopping: int | None = None  # the first signal received
    forwarded = False
    killed = False
    deadline: float | None = None
    while proc.poll() is None:
        if stopping is not None and not forwarded:
            timeout: float | None = 0.05  # the container was not there yet: retry soon
        else:
            timeout = None if deadline is None or killed else max(0.0, deadline - time.monotonic())
        with contextlib.suppress(InterruptedError):
            select.select([pidfd, wake_r], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            os.read(wake_r, 64)
        if received and stopping is None:
            stopping = received[0]
            deadline = time.monotonic() + stop_timeout
        if len(received) > 1 and not killed:
            killed = True  # a second signal: the user does not want to wait
            _runc(runc, run, "kill", "--all", run.container_id, "KILL")
        if stopping is not None and not forwarded and not killed:
            forwarded = _forward(runc, run, stopping)
        if deadline is not None and not killed and time.monotonic() >= deadline and proc.poll() is None:
            killed = True
            _runc(runc, run, "kill", "--all", run.container_id, "KILL")
    code = proc.returncode
    if code < 0:  # runc itself died of a signal
        code = 128 - code
    if killed and stopping is not None:
        return 128 + stopping
    return code


def _forward(runc: str, run: _RunDir, signum: int) -> bool:
    """Signal the container's process; False while there is none yet (the caller retries).

    Until runc has started the process, init is runc's own code, and a signal sent then is lost.
    """
    state = _runc(runc, run, "state", run.container_id)
    try:
        status = json.loads(state.stdout).get("status") if state.returncode == 0 else None
    except ValueError:
        status = None
    if status != "running":
        return False
    return _runc(runc, run, "kill", run.container_id, signal.Signals(signum).name).returncode == 0


def _runc(runc: str, run: _RunDir, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([runc, "--root", run.runc_root, *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, check=False)


# --- the run dir ----------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _overlay_path(path: str) -> str:
    # overlayfs splits its options on "," and lowerdir on ":"; a backslash escapes both.
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def _mounts_under(path: str) -> list[str]:
    """Mount points at or below `path`, deepest first (from /proc/self/mountinfo)."""
    prefix = path.rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == path or point.startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _is_mount(path: str) -> bool:
    # From the mount table, not os.path.ismount: a FUSE mount whose daemon died fails every stat.
    return path in _mounts_under(path)


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


@dataclasses.dataclass
class _RunDir:
    path: str
    container_id: str
    container_started: bool = False
    terminal: bool = False
    daemon_spawned: bool = False
    daemon_pid: int | None = None  # of the mount daemon this run started
    trace_to: str | None = None

    @classmethod
    def create(cls, keep: bool = False) -> _RunDir:
        # Canonical, as the mount table shows it: cleanup finds mounts by this path.
        base = os.path.realpath(os.path.join(naiad_home(), "run"))
        os.makedirs(base, exist_ok=True)
        run_id = secrets.token_hex(8)
        path = os.path.join(base, run_id)
        os.mkdir(path, 0o700)
        self = cls(path, f"naiad-{run_id}")
        daemon.write_json(os.path.join(path, "owner.json"), {
            "pid": os.getpid(), "start": daemon.process_start(os.getpid()), "container_id": self.container_id,
            "keep": keep,
        })
        for sub in ("lower", "upper", "work", "rootfs"):
            os.mkdir(os.path.join(path, sub), 0o755)
        return self

    @property
    def lower(self) -> str:
        return os.path.join(self.path, "lower")

    @property
    def rootfs(self) -> str:
        return os.path.join(self.path, "rootfs")

    @property
    def runc_root(self) -> str:
        return os.path.join(naiad_home(), "runc")

    def start_lazy(self, ref: str, options: RunOptions) -> daemon.Starting:
        argv = [ref, self.lower, "--platform", str(options.platform)]
        if options.registry.plain_http:
            argv.append("--plain-http")
        if not options.registry.tls_verify:
            argv.append("--insecure-skip-tls-verify")
        if options.prefetch_all:
            argv.append("--prefetch-all")
        if not options.hints:
            argv.append("--no-hints")
        if options.trace_to:
            argv += ["--mode", "fuse"]  # only FUSE mode sees which file each read is for
        self.daemon_spawned = True
        # Credentials go through the environment, not the daemon's command line (ps shows that).
        with _env("NAIAD_CREDS", options.registry.creds):
            starting = daemon.start(argv, self.lower, fork=True)
        self.daemon_pid = starting.pid
        return starting

    def mount_overlay(self) -> None:
        upper, work = os.path.join(self.path, "upper"), os.path.join(self.path, "work")
        data = (f"lowerdir={_overlay_path(self.lower)},upperdir={_overlay_path(upper)},"
                f"workdir={_overlay_path(work)}")
        if _libc.mount(b"overlay", self.rootfs.encode(), b"overlay", 0, data.encode()) != 0:
            err = ctypes.get_errno()
            raise RunError(f"cannot mount overlayfs at {self.rootfs}: {os.strerror(err)}")

    def write_etc_files(self, net: str, hostname: str) -> list[tuple[str, str]]:
        """Copies of /etc/hosts, /etc/hostname (and /etc/resolv.conf) for the container, as Docker does.

        Copies, not the host's files, so that the container may edit its own.
        """
        files: dict[str, str] = {"hostname": hostname + "\n"}
        if net == "host":
            for name in ("hosts", "resolv.conf"):
                with contextlib.suppress(OSError), open(os.path.join("/etc", name)) as f:
                    files[name] = f.read()
        else:
            files["hosts"] = (f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                              f"127.0.1.1\t{hostname}\n")
        binds = []
        for name, text in files.items():
            path = os.path.join(self.path, name)
            with open(path, "w") as f:
                f.write(text)
            binds.append((path, f"/etc/{name}"))
        return binds

    def cleanup(self, keep_upper: bool = False) -> None:
        """Undo everything, in reverse order; carry on past failures, report them at the end."""
        problems: list[str] = []
        runc = shutil.which("runc")
        if runc:
            proc = _runc(runc, self, "delete", "--force", self.container_id)
            if proc.returncode != 0 and "does not exist" not in proc.stderr:
                problems.append(f"runc delete: {proc.stderr.strip()}")
        if _is_mount(self.rootfs):
            problems += _umount(self.rootfs)
        problems += self._stop_lazy_mount()
        left = _mounts_under(self.path)
        if left:
            # Never rmtree through a mount: it would delete inside whatever is mounted there.
            problems.append(f"still mounted, kept {self.path}: {', '.join(left)}")
        elif keep_upper:
            for name in os.listdir(self.path):
                if name != "upper":
                    _remove(os.path.join(self.path, name))
            print(f"naiad: the container's writes are kept in {os.path.join(self.path, 'upper')}",
                  file=sys.stderr)
        else:
            _remove(self.path)
        if problems:
            print("naiad: cleanup: " + "; ".join(problems), file=sys.stderr)

    def _stop_lazy_mount(self) -> list[str]:
        problems = []
        if self.daemon_spawned or _is_mount(self.lower):
            if _is_mount(self.lower):
                try:
                    daemon.umount(self.lower)
                except NaiadError as e:
                    problems.append(str(e))
            # A daemon still starting up (setup was interrupted) is not mounted yet: stop it by its
            # pid, this run's or, for a stale run, the one its state dir records.
            pids = {pid for pid in (self.daemon_pid, daemon.started_daemon(self.lower))
                    if pid is not None and daemon.pid_alive(pid)}
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                _wait_gone(pid, 10.0)
            if _is_mount(self.lower):
                problems += _umount(self.lower)
            # A daemon killed as it came up may have left its blob files (kernel mode) mounted.
            for point in _mounts_under(os.path.realpath(daemon.state_dir(self.lower))):
                problems += _umount(point)
            trace = os.path.join(daemon.state_dir(self.lower), "trace.json")
            if self.trace_to and os.path.exists(trace):
                shutil.copyfile(trace, self.trace_to)
            shutil.rmtree(daemon.state_dir(self.lower), ignore_errors=True)
        return problems


@contextlib.contextmanager
def _env(key: str, value: str | None) -> Iterator[None]:
    if value is None:
        yield
        return
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _umount(path: str) -> list[str]:
    """Unmount `path`; a busy mount is retried briefly, then detached (it goes once unused)."""
    for _ in range(20):
        if _libc.umount2(path.encode(), 0) == 0:
            return []
        err = ctypes.get_errno()
        if err != errno.EBUSY:
            break
        time.sleep(0.05)
    if _libc.umount2(path.encode(), MNT_DETACH) == 0:
        return []
    return [f"cannot unmount {path}: {os.strerror(ctypes.get_errno())}"]


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while daemon.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def cleanup_stale() -> None:
    """Clean up after runs whose naiad process is gone (killed with SIGKILL, or the machine reset)."""
    base = os.path.realpath(os.path.join(naiad_home(), "run"))
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return
    for name in names:
        path = os.path.join(base, name)
        try:
            with open(os.path.join(path, "owner.json")) as f:
                owner = json.load(f)
            pid = int(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being created right now, or not ours
        if daemon.process_start(pid) == owner.get("start"):
            continue  # its owner still runs
        log.info("cleaning up stale run %s", path)
        stale = _RunDir(path, owner.get("container_id", ""), daemon_spawned=True)
        stale.cleanup(keep_upper=bool(owner.get("keep")))
