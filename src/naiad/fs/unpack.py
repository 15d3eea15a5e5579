"""`naiad unpack`: materialise a naiad image's rootfs in a directory.

This is the oracle for every later front end: its output must equal what
the source OCI layers give. Entries are created parents first; directory
attributes are set last, deepest first, so writing children does not undo
their mtimes. Owners are set before modes and xattrs because chown clears
setuid bits and file capabilities.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable

from naiad.errors import FormatError, NaiadError
from naiad.format.bootstrap import ROOT_INO, Attr, Bootstrap
from naiad.storage.image import NaiadImage


def unpack_image(img: NaiadImage, dest: str, advance: Callable[[int], None] | None = None) -> int:
    """Write the image's rootfs into `dest` (absent or empty); returns the number of entries."""
    if os.path.lexists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise NaiadError(f"{dest} exists and is not an empty directory")
    created = not os.path.exists(dest)
    os.makedirs(dest, exist_ok=True)
    try:
        return _unpack(img, dest, advance)
    except BaseException:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for name in os.listdir(dest):
                p = os.path.join(dest, name)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.unlink(p)
        raise


def _unpack(img: NaiadImage, dest: str, advance: Callable[[int], None] | None) -> int:
    bs = img.bootstrap
    destb = os.fsencode(dest)
    first_path: dict[int, bytes] = {}
    dirs: list[tuple[bytes, Attr]] = [(destb, bs.getattr(ROOT_INO))]
    seen_dirs = {ROOT_INO}
    count = 0
    for rel, _parent, attr in bs.walk():
        _check_name(rel.rsplit(b"/", 1)[1])
        path = destb + rel
        count += 1
        if attr.is_dir:
            if attr.ino in seen_dirs:
                raise FormatError(f"bootstrap: directory inode {attr.ino} appears twice")
            seen_dirs.add(attr.ino)
            os.mkdir(path, 0o700)
            dirs.append((path, attr))
            continue
        if attr.ino in first_path:
            os.link(first_path[attr.ino], path, follow_symlinks=False)
            continue
        first_path[attr.ino] = path
        if attr.is_reg:
            _write_file(img, path, attr, advance)
        elif attr.is_symlink:
            os.symlink(bs.readlink(attr.ino), path)
        elif stat.S_IFMT(attr.mode) in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            os.mknod(path, stat.S_IFMT(attr.mode) | 0o600, attr.rdev)
        else:
            raise FormatError(f"bootstrap: inode {attr.ino} has unknown mode {attr.mode:o}")
        _set_attrs(bs, path, attr)
    for path, attr in reversed(dirs):
        _set_attrs(bs, path, attr)
    return count


def _check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise FormatError(f"bootstrap: unsafe file name {name!r}")


def _write_file(img: NaiadImage, path: bytes, attr: Attr, advance: Callable[[int], None] | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        written = 0
        for chunk in img.bootstrap.file_chunks(attr.ino):
            if chunk.foffset != written:
                raise FormatError(f"bootstrap: chunk table of inode {attr.ino} has a gap at {written}")
            data = img.read_chunk(chunk)
            _write_all(fd, data)
            written += len(data)
            if advance:
                advance(len(data))
        if written != attr.size:
            raise FormatError(f"bootstrap: inode {attr.ino} has {written} bytes of chunks, size {attr.size}")
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _set_attrs(bs: Bootstrap, path: bytes, attr: Attr) -> None:
    os.chown(path, attr.uid, attr.gid, follow_symlinks=False)
    if not attr.is_symlink:
        os.chmod(path, stat.S_IMODE(attr.mode))
    for name, value in bs.xattrs(attr.ino):
        try:
            os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as e:
            # user.* xattrs are not allowed on symlinks and devices on Linux.
            if not (name.startswith(b"user.") and not attr.is_reg and not attr.is_dir):
                raise NaiadError(
                    f"cannot set xattr {name.decode(errors='replace')} on {os.fsdecode(path)}: "
                    f"{e.strerror}"
                ) from None
    with contextlib.suppress(NotImplementedError):
        os.utime(path, ns=(attr.mtime_ns, attr.mtime_ns), follow_symlinks=False)
