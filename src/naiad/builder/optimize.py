"""Giving a naiad image a prefetch list: the files an app reads at start, in order.

The new image shares every data blob with the old one; only the bootstrap
(its `prefetch` table), the config's last diff_id and the manifest change,
so pushing it costs a few MB. `naiad optimize` records the list by running
the app on a lazy mount (fs/mount.py writes the first-read trace).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from naiad.builder.assemble import finish_image
from naiad.builder.convert import output_layout
from naiad.errors import NaiadError
from naiad.format import spec
from naiad.format.bootstrap import rewrite_prefetch
from naiad.oci.copy import copy_blob
from naiad.oci.image import Platform, RegistryOptions, source_for
from naiad.oci.reference import Reference
from naiad.storage.image import NaiadImage


@dataclasses.dataclass
class PrefetchResult:
    manifest_digest: str
    files: int
    bytes: int
    missing: list[str]


def with_prefetch_list(source_ref: Reference, target_ref: Reference, paths: Sequence[str],
                       registry: RegistryOptions | None = None,
                       platform: Platform | None = None) -> PrefetchResult:
    """Write the image `source_ref` with prefetch list `paths` (regular files; others are skipped)."""
    registry = registry or RegistryOptions()
    with source_for(source_ref, registry) as source:
        img = NaiadImage.open(source, platform)
        try:
            bs = img.bootstrap
            inos: list[int] = []
            missing: list[str] = []
            seen: set[int] = set()
            for path in paths:
                ino = bs.resolve(path)
                if ino is None:
                    missing.append(path)
                elif ino not in seen and bs.getattr(ino).is_reg:
                    seen.add(ino)
                    inos.append(ino)
            if not inos and paths:
                raise NaiadError(f"none of the {len(paths)} listed paths is a regular file of {source_ref}")
            blob_descs = [d for d in img.image.layers if d.media_type == spec.MEDIA_TYPE_BLOB]
            annotations = {k: v for k, v in (img.image.manifest.get("annotations") or {}).items()
                           if k != spec.ANNOTATION_VERSION}
            with output_layout(target_ref, registry, fallback=source) as layout:
                if target_ref.transport == "oci":
                    for desc in blob_descs:
                        copy_blob(source, layout, desc)
                db = os.path.join(layout.staging_dir(), "bootstrap.db")
                rewrite_prefetch(bs.path, db, inos)
                digest, _, _ = finish_image(layout, img.image.config, blob_descs, db, target_ref.tag,
                                            annotations)
            size = sum(bs.getattr(i).size for i in inos)
        finally:
            img.close()
    return PrefetchResult(digest, len(inos), size, missing)
