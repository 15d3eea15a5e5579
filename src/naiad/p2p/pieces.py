"""Pieces of a task (one blob): their size, the ones a byte range covers, and the digests that name them.

The piece size is a function of the blob size alone, so every peer cuts a
blob the same way without asking anyone.
"""

from __future__ import annotations

import hashlib
import re

from naiad.errors import NaiadError

MIB = 1 << 20
DEFAULT_PIECE_SIZE = 4 * MIB
# Past this many pieces a blob gets bigger pieces: the scheduler's state and the
# per-piece round trips grow with the count, not with the bytes.
MAX_PIECES = 1024
MAX_PIECE_SIZE = 64 * MIB

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")


class P2PError(NaiadError):
    """A failure of the P2P network the user can act on (bad flag, unreachable scheduler...)."""


def check_task(digest: str) -> str:
    """`digest` if it names a task (a sha256 blob digest), else P2PError."""
    if not _DIGEST_RE.match(digest):
        raise P2PError(f"not a sha256 blob digest: {digest[:80]!r}")
    return digest


def is_piece_hash(text: str) -> bool:
    return bool(_HEX_RE.match(text))


def piece_hash(data: bytes | memoryview) -> str:
    """The hex sha256 of a piece (the name it is checked and stored by)."""
    return hashlib.sha256(data).hexdigest()


def piece_size_for(blob_size: int) -> int:
    """4 MiB, doubled until the blob has at most MAX_PIECES pieces (64 MiB at most)."""
    size = DEFAULT_PIECE_SIZE
    while size < MAX_PIECE_SIZE and blob_size > size * MAX_PIECES:
        size *= 2
    return size


def piece_count(blob_size: int, piece_size: int) -> int:
    return max(1, -(-blob_size // piece_size))


def piece_span(blob_size: int, piece_size: int, index: int) -> tuple[int, int]:
    """(offset, length) of piece `index`."""
    offset = index * piece_size
    return offset, max(0, min(piece_size, blob_size - offset))


def covering(offset: int, length: int, piece_size: int) -> range:
    """Indices of the pieces that hold bytes [offset, offset + length)."""
    if length <= 0:
        return range(0)
    return range(offset // piece_size, (offset + length - 1) // piece_size + 1)
