"""Turning a chunk's stored bytes back into verified file data."""

from __future__ import annotations

import hashlib

from naiad.errors import DigestMismatchError
from naiad.format.bootstrap import Chunk
from naiad.format.compression import codec


def decode_chunk(stored: bytes, chunk: Chunk, compressor: str) -> bytes:
    """The chunk's uncompressed bytes, or DigestMismatchError if they are not the named ones."""
    if len(stored) != chunk.csize:
        raise DigestMismatchError(
            f"chunk sha256:{chunk.digest.hex()}: got {len(stored)} stored bytes, expected {chunk.csize}"
        )
    try:
        data = codec(compressor).decompress(stored, chunk.usize)
    except Exception as e:  # any decoder failure on untrusted bytes is a bad chunk
        raise DigestMismatchError(f"chunk sha256:{chunk.digest.hex()} is corrupt: {e}") from None
    if hashlib.sha256(data).digest() != chunk.digest:
        raise DigestMismatchError(f"chunk sha256:{chunk.digest.hex()} does not match its digest")
    return data
