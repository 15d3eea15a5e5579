"""A naiad image opened for reading: its manifest, verified bootstrap and blobs.

The bootstrap is fetched once, checked against both the manifest's layer
digest and the config's diff_id, and kept decompressed under
`$NAIAD_HOME/bootstraps/` for SQLite to open; it is written to a temporary
name and renamed, so a killed fetch never leaves a bootstrap that looks valid.
The image's EROFS view, where it ships one, is fetched the same way, beside
the bootstrap, when a kernel mount asks for it (`fetch_erofs`).
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
from naiad.format.erofs import erofs_path
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
        cache = os.path.join(naiad_home(), "bootstraps")
        diff_id = _diff_id(source, image, desc)
        path = os.path.join(cache, diff_id.replace(":", "-") + ".db")
        if not os.path.exists(path):
            fetch_layer(source, desc, diff_id, path, "bootstrap")
        return cls(source, image, Bootstrap(path), desc)

    def fetch_erofs(self) -> str | None:
        """Path of the EROFS view this image ships (erofs_path() of its bootstrap), fetched if
        missing; None if it ships none. Whether the file suits this naiad is erofs_image()'s call."""
        views = [d for d in self.image.layers if d.media_type == spec.MEDIA_TYPE_EROFS]
        if len(views) != 1:
            return None
        path = erofs_path(self.bootstrap.path)
        if not os.path.exists(path):
            view = views[0]
            fetch_layer(self.source, view, _diff_id(self.source, self.image, view), path, "EROFS view")
        return path

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


def _diff_id(source: ImageSource, image: ResolvedImage, desc: Descriptor) -> str:
    diff_ids = image.diff_ids
    if len(diff_ids) != len(image.layers):
        raise FormatError(f"{source.ref}: config has {len(diff_ids)} diff_ids for {len(image.layers)} layers")
    return diff_ids[image.layers.index(desc)]


def fetch_layer(source: ImageSource, desc: Descriptor, diff_id: str, path: str, what: str) -> None:
    """Fetch zstd layer `desc` decompressed to `path`, verified against its digest and `diff_id`."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fetch-")
    try:
        raw_hash = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, source.open_blob(desc) as raw:
            reader = HashingReader(raw, desc.digest, desc.size, f"{what} {desc.digest}")
            try:
                with zstandard.ZstdDecompressor().stream_reader(reader, closefd=False) as z:
                    while block := z.read(1 << 20):
                        raw_hash.update(block)
                        out.write(block)
            except zstandard.ZstdError as e:
                reader.verify()  # a digest mismatch is the better message, if there is one
                raise FormatError(f"{what} {desc.digest} does not decompress: {e}") from None
            reader.verify()
        if "sha256:" + raw_hash.hexdigest() != diff_id:
            raise DigestMismatchError(f"{what} {desc.digest}: uncompressed digest is not {diff_id}")
        os.rename(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
