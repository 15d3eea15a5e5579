"""The EROFS view of a bootstrap: a metadata image the kernel mounts itself.

`write_erofs(bootstrap, path)` writes an EROFS image holding the whole tree
(inodes, directories, symlinks, devices, xattrs, hard links, owners and ns
mtimes) but no file data: regular files are chunk-based inodes whose chunk
indexes point into extra devices, one per data blob, addressed in the blob's
*uncompressed* byte space (chunk at `uoffset` = block `uoffset / 4096` of
device 1 + blob index). Whoever mounts it supplies those devices: naiad's
blobfs serves one file per blob, filled from the verified chunk cache.
docs/format.md ("The EROFS view") describes the layout; the on-disk
structures are the kernel's (include/linux/erofs_fs.h), written here from
their description.

Layout of the image:

    block 0          superblock at byte 1024, device table right after it
    meta area        inodes, each 32-byte aligned: 64-byte extended inode,
                     inline xattrs, then either the inline tail of a
                     directory/symlink or the chunk index array of a file
    data area        full blocks of large directories and symlinks (and
                     tails that did not fit next to their inode)

The writer streams: it merges four ordered scans of the bootstrap (inodes,
dentries, xattrs, file chunks) and keeps only an array of inode positions
and a map of directory parents, so 100k files cost a few MB. It runs the
same placement twice, once to learn every inode's position (directory
entries name their children by position) and once to write. The output
depends only on the bootstrap: same bootstrap, same bytes.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import tempfile
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from naiad.errors import FormatError
from naiad.format.bootstrap import ROOT_INO, Bootstrap

MAGIC = 0xE0F5E1E2
SUPER_OFFSET = 1024
BLOCK_BITS = 12
BLOCK = 1 << BLOCK_BITS
SLOT = 32  # inode positions ("nid") count 32-byte slots from the meta area's start
INODE_SIZE = 64  # extended inode: 32-bit owners, 64-bit mtime + ns
DEVICE_SLOT = 128
NULL_ADDR = 0xFFFFFFFF
# Written into the superblock's volume name: a cached image written by another version of this
# writer is rewritten rather than trusted.
VOLUME_NAME = b"naiad-erofs-1"

INCOMPAT_CHUNKED_FILE = 0x4
INCOMPAT_DEVICE_TABLE = 0x8

# i_format: bit 0 = extended inode, bits 1-3 = data layout
LAYOUT_FLAT_PLAIN = 0
LAYOUT_FLAT_INLINE = 2
LAYOUT_CHUNK_BASED = 4
CHUNK_FORMAT_INDEXES = 0x20
CHUNK_INDEX_SIZE = 8

DIRENT_SIZE = 12
FILE_TYPES = {
    stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4,
    stat.S_IFIFO: 5, stat.S_IFSOCK: 6, stat.S_IFLNK: 7,
}

# Name prefixes EROFS stores as an index; the ACL names are whole names (empty suffix).
# Longer prefixes first, so "system.posix_acl_access" is not taken for something shorter.
XATTR_PREFIXES = (
    (b"system.posix_acl_default", 3),
    (b"system.posix_acl_access", 2),
    (b"security.", 6),
    (b"trusted.", 4),
    (b"lustre.", 5),
    (b"user.", 1),
)
XATTR_ENTRY_HEADER = 4
XATTR_IBODY_HEADER = 12

_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23x")
_INODE = struct.Struct("<HHHHQIIIIQII16x")
_DIRENT = struct.Struct("<QHBx")
_CHUNK_INDEX = struct.Struct("<HHI")
_DEVICE = struct.Struct("<64sII56x")
assert _SUPER.size == 128 and _INODE.size == INODE_SIZE and _DIRENT.size == DIRENT_SIZE
assert _DEVICE.size == DEVICE_SLOT and _CHUNK_INDEX.size == CHUNK_INDEX_SIZE


def _align(n: int, unit: int) -> int:
    return -(-n // unit) * unit


@dataclass(slots=True)
class _Record:
    """One inode as the scans deliver it."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime: int
    mtime_nsec: int
    rdev: int
    target: bytes | None
    # Filled by the merge; most inodes have none of one kind or another, so a list is only made
    # for rows that exist (three fresh lists per inode were a measurable share of the time).
    entries: Sequence[tuple[bytes, int, int]] = ()  # (name, ino, mode), sorted
    xattrs: Sequence[tuple[bytes, bytes]] = ()
    chunks: Sequence[tuple[int, int, int]] = ()  # (foffset, blob id, uoffset)


