"""Kernel mounts for the fast path: EROFS from a regular file, with regular files as its devices.

Uses the new mount API (fsopen/fsconfig/fsmount/move_mount) through ctypes:
each extra device is its own `device` parameter, so neither the 4 KiB limit
of mount(2)'s option string nor commas in paths get in the way, and when
the kernel refuses, its own words (read back from the fs context) make the
error message. The syscall numbers are the same on every architecture.
"""

from __future__ import annotations

import ctypes
import errno
import os

from naiad.errors import NaiadError

_SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 429, 430, 431, 432
_FSOPEN_CLOEXEC = 1
_FSCONFIG_SET_FLAG, _FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 0, 1, 6
_FSMOUNT_CLOEXEC = 1
_MOUNT_ATTR_RDONLY = 1
_MOVE_MOUNT_F_EMPTY_PATH = 4
_AT_FDCWD = -100
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _syscall(number: int, *args: object) -> int:
    result = _libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def erofs_available() -> str | None:
    """Why EROFS kernel mounts cannot be used here, or None if they may be."""
    if os.geteuid() != 0:
        return "kernel mounts need root"
    try:
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1:] == ["erofs"] for line in f):
                return "the kernel has no erofs"
    except OSError:
        return "no /proc/filesystems"
    return None


def mount_erofs(image: str, devices: list[str], target: str) -> None:
    """Mount EROFS image file `image` read-only at `target`, its extra devices being `devices`."""
    try:
        fs = _syscall(_SYS_FSOPEN, b"erofs", _FSOPEN_CLOEXEC)
    except OSError as e:
        raise NaiadError(f"cannot mount EROFS: {e.strerror}") from None
    try:
        _syscall(_SYS_FSCONFIG, fs, _FSCONFIG_SET_STRING, b"source", os.fsencode(image), 0)
        for device in devices:
            _syscall(_SYS_FSCONFIG, fs, _FSCONFIG_SET_STRING, b"device", os.fsencode(device), 0)
        _syscall(_SYS_FSCONFIG, fs, _FSCONFIG_SET_FLAG, b"ro", None, 0)
        _syscall(_SYS_FSCONFIG, fs, _FSCONFIG_CMD_CREATE, None, None, 0)
        mnt = _syscall(_SYS_FSMOUNT, fs, _FSMOUNT_CLOEXEC, _MOUNT_ATTR_RDONLY)
        try:
            _syscall(_SYS_MOVE_MOUNT, mnt, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH)
        finally:
            os.close(mnt)
    except OSError as e:
        said = "; ".join(_kernel_messages(fs)) or e.strerror
        raise NaiadError(f"cannot mount EROFS image {image} at {target}: {said}") from None
    finally:
        os.close(fs)


def _kernel_messages(fs: int) -> list[str]:
    """What the kernel logged about this fs context ("e erofs: ..." lines)."""
    out = []
    while True:
        try:
            out.append(os.read(fs, 4096).decode(errors="replace").strip())
        except OSError:
            return out


def umount(target: str, *, detach: bool = False) -> None:
    """Unmount `target`; NaiadError (with EBUSY's word "busy") if it is in use and not `detach`."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH if detach else 0) != 0:
        err = ctypes.get_errno()
        word = "busy" if err == errno.EBUSY else os.strerror(err)
        raise NaiadError(f"cannot unmount {target}: {word}")
