"""`docker save` tarballs (`docker-archive:FILE[:REPO:TAG]`) as an image source.

The archive's manifest.json names a config file and one tar per layer; we
present it as an OCI image manifest synthesised from those, reading members
in place (the archive is seekable, nothing is extracted). Layers in such
archives are normally uncompressed, so a layer's digest is its diff_id; a
compressed layer member is hashed once up front to get its digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from typing import Any, BinaryIO

from naiad.errors import FormatError, NotFoundError
from naiad.oci import mediatypes as mt
from naiad.oci.digest import sha256_digest
from naiad.oci.image import Descriptor
from naiad.oci.reference import Reference


class _Member:
    """A read-only window onto one member's bytes inside the archive file."""

    def __init__(self, path: str, offset: int, size: int):
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._f.seek(offset)
        self._left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> _Member:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DockerArchive:
    def __init__(self, ref: Reference):
        self.ref = ref
        self.path = ref.path
        try:
            with tarfile.open(self.path, "r:") as tf:
                self._members = {
                    m.name.removeprefix("./"): (m.offset_data, m.size) for m in tf if m.isfile()
                }
        except FileNotFoundError:
            raise NotFoundError(f"{ref}: no such file {self.path}") from None
        except (tarfile.TarError, OSError) as e:
            raise FormatError(f"{ref}: not a docker archive: {e}") from None
        entries = json.loads(self._read_member("manifest.json"))
        if not isinstance(entries, list) or not entries:
            raise FormatError(f"{ref}: manifest.json lists no image")
        entry = self._pick(entries)
        self._config = self._read_member(entry["Config"])
        diff_ids = json.loads(self._config).get("rootfs", {}).get("diff_ids", [])
        if len(diff_ids) != len(entry["Layers"]):
            raise FormatError(f"{ref}: config has {len(diff_ids)} diff_ids for {len(entry['Layers'])} layers")
        self._by_digest: dict[str, str] = {sha256_digest(self._config): entry["Config"]}
        layers = []
        for name, diff_id in zip(entry["Layers"], diff_ids, strict=True):
            _, size = self._member(name)
            digest = diff_id if not self._compressed(name) else self._hash(name)
            self._by_digest[digest] = name
            layers.append(Descriptor(mt.DOCKER_LAYER, digest, size).to_json())
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": Descriptor(mt.OCI_CONFIG, sha256_digest(self._config), len(self._config)).to_json(),
            "layers": layers,
        }
        self._manifest = json.dumps(manifest, separators=(",", ":")).encode()

    def _pick(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        if self.ref.tag is None or (len(entries) == 1 and self.ref.tag == "latest"):
            return entries[0]
        for e in entries:
            if self.ref.tag in (e.get("RepoTags") or []):
                return e
        raise NotFoundError(f"{self.ref}: no image tagged {self.ref.tag!r} in the archive")

    def _member(self, name: str) -> tuple[int, int]:
        try:
            return self._members[os.path.normpath(name)]
        except KeyError:
            raise FormatError(f"{self.ref}: archive has no member {name!r}") from None

    def _read_member(self, name: str) -> bytes:
        with _Member(self.path, *self._member(name)) as m:
            return m.read()

    def _compressed(self, name: str) -> bool:
        with _Member(self.path, *self._member(name)) as m:
            head = m.read(4)
        return head[:2] == b"\x1f\x8b" or head == b"\x28\xb5\x2f\xfd"

    def _hash(self, name: str) -> str:
        h = hashlib.sha256()
        with _Member(self.path, *self._member(name)) as m:
            while block := m.read(1 << 20):
                h.update(block)
        return "sha256:" + h.hexdigest()

    def get_manifest(self, reference: str) -> tuple[bytes, str]:
        if reference.startswith("sha256:") and reference != sha256_digest(self._manifest):
            raise NotFoundError(f"{self.ref}: no manifest {reference}")
        return self._manifest, mt.OCI_MANIFEST

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        name = self._by_digest.get(desc.digest)
        if name is None:
            raise NotFoundError(f"{self.ref}: no blob {desc.digest}")
        return _Member(self.path, *self._member(name))  # type: ignore[return-value]

    def read_range(self, digest: str, offset: int, size: int) -> bytes:
        name = self._by_digest.get(digest)
        if name is None:
            raise NotFoundError(f"{self.ref}: no blob {digest}")
        start, length = self._member(name)
        if offset >= length:
            return b""
        with _Member(self.path, start + offset, min(size, length - offset)) as m:
            return m.read()

    def close(self) -> None:
        pass
