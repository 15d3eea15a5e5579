"""The registry client against a real `docker-registry`: uploads, reads, auth, faults.

Everything here talks to the CNCF distribution server started by conftest.py;
faults come from faultproxy.FaultProxy in front of it, and bearer tokens from
the test token issuer in registry_server.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from faultproxy import FaultProxy
from registry_server import RegistryServer, TestCA, TestTokenIssuer, TokenRegistry, docker_config

from naiad.errors import DigestMismatchError, NaiadError, NotFoundError, RegistryError
from naiad.oci import auth
from naiad.oci import mediatypes as mt
from naiad.oci import registry as registry_mod
from naiad.oci.digest import HashingReader, sha256_digest
from naiad.oci.fastrange import RangeConnections
from naiad.oci.image import Descriptor, RegistryOptions, resolve_image, source_for, target_for
from naiad.oci.reference import parse_reference
from naiad.oci.registry import RegistryClient, RegistrySource, RegistryTarget
from naiad.oci.tls import client_context


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the backoff real but short, so fault tests take milliseconds."""
    monkeypatch.setattr(registry_mod, "BACKOFF", 0.01)
    monkeypatch.setattr(registry_mod, "BACKOFF_MAX", 0.05)


@pytest.fixture(autouse=True)
def no_docker_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never pick up the developer's own ~/.docker/config.json."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "empty-docker-config"))


def _repo() -> str:
    return f"naiad-test/{uuid.uuid4().hex[:12]}"


def _target(host: str, repo: str, tag: str = "v1", creds: str | None = None) -> RegistryTarget:
    return RegistryTarget(parse_reference(f"{host}/{repo}:{tag}"), RegistryOptions(creds=creds))


def _source(host: str, repo: str, tag: str = "v1", creds: str | None = None) -> RegistrySource:
    return RegistrySource(parse_reference(f"{host}/{repo}:{tag}"), RegistryOptions(creds=creds))


def _blob(size: int, seed: int = 0) -> tuple[bytes, Descriptor]:
    data = (
        os.urandom(size)
        if seed == 0
        else hashlib.sha256(str(seed).encode()).digest() * (size // 32)
    )
    return data, Descriptor.for_bytes(mt.OCI_LAYER_GZIP, data)


def _read_verified(source: RegistrySource, desc: Descriptor) -> bytes:
    with HashingReader(source.open_blob(desc), desc.digest, desc.size, "blob") as reader:
        data = reader.read()
        reader.verify()
    return data


def _push_image(target: RegistryTarget, tag: str | None = "v1") -> tuple[str, bytes, Descriptor]:
    layer, layer_desc = _blob(100_000)
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    config_desc = Descriptor.for_bytes(mt.OCI_CONFIG, config)
    target.put_blob_bytes(layer, layer_desc)
    target.put_blob_bytes(config, config_desc)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": config_desc.to_json(),
            "layers": [layer_desc.to_json()],
        }
    ).encode()
    return target.put_manifest(manifest, mt.OCI_MANIFEST, tag), manifest, layer_desc


# --- blobs ---------------------------------------------------------------------


def test_monolithic_blob_roundtrip(registry: RegistryServer) -> None:
    repo = _repo()
    data, desc = _blob(3 << 20)
    with _target(registry.host, repo) as target:
        assert target.staging_dir() is None
        assert not target.has_blob(desc)
        target.put_blob_bytes(data, desc)
        assert target.has_blob(desc)
    assert registry.stored_blobs()[desc.digest] == len(data)
    uploads = [r for r in registry.requests() if repo in r.path and r.method in ("PUT", "PATCH")]
    assert [r.method for r in uploads] == ["PUT"]
    with _source(registry.host, repo) as source:
        assert _read_verified(source, desc) == data
        assert source.read_range(desc.digest, 0, 10) == data[:10]
        assert source.read_range(desc.digest, len(data) - 1, 1) == data[-1:]


