"""A naiad image opened for reading: its manifest, verified bootstrap and blobs.

The bootstrap is fetched once, checked against both the manifest's layer
digest and the config's diff_id, and kept decompressed under
`$NAIAD_HOME/bootstraps/` for SQLite to open; it is written to a temporary
name and renamed, so a killed fetch never leaves a bootstrap that looks valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile

import zstandard

from naiad.errors import DigestMismatchError, FormatError
from naiad.format import spec
from naiad.format.bootstrap import Blob, Bootstrap, Chunk
from naiad.format.chunk import decode_chunk
from naiad.oci.digest import HashingReader
from naiad.oci.image import Descriptor, ImageSource, Platform, ResolvedImage, resolve_image
from naiad.paths import naiad_home


class NaiadImage:
    def __init__(self, source: ImageSource, image: ResolvedImage, bootstrap: Bootstrap,
                 bootstrap_desc: Descriptor):
        self.source = source
        self.image = image
        self.bootstrap = bootstrap
        self.bootstrap_desc = bootstrap_desc
        self.blobs: dict[int, Blob] = {b.id: b for b in bootstrap.blobs()}
        listed = {d.digest for d in image.layers}
        missing = [b.digest for b in self.blobs.values() if b.digest not in listed]
        if missing:
            raise FormatError(f"{source.ref}: bootstrap names blobs the manifest lacks: {missing[0]}")

    @classmethod
    def open(cls, source: ImageSource, platform: Platform | None = None) -> NaiadImage:
        image = resolve_image(source, platform)
        boots = [d for d in image.layers if d.media_type == spec.MEDIA_TYPE_BOOTSTRAP]
        if len(boots) != 1:
            raise FormatError(f"{source.ref} is not a naiad image (no bootstrap layer)")
        desc = boots[0]
        diff_ids = image.diff_ids
        if len(diff_ids) != len(image.layers):
            raise FormatError(
                f"{source.ref}: config has {len(diff_ids)} diff_ids for {len(image.layers)} layers"
            )
        path = fetch_bootstrap(source, desc, diff_ids[image.layers.index(desc)])
        return cls(source, image, Bootstrap(path), desc)

    def blob_desc(self, blob_id: int) -> Descriptor:
        digest = self.blobs[blob_id].digest
        return next(d for d in self.image.layers if d.digest == digest)

    def read_chunk(self, chunk: Chunk) -> bytes:
        """One chunk, fetched with a range read and verified."""
        blob = self.blobs[chunk.blob]
        stored = self.source.read_range(blob.digest, chunk.offset, chunk.csize)
        return decode_chunk(stored, chunk, blob.compressor)

    def close(self) -> None:
        self.bootstrap.close()


def fetch_bootstrap(source: ImageSource, desc: Descriptor, diff_id: str) -> str:
    """Path of the decompressed, verified bootstrap, fetching it if not cached."""
    cache = os.path.join(naiad_home(), "bootstraps")
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, diff_id.replace(":", "-") + ".db")
    if os.path.exists(path):
        return path
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".fetch-")
    try:
        raw_hash = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, source.open_blob(desc) as raw:
            reader = HashingReader(raw, desc.digest, desc.size, f"bootstrap {desc.digest}")
            try:
                with zstandard.ZstdDecompressor().stream_reader(reader, closefd=False) as z:
                    while block := z.read(1 << 20):
                        raw_hash.update(block)
                        out.write(block)
            except zstandard.ZstdError as e:
                reader.verify()  # a digest mismatch is the better message, if there is one
                raise FormatError(f"bootstrap {desc.digest} does not decompress: {e}") from None
            reader.verify()
        if "sha256:" + raw_hash.hexdigest() != diff_id:
            raise DigestMismatchError(f"bootstrap {desc.digest}: uncompressed digest is not {diff_id}")
        os.rename(tmp, path)
        return path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
