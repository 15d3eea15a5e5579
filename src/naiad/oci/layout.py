"""OCI image layout directories (`oci:PATH[:TAG]`), as source and as target.

Blobs are written to a staging directory inside the layout and renamed into
`blobs/sha256/` only once complete and verified, so a crash or a full disk
never leaves a partial blob under a digest name. index.json is replaced
atomically, after the manifest's blobs are all in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import BinaryIO

from naiad.errors import FormatError, NotFoundError
from naiad.oci import mediatypes as mt
from naiad.oci.digest import check_digest, verify_bytes
from naiad.oci.image import Descriptor
from naiad.oci.reference import Reference

STAGING_PREFIX = ".naiad-staging-"


class OCILayout:
    """An OCI image layout directory; a source, and a target when `create` is set."""

    def __init__(self, ref: Reference, create: bool):
        self.ref = ref
        self.root = ref.path
        self._staging: str | None = None
        self._added: list[str] = []  # blobs this session created, for rollback()
        self._fds: dict[str, int] = {}  # open blobs, for range reads
        if create:
            os.makedirs(os.path.join(self.root, "blobs", "sha256"), exist_ok=True)
            layout_file = os.path.join(self.root, "oci-layout")
            if not os.path.exists(layout_file):
                _atomic_write(layout_file, b'{"imageLayoutVersion": "1.0.0"}')
            if not os.path.exists(self._index_path):
                _atomic_write(self._index_path, _dump({"schemaVersion": 2, "manifests": []}))
        elif not os.path.isfile(os.path.join(self.root, "oci-layout")):
            raise NotFoundError(f"{ref}: {self.root} is not an OCI image layout (no oci-layout file)")

    @property
    def _index_path(self) -> str:
        return os.path.join(self.root, "index.json")

    def blob_path(self, digest: str) -> str:
        algo, _, hexpart = check_digest(digest).partition(":")
        return os.path.join(self.root, "blobs", algo, hexpart)

    def index(self) -> dict:
        try:
            with open(self._index_path, "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            raise NotFoundError(f"{self.ref}: no index.json in {self.root}") from None
        except ValueError as e:
            raise FormatError(f"{self._index_path}: not valid JSON: {e}") from None

    def _find(self, reference: str) -> Descriptor:
        manifests = [Descriptor.from_json(m) for m in self.index().get("manifests", [])]
        if reference.startswith("sha256:"):
            for d in manifests:
                if d.digest == reference:
                    return d
            # A digest not listed in index.json may still be a blob (e.g. an
            # image manifest inside a listed index).
            if os.path.exists(self.blob_path(reference)):
                return Descriptor(mt.OCI_MANIFEST, reference, os.path.getsize(self.blob_path(reference)))
        else:
            tagged = [d for d in manifests if (d.annotations or {}).get(mt.REF_NAME) == reference]
            if tagged:
                return tagged[-1]
            if self.ref.tag is None and reference == "latest" and len(manifests) == 1:
                return manifests[0]
        raise NotFoundError(f"{self.ref}: no image {reference!r} in {self.root}")

    # --- source -------------------------------------------------------

    def get_manifest(self, reference: str) -> tuple[bytes, str]:
        desc = self._find(reference)
        path = self.blob_path(desc.digest)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise NotFoundError(f"{self.ref}: manifest blob {desc.digest} is missing") from None
        verify_bytes(data, desc.digest, f"manifest {desc.digest}")
        return data, desc.media_type

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        try:
            return open(self.blob_path(desc.digest), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"{self.ref}: blob {desc.digest} is missing from {self.root}") from None

    def read_range(self, digest: str, offset: int, size: int) -> bytes:
        fd = self._fds.get(digest)
        if fd is None:
            try:
                fd = os.open(self.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NotFoundError(f"{self.ref}: blob {digest} is missing from {self.root}") from None
            fd = self._fds.setdefault(digest, fd)
        return os.pread(fd, size, offset)

    # --- target -------------------------------------------------------

    def staging_dir(self) -> str:
        if self._staging is None:
            self._staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root)
        return self._staging

    def has_blob(self, desc: Descriptor) -> bool:
        try:
            return os.path.getsize(self.blob_path(desc.digest)) == desc.size
        except FileNotFoundError:
            return False

    def put_blob_file(self, path: str, desc: Descriptor) -> None:
        final = self.blob_path(desc.digest)
        if self.has_blob(desc):
            return
        staging = self.staging_dir()
        if os.path.dirname(os.path.abspath(path)) != os.path.abspath(staging):
            tmp = os.path.join(staging, desc.digest.replace(":", "-"))
            shutil.copyfile(path, tmp)
            path = tmp
        os.rename(path, final)
        self._added.append(final)

    def put_blob_bytes(self, data: bytes, desc: Descriptor) -> None:
        if self.has_blob(desc):
            return
        fd, tmp = tempfile.mkstemp(dir=self.staging_dir())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.blob_path(desc.digest))
        self._added.append(self.blob_path(desc.digest))

    def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        desc = Descriptor.for_bytes(media_type, data)
        self.put_blob_bytes(data, desc)
        index = self.index()
        manifests = index.setdefault("manifests", [])
        annotations = {mt.REF_NAME: tag} if tag else None
        if tag:
            manifests[:] = [m for m in manifests if (m.get("annotations") or {}).get(mt.REF_NAME) != tag]
        elif any(m.get("digest") == desc.digest for m in manifests):
            return desc.digest
        manifests.append(Descriptor(media_type, desc.digest, desc.size, annotations).to_json())
        _atomic_write(self._index_path, _dump(index))
        return desc.digest

    def rollback(self) -> None:
        """Remove the blobs this session added: a failed write leaves the layout as it was."""
        for path in self._added:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._added.clear()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def _dump(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _atomic_write(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