def test_chunked_blob_from_file_and_ranges(registry: RegistryServer, tmp_path: Path) -> None:
    repo = _repo()
    size = 40 << 20
    path = tmp_path / "big"
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            piece = os.urandom(1 << 20)
            h.update(piece)
            f.write(piece)
    desc = Descriptor(mt.OCI_LAYER, "sha256:" + h.hexdigest(), size)
    with _target(registry.host, repo) as target:
        target.put_blob_file(str(path), desc)
        assert target.has_blob(desc)
    methods = [r.method for r in registry.requests() if repo in r.path and "/uploads/" in r.path]
    # 40 MiB is over the 32 MiB monolithic limit: POST, three 16 MiB-or-less PATCHes, PUT.
    assert methods == ["POST", "PATCH", "PATCH", "PATCH", "PUT"]
    data = path.read_bytes()
    with _source(registry.host, repo) as source:
        assert _read_verified(source, desc) == data
        for offset, n in [
            (0, 1),
            (0, 4096),
            (CHUNK := 16 << 20, 7),  # the first byte of the second PATCH
            (CHUNK - 3, 6),  # across a chunk boundary
            (12345, 1 << 20),
            (size - 1, 1),  # the last byte
            (size - 10, 100),  # past the end: what there is
        ]:
            assert source.read_range(desc.digest, offset, n) == data[offset : offset + n], (
                offset,
                n,
            )
        assert source.read_range(desc.digest, size + 10, 5) == b""
        assert source.read_range(desc.digest, 5, 0) == b""


def test_existing_blob_is_not_uploaded_again(registry: RegistryServer) -> None:
    repo = _repo()
    data, desc = _blob(1000)
    with _target(registry.host, repo) as target:
        target.put_blob_bytes(data, desc)
        before = len([r for r in registry.requests() if repo in r.path and r.method == "POST"])
        target.put_blob_bytes(data, desc)
        after = len([r for r in registry.requests() if repo in r.path and r.method == "POST"])
    assert before == after == 1


def test_cross_repo_mount(registry: RegistryServer) -> None:
    src_repo, dst_repo, empty_repo = _repo(), _repo(), _repo()
    data, desc = _blob(50_000)
    with _target(registry.host, src_repo) as t:
        t.put_blob_bytes(data, desc)
    with _target(registry.host, dst_repo) as target:
        assert target.mount_blob(desc, src_repo) is True
        assert target.has_blob(desc)
    mounts = [r for r in registry.requests() if dst_repo in r.path and "mount=" in r.path]
    assert [r.status for r in mounts] == [201]
    # No upload was needed: the only upload-path request is the mount itself.
    assert [
        r for r in registry.requests() if dst_repo in r.path and r.method in ("PUT", "PATCH")
    ] == []

    other, other_desc = _blob(20_000)
    fallback_repo = _repo()
    with _target(registry.host, fallback_repo) as target:
        # empty_repo lacks the blob: the registry opens an upload session instead (202).
        assert target.mount_blob(other_desc, empty_repo) is False
        target.put_blob_bytes(other, other_desc)
        assert target.has_blob(other_desc)
    posts = [r for r in registry.requests() if fallback_repo in r.path and r.method == "POST"]
    assert len(posts) == 1, "the upload must reuse the session the refused mount opened"
    with _source(registry.host, fallback_repo) as source:
        assert _read_verified(source, other_desc) == other


def test_refused_mount_session_is_cancelled_on_close(registry: RegistryServer) -> None:
    repo = _repo()
    _, desc = _blob(1000)
    with _target(registry.host, repo) as target:
        assert target.mount_blob(desc, _repo()) is False
        assert len(registry.upload_sessions(repo)) == 1
    assert registry.upload_sessions(repo) == []


# --- manifests ---------------------------------------------------------------------


def test_manifest_by_tag_and_digest(registry: RegistryServer) -> None:
    repo = _repo()
    with _target(registry.host, repo) as target:
        digest, manifest, layer_desc = _push_image(target, "v1")
    assert digest == sha256_digest(manifest)
    assert registry.manifest_tags(repo) == ["v1"]
    with _source(registry.host, repo) as source:
        data, media_type = source.get_manifest("v1")
        assert (data, media_type) == (manifest, mt.OCI_MANIFEST)
        assert source.get_manifest(digest) == (manifest, mt.OCI_MANIFEST)
        image = resolve_image(source)
        assert image.manifest_digest == digest
        assert image.layers == [layer_desc]

    # No tag: stored by digest only, and fetchable that way.
    repo2 = _repo()
    with _target(registry.host, repo2) as target:
        digest2, manifest2, _ = _push_image(target, None)
    assert registry.manifest_tags(repo2) == []
    ref = parse_reference(f"{registry.host}/{repo2}@{digest2}")
    with source_for(ref) as source:
        assert source.get_manifest(digest2)[0] == manifest2


