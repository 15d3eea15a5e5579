"""Copying an image between transports: blobs the target lacks, then the manifest.

Used for push and pull alike. Blobs are streamed through a verified spool
file, never held in memory; the manifest goes last, so a failed copy leaves
no manifest pointing at missing blobs.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable

from naiad.oci.digest import HashingReader
from naiad.oci.image import Descriptor, ImageSource, ImageTarget, resolve_image
from naiad.oci.layout import OCILayout
from naiad.paths import naiad_home


@dataclasses.dataclass
class CopyResult:
    manifest_digest: str
    blobs_total: int
    bytes_total: int
    blobs_sent: int
    bytes_sent: int


def copy_image(source: ImageSource, target: ImageTarget, tag: str | None,
               advance: Callable[[int], None] | None = None,
               fallback: ImageSource | None = None) -> CopyResult:
    """Copy the image `source.ref` names (one platform manifest, as resolved) to `target`.

    Blobs that `source` lacks are taken from `fallback` (an image derived
    from another shares most of its blobs with it).
    """
    image = resolve_image(source)
    blobs = [image.config_desc, *image.layers]
    sent = sent_bytes = 0
    for desc in blobs:
        if target.has_blob(desc):
            if advance:
                advance(desc.size)
            continue
        src = source
        if fallback is not None and isinstance(source, OCILayout) and not source.has_blob(desc):
            src = fallback
        copy_blob(src, target, desc, advance)
        sent += 1
        sent_bytes += desc.size
    data, _ = source.get_manifest(image.manifest_digest)
    digest = target.put_manifest(data, image.manifest_media_type, tag)
    return CopyResult(digest, len(blobs), sum(d.size for d in blobs), sent, sent_bytes)


def copy_blob(source: ImageSource, target: ImageTarget, desc: Descriptor,
              advance: Callable[[int], None] | None = None) -> None:
    """Copy one blob, verified, unless the target has it."""
    if target.has_blob(desc):
        return
    if isinstance(source, OCILayout):
        target.put_blob_file(source.blob_path(desc.digest), desc)
        if advance:
            advance(desc.size)
        return
    spool_dir = target.staging_dir() or os.path.join(naiad_home(), "tmp")
    os.makedirs(spool_dir, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=spool_dir, prefix="copy-")
    try:
        with os.fdopen(fd, "wb") as out, source.open_blob(desc) as raw:
            reader = HashingReader(raw, desc.digest, desc.size, f"blob {desc.digest}")
            while block := reader.read(1 << 20):
                out.write(block)
                if advance:
                    advance(len(block))
            reader.verify()
        target.put_blob_file(path, desc)
    finally:
        if os.path.exists(path):
            os.unlink(path)
