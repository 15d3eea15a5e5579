"""Copying an image between transports: blobs the target lacks, then the manifest.

Used for push and pull alike. Blobs are streamed through a verified spool
file, never held in memory; the manifest goes last, so a failed copy leaves
no manifest pointing at missing blobs.

A blob the source lacks (an image built against a chunk dictionary, or
optimized from another, references blobs it never wrote) is found through a
*blob locator*: the image that holds it. When that image lives in another
repository of the target registry, the blob is cross-repo mounted, which
moves no bytes; otherwise it is copied from there.
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

# Where a blob the source lacks can be read from (None: nowhere known).
BlobLocator = Callable[[Descriptor], ImageSource | None]


@dataclasses.dataclass
class CopyResult:
    manifest_digest: str
    blobs_total: int
    bytes_total: int  # the image: config, layers (manifest not counted)
    blobs_sent: int  # uploaded (or copied) bytes
    bytes_sent: int
    blobs_mounted: int = 0  # linked from another repository of the same registry: no bytes moved
    bytes_mounted: int = 0

    def to_json(self) -> dict[str, int | str]:
        return dataclasses.asdict(self)


def copy_image(source: ImageSource, target: ImageTarget, tag: str | None,
               advance: Callable[[int], None] | None = None,
               fallback: ImageSource | BlobLocator | None = None) -> CopyResult:
    """Copy the image `source.ref` names (one platform manifest, as resolved) to `target`.

    Blobs the target has are skipped. Blobs that `source` (a layout) lacks
    are taken from `fallback`: one image (an image derived from another
    shares most of its blobs with it) or a locator naming one per blob;
    mounted instead when that image is on the target registry.
    """
    locate: BlobLocator | None
    if fallback is None or callable(fallback):
        locate = fallback
    else:
        def locate(desc: Descriptor, _src: ImageSource = fallback) -> ImageSource | None:
            return _src
    image = resolve_image(source)
    blobs = [image.config_desc, *image.layers]
    sent = sent_bytes = mounted = mounted_bytes = 0
    for desc in blobs:
        if target.has_blob(desc):
            if advance:
                advance(desc.size)
            continue
        src = source
        if locate is not None and isinstance(source, OCILayout) and not source.has_blob(desc):
            src = locate(desc) or source
            if src is not source and _mount(src, target, desc):
                mounted += 1
                mounted_bytes += desc.size
                if advance:
                    advance(desc.size)
                continue
        copy_blob(src, target, desc, advance)
        sent += 1
        sent_bytes += desc.size
    data, _ = source.get_manifest(image.manifest_digest)
    digest = target.put_manifest(data, image.manifest_media_type, tag)
    return CopyResult(digest, len(blobs), sum(d.size for d in blobs), sent, sent_bytes, mounted,
                      mounted_bytes)


def _mount(source: ImageSource, target: ImageTarget, desc: Descriptor) -> bool:
    """Cross-repo mount `desc` from `source` into `target` if both are repositories of one registry."""
    from naiad.oci.registry import RegistrySource, RegistryTarget

    if not (isinstance(source, RegistrySource) and isinstance(target, RegistryTarget)):
        return False
    if source.ref.host != target.ref.host or source.repo == target.repo:
        return False
    return target.mount_blob(desc, source.repo)


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
