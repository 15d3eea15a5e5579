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
# A build's default: every pull of an image reads its chunks, often more than once per node and
# on many nodes. torchapp (1.14 GB) is 335.5 MB at level 3 in 27.9 s, 317.0 MB at 6 in 33.1 s, 313.6 MB
# at 9 in 37.7 s (naiad convert, 2 cores); a lazy start at 100 Mbit/s fetches 3% fewer bytes at 6 and
# is ready 0.37 s sooner (bench/datapath.py, 3 alternating runs). Levels up to 9 decode as fast
# (about 1 GB/s; 18 decodes 17% slower).
ZSTD_LEVEL = 6


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


_codecs: dict[tuple[str, int], Codec] = {}


def codec(name: str, zstd_level: int = ZSTD_LEVEL) -> Codec:
    """The shared codec for `name` (compressing zstd at `zstd_level`; any level decodes)."""
    c = _codecs.get((name, zstd_level))
    if c is None:
        c = _codecs.setdefault((name, zstd_level), Codec(name, zstd_level))
    return c
