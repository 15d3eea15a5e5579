"""The image model shared by every transport: descriptors, sources, targets.

A *source* hands out manifests and blob streams; a *target* stores blobs and,
last of all, the manifest that names them. `open_source` / `open_target` pick
the transport from a parsed reference, and `resolve_image` walks an index down
to the manifest of one platform.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, Protocol

from naiad.errors import BadReferenceError, FormatError, NotFoundError
from naiad.oci import mediatypes as mt
from naiad.oci.digest import sha256_digest, verify_bytes
from naiad.oci.reference import Reference


@dataclasses.dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None = None
    platform: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Descriptor:
        try:
            return cls(
                media_type=obj["mediaType"],
                digest=obj["digest"],
                size=int(obj["size"]),
                annotations=obj.get("annotations"),
                platform=obj.get("platform"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"malformed descriptor {obj!r}: {e}") from None

    @classmethod
    def for_bytes(cls, media_type: str, data: bytes) -> Descriptor:
        return cls(media_type, sha256_digest(data), len(data))

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            obj["annotations"] = dict(sorted(self.annotations.items()))
        if self.platform:
            obj["platform"] = self.platform
        return obj


@dataclasses.dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise BadReferenceError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, obj: dict[str, Any] | None) -> bool:
        if not obj:
            return False
        if obj.get("os") != self.os or obj.get("architecture") != self.architecture:
            return False
        return self.variant is None or obj.get("variant") == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


class ImageSource(Protocol):
    """Where an image is read from."""

    ref: Reference

    def get_manifest(self, reference: str) -> tuple[bytes, str]:
        """Raw manifest or index bytes and their media type; `reference` is a tag or digest.

        When `reference` is a digest, the bytes are verified against it.
        """
        ...

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        """A stream of the blob's bytes; unverified (wrap it in a HashingReader)."""
        ...

    def read_range(self, digest: str, offset: int, size: int) -> bytes:
        """`size` bytes of blob `digest` from `offset` (fewer at its end); unverified."""
        ...

    def close(self) -> None: ...


class ImageTarget(Protocol):
    """Where an image is written to: blobs first, the manifest last."""

    ref: Reference

    def has_blob(self, desc: Descriptor) -> bool: ...

    def put_blob_file(self, path: str, desc: Descriptor) -> None:
        """Store the file at `path` as blob `desc`, atomically; the file may be consumed."""
        ...

    def put_blob_bytes(self, data: bytes, desc: Descriptor) -> None: ...

    def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        """Store the manifest (all its blobs must be in), tag it, and return its digest."""
        ...

    def staging_dir(self) -> str | None:
        """A directory on the target's filesystem for files that will become blobs, if any."""
        ...

    def close(self) -> None: ...


@dataclasses.dataclass
class ResolvedImage:
    """One platform's image manifest, its config and its layers."""

    manifest_digest: str
    manifest_media_type: str
    manifest: dict[str, Any]
    config_desc: Descriptor
    config_bytes: bytes
    layers: list[Descriptor]

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_bytes)

    @property
    def diff_ids(self) -> list[str]:
        return list(self.config.get("rootfs", {}).get("diff_ids", []))


def read_small_blob(source: ImageSource, desc: Descriptor, limit: int = 64 << 20) -> bytes:
    """Read and verify a blob meant to be held in memory (configs, bootstraps)."""
    if desc.size > limit:
        raise FormatError(f"blob {desc.digest} is {desc.size} bytes, over the {limit} byte limit")
    with source.open_blob(desc) as f:
        data = f.read(desc.size + 1)
    if len(data) != desc.size:
        raise FormatError(f"blob {desc.digest}: {len(data)} bytes, expected {desc.size}")
    return verify_bytes(data, desc.digest, f"blob {desc.digest}")


def resolve_image(source: ImageSource, platform: Platform | None = None) -> ResolvedImage:
    """Fetch the manifest the source reference names, descending an index to `platform`."""
    platform = platform or Platform()
    ref = source.ref
    data, media_type = source.get_manifest(ref.reference)
    digest = sha256_digest(data)
    obj = _load_json(data, f"manifest of {ref}")
    media_type = obj.get("mediaType") or media_type
    if media_type in mt.INDEX_TYPES or "manifests" in obj:
        chosen = [m for m in obj.get("manifests", []) if platform.matches(m.get("platform"))]
        if not chosen:
            present = sorted(
                str(Platform(p.get("os", "?"), p.get("architecture", "?"), p.get("variant")))
                for m in obj.get("manifests", [])
                if (p := m.get("platform"))
            )
            raise NotFoundError(
                f"{ref}: no manifest for platform {platform} (has: {', '.join(present) or 'none'})"
            )
        desc = Descriptor.from_json(chosen[0])
        data, media_type = source.get_manifest(desc.digest)
        verify_bytes(data, desc.digest, f"manifest {desc.digest}")
        digest = desc.digest
        obj = _load_json(data, f"manifest {desc.digest}")
        media_type = obj.get("mediaType") or desc.media_type
    if media_type not in mt.MANIFEST_TYPES and "layers" not in obj:
        raise FormatError(f"{ref}: unsupported manifest media type {media_type!r}")
    try:
        config_desc = Descriptor.from_json(obj["config"])
        layers = [Descriptor.from_json(layer) for layer in obj["layers"]]
    except (KeyError, TypeError) as e:
        raise FormatError(f"{ref}: malformed manifest: missing {e}") from None
    config_bytes = read_small_blob(source, config_desc)
    return ResolvedImage(digest, media_type, obj, config_desc, config_bytes, layers)


def _load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise FormatError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{what} is not a JSON object")
    return obj


@dataclasses.dataclass(frozen=True)
class RegistryOptions:
    """How to talk to registries: TLS or not, and whose credentials."""

    plain_http: bool | None = None  # None: plain HTTP for loopback hosts only
    creds: str | None = None  # "USER:PASS", never logged
    tls_verify: bool = True


def open_source(ref: Reference, options: RegistryOptions | None = None) -> ImageSource:
    if ref.transport == "oci":
        from naiad.oci.layout import OCILayout

        return OCILayout(ref, create=False)
    if ref.transport == "docker-archive":
        from naiad.oci.archive import DockerArchive

        return DockerArchive(ref)
    from naiad.oci.registry import RegistrySource

    return RegistrySource(ref, options or RegistryOptions())


def open_target(ref: Reference, options: RegistryOptions | None = None) -> ImageTarget:
    if ref.transport == "oci":
        from naiad.oci.layout import OCILayout

        return OCILayout(ref, create=True)
    if ref.transport == "docker-archive":
        raise BadReferenceError(f"{ref}: docker-archive can only be a source")
    from naiad.oci.registry import RegistryTarget

    return RegistryTarget(ref, options or RegistryOptions())


@contextmanager
def source_for(ref: Reference, options: RegistryOptions | None = None) -> Iterator[ImageSource]:
    src = open_source(ref, options)
    try:
        yield src
    finally:
        src.close()


@contextmanager
def target_for(ref: Reference, options: RegistryOptions | None = None) -> Iterator[ImageTarget]:
    dst = open_target(ref, options)
    try:
        yield dst
    finally:
        dst.close()
