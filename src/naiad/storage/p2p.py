"""The P2P storage backend: blob range reads through the node's peer daemon instead of the registry.

The peer's mirror speaks the registry protocol, so this is the registry
client pointed at it, with containerd's `?ns=<registry>` on every URL to name
the upstream. Auth works unchanged: the mirror relays the registry's 401
challenge, the client gets its token from the registry's token server as
usual, and the mirror forwards it upstream. Manifests and the bootstrap still
come from the image source; only `read_range` (the lazy filesystem's chunk
reads) goes through the peer.

The peer is named with `--p2p-proxy HOST:PORT` or `$NAIAD_P2P_PROXY`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import BinaryIO

import httpx

from naiad.oci.auth import resolve_credentials
from naiad.oci.image import Descriptor, ImageSource, RegistryOptions
from naiad.oci.reference import Reference
from naiad.oci.registry import RegistryClient

ENV = "NAIAD_P2P_PROXY"


class _MirrorClient(RegistryClient):
    """A RegistryClient for the mirror at `proxy` that asks it for blobs of `upstream`."""

    def __init__(self, proxy: str, upstream: str, options: RegistryOptions):
        # The mirror is node-local plain HTTP; TLS, if any, is between the peer and the registry.
        super().__init__(proxy, RegistryOptions(plain_http=True, creds=None))
        self.upstream = upstream
        # The credentials are the upstream registry's, not the mirror's.
        self._creds = resolve_credentials(upstream, options.creds)

    def _url(self, path: str, params: dict[str, str] | None = None) -> httpx.URL:
        return super()._url(path, {**(params or {}), "ns": self.upstream})


class PeerSource:
    """An ImageSource reading blob ranges through the peer daemon and everything else from `inner`."""

    def __init__(self, inner: ImageSource, ref: Reference, proxy: str,
                 options: RegistryOptions | None = None):
        self.inner = inner
        self.ref = ref
        self.repo = ref.repo
        self._mirror = _MirrorClient(proxy, ref.host, options or RegistryOptions())

    def read_range(self, digest: str, offset: int, size: int) -> bytes:
        return self._mirror.read_range(self.repo, digest, offset, size)

    def read_range_head_first(self, digest: str, offset: int, size: int, head: int,
                              on_head: Callable[[bytes], None]) -> bytes:
        return self._mirror.read_range(self.repo, digest, offset, size, (head, on_head))

    def prewarm(self, n: int) -> None:
        self._mirror.prewarm(n)

    def get_manifest(self, reference: str) -> tuple[bytes, str]:
        return self.inner.get_manifest(reference)

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        return self.inner.open_blob(desc)

    def close(self) -> None:
        """Close the connection to the peer; `inner` stays its opener's to close."""
        self._mirror.close()


@contextlib.contextmanager
def via_peer(source: ImageSource, ref: Reference, options: RegistryOptions | None = None,
             proxy: str | None = None) -> Iterator[ImageSource]:
    """`source` with its range reads going through the peer (`proxy`, else $NAIAD_P2P_PROXY), if any.

    Only registry images go through a peer; local layouts and archives are read
    directly. Use it inside the `with` that opened `source`:

        with source_for(ref, registry) as inner, via_peer(inner, ref, registry) as source: ...
    """
    proxy = proxy or os.environ.get(ENV)
    if not proxy or not ref.is_registry:
        yield source
        return
    peer = PeerSource(source, ref, proxy, options)
    try:
        yield peer
    finally:
        peer.close()
