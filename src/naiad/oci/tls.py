"""The TLS context every registry connection of a process verifies servers with.

The system's trust store, through OpenSSL's default paths (on Debian the bundle
`update-ca-certificates` writes; `SSL_CERT_FILE` and `SSL_CERT_DIR` override it), as
Docker, containerd and skopeo trust: a registry whose CA an administrator installed is
trusted by naiad too. httpx's default would be certifi's bundle alone, and the range
reads (oci/fastrange.py) used the system's: a private CA then passed one and failed the
other. certifi's bundle stands in only where the system has none. One context per
process and setting, shared by every connection: loading a store takes ~17 ms.
"""

from __future__ import annotations

import functools
import ssl


@functools.cache
def client_context(verify: bool = True) -> ssl.SSLContext:
    """The context for HTTPS to registries: verifying with the system's trust store, or not at all."""
    if not verify:  # --insecure-skip-tls-verify
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    context = ssl.create_default_context()
    paths = ssl.get_default_verify_paths()  # cafile/capath are None where no such file/dir exists
    if paths.cafile is None and paths.capath is None:
        import certifi

        context.load_verify_locations(certifi.where())
    return context
