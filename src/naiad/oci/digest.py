"""sha256 digests: parsing, and streams that verify what passes through them (plus exact reads)."""

from __future__ import annotations

import hashlib
import io
import re
from typing import BinaryIO

from naiad.errors import BadReferenceError, DigestMismatchError

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    """Return `digest` if it is a well-formed sha256 digest, else raise."""
    if not _DIGEST_RE.match(digest):
        raise BadReferenceError(f"not a sha256 digest: {digest!r}")
    return digest


def verify_bytes(data: bytes, digest: str, what: str) -> bytes:
    actual = sha256_digest(data)
    if actual != digest:
        raise DigestMismatchError(f"{what}: digest is {actual}, expected {digest}")
    return data


class HashingReader(io.RawIOBase):
    """A read-only stream that hashes every byte read through it.

    `verify()` is called after the consumer is done: it drains what is left,
    then compares digest and, when known, size. Nothing read from it may be
    trusted before `verify()` returns.
    """

    def __init__(self, raw: BinaryIO, digest: str | None, size: int | None, what: str):
        self._raw = raw
        self._hash = hashlib.sha256()
        self._expected = digest
        self._size = size
        self._what = what
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[override]
        data = self._raw.read(len(buf))
        n = len(data)
        buf[:n] = data
        self._hash.update(data)
        self.count += n
        if self._size is not None and self.count > self._size:
            raise DigestMismatchError(
                f"{self._what}: longer than its announced size of {self._size} bytes"
            )
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def verify(self) -> str:
        self.drain()
        if self._size is not None and self.count != self._size:
            raise DigestMismatchError(
                f"{self._what}: {self.count} bytes, expected {self._size} (truncated?)"
            )
        if self._expected is not None and self.digest != self._expected:
            raise DigestMismatchError(
                f"{self._what}: digest is {self.digest}, expected {self._expected}"
            )
        return self.digest

    def close(self) -> None:
        self._raw.close()
        super().close()


def read_exact(stream: BinaryIO | HashingReader, n: int) -> bytes:
    """`n` bytes from `stream`, fewer only at its end (a single read() may return less)."""
    parts = []
    while n > 0:
        block = stream.read(n)
        if not block:
            break
        parts.append(block)
        n -= len(block)
    return b"".join(parts)
