"""Shared fixtures: real registries (anonymous, basic auth, token auth) and a fault proxy.

The logic lives in registry_server.py and faultproxy.py; this file only wires
it into pytest. Registry tests skip only where `docker-registry` is missing
(a developer laptop); CI installs it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from faultproxy import FaultProxy
from registry_server import RegistryServer, TokenRegistry, registry_available


def _need_registry() -> None:
    if not registry_available():
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """An anonymous registry: `.host` ("127.0.0.1:PORT"), `.url`, `.root` (storage dir)."""
    _need_registry()
    server = RegistryServer(tmp_path_factory.mktemp("registry")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def auth_registry_basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A registry behind htpasswd basic auth; `.username` / `.password` get in."""
    _need_registry()
    users = {"naiad-user": "pw-" + secrets.token_hex(8)}
    server = RegistryServer(
        tmp_path_factory.mktemp("registry-basic"), auth="basic", users=users
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def auth_registry_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenRegistry]:
    """A registry with bearer-token auth; `.issuer` is the test's token server."""
    _need_registry()
    users = {"naiad-user": "pw-" + secrets.token_hex(8)}
    registry = TokenRegistry(tmp_path_factory.mktemp("registry-token"), users).start()
    yield registry
    registry.stop()


@pytest.fixture
def fault_proxy(registry: RegistryServer) -> Iterator[FaultProxy]:
    """A fresh fault-injecting proxy in front of the anonymous `registry`."""
    with FaultProxy(registry.host) as proxy:
        yield proxy


@pytest.fixture
def node(tmp_path):
    """A machine's naiad state for mount tests (test_mount.Node); its mounts are always undone."""
    from test_mount import Node

    n = Node(tmp_path)
    try:
        yield n
    finally:
        n.cleanup()


@pytest.fixture(scope="module")
def small_image(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """A two-file naiad image on `registry` for mount tests: (reference, {path: bytes})."""
    from test_mount import KiB, publish, rand, write_tree

    root = tmp_path_factory.mktemp("small")
    files = {"etc/hello": b"hello\n", "bin/tool": rand(300 * KiB, 70)}
    ref, _ = publish(root / "home", write_tree(root / "tree", files), registry, name="small")
    return ref, files