def test_manifest_fetched_by_digest_is_verified(registry: RegistryServer) -> None:
    repo = _repo()
    with _target(registry.host, repo) as target:
        digest, manifest, _ = _push_image(target, "v1")
    # Change the stored bytes behind the registry's back (still valid JSON).
    stored = registry.root / "docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data"
    stored.write_bytes(manifest.replace(b'"schemaVersion": 2', b'"schemaVersion":  2'))
    with _source(registry.host, repo) as source, pytest.raises(DigestMismatchError) as e:
        source.get_manifest(digest)
    assert digest in str(e.value)


def test_not_found_errors_name_the_reference(registry: RegistryServer) -> None:
    repo = _repo()
    with _source(registry.host, repo, "nope") as source:
        with pytest.raises(NotFoundError) as e:
            source.get_manifest("nope")
        assert f"{registry.host}/{repo}:nope" in str(e.value)
        assert "manifest not found" in str(e.value) and "404" in str(e.value)
        _, desc = _blob(10)
        with pytest.raises(NotFoundError) as e:
            source.open_blob(desc)
        assert desc.digest in str(e.value) and "404" in str(e.value)
        with pytest.raises(NotFoundError):
            source.read_range(desc.digest, 0, 5)
        assert not source.has_blob(desc)


def test_open_target_and_source_pick_the_registry(registry: RegistryServer) -> None:
    ref = parse_reference(f"docker://{registry.host}/{_repo()}:t")
    with target_for(ref) as target:
        assert isinstance(target, RegistryTarget)
        assert str(target.client.base_url) == f"http://{registry.host}"
    https = RegistryClient("registry.example.com")
    assert https.base_url.scheme == "https"
    assert (
        RegistryClient("registry.example.com", RegistryOptions(plain_http=True)).base_url.scheme
        == "http"
    )
    https.close()


# --- basic auth -------------------------------------------------------------------


def _creds(server: RegistryServer | TokenRegistry) -> str:
    return f"{server.username}:{server.password}"


def test_basic_auth_with_creds(auth_registry_basic: RegistryServer) -> None:
    host, repo = auth_registry_basic.host, _repo()
    with _target(host, repo, creds=_creds(auth_registry_basic)) as target:
        _, manifest, layer_desc = _push_image(target)
    with _source(host, repo, creds=_creds(auth_registry_basic)) as source:
        assert source.get_manifest("v1")[0] == manifest
        assert len(_read_verified(source, layer_desc)) == layer_desc.size


def test_basic_auth_without_creds_fails_clearly(auth_registry_basic: RegistryServer) -> None:
    with _source(auth_registry_basic.host, _repo()) as source, pytest.raises(RegistryError) as e:
        source.get_manifest("v1")
    message = str(e.value)
    assert "401" in message and "credentials required" in message
    assert auth_registry_basic.host in message and "\n" not in message


def test_basic_auth_wrong_password(auth_registry_basic: RegistryServer) -> None:
    bad = "not-the-" + auth_registry_basic.password
    with _target(
        auth_registry_basic.host, _repo(), creds=f"{auth_registry_basic.username}:{bad}"
    ) as t:
        _, desc = _blob(10)
        with pytest.raises(RegistryError) as e:
            t.has_blob(desc)
    assert "401" in str(e.value) and "credentials rejected" in str(e.value)
    assert bad not in str(e.value) and bad not in repr(e.value)


