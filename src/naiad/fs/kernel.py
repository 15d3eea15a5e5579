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
import fcntl
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


_FS_IOC_GETFSSYSFSPATH = 0x80811501  # _IOR(0x15, 1, struct fs_sysfs_path), Linux 6.8+


def read_ahead_file(mountpoint: str) -> str:
    """The sysfs file holding the read-ahead (KiB) of the filesystem mounted at `mountpoint`.

    EROFS from a file has a bdi of its own, named like its sysfs directory (`erofs-28`).
    """
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        buf = bytearray(129)  # struct fs_sysfs_path: __u8 len; __u8 name[128]
        fcntl.ioctl(fd, _FS_IOC_GETFSSYSFSPATH, buf)
    except OSError as e:
        raise NaiadError(f"cannot find the read-ahead setting of {mountpoint}: {e.strerror}") from None
    finally:
        os.close(fd)
    name = bytes(buf[1:1 + buf[0]]).decode().rsplit("/", 1)[-1]  # "erofs/erofs-28" -> "erofs-28"
    return f"/sys/class/bdi/{name}/read_ahead_kb"


def set_read_ahead(mountpoint: str, kib: int) -> None:
    """Set how far the kernel reads ahead in the files of the filesystem at `mountpoint`.

    Its default, 128 KiB, cuts a sequential read of a large file (model weights) into many small
    reads of the blob files, each a FUSE round trip through Python.
    """
    path = read_ahead_file(mountpoint)
    try:
        with open(path, "w") as f:
            f.write(f"{kib}\n")
    except OSError as e:
        raise NaiadError(f"cannot set the read-ahead of {mountpoint}: {e.strerror}") from None


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
