"""Image references in skopeo's syntax, which users already know.

    oci:PATH[:TAG|@DIGEST]          an OCI image layout directory
    docker-archive:FILE[:REPO:TAG]  a `docker save` tarball
    docker://HOST[:PORT]/REPO[:TAG|@DIGEST]
    HOST[:PORT]/REPO[:TAG|@DIGEST]  the same as docker://
"""

from __future__ import annotations

import dataclasses
import re

from naiad.errors import BadReferenceError
from naiad.oci.digest import check_digest

DOCKER_HUB = "registry-1.docker.io"
_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclasses.dataclass(frozen=True)
class Reference:
    """A parsed image reference.

    `transport` is "oci", "docker-archive" or "docker". For "oci" and
    "docker-archive", `path` is the layout directory or archive file; for
    "docker", `host` and `repo` name the registry repository.
    """

    transport: str
    path: str = ""
    host: str = ""
    repo: str = ""
    tag: str | None = None
    digest: str | None = None

    @property
    def is_registry(self) -> bool:
        return self.transport == "docker"

    @property
    def plain_http_default(self) -> bool:
        """Registries on the loopback interface are spoken to without TLS."""
        name = self.host.rsplit(":", 1)[0] if not self.host.startswith("[") else self.host
        return name in ("localhost", "127.0.0.1", "[::1]")

    def with_tag(self, tag: str) -> Reference:
        return dataclasses.replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> Reference:
        return dataclasses.replace(self, digest=digest)

    @property
    def reference(self) -> str:
        """What names the manifest: its digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        if self.transport == "docker":
            base = f"docker://{self.host}/{self.repo}"
        else:
            base = f"{self.transport}:{self.path}"
        if self.digest:
            return f"{base}@{self.digest}"
        if self.tag:
            return f"{base}:{self.tag}"
        return base


def parse_reference(text: str) -> Reference:
    """Parse `text`, raising BadReferenceError with the reason if it is not one."""
    if text.startswith("oci:"):
        return _parse_local("oci", text[4:], text)
    if text.startswith("docker-archive:"):
        return _parse_local("docker-archive", text[len("docker-archive:"):], text)
    if text.startswith("docker://"):
        return _parse_registry(text[len("docker://"):], text)
    if "://" in text or text.split(":", 1)[0] in ("dir", "containers-storage", "docker-daemon"):
        raise BadReferenceError(
            f"unsupported image reference {text!r}: use oci:PATH[:TAG], "
            "docker-archive:FILE or docker://HOST/REPO[:TAG]"
        )
    return _parse_registry(text, text)


def _parse_local(transport: str, rest: str, text: str) -> Reference:
    digest = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        check_digest(digest)
    path, _, tag = rest.partition(":")
    if not path:
        raise BadReferenceError(f"{text!r}: missing path")
    if tag and transport == "oci" and not _TAG_RE.match(tag):
        raise BadReferenceError(f"{text!r}: invalid tag {tag!r}")
    return Reference(transport, path=path, tag=tag or None, digest=digest)


def _parse_registry(rest: str, text: str) -> Reference:
    digest = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        check_digest(digest)
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG_RE.match(tag):
            raise BadReferenceError(f"{text!r}: invalid tag {tag!r}")
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        host, repo = first, remainder
    else:
        host, repo = DOCKER_HUB, rest
        if "/" not in repo:
            repo = "library/" + repo
    if host == "docker.io":
        host = DOCKER_HUB
    if not _REPO_RE.match(repo):
        raise BadReferenceError(f"{text!r}: invalid repository name {repo!r}")
    if tag is None and digest is None:
        tag = None
    return Reference("docker", host=host, repo=repo, tag=tag, digest=digest)