def test_basic_auth_from_docker_config(
    auth_registry_basic: RegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "docker"
    docker_config(
        config_dir,
        "http://" + auth_registry_basic.host,
        auth_registry_basic.username,
        auth_registry_basic.password,
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    repo = _repo()
    with _target(auth_registry_basic.host, repo) as target:
        _push_image(target)
    assert auth_registry_basic.manifest_tags(repo) == ["v1"]


# --- token auth --------------------------------------------------------------------


def test_token_auth_push_pull_and_mount(auth_registry_token: TokenRegistry) -> None:
    reg = auth_registry_token
    repo, other = _repo(), _repo()
    with _target(reg.host, repo, creds=_creds(reg)) as target:
        digest, manifest, layer_desc = _push_image(target)
    assert any(f"repository:{repo}:pull,push" in c["scopes"] for c in reg.issuer.calls)
    with _source(reg.host, repo, creds=_creds(reg)) as source:
        assert source.get_manifest(digest)[0] == manifest
        assert source.read_range(layer_desc.digest, 1, 3) == _read_verified(source, layer_desc)[1:4]
    assert any(c["scopes"] == [f"repository:{repo}:pull"] for c in reg.issuer.calls)
    with _target(reg.host, other, creds=_creds(reg)) as target:
        assert target.mount_blob(layer_desc, repo) is True
    mount_call = reg.issuer.calls[-1]["scopes"]
    assert f"repository:{repo}:pull" in mount_call and f"repository:{other}:pull,push" in mount_call
    # One token per scope set: a push of three blobs and a manifest asks for one token.
    pushes = [c for c in reg.issuer.calls if c["scopes"] == [f"repository:{repo}:pull,push"]]
    assert len(pushes) == 1


def test_refused_token_is_replaced_once(auth_registry_token: TokenRegistry) -> None:
    reg = auth_registry_token
    repo = _repo()
    with _target(reg.host, repo, creds=_creds(reg)) as target:
        digest, manifest, _ = _push_image(target)
    with _source(reg.host, repo, creds=_creds(reg)) as source:
        assert source.get_manifest(digest)[0] == manifest
        calls = len(reg.issuer.calls)
        # As if the token had expired at the registry before our clock said so.
        cache = source.client._tokens._tokens
        for key, (_, expiry) in list(cache.items()):
            cache[key] = (reg.issuer.sign({"iss": "someone-else"}), expiry)
        assert source.get_manifest("v1")[0] == manifest
        assert len(reg.issuer.calls) == calls + 1


def test_token_cache_honours_expiry() -> None:
    cache = auth.TokenCache()
    challenge = auth.Challenge("bearer", {"realm": "http://r/token", "service": "s"})
    cache.put(challenge, ["repository:a:pull"], "tok", expires_in=0.05)
    assert cache.get(challenge, ["repository:a:pull"]) == "tok"
    assert cache.get(challenge, ["repository:b:pull"]) is None
    time.sleep(0.06)
    assert cache.get(challenge, ["repository:a:pull"]) is None
    cache.put(challenge, ["repository:a:pull"], "tok2", expires_in=300)
    cache.discard("tok2")
    assert cache.get(challenge, ["repository:a:pull"]) is None


def test_token_auth_failures(auth_registry_token: TokenRegistry) -> None:
    reg = auth_registry_token
    with _source(reg.host, _repo()) as source, pytest.raises(RegistryError) as e:
        source.get_manifest("v1")  # anonymous: the issuer grants nothing
    assert "401" in str(e.value)
    wrong = f"{reg.username}:wrong-pw"
    with _source(reg.host, _repo(), creds=wrong) as source, pytest.raises(RegistryError) as e:
        source.get_manifest("v1")
    assert "credentials rejected" in str(e.value) and "wrong-pw" not in str(e.value)


def test_token_response_with_access_token_field(tmp_path: Path) -> None:
    import httpx

    issuer = TestTokenIssuer(
        tmp_path, {"u": "p"}, token_field="access_token", expires_in=30
    ).start()
    try:
        challenge = auth.parse_www_authenticate(
            f'Bearer realm="{issuer.realm}",service="svc",scope="repository:a/b:pull"'
        )[0]
        with httpx.Client() as http:
            token, expires_in = auth.fetch_token(
                http, challenge, ["repository:a/b:pull"], auth.Credentials("u", "p")
            )
        assert token == issuer.issued[-1] and expires_in == 30
        assert issuer.calls[-1]["access"] == [
            {"type": "repository", "name": "a/b", "actions": ["pull"]}
        ]
    finally:
        issuer.stop()


def test_secrets_never_logged_or_shown(
    auth_registry_basic: RegistryServer,
    auth_registry_token: TokenRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets: list[str] = []
    shown: list[str] = []  # everything a user or a log reader could see
    for reg in (auth_registry_basic, auth_registry_token):
        creds = _creds(reg)
        secrets += [reg.password, base64.b64encode(creds.encode()).decode()]
        with _target(reg.host, _repo(), creds=creds) as target:
            _push_image(target)
            shown.append(repr(target.client))
        with _source(reg.host, _repo(), creds=creds) as source, pytest.raises(NotFoundError) as e:
            source.get_manifest("v1")
        shown += [str(e.value), repr(e.value)]
        wrong = f"{reg.username}:x{reg.password}"
        with _source(reg.host, _repo(), creds=wrong) as source, pytest.raises(RegistryError) as e:
            source.get_manifest("v1")
        shown += [str(e.value), repr(e.value)]
    tokens = auth_registry_token.issuer.issued
    assert tokens and caplog.records
    text = caplog.text + "\n".join(shown)
    for secret in secrets:
        assert secret not in text
    for token in tokens:
        assert token.split(".")[2] not in text  # the signature is what makes it a token

    creds = auth.parse_creds("alice:s3cr:et")
    assert creds.password == "s3cr:et"
    assert "s3cr" not in repr(creds) and "s3cr" not in str(creds) and "alice" in repr(creds)
    with pytest.raises(RegistryError) as e:
        auth.parse_creds("no-colon-secret")
    assert "no-colon-secret" not in str(e.value)


# --- auth helpers (no server) ------------------------------------------------------


def test_www_authenticate_parsing() -> None:
    [c] = auth.parse_www_authenticate(
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:a/b:pull,push repository:c:pull"'
    )
    assert c.scheme == "bearer" and c.realm == "https://auth.example.com/token"
    assert c.params["scope"] == "repository:a/b:pull,push repository:c:pull"
    [c] = auth.parse_www_authenticate('Basic realm="a \\"quoted\\", realm"')
    assert (c.scheme, c.realm) == ("basic", 'a "quoted", realm')
    cs = auth.parse_www_authenticate(
        'Negotiate abc123==, Basic realm=plain, charset="UTF-8", '
        'Bearer realm="r",error="invalid_token"'
    )
    assert [c.scheme for c in cs] == ["negotiate", "basic", "bearer"]
    assert cs[0].params == {"": "abc123=="}
    assert cs[1].params == {"realm": "plain", "charset": "UTF-8"}
    assert cs[2].params == {"realm": "r", "error": "invalid_token"}
    assert auth.pick_challenge(cs).scheme == "bearer"  # type: ignore[union-attr]
    assert auth.parse_www_authenticate("") == []
    assert auth.pick_challenge(auth.parse_www_authenticate("Negotiate")) is None


def test_docker_config_host_matching(tmp_path: Path) -> None:
    def b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": b64("hub:hubpw")},
                    "https://127.0.0.1:5000": {"auth": b64("loc:locpw:with:colons")},
                    "registry.example.com": {"username": "ex", "password": "expw"},
                    "quay.io": {},
                }
            }
        )
    )
    find = auth.credentials_from_docker_config
    assert find("registry-1.docker.io", str(path)) == auth.Credentials("hub", "hubpw")
    assert find("docker.io", str(path)) == auth.Credentials("hub", "hubpw")
    assert find("127.0.0.1:5000", str(path)) == auth.Credentials("loc", "locpw:with:colons")
    assert find("registry.example.com", str(path)) == auth.Credentials("ex", "expw")
    assert find("127.0.0.1:5001", str(path)) is None
    assert find("quay.io", str(path)) is None
    assert find("x", str(tmp_path / "missing.json")) is None
    path.write_text('{"auths": {"h": {"auth": "!!!"}}}')
    with pytest.raises(RegistryError):
        find("h", str(path))


