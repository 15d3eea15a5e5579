"""fusewire: a read-only FUSE server of one flat directory of files, speaking the kernel's protocol.

Kernel mode (BlobFS) needs a directory of a few files whose only busy
operation is read: the kernel already serves every lookup of the image tree
from EROFS. Through pyfuse3 each read cost 0.35 ms of daemon CPU on top of
the read itself (a trio task per request, a thread hop for every read that
waits for the disk or the network), and torchapp's start makes about 4,000
of them, serially behind the app's page faults. Here a pool of threads each
reads a request from /dev/fuse, answers it in place (a pread of the cache
file, or a fetch the thread waits for) and writes the reply: nothing sits
between the kernel and the read. The protocol is the kernel's
`include/uapi/linux/fuse.h`; only what a read-only flat directory needs is
spoken, anything else is answered ENOSYS, which the kernel takes as "not
supported" for good.

Mounting /dev/fuse directly takes root; kernel mode does anyway (EROFS).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from naiad.errors import NaiadError

log = logging.getLogger(__name__)

# Opcodes (fuse.h, enum fuse_opcode).
_LOOKUP, _FORGET, _GETATTR, _OPEN, _READ, _STATFS, _RELEASE = 1, 2, 3, 14, 15, 17, 18
_FLUSH, _INIT, _OPENDIR, _READDIR, _RELEASEDIR = 25, 26, 27, 28, 29
_INTERRUPT, _DESTROY, _BATCH_FORGET = 36, 38, 42
_NO_REPLY = frozenset({_FORGET, _BATCH_FORGET, _INTERRUPT})

# INIT flags.
_ASYNC_READ = 1 << 0
_MAX_PAGES = 1 << 22
_INIT_EXT = 1 << 30
_PASSTHROUGH_FLAGS2 = 1 << (37 - 32)  # FUSE_PASSTHROUGH, in the second word of flags
_KERNEL_MAJOR, _MAX_MINOR = 7, 40  # the structures below are 7.40's (Linux 6.9)

_FOPEN_DIRECT_IO = 1 << 0
_FOPEN_PASSTHROUGH = 1 << 7
# ioctl(/dev/fuse, FUSE_DEV_IOC_BACKING_OPEN, struct fuse_backing_map {s32 fd; u32 flags; u64 pad})
_BACKING_OPEN = (1 << 30) | (16 << 16) | (229 << 8) | 1
_BACKING_MAP = struct.Struct("<iIQ")
_ROOT = 1
_TIMEOUT = 86400 * 365  # seconds the kernel may keep names and attributes: the files never change
_MAX_PAGES_PER_READ = 256  # 1 MiB reads, the kernel's ceiling
_MAX_WRITE = 4096  # nothing is written; the smallest buffer the kernel accepts for requests
_BUFFER = 64 << 10  # a request: header + a read's arguments, or a lookup's name

_IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
_OUT_HEADER = struct.Struct("<IiQ")  # len error unique
_INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags
_INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
_ATTR = "QQQQQQIIIIIIIIII"  # ino size blocks atime mtime ctime atimens mtimens ctimens mode nlink uid gid
#                              rdev blksize flags
_ENTRY_OUT = struct.Struct("<QQQQII" + _ATTR)  # nodeid generation entry_valid attr_valid (nsecs) attr
_ATTR_OUT = struct.Struct("<QII" + _ATTR)  # attr_valid attr_valid_nsec dummy attr
_OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
_READ_IN = struct.Struct("<QQI")  # fh offset size (read_flags lock_owner flags follow)
_STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize pad
_DIRENT = struct.Struct("<QQII")  # ino off namelen type

_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 1, 2, 4
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]


@dataclass(frozen=True)
class FlatFile:
    """One file of the directory: its inode number (2 and up), name and size."""

    ino: int
    name: bytes
    size: int


Reader = Callable[[int, int, int], "bytes | bytearray"]  # (ino, offset, size) -> data; OSError fails it
Backing = Callable[[int], "int | None"]  # ino -> a descriptor whose bytes ARE the file's, or None


class FuseWireServer:
    """Serves `files` read-only at a mount point, with `read` answering reads, on `threads` threads.

    `read` runs on the server's threads and may block (a fetch): the other threads go on. A
    request waits only when all of them are busy, so there are enough for reads of cached bytes
    to pass while some wait for a registry that stopped answering (up to the fetch timeout);
    an idle thread costs a 64 KiB buffer.

    FUSE passthrough (Linux 6.9): when `backing` gives a descriptor for a file being opened, the
    kernel reads that open file from the descriptor's file itself, never asking `read`. That file
    must hold the served file's bytes, be at least as long (EROFS takes a short read for EIO),
    and keep both while the mount lives.
    """

    def __init__(self, files: Sequence[FlatFile], read: Reader, *, threads: int = 32,
                 fsname: str = "naiad-blobs", backing: Backing | None = None):
        self.files = list(files)
        self._by_ino = {f.ino: f for f in self.files}
        self._by_name = {f.name: f for f in self.files}
        self._read = read
        self._threads = threads
        self._fsname = fsname
        self._backing = backing
        self._backing_ids: dict[int, int] = {}  # ino -> the kernel's id of its backing file
        self.passthrough = False  # the kernel agreed to FUSE passthrough (INIT)
        self._fd = -1
        self._running = 0
        self._lock = threading.Lock()
        self.finished = threading.Event()  # the connection ended (unmounted) or stop() was called

    def mount(self, target: str) -> None:
        """Mount at `target` and start answering (read-only, root only, as kernel mode is)."""
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = (f"fd={self._fd},rootmode={stat.S_IFDIR:o},user_id=0,group_id=0,"
                   "default_permissions,allow_other")
        if _libc.mount(self._fsname.encode(), os.fsencode(target), b"fuse.naiad",
                       _MS_RDONLY | _MS_NOSUID | _MS_NODEV, options.encode()) != 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            self._fd = -1
            raise NaiadError(f"cannot mount the blob files at {target}: {os.strerror(err)}")
        self._running = self._threads
        for i in range(self._threads):
            threading.Thread(target=self._serve, name=f"fusewire-{i}", daemon=True).start()

    def stop(self) -> None:
        """Stop answering: the process may exit, which ends the connection (the kernel aborts it)."""
        self.finished.set()

    # --- the loop ----------------------------------------------------------

    def _serve(self) -> None:
        buf = bytearray(_BUFFER)
        view = memoryview(buf)
        try:
            while not self.finished.is_set():
                try:
                    n = os.readv(self._fd, [buf])
                except OSError as e:
                    if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):  # ENOENT: interrupted away
                        continue
                    if e.errno != errno.ENODEV:  # ENODEV: unmounted
                        log.error("blob files: reading a request failed: %s", e)
                    return
                self._answer(view[:n])
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    self.finished.set()

    def _answer(self, request: memoryview) -> None:
        _, opcode, unique, nodeid, *_ = _IN_HEADER.unpack_from(request)
        args = request[_IN_HEADER.size:]
        if opcode in _NO_REPLY:
            return
        try:
            reply = self._dispatch(opcode, nodeid, args)
        except OSError as e:
            self._reply(unique, -(e.errno or errno.EIO))
            return
        except Exception:
            # A bug must cost this request, not the mount.
            log.exception("blob files: request %d failed", opcode)
            self._reply(unique, -errno.EIO)
            return
        self._reply(unique, 0, reply)

    def _reply(self, unique: int, error: int, data: bytes | bytearray | memoryview = b"") -> None:
        header = _OUT_HEADER.pack(_OUT_HEADER.size + len(data), error, unique)
        try:
            os.writev(self._fd, [header, data] if data else [header])  # one reply, one write
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):  # the request was interrupted / unmounted
                log.error("blob files: writing a reply failed: %s", e)

    def _dispatch(self, opcode: int, nodeid: int, args: memoryview) -> bytes | bytearray:
        if opcode == _READ:
            _, offset, size = _READ_IN.unpack_from(args)
            f = self._by_ino.get(nodeid)
            if f is None:
                raise OSError(errno.EBADF, "not a file")
            # Direct I/O reads are not cut at the file's end by the kernel: the end is here.
            size = min(size, f.size - offset)
            return self._read(nodeid, offset, size) if size > 0 else b""
        if opcode == _LOOKUP:
            f = self._by_name.get(bytes(args).rstrip(b"\0")) if nodeid == _ROOT else None
            if f is None:
                raise OSError(errno.ENOENT, "no such file")
            return _ENTRY_OUT.pack(f.ino, 0, _TIMEOUT, _TIMEOUT, 0, 0, *self._attr(f.ino))
        if opcode == _GETATTR:
            return _ATTR_OUT.pack(_TIMEOUT, 0, 0, *self._attr(nodeid))
        if opcode in (_OPEN, _OPENDIR):
            if (opcode == _OPEN) != (nodeid in self._by_ino):
                raise OSError(errno.EISDIR if opcode == _OPEN else errno.ENOTDIR, "wrong type")
            if struct.unpack_from("<I", args)[0] & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise OSError(errno.EROFS, "read-only")
            if opcode == _OPENDIR:
                return _OPEN_OUT.pack(nodeid, 0, 0)
            backing_id = self._backing_id(nodeid)
            if backing_id is not None:
                return _OPEN_OUT.pack(nodeid, _FOPEN_PASSTHROUGH, backing_id)
            # No page cache for the files: whoever reads them (EROFS) caches what it read itself.
            return _OPEN_OUT.pack(nodeid, _FOPEN_DIRECT_IO, 0)
        if opcode == _READDIR:
            _, offset, size = _READ_IN.unpack_from(args)
            return self._readdir(offset, size)
        if opcode in (_RELEASE, _RELEASEDIR, _FLUSH, _DESTROY):
            return b""
        if opcode == _STATFS:
            blocks = sum(-(-f.size // 4096) for f in self.files)
            return _STATFS_OUT.pack(blocks, 0, 0, len(self.files) + 1, 0, 4096, 255, 4096, 0)
        if opcode == _INIT:
            return self._init(args)
        raise OSError(errno.ENOSYS, "not supported")

    def _init(self, args: memoryview) -> bytes:
        major, minor, max_readahead, flags = _INIT_IN.unpack_from(args)
        if major != _KERNEL_MAJOR:
            raise OSError(errno.EPROTO, f"FUSE protocol {major}.{minor}")
        want = (_ASYNC_READ | _MAX_PAGES | _INIT_EXT) & flags
        extended = flags & _INIT_EXT and len(args) >= _INIT_IN.size + 4  # 7.36+: a second flags word
        flags2 = struct.unpack_from("<I", args, _INIT_IN.size)[0] if extended else 0
        want2 = _PASSTHROUGH_FLAGS2 & flags2 if self._backing is not None else 0
        self.passthrough = bool(want2)
        # Passthrough makes this filesystem one level of stacking (max_stack_depth 1): the backing
        # files must be on a plain filesystem, and whatever mounts on these files (EROFS) counts it.
        return _INIT_OUT.pack(_KERNEL_MAJOR, min(minor, _MAX_MINOR), max_readahead, want,
                              16, 12, _MAX_WRITE, 1, _MAX_PAGES_PER_READ, 0, want2, 1 if want2 else 0)

    def passed_through(self) -> int:
        """How many files the kernel reads from their backing file (opened with passthrough)."""
        with self._lock:
            return len(self._backing_ids)

    def _backing_id(self, ino: int) -> int | None:
        """The kernel's id for `ino`'s backing file, registering it on first use; None: no passthrough."""
        if not self.passthrough:
            return None
        with self._lock:
            if ino in self._backing_ids:
                return self._backing_ids[ino]
            assert self._backing is not None
            fd = self._backing(ino)
            if fd is None:
                return None
            try:
                # Kept for the mount's life: the kernel looks the id up after this open's reply.
                arg = bytearray(_BACKING_MAP.pack(fd, 0, 0))
                backing_id = fcntl.ioctl(self._fd, _BACKING_OPEN, arg, True)  # True: the result
            except OSError as e:
                log.warning("blob file %d: no passthrough: %s", ino, e.strerror)
                return None
            self._backing_ids[ino] = backing_id
            return backing_id

    def _attr(self, ino: int) -> tuple[int, ...]:
        if ino == _ROOT:
            mode, size, nlink = stat.S_IFDIR | 0o500, 0, 2
        elif (f := self._by_ino.get(ino)) is not None:
            mode, size, nlink = stat.S_IFREG | 0o400, f.size, 1
        else:
            raise OSError(errno.ENOENT, "no such inode")
        return (ino, size, -(-size // 512), 0, 0, 0, 0, 0, 0, mode, nlink, 0, 0, 0, 4096, 0)

    def _readdir(self, offset: int, size: int) -> bytes:
        out = bytearray()
        for i in range(offset, len(self.files)):
            f = self.files[i]
            entry = _DIRENT.pack(f.ino, i + 1, len(f.name), stat.S_IFREG >> 12) + f.name
            entry += bytes(-len(entry) % 8)
            if len(out) + len(entry) > size:
                break
            out += entry
        return bytes(out)
