"""Which layers containerd asks for belong to a naiad image, from the labels it forwards.

containerd forwards to a proxy snapshotter only the labels named `containerd.io/snapshot.ref`
or starting with `containerd.io/snapshot/`. Two families name the image and the layer:

- `ctr-remote image rpull` (stargz-snapshotter's handler): `.../remote/stargz.reference`
  (the image reference), `.../remote/stargz.digest` (this layer);
- the CRI plugin with `disable_snapshot_annotations = false`: `.../cri.image-ref`,
  `.../cri.layer-digest`, `.../cri.manifest-digest`.

The image's manifest decides: a naiad image has exactly one bootstrap layer (docs/format.md).
Manifests are cached for a minute, so a pull of N layers resolves its image once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time

from naiad.errors import NaiadError
from naiad.format import spec
from naiad.oci.image import Platform, RegistryOptions, ResolvedImage, resolve_image, source_for
from naiad.oci.reference import Reference, parse_reference
from naiad.snapshotter.locks import KeyedLocks

log = logging.getLogger(__name__)

LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
LABEL_PREFIX = "containerd.io/snapshot/"
STARGZ_REF = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
CRI_REF = "containerd.io/snapshot/cri.image-ref"
CRI_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_MANIFEST = "containerd.io/snapshot/cri.manifest-digest"
# Set on naiad's own snapshots, for `ctr snapshots info` and for whoever debugs a node.
LABEL_NAIAD_LAYER = "containerd.io/snapshot/naiad.layer"
LABEL_NAIAD_IMAGE = "containerd.io/snapshot/naiad.image"

CACHE_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class NaiadLayer:
    """A layer of a naiad image: a data blob (nothing to mount) or its bootstrap (the lazy mount)."""

    ref: Reference  # the image, pinned to the manifest digest
    layer: str  # this layer's digest
    bootstrap: bool

    @property
    def mount_key(self) -> str:
        """Names the lazy mount: one per repository and bootstrap, shared by all its snapshots."""
        return hashlib.sha256(f"{self.ref.host}/{self.ref.repo}@{self.layer}".encode()).hexdigest()[:24]


def image_and_layer(labels: dict[str, str]) -> tuple[str, str, str | None] | None:
    """(image reference, layer digest, manifest digest or None) from either label family."""
    if labels.get(CRI_REF) and labels.get(CRI_DIGEST):
        return labels[CRI_REF], labels[CRI_DIGEST], labels.get(CRI_MANIFEST) or None
    if labels.get(STARGZ_REF) and labels.get(STARGZ_DIGEST):
        return labels[STARGZ_REF], labels[STARGZ_DIGEST], None
    return None


def inheritable(labels: dict[str, str]) -> dict[str, str]:
    """The labels containerd lets through to snapshotters (and expects back from List)."""
    return {k: v for k, v in labels.items() if k == LABEL_SNAPSHOT_REF or k.startswith(LABEL_PREFIX)}


class Resolver:
    """Tells naiad layers from plain ones, asking the registry for the manifest (cached)."""

    def __init__(self, registry: RegistryOptions, insecure_hosts: frozenset[str], platform: Platform):
        self.registry = registry
        self.insecure_hosts = insecure_hosts
        self.platform = platform
        self._cache: dict[str, tuple[float, ResolvedImage]] = {}
        self._lock = threading.Lock()
        self._resolving = KeyedLocks()

    def options_for(self, ref: Reference) -> RegistryOptions:
        """The registry options for `ref`'s host (plain HTTP for the --insecure-registry ones)."""
        if ref.host in self.insecure_hosts:
            return dataclasses.replace(self.registry, plain_http=True)
        return self.registry

    def classify(self, labels: dict[str, str]) -> NaiadLayer | None:
        """The naiad layer these Prepare labels name, or None for a plain OCI layer (or no image)."""
        found = image_and_layer(labels)
        if found is None:
            return None
        ref_text, layer, manifest_digest = found
        try:
            ref = parse_reference(ref_text)
            if not ref.is_registry:
                return None
            if manifest_digest:
                ref = ref.with_digest(manifest_digest)
            image = self._resolve(ref)
        except NaiadError as e:
            # containerd then downloads the layer itself: a plain image still pulls.
            log.warning("cannot resolve %s, treating layer %s as plain: %s", ref_text, layer, e)
            return None
        kinds = {d.digest: d.media_type for d in image.layers}
        boots = [d for d in image.layers if d.media_type == spec.MEDIA_TYPE_BOOTSTRAP]
        if len(boots) != 1 or layer not in kinds:
            return None
        pinned = ref.with_digest(image.manifest_digest)
        return NaiadLayer(pinned, layer, kinds[layer] == spec.MEDIA_TYPE_BOOTSTRAP)

    def _resolve(self, ref: Reference) -> ResolvedImage:
        key = str(ref)
        # One resolve per image at a time: the layers of one pull arrive together.
        with self._resolving[key]:
            with self._lock:
                hit = self._cache.get(key)
            if hit and time.monotonic() - hit[0] < CACHE_SECONDS:
                return hit[1]
            with source_for(ref, self.options_for(ref)) as source:
                image = resolve_image(source, self.platform)
            with self._lock:
                now = time.monotonic()
                self._cache = {k: v for k, v in self._cache.items() if now - v[0] < CACHE_SECONDS}
                self._cache[key] = (now, image)
            return image