# --- faults -------------------------------------------------------------------------


def test_500s_are_retried(fault_proxy: FaultProxy) -> None:
    repo = _repo()
    with _target(fault_proxy.host, repo) as target:
        _push_image(target)
    fault_proxy.fail_next(2, status=500, path_contains="/manifests/")
    with _source(fault_proxy.host, repo) as source:
        data, _ = source.get_manifest("v1")
    assert json.loads(data)["schemaVersion"] == 2
    tries = fault_proxy.requests("GET", "/manifests/")
    assert [s.status for s in tries] == [500, 500, 200]

    fault_proxy.fail_next(1, status=503, method="GET", path_contains="/blobs/")
    fault_proxy.fail_next(1, status=429, method="GET", path_contains="/blobs/")
    layer = Descriptor.from_json(json.loads(data)["layers"][0])
    with _source(fault_proxy.host, repo) as source:
        assert len(_read_verified(source, layer)) == layer.size


def test_upload_500s_restart_the_upload(fault_proxy: FaultProxy, registry: RegistryServer) -> None:
    repo = _repo()
    data, desc = _blob(2 << 20)
    fault_proxy.fail_next(2, status=500, method="PUT", path_contains="/blobs/uploads/")
    with _target(fault_proxy.host, repo) as target:
        target.put_blob_bytes(data, desc)
    assert registry.stored_blobs()[desc.digest] == len(data)
    assert len(fault_proxy.requests("POST", "/blobs/uploads/")) == 3
    assert registry.upload_sessions(repo) == [], "failed sessions must be cancelled"


