"""`naiad check`: fetch every blob of a naiad image and verify every chunk in it.

Each blob is streamed once, front to back, and cut at the chunk offsets the
bootstrap records; a chunk that fails names the files that use it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from naiad.errors import NaiadError
from naiad.format.bootstrap import Chunk
from naiad.format.chunk import decode_chunk
from naiad.oci.digest import HashingReader, read_exact
from naiad.storage.image import NaiadImage

MAX_REPORTED = 20


def check_image(img: NaiadImage, advance: Callable[[int], None] | None = None) -> list[str]:
    """Problems found (empty when the image is sound)."""
    problems: list[str] = []
    for blob_id, group in itertools.groupby(img.bootstrap.chunks(), key=lambda c: c.blob):
        if len(problems) >= MAX_REPORTED:
            break
        problems.extend(_check_blob(img, blob_id, list(group), advance))
    return problems


def _check_blob(img: NaiadImage, blob_id: int, chunks: list[Chunk],
                advance: Callable[[int], None] | None) -> list[str]:
    blob = img.blobs[blob_id]
    desc = img.blob_desc(blob_id)
    problems = []
    try:
        with img.source.open_blob(desc) as raw:
            reader = HashingReader(raw, desc.digest, desc.size, f"blob {desc.digest}")
            pos = 0
            for chunk in chunks:
                if chunk.offset > pos:
                    reader.read(chunk.offset - pos)
                stored = read_exact(reader, chunk.csize)
                pos = chunk.offset + len(stored)
                if advance:
                    advance(len(stored))
                try:
                    decode_chunk(stored, chunk, blob.compressor)
                except NaiadError as e:
                    problems.append(f"{e} (offset {chunk.offset} of blob {blob.digest}; "
                                    f"used by {_users(img, chunk)})")
            reader.verify()
    except NaiadError as e:
        if not problems:
            problems.append(f"{e} (used by {_users(img, chunks[0])})")
    return problems


def _users(img: NaiadImage, chunk: Chunk) -> str:
    inos = img.bootstrap.files_of_chunk(chunk.id)
    paths = [img.bootstrap.path_of(ino) for ino in inos[:3]]
    more = f" and {len(inos) - 3} more" if len(inos) > 3 else ""
    return ", ".join(paths) + more if paths else "no file"