def _records(bs: Bootstrap, with_chunks: bool) -> Iterator[_Record]:
    """Every inode in inode order, with its directory entries, xattrs and (if asked) chunks: a merge
    of ordered scans. Placing needs no chunks (a file's size says how many indexes it has)."""
    entries = _scan(bs, "SELECT d.parent, d.name, d.ino, i.mode FROM dentries d"
                        " JOIN inodes i ON i.ino = d.ino ORDER BY d.parent, d.name")
    xattrs = _scan(bs, "SELECT ino, name, value FROM xattrs ORDER BY ino, name")
    chunks = iter(())
    if with_chunks:
        chunks = _scan(bs, "SELECT f.ino, f.foffset, c.blob, c.uoffset FROM file_chunks f"
                           " JOIN chunks c ON c.id = f.chunk ORDER BY f.ino, f.foffset")
    pending_e, pending_x, pending_c = next(entries, None), next(xattrs, None), next(chunks, None)
    for row in _scan(bs, "SELECT ino, mode, nlink, uid, gid, size, mtime, mtime_nsec, rdev, target"
                         " FROM inodes ORDER BY ino"):
        rec = _Record(*row)
        ino = rec.ino
        if pending_e is not None and pending_e[0] <= ino:
            rec.entries, pending_e = _take(ino, pending_e, entries)
        if pending_x is not None and pending_x[0] <= ino:
            rec.xattrs, pending_x = _take(ino, pending_x, xattrs)
        if pending_c is not None and pending_c[0] <= ino:
            rec.chunks, pending_c = _take(ino, pending_c, chunks)
        yield rec


def _take(ino: int, pending: tuple, rows: Iterator[tuple]) -> tuple[list[tuple], tuple | None]:
    """The rows of `ino` (without the ino) from an ino-ordered scan; and the next pending row."""
    out = []
    while pending is not None and pending[0] <= ino:
        if pending[0] == ino:
            out.append(pending[1:])
        pending = next(rows, None)
    return out, pending


def _scan(bs: Bootstrap, sql: str) -> Iterator[tuple]:
    # A cursor of its own: the scans are interleaved, and Bootstrap.query would fetch all rows.
    return bs._db.execute(sql)