def test_failed_upload_leaves_nothing(fault_proxy: FaultProxy, registry: RegistryServer) -> None:
    repo = _repo()
    data, desc = _blob(40 << 20, seed=7)
    fault_proxy.fail_next(1000, status=500, method="PATCH")
    with _target(fault_proxy.host, repo) as target, pytest.raises(RegistryError) as e:
        # As an image push does it: blobs first, so the manifest is never reached.
        target.put_blob_bytes(data, desc)
        _push_image(target)
    message = str(e.value)
    assert "500" in message and "push blob" in message and repo in message
    assert "\n" not in message and isinstance(e.value, NaiadError)
    assert len(fault_proxy.requests("POST", "/blobs/uploads/")) == registry_mod.RETRIES
    assert registry.manifest_tags(repo) == []
    assert registry.upload_sessions(repo) == []
    assert desc.digest not in registry.stored_blobs()


def test_always_500_gives_up(fault_proxy: FaultProxy) -> None:
    fault_proxy.fail_next(1000, status=500, path_contains="/manifests/")
    repo = _repo()
    with _source(fault_proxy.host, repo) as source, pytest.raises(RegistryError) as e:
        source.get_manifest("v1")
    assert "HTTP 500" in str(e.value) and f"after {registry_mod.RETRIES} attempts" in str(e.value)
    assert len(fault_proxy.requests("GET", "/manifests/")) == registry_mod.RETRIES


def test_connection_refused_is_a_registry_error() -> None:
    from registry_server import free_port

    with _source(f"127.0.0.1:{free_port()}", _repo()) as source, pytest.raises(RegistryError) as e:
        source.get_manifest("v1")
    assert "connection failed" in str(e.value)


def test_dropped_blob_stream_resumes(fault_proxy: FaultProxy) -> None:
    repo = _repo()
    data, desc = _blob(5 << 20)
    with _target(fault_proxy.host, repo) as target:
        target.put_blob_bytes(data, desc)
    fault_proxy.drop_next(after=(1 << 20) + 123)
    fault_proxy.drop_next(after=777)
    with _source(fault_proxy.host, repo) as source:
        assert _read_verified(source, desc) == data
    gets = fault_proxy.requests("GET", f"/blobs/{desc.digest}")
    assert [s.fault for s in gets] == ["drop", "drop", None]
    assert "range" not in gets[0].headers
    assert gets[1].headers["range"] == f"bytes={(1 << 20) + 123}-"
    assert gets[2].headers["range"] == f"bytes={(1 << 20) + 123 + 777}-"

    # A range read whose connection drops is retried whole.
    fault_proxy.drop_next(after=10)
    with _source(fault_proxy.host, repo) as source:
        assert source.read_range(desc.digest, 1000, 5000) == data[1000:6000]


