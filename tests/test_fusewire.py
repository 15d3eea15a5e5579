"""fusewire, the FUSE server of kernel mode's blob files, on a real mount (root).

Through the kernel: the directory lists its files with their sizes, reads at any offset and size
return the reader's bytes (up to 1 MiB at a time), a reader's OSError reaches the caller as its
errno, writes are refused, and unmounting ends the server's threads.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import threading
from pathlib import Path

import pytest

from naiad.fs import kernel
from naiad.fs.fusewire import FlatFile, FuseWireServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="needs root and /dev/fuse")


@pytest.fixture
def served(tmp_path: Path):
    data = {2: random.Random(1).randbytes(3 << 20), 3: b"short"}
    asked: list[tuple[int, int, int]] = []  # (ino, offset, size) of every read the reader got

    def read(ino: int, off: int, size: int) -> bytes:
        asked.append((ino, off, size))
        if ino == 4:
            raise OSError(errno.EIO, "a chunk failed")
        return data[ino][off:off + size]

    files = [FlatFile(2, b"1", len(data[2])), FlatFile(3, b"2", 5), FlatFile(4, b"3", 4096)]
    server = FuseWireServer(files, read, threads=4)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    server.mount(str(mnt))
    try:
        yield mnt, data, asked, server
    finally:
        if os.path.ismount(mnt):
            kernel.umount(str(mnt), detach=True)
        server.finished.wait(5)


def test_lists_and_reads(served) -> None:
    mnt, data, asked, _ = served
    assert sorted(os.listdir(mnt)) == ["1", "2", "3"]
    st = os.stat(mnt / "1")
    assert stat.S_ISREG(st.st_mode) and st.st_size == 3 << 20 and st.st_uid == 0
    assert stat.S_ISDIR(os.stat(mnt).st_mode)
    assert (mnt / "2").read_bytes() == b"short"
    fd = os.open(mnt / "1", os.O_RDONLY)
    try:
        for off, size in [(0, 4096), (12345, 777), ((3 << 20) - 10, 100), (0, 2 << 20), (5 << 20, 10)]:
            assert os.pread(fd, size, off) == data[2][off:off + size]
    finally:
        os.close(fd)
    assert max(size for _, _, size in asked) == 1 << 20  # the kernel was allowed 1 MiB reads
    # The kernel does not cut direct reads at a file's end; the server does, for the reader.
    ends = {2: 3 << 20, 3: 5}
    assert all(off + size <= ends[ino] for ino, off, size in asked), asked
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "4")


def test_errors_reach_the_reader(served) -> None:
    mnt, *_ = served
    with pytest.raises(OSError) as e:
        (mnt / "3").read_bytes()
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:
        os.open(mnt / "1", os.O_WRONLY)
    assert e.value.errno in (errno.EROFS, errno.EACCES)
    assert (mnt / "2").read_bytes() == b"short"  # the mount goes on


def test_concurrent_reads(served) -> None:
    mnt, data, _, _ = served
    errors: list[str] = []

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        with open(mnt / "1", "rb", buffering=0) as f:
            for _ in range(200):
                off, size = rnd.randrange(3 << 20), rnd.randrange(1, 300_000)
                f.seek(off)
                if f.read(size) != data[2][off:off + size]:
                    errors.append(f"{off}+{size}")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_unmount_ends_the_server(served) -> None:
    mnt, _, _, server = served
    assert not server.finished.is_set()
    kernel.umount(str(mnt))
    assert server.finished.wait(5)


def test_passthrough_reads_the_backing_file_without_the_reader(tmp_path: Path) -> None:
    data = random.Random(2).randbytes(2 << 20)
    (tmp_path / "backing").write_bytes(data)
    fd = os.open(tmp_path / "backing", os.O_RDONLY)
    calls: list[int] = []

    def read(ino: int, off: int, size: int) -> bytes:
        calls.append(ino)
        return bytes(min(size, 4096 - off))

    files = [FlatFile(2, b"through", len(data)), FlatFile(3, b"served", 4096)]
    server = FuseWireServer(files, read, threads=2, backing=lambda ino: fd if ino == 2 else None)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    server.mount(str(mnt))
    try:
        assert (mnt / "through").read_bytes() == data
        assert (mnt / "served").read_bytes() == bytes(4096)
        assert server.passthrough and server.passed_through() == 1 and set(calls) == {3}
    finally:
        kernel.umount(str(mnt), detach=True)
        os.close(fd)
