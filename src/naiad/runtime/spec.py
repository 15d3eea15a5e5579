"""The OCI runtime spec (runc's `config.json`) for running an image.

`build_spec()` is a pure function of the image config, the command-line
options and the resolved user, so it can be tested without runc or mounts.
Defaults follow what Docker gives a container, because that is what images
are written against: Docker's capability set, masked and read-only /proc
paths, the usual /dev, /sys and /proc mounts, an environment with PATH and
HOSTNAME. `resolve_user()` turns an image `User` ("uid[:gid]" or names) into
ids, reading /etc/passwd and /etc/group of the image without ever following a
symlink out of its root (`read_in_root()`).
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from naiad.errors import NaiadError

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Docker's default capability set: what container images assume root may do.
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)

# Docker's defaults: host information a container has no business reading...
MASKED_PATHS = (
    "/proc/asound", "/proc/acpi", "/proc/interrupts", "/proc/kcore", "/proc/keys",
    "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
    "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
)
# ...and kernel knobs it must not turn.
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

NET_MODES = ("host", "none")
MAX_SYMLINKS = 40  # as the kernel's path walk (ELOOP)


@dataclasses.dataclass(frozen=True)
class User:
    """The ids a container process runs as, and its home directory if the image names one."""

    uid: int = 0
    gid: int = 0
    additional_gids: tuple[int, ...] = ()
    home: str | None = None


@dataclasses.dataclass(frozen=True)
class SpecOptions:
    """What `naiad run` says on top of the image config."""

    command: Sequence[str] | None = None  # replaces the image's Cmd
    entrypoint: str | None = None  # replaces the image's Entrypoint (and drops its Cmd); "" clears it
    env: Sequence[str] = ()  # "K=V", overriding the image's Env
    workdir: str | None = None
    net: str = "host"  # "host": the host's network namespace; "none": a private one with loopback only
    terminal: bool = False
    hostname: str = "naiad"
    rootfs: str = "rootfs"
    # (host file, path in the container) bind-mounted, e.g. /etc/hosts and /etc/resolv.conf.
    binds: Sequence[tuple[str, str]] = ()
    cgroups_path: str | None = None
    nofile: int = 1048576  # RLIMIT_NOFILE soft and hard, Docker's traditional default


def image_settings(image_config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The runtime part ("config") of an OCI image config; an image may have none."""
    settings = image_config.get("config") or {}
    if not isinstance(settings, Mapping):
        raise NaiadError("image config: 'config' is not an object")
    return settings


def process_args(settings: Mapping[str, Any], options: SpecOptions) -> list[str]:
    """Entrypoint + (the command given, else the image's Cmd), as Docker composes them."""
    if options.entrypoint is not None:
        # An explicit entrypoint makes the image's Cmd meaningless: it was written for the old one.
        entrypoint = [options.entrypoint] if options.entrypoint else []
        default_cmd: list[str] = []
    else:
        entrypoint = _str_list(settings.get("Entrypoint"), "Entrypoint")
        default_cmd = _str_list(settings.get("Cmd"), "Cmd")
    cmd = list(options.command) if options.command else default_cmd
    args = entrypoint + cmd
    if not args:
        raise NaiadError("no command: the image has no Entrypoint or Cmd; give one after '--'")
    return args


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):  # some builders write a shell-form string; run it as one word
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise NaiadError(f"image config: {what} is not a list of strings")
    return list(value)


def merge_env(settings: Mapping[str, Any], options: SpecOptions, user: User) -> list[str]:
    """The process environment: defaults, then the image's Env, then `options.env`."""
    env: dict[str, str] = {"PATH": DEFAULT_PATH, "HOSTNAME": options.hostname}
    if options.terminal:
        env["TERM"] = "xterm"
    for item in [*_str_list(settings.get("Env"), "Env"), *options.env]:
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise NaiadError(f"environment entry {item!r} is not KEY=VALUE")
        env[key] = value
    env.setdefault("HOME", user.home or "/")
    return [f"{k}={v}" for k, v in env.items()]