def test_blob_stream_that_keeps_dropping_gives_up(fault_proxy: FaultProxy) -> None:
    repo = _repo()
    data, desc = _blob(1 << 20)
    with _target(fault_proxy.host, repo) as target:
        target.put_blob_bytes(data, desc)
    fault_proxy.drop_next(after=0, n=1000)
    with _source(fault_proxy.host, repo) as source, pytest.raises(RegistryError) as e:
        source.open_blob(desc).read()
    assert "connection dropped at byte 0" in str(e.value)


class _FakeServer:
    """A plain HTTP server on 127.0.0.1, for answers docker-registry cannot be made to give."""

    def _serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _StaticBlobServer(_FakeServer):
    """Stands in for object storage behind a redirect; records the headers it got."""

    def __init__(self, data: bytes):
        self.headers: list[dict[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                owner.headers.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(200)  # ignores Range, as some servers do
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._serve(Handler)


def test_redirect_does_not_forward_credentials(auth_registry_basic: RegistryServer) -> None:
    repo = _repo()
    data, desc = _blob(300_000)
    storage = _StaticBlobServer(data)
    try:
        with FaultProxy(auth_registry_basic.host) as proxy:
            with _target(proxy.host, repo, creds=_creds(auth_registry_basic)) as target:
                target.put_blob_bytes(data, desc)
            # Three: the stream, the range read's fast path (which hands a redirect to the slow
            # path and stops trying for this registry), and the slow path's own request.
            proxy.redirect_next(storage.url, n=3)
            with _source(proxy.host, repo, creds=_creds(auth_registry_basic)) as source:
                assert _read_verified(source, desc) == data
                assert source.read_range(desc.digest, 5, 10) == data[5:15]
                assert source.read_range(desc.digest, 20, 10) == data[20:30]  # no fast try now
            redirected = proxy.requests("GET", "/blobs/sha256:")
            assert [s.fault for s in redirected] == ["redirect", "redirect", "redirect", None]
            assert all("authorization" in s.headers for s in redirected)
    finally:
        storage.stop()
    assert len(storage.headers) == 2
    assert all("authorization" not in h for h in storage.headers)
    assert storage.headers[1]["range"] == "bytes=5-14"


def _pushed(registry: RegistryServer, size: int) -> tuple[bytes, str]:
    """A blob of `size` random bytes on `registry`: its bytes and its request path."""
    repo = _repo()
    data, desc = _blob(size)
    with _target(registry.host, repo) as target:
        target.put_blob_bytes(data, desc)
    return data, f"/v2/{repo}/blobs/{desc.digest}"


def test_range_reads_of_many_threads_share_the_connections_opened_before(
        registry: RegistryServer, fault_proxy: FaultProxy) -> None:
    data, path = _pushed(registry, 100_000)
    ranges = RangeConnections(httpx.URL(fault_proxy.url), client_context(), 10.0, "naiad-test")
    ranges.prewarm(2)
    deadline = time.monotonic() + 5
    while fault_proxy.connections < 2 and time.monotonic() < deadline:  # accepted on its own thread
        time.sleep(0.01)
    assert fault_proxy.connections == 2
    one_at_a_time = threading.Lock()

    def read(i: int) -> bytes | None:
        with one_at_a_time:
            return ranges.get(path, i * 1000, 1000, None)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(read, range(16)))
    assert got == [data[i * 1000:(i + 1) * 1000] for i in range(16)]
    assert fault_proxy.connections == 2  # not one per thread
    ranges.close()


def test_a_pooled_connection_the_server_closed_is_replaced_on_the_fast_path(
        registry: RegistryServer, fault_proxy: FaultProxy) -> None:
    data, path = _pushed(registry, 10_000)
    ranges = RangeConnections(httpx.URL(fault_proxy.url), client_context(), 10.0, "naiad-test")
    fault_proxy.hang_up_next()  # as a server's idle timeout would, after this answer
    assert ranges.get(path, 0, 100, None) == data[:100]
    time.sleep(0.1)
    # None would send the caller to its slow path: the fast one takes a new connection instead.
    assert ranges.get(path, 100, 100, None) == data[100:200]
    assert fault_proxy.connections == 2
    ranges.close()


class _MultipartServer(_FakeServer):
    """A fake blob server (docker-registry cannot be made to send these) answering every GET with
    one canned multipart/byteranges body over the bytes of `data`: `parts` are (first, last)
    pairs, `claimed` overrides the Content-Range a part states."""

    def __init__(self, data: bytes, parts: list[tuple[int, int]], claimed: dict[int, str] | None = None):
        boundary = "naiad-test-boundary"
        body = b""
        for i, (first, last) in enumerate(parts):
            stated = (claimed or {}).get(i, f"bytes {first}-{last}/{len(data)}")
            body += (f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Range: {stated}\r\n\r\n").encode() + data[first:last + 1]
        body += f"\r\n--{boundary}--\r\n".encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(206)
                self.send_header("Content-Type", f"multipart/byteranges; boundary={boundary}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._serve(Handler)


def test_multipart_answers_joined_parts_the_receivers_errors_and_oversized_parts() -> None:
    data = os.urandom(50_000)
    spans = [(100, 50), (200, 50), (30_000, 10)]
    # A server may join ranges that are close into one part: each range it covers is handed over.
    server = _MultipartServer(data, [(100, 249), (30_000, 30_009)])
    ranges = RangeConnections(httpx.URL(server.url), client_context(), 10.0, "naiad-test")
    got: dict[int, bytes] = {}
    assert ranges.get_many("/blob", spans, None, got.__setitem__) == {0, 1, 2}
    assert got == {i: data[o:o + n] for i, (o, n) in enumerate(spans)}
    # The receiver's own error is its caller's to see, not taken for the server's.

    def refuse(i: int, data: bytes) -> None:
        raise ValueError("the receiver's own")

    with pytest.raises(ValueError, match="receiver's own"):
        ranges.get_many("/blob", spans, None, refuse)
    server.stop()
    # A part that claims more bytes than the ranges asked for span is not read (nor allocated).
    server = _MultipartServer(data, [(100, 149)], claimed={0: f"bytes 0-{1 << 40}/{1 << 41}"})
    ranges = RangeConnections(httpx.URL(server.url), client_context(), 10.0, "naiad-test")
    got.clear()
    assert ranges.get_many("/blob", spans, None, got.__setitem__) == set()
    assert got == {}
    server.stop()


# --- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A registry serving HTTPS with a certificate of a CA of this module's own."""
    root = tmp_path_factory.mktemp("tls")
    with RegistryServer(root / "registry", tls=TestCA(root / "ca")) as server:
        yield server


def test_an_https_registry_is_verified_with_the_systems_trust_store(
        tls_registry: RegistryServer, node, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from test_mount import KiB, one_line_error, publish, rand, write_tree

    files = {"etc/hello": b"hello over TLS\n", "bin/tool": rand(300 * KiB, 71)}
    tree = write_tree(tmp_path / "tree", files)
    assert tls_registry.ca is not None
    for variable in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(variable, raising=False)
    # The system's store does not know the CA: one clear line.
    one_line_error(node.naiad("build", tree, f"{tls_registry.host}/tls/app:v1"), "certificate")
    # Installed there (SSL_CERT_FILE stands for it: OpenSSL's default paths), it is trusted by the
    # push, the manifest and bootstrap reads, and the mount daemon's range reads alike.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_registry.ca.cert_path))
    ref, _ = publish(node.home, tree, tls_registry.host, name="tls")
    mnt = node.mount(ref)
    for path, data in files.items():
        assert (mnt / path).read_bytes() == data
    assert node.stats(mnt)["bytes_fetched"] > 0  # chunks came over TLS
    # Verification off: no CA needed.
    monkeypatch.delenv("SSL_CERT_FILE")
    mnt = node.mount(ref, "--insecure-skip-tls-verify", name="mnt2")
    assert (mnt / "bin/tool").read_bytes() == files["bin/tool"]


def test_one_tls_context_per_process_from_the_systems_trust_store() -> None:
    # Not certifi's bundle (httpx's default): OpenSSL's default paths, as Docker and containerd.
    assert client_context() is client_context()
    assert client_context().get_ca_certs() == ssl.create_default_context().get_ca_certs()
    assert client_context(False).verify_mode == ssl.CERT_NONE
