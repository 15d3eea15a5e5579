"""Per-chunk compression codecs: zstd (default), lz4 and none.

A chunk is stored compressed only when that makes it smaller; a chunk whose
stored size equals its uncompressed size is stored raw, whatever the blob's
compressor. Codecs keep one compressor object per thread because the
libraries' objects are not thread-safe, while their work releases the GIL.
"""

from __future__ import annotations

import threading

import lz4.block
import zstandard

from naiad.errors import FormatError

COMPRESSORS = ("zstd", "lz4", "none")
ZSTD_LEVEL = 3


class Codec:
    def __init__(self, name: str, zstd_level: int = ZSTD_LEVEL):
        if name not in COMPRESSORS:
            raise FormatError(f"unknown compressor {name!r} (choose from {', '.join(COMPRESSORS)})")
        self.name = name
        self.zstd_level = zstd_level
        self._local = threading.local()

    def _zstd_c(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "zc", None)
        if c is None:
            c = self._local.zc = zstandard.ZstdCompressor(level=self.zstd_level, write_checksum=False)
        return c

    def _zstd_d(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "zd", None)
        if d is None:
            d = self._local.zd = zstandard.ZstdDecompressor()
        return d

    def compress(self, data: bytes) -> bytes:
        """The bytes to store for `data`: compressed if smaller, else `data` itself."""
        if self.name == "zstd":
            out = self._zstd_c().compress(data)
        elif self.name == "lz4":
            out = lz4.block.compress(data, mode="default", store_size=False)
        else:
            return data
        return out if len(out) < len(data) else data

    def decompress(self, stored: bytes, usize: int) -> bytes:
        """Inverse of compress(); raises FormatError on bytes that do not decode to `usize`."""
        if len(stored) == usize:
            return stored
        try:
            if self.name == "zstd":
                out = self._zstd_d().decompress(stored, max_output_size=usize)
            elif self.name == "lz4":
                out = lz4.block.decompress(stored, uncompressed_size=usize)
            else:
                raise FormatError(f"stored size {len(stored)} != size {usize} for an uncompressed chunk")
        except (zstandard.ZstdError, lz4.block.LZ4BlockError) as e:
            raise FormatError(f"chunk does not decompress ({self.name}): {e}") from None
        if len(out) != usize:
            raise FormatError(f"chunk decompresses to {len(out)} bytes, expected {usize}")
        return out


_codecs: dict[str, Codec] = {}


def codec(name: str) -> Codec:
    """The shared codec for `name`."""
    c = _codecs.get(name)
    if c is None:
        c = _codecs.setdefault(name, Codec(name))
    return c