def _xattr_body(ino: int, xattrs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """Inline xattr area: header, then (name_len, prefix index, value_size, name, value), 4-aligned."""
    if not xattrs:
        return b""
    out = bytearray(XATTR_IBODY_HEADER)  # no name filter, no shared xattrs
    for name, value in xattrs:
        match = next(((p, i) for p, i in XATTR_PREFIXES if name.startswith(p)), None)
        if match is None:
            raise FormatError(f"inode {ino}: xattr {name!r} has no EROFS name prefix")
        prefix, index = match
        suffix = name[len(prefix):]
        if len(suffix) > 255 or len(value) > 0xFFFF:
            raise FormatError(f"inode {ino}: xattr {name!r} is too large for EROFS")
        entry = struct.pack("<BBH", len(suffix), index, len(value)) + suffix + value
        out += entry + bytes(_align(len(entry), 4) - len(entry))
    if len(out) > 0xFFFF * 4:
        raise FormatError(f"inode {ino}: xattrs too large for EROFS")
    return bytes(out)


def _dir_blocks(entries: list[tuple[bytes, int, int]]) -> list[list[tuple[bytes, int, int]]]:
    """Entries (already sorted by name, "." and ".." included) packed into 4 KiB blocks."""
    blocks: list[list[tuple[bytes, int, int]]] = [[]]
    used = 0
    for e in entries:
        need = DIRENT_SIZE + len(e[0])
        if used + need > BLOCK:
            blocks.append([])
            used = 0
        blocks[-1].append(e)
        used += need
    return blocks


def _dir_block_bytes(block: list[tuple[bytes, int, int]], nid_of: array) -> bytes:
    head = bytearray()
    names = bytearray()
    nameoff = DIRENT_SIZE * len(block)
    for name, ino, mode in block:
        head += _DIRENT.pack(nid_of[ino], nameoff + len(names), FILE_TYPES.get(stat.S_IFMT(mode), 0))
        names += name
    return bytes(head + names)


def _rdev(rdev: int) -> int:
    # The kernel's new_encode_dev, as EROFS keeps device numbers.
    major, minor = os.major(rdev), os.minor(rdev)
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


class _Writer:
    """Places (and in the second pass writes) inodes one after the other."""

    def __init__(self, chunk_bits: int, devices: dict[int, int], nid_of: array, parents: dict[int, int],
                 out: BinaryIO | None = None, data_start_block: int = 0):
        self.pos = 0  # next free byte in the meta area
        self.data: list[bytes] = []  # blocks of the data area, in order (in the placing pass: zeros)
        self.data_start_block = data_start_block  # known in the writing pass
        self.chunk_bits = chunk_bits
        self.devices = devices  # blob id -> device id
        self.nid_of = nid_of
        self.parents = parents
        self.out = out  # None in the placing pass
        self.placed = 0

    def place(self, rec: _Record) -> None:
        xattrs = _xattr_body(rec.ino, rec.xattrs)
        icount = 0 if not xattrs else (len(xattrs) - XATTR_IBODY_HEADER) // 4 + 1
        kind = stat.S_IFMT(rec.mode)
        head_end = self.pos + INODE_SIZE + len(xattrs)  # relative to the meta area
        tail = b""
        full: list[bytes] = []
        i_u = 0
        size = rec.size
        if kind == stat.S_IFREG and rec.size:
            layout = LAYOUT_CHUNK_BASED
            i_u = (self.chunk_bits - BLOCK_BITS) | CHUNK_FORMAT_INDEXES
            tail = bytes(_align(head_end, CHUNK_INDEX_SIZE) - head_end) + self._chunk_indexes(rec)
        elif kind in (stat.S_IFDIR, stat.S_IFLNK):
            data = self._dir_data(rec) if kind == stat.S_IFDIR else (rec.target or b"")
            size = len(data)
            cut = len(data) - len(data) % BLOCK
            full = [data[i:i + BLOCK] for i in range(0, cut, BLOCK)]
            rest = data[cut:]
            # The inline tail must sit in the block that holds the end of the inode's xattrs.
            if rest and (head_end % BLOCK) + len(rest) <= BLOCK and head_end % BLOCK != 0:
                layout, tail = LAYOUT_FLAT_INLINE, rest
            else:
                layout = LAYOUT_FLAT_PLAIN
                if rest:
                    full.append(rest + bytes(BLOCK - len(rest)))
            i_u = self.data_start_block + len(self.data) if full else NULL_ADDR
            self.data.extend(full)
        else:
            layout = LAYOUT_FLAT_PLAIN
            i_u = _rdev(rec.rdev) if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
        if self.out is not None:
            if self.pos // SLOT != self.nid_of[rec.ino]:  # a bug, never bad input
                raise FormatError(f"inode {rec.ino} moved between the EROFS passes")
            inode = _INODE.pack(
                1 | (layout << 1), icount, rec.mode & 0xFFFF, 0, size, i_u, rec.ino & 0xFFFFFFFF,
                rec.uid, rec.gid, rec.mtime & 0xFFFFFFFFFFFFFFFF, rec.mtime_nsec, rec.nlink)
            self.out.write(inode + xattrs + tail)
        else:
            self.nid_of[rec.ino] = self.pos // SLOT
        end = head_end + len(tail)
        self.pos = _align(end, SLOT)
        if self.out is not None and self.pos > end:
            self.out.write(bytes(self.pos - end))
        self.placed += 1

    def _dir_data(self, rec: _Record) -> bytes:
        parent = self.parents.get(rec.ino, rec.ino)  # the root is its own parent
        entries = sorted([(b".", rec.ino, rec.mode), (b"..", parent, stat.S_IFDIR), *rec.entries])
        if self.out is None:  # sizes only: names decide them, positions do not
            blocks = _dir_blocks(entries)
            return bytes(BLOCK * (len(blocks) - 1) + sum(DIRENT_SIZE + len(e[0]) for e in blocks[-1]))
        blocks = _dir_blocks(entries)
        raw = [_dir_block_bytes(b, self.nid_of) for b in blocks]
        return b"".join(r + bytes(BLOCK - len(r)) for r in raw[:-1]) + raw[-1]

    def _chunk_indexes(self, rec: _Record) -> bytes:
        count = -(-rec.size // (1 << self.chunk_bits))
        if self.out is None:
            return bytes(CHUNK_INDEX_SIZE * count)
        out = bytearray(_CHUNK_INDEX.pack(0, 0, NULL_ADDR) * count)  # absent chunk: reads as zeros
        for foffset, blob, uoffset in rec.chunks:
            index = foffset >> self.chunk_bits
            if foffset & ((1 << self.chunk_bits) - 1) or index >= count:
                raise FormatError(f"inode {rec.ino}: chunk at {foffset} is not on the chunk grid")
            _CHUNK_INDEX.pack_into(out, index * CHUNK_INDEX_SIZE, 0, self.devices[blob],
                                   uoffset >> BLOCK_BITS)
        return bytes(out)


def write_erofs(bs: Bootstrap, path: str) -> None:
    """Write the EROFS metadata image of bootstrap `bs` at `path` (atomically: temp + rename)."""
    chunk_size = bs.chunk_size
    chunk_bits = chunk_size.bit_length() - 1
    if chunk_size & (chunk_size - 1) or not BLOCK_BITS <= chunk_bits <= BLOCK_BITS + 31:
        raise FormatError(f"chunk size {chunk_size} cannot be an EROFS chunk size")
    blobs = bs.blobs()
    devices = {b.id: i + 1 for i, b in enumerate(blobs)}
    for uoffset, in bs.query("SELECT uoffset FROM chunks WHERE uoffset % ? != 0 LIMIT 1", (BLOCK,)):
        raise FormatError(f"a chunk at uncompressed offset {uoffset} is not block-aligned")
    count, max_ino = bs.query("SELECT count(*), coalesce(max(ino), 0) FROM inodes")[0]
    if max_ino > 4 * count + 64:
        raise FormatError(f"inode numbers are too sparse ({count} inodes up to {max_ino})")
    nid_of = array("Q", bytes(8 * (max_ino + 1)))
    parents = dict(bs.query(
        "SELECT d.ino, d.parent FROM dentries d JOIN inodes i ON i.ino = d.ino WHERE i.mode & ? = ?",
        (0o170000, stat.S_IFDIR)))
    table_end = SUPER_OFFSET + _SUPER.size + DEVICE_SLOT * len(blobs)
    meta_block = _align(table_end, BLOCK) // BLOCK
    if bs.query("SELECT min(ino) FROM inodes")[0][0] != ROOT_INO:
        raise FormatError("bootstrap has no root inode")

    placing = _Writer(chunk_bits, devices, nid_of, parents)
    for rec in _records(bs, with_chunks=False):
        placing.place(rec)
    if nid_of[ROOT_INO] != 0:
        raise FormatError("root inode is not first")
    data_block = meta_block + _align(placing.pos, BLOCK) // BLOCK

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".erofs-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.seek(meta_block * BLOCK)
            writer = _Writer(chunk_bits, devices, nid_of, parents, out=f, data_start_block=data_block)
            for rec in _records(bs, with_chunks=True):
                writer.place(rec)
            if writer.placed != placing.placed or writer.pos != placing.pos:
                raise FormatError("EROFS layout changed between passes")  # a bug, as above
            f.write(bytes(data_block * BLOCK - f.tell()))
            for block in writer.data:
                f.write(block)
            total_blocks = data_block + len(writer.data)
            f.seek(SUPER_OFFSET)
            f.write(_SUPER.pack(
                MAGIC, 0, 0, BLOCK_BITS, 0, 0, count, 0, 0, total_blocks, meta_block, 0,
                bytes(16), VOLUME_NAME, INCOMPAT_CHUNKED_FILE | INCOMPAT_DEVICE_TABLE,
                0, len(blobs), (SUPER_OFFSET + _SUPER.size) // DEVICE_SLOT, 0, 0, 0, 0, 0))
            for digest, size in blob_extents(bs):
                f.write(_DEVICE.pack(digest.encode()[:64], size // BLOCK, 0))
        os.rename(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def blob_extents(bs: Bootstrap) -> list[tuple[str, int]]:
    """(digest, bytes) of each blob's uncompressed byte space, in device order (device i + 1)."""
    extents = dict(bs.query("SELECT blob, max(uoffset + usize) FROM chunks GROUP BY blob"))
    return [(b.digest, _align(extents.get(b.id, 0), BLOCK)) for b in bs.blobs()]


def is_current(path: str) -> bool:
    """Whether `path` is an EROFS image this writer version made."""
    try:
        with open(path, "rb") as f:
            f.seek(SUPER_OFFSET)
            head = f.read(_SUPER.size)
    except OSError:
        return False
    if len(head) != _SUPER.size:
        return False
    fields = _SUPER.unpack(head)
    return fields[0] == MAGIC and fields[13] == VOLUME_NAME.ljust(16, b"\0")


def erofs_path(bootstrap_path: str) -> str:
    """Where the EROFS image of the bootstrap at `bootstrap_path` is kept: beside it."""
    return os.path.splitext(bootstrap_path)[0] + ".erofs"


def erofs_image(bs: Bootstrap) -> str:
    """The EROFS image of `bs` (at erofs_path()), written if missing or from another writer version."""
    path = erofs_path(bs.path)
    if not is_current(path):
        write_erofs(bs, path)
    return path