def build_spec(image_config: Mapping[str, Any], options: SpecOptions, user: User) -> dict[str, Any]:
    """The runc `config.json` for one container of this image."""
    if options.net not in NET_MODES:
        raise NaiadError(f"--net must be one of {', '.join(NET_MODES)}, not {options.net!r}")
    settings = image_settings(image_config)
    cwd = options.workdir or settings.get("WorkingDir") or "/"
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise NaiadError(f"working directory {cwd!r} is not an absolute path")
    caps = list(DEFAULT_CAPABILITIES)
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if options.net == "none":
        namespaces.append({"type": "network"})  # runc brings up loopback in a new one
    process: dict[str, Any] = {
        "terminal": options.terminal,
        "user": {"uid": user.uid, "gid": user.gid},
        "args": process_args(settings, options),
        "env": merge_env(settings, options, user),
        "cwd": os.path.normpath(cwd),
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": options.nofile, "soft": options.nofile}],
        # Docker leaves setuid binaries working (su, ping); images expect that.
        "noNewPrivileges": False,
    }
    if user.additional_gids:
        process["user"]["additionalGids"] = list(user.additional_gids)
    linux: dict[str, Any] = {
        # Deny every device but the defaults runc adds itself (null, zero, tty, ...).
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "namespaces": namespaces,
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if options.cgroups_path:
        linux["cgroupsPath"] = options.cgroups_path
    return {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": options.rootfs, "readonly": False},
        "hostname": options.hostname,
        "mounts": _mounts(options),
        "linux": linux,
    }


def _mounts(options: SpecOptions) -> list[dict[str, Any]]:
    nosuid_noexec_nodev = ["nosuid", "noexec", "nodev"]
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": nosuid_noexec_nodev},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": [*nosuid_noexec_nodev, "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": nosuid_noexec_nodev},
        # Without a network namespace of its own, runc cannot mount a fresh sysfs and bind-mounts
        # the host's /sys instead; read-only either way.
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": [*nosuid_noexec_nodev, "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": [*nosuid_noexec_nodev, "relatime", "ro"]},
    ]
    for source, destination in options.binds:
        mounts.append({"destination": destination, "type": "bind", "source": source,
                       "options": ["rbind", "rprivate"]})
    return mounts


# --- users ----------------------------------------------------------------

def read_in_root(root: str, path: str, limit: int = 4 << 20) -> bytes | None:
    """Bytes of regular file `path` inside `root`, resolving symlinks as if `root` were `/`.

    A symlink (absolute or with "..") never leads out of `root`: "/" and ".." stop at it,
    as in a chroot. None when the file is missing, not a regular file, or a loop.
    """
    parts = deque(path.split("/"))
    resolved: list[str] = []
    links = 0
    while parts:
        name = parts.popleft()
        if name in ("", "."):
            continue
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        here = os.path.join(root, *resolved, name)
        try:
            st = os.lstat(here)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                return None
            target = os.readlink(here)
            if target.startswith("/"):
                resolved = []
            parts.extendleft(reversed(target.split("/")))
            continue
        resolved.append(name)
    full = os.path.join(root, *resolved)
    try:
        # Checked again on the open file: never read a device or FIFO of the image.
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return f.read(limit)


def _entries(text: str, fields: int) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        row = line.split(":")
        if len(row) >= fields:
            rows.append(row)
    return rows


def lookup_user(spec: str, passwd: str | None, group: str | None) -> User:
    """Ids for an image `User` ("name", "uid", "name:group", "uid:gid", ...), Docker's rules.

    A numeric uid absent from passwd is fine (gid 0, home "/"); a name must be found.
    Without an explicit group, the user's primary gid and the groups listing it apply.
    """
    spec = spec.strip()
    if not spec:
        spec = "0"
    user_part, _, group_part = spec.partition(":")
    users = _entries(passwd or "", 7)
    groups = _entries(group or "", 4)
    entry = None
    if user_part.isdigit():
        uid = int(user_part)
        entry = next((u for u in users if u[2] == user_part), None)
    else:
        entry = next((u for u in users if u[0] == user_part), None)
        if entry is None:
            raise NaiadError(
                f"unable to find user {user_part}: no matching entries in the image's passwd file")
        uid = _id(entry[2], "uid", user_part)
    gid = _id(entry[3], "gid", user_part) if entry else 0
    home = entry[5] if entry and entry[5] else None
    name = entry[0] if entry else None
    extra: list[int] = []
    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
        else:
            g = next((g for g in groups if g[0] == group_part), None)
            if g is None:
                raise NaiadError(
                    f"unable to find group {group_part}: no matching entries in the image's group file")
            gid = _id(g[2], "gid", group_part)
    elif name:
        for g in groups:
            if name in g[3].split(",") and g[2].isdigit() and int(g[2]) not in extra:
                extra.append(int(g[2]))
    return User(uid, gid, tuple(extra), home)


def _id(text: str, what: str, whose: str) -> int:
    if not text.isdigit():
        raise NaiadError(f"the image's entry for {whose} has an invalid {what} {text!r}")
    return int(text)


def resolve_user(spec: str, rootfs: str) -> User:
    """`lookup_user` against /etc/passwd and /etc/group of the image mounted at `rootfs`."""
    passwd = _text(read_in_root(rootfs, "/etc/passwd"))
    # Group names and memberships only matter for a user other than root.
    group = _text(read_in_root(rootfs, "/etc/group")) if spec.strip() not in ("", "0", "root") else None
    return lookup_user(spec, passwd, group)


def _text(data: bytes | None) -> str | None:
    return data.decode("utf-8", "replace") if data is not None else None
