"""A real `docker-registry` (CNCF distribution) for tests, plus the test's token issuer.

`RegistryServer` runs Debian's `docker-registry` on 127.0.0.1 with a throwaway
config and filesystem storage, in one of three modes: anonymous, htpasswd
basic auth, or bearer-token auth; with `tls`, it serves HTTPS (on another
loopback address, which naiad does not speak plain HTTP to by default) with a
certificate of `TestCA`'s. For token mode, `TestTokenIssuer` is the
token server the registry's challenge points to: it issues RS256 JWTs signed
with a key whose self-signed certificate is the registry's `rootcertbundle`.
Only the token issuer is ours; the registry is the real thing.

What the registry received can be read back from its access log
(`requests()`) and from its storage directory (`stored_blobs()`).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

REGISTRY_BIN = "docker-registry"
SERVICE = "naiad-test-registry"
ISSUER = "naiad-test-token-issuer"


def registry_available() -> bool:
    return shutil.which(REGISTRY_BIN) is not None


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class TestCA:
    """A certificate authority of a test's own, and server certificates it signs for IP addresses."""

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, workdir: Path):
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "naiad test CA")])
        cert = self._sign(self._name, self._key.public_key(),
                          x509.BasicConstraints(ca=True, path_length=None), critical=True)
        self.cert_path = self._write(self.workdir / "ca.pem", cert)

    def server_cert(self, address: str) -> tuple[Path, Path]:
        """(certificate, key) PEM files for a server at IP `address`."""
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)]), key.public_key(),
                          x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
                          critical=False)
        key_path = self.workdir / f"{address}.key"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return self._write(self.workdir / f"{address}.pem", cert), key_path

    def _sign(self, subject, public_key, extension, critical: bool):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        now = datetime.datetime.now(datetime.UTC)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self._name)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(extension, critical=critical).sign(self._key, hashes.SHA256()))

    @staticmethod
    def _write(path: Path, cert) -> Path:
        from cryptography.hazmat.primitives import serialization

        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path


@dataclasses.dataclass(frozen=True)
class AccessLogEntry:
    method: str
    path: str
    status: int
    size: int  # response bytes, as the registry reports them


# Combined Log Format, as distribution writes it to stdout.
_ACCESS_RE = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) (?P<size>\d+|-)'
)


class RegistryServer:
    """One `docker-registry serve` process; `auth` is None, "basic" or "token"."""

    def __init__(
        self,
        workdir: Path,
        auth: str | None = None,
        users: dict[str, str] | None = None,
        token_realm: str | None = None,
        token_cert: Path | None = None,
        tls: TestCA | None = None,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.auth = auth
        self.users = dict(users or {})
        self.token_realm = token_realm
        self.token_cert = token_cert
        # HTTPS on 127.0.0.2: naiad speaks plain HTTP to 127.0.0.1 and localhost unless told.
        address = "127.0.0.2" if tls else "127.0.0.1"
        self.ca = tls
        self.tls = tls.server_cert(address) if tls else None
        self.port = free_port(address)
        self.host = f"{address}:{self.port}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.root = self.workdir / "storage"
        self.root.mkdir(exist_ok=True)
        self.stdout_path = self.workdir / "registry.stdout"
        self.stderr_path = self.workdir / "registry.stderr"
        self._proc: subprocess.Popen | None = None

    # --- lifecycle ----------------------------------------------------

    def _config(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  formatter: text",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.root}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: {self.host}",
            # A fixed secret: all upload-state HMACs agree if it is restarted.
            "  secret: naiad-test-secret",
        ]
        if self.tls:
            lines += ["  tls:", f"    certificate: {self.tls[0]}", f"    key: {self.tls[1]}"]
        if self.auth == "basic":
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text(make_htpasswd(self.users))
            lines += ["auth:", "  htpasswd:", "    realm: naiad-test", f"    path: {htpasswd}"]
        elif self.auth == "token":
            assert self.token_realm and self.token_cert, "token auth needs a realm and a cert"
            lines += [
                "auth:",
                "  token:",
                f"    realm: {self.token_realm}",
                f"    service: {SERVICE}",
                f"    issuer: {ISSUER}",
                f"    rootcertbundle: {self.token_cert}",
            ]
        elif self.auth is not None:
            raise ValueError(f"unknown auth mode {self.auth!r}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 20.0) -> RegistryServer:
        config = self.workdir / "config.yml"
        config.write_text(self._config())
        self._proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(config)],
            stdout=open(self.stdout_path, "ab"),  # noqa: SIM115 - the child owns it
            stderr=open(self.stderr_path, "ab"),  # noqa: SIM115
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"docker-registry exited with {self._proc.returncode}: {self.log_tail()}"
                )
            try:
                r = httpx.get(f"{self.url}/v2/", timeout=1.0, verify=False)  # up, whatever its cert
                if r.status_code in (200, 401):
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not answer on {self.url}: {self.log_tail()}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    @property
    def username(self) -> str:
        return next(iter(self.users))

    @property
    def password(self) -> str:
        return self.users[self.username]

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 20) -> str:
        text = ""
        for p in (self.stderr_path, self.stdout_path):
            if p.exists():
                text += p.read_text(errors="replace")
        return "\n".join(text.splitlines()[-n:])

    # --- what the registry received -----------------------------------

    def requests(self) -> list[AccessLogEntry]:
        """Every request the registry answered so far, from its access log."""
        entries = []
        if self.stdout_path.exists():
            for line in self.stdout_path.read_text(errors="replace").splitlines():
                m = _ACCESS_RE.search(line)
                if m:
                    size = m["size"]
                    entries.append(
                        AccessLogEntry(
                            m["method"],
                            m["path"],
                            int(m["status"]),
                            0 if size == "-" else int(size),
                        )
                    )
        return entries

    def stored_blobs(self) -> dict[str, int]:
        """digest -> size of every blob in the registry's storage."""
        blobs = {}
        base = self.root / "docker" / "registry" / "v2" / "blobs" / "sha256"
        if base.exists():
            for data in base.glob("*/*/data"):
                blobs["sha256:" + data.parent.name] = data.stat().st_size
        return blobs

    def stored_bytes(self) -> int:
        return sum(self.stored_blobs().values())

    def manifest_tags(self, repo: str) -> list[str]:
        tags = (
            self.root / "docker" / "registry" / "v2" / "repositories" / repo / "_manifests" / "tags"
        )
        return sorted(p.name for p in tags.iterdir()) if tags.exists() else []

    def upload_sessions(self, repo: str) -> list[str]:
        """Upload sessions still open on `repo` (a failed push should leave none).

        A cancelled session can leave an empty `hashstates/` directory behind in
        distribution 2.8; it is gone for the registry, which answers 404 for it,
        and no data remains. An open session has `startedat`.
        """
        d = self.root / "docker" / "registry" / "v2" / "repositories" / repo / "_uploads"
        if not d.exists():
            return []
        return sorted(p.name for p in d.iterdir() if (p / "startedat").exists())


def make_htpasswd(users: dict[str, str]) -> str:
    """An htpasswd file with bcrypt entries, the only kind distribution accepts."""
    import bcrypt

    lines = []
    for user, password in users.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
        lines.append(f"{user}:{hashed}")
    return "\n".join(lines) + "\n"


# --- the test's token issuer ---------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TestTokenIssuer:
    """A Docker-token-spec auth server for tests: `GET /token?service=&scope=`.

    Authenticated users (HTTP basic against `users`) get every action they ask
    for; anonymous callers get pull only when `anonymous_pull` is set. Tokens
    are RS256 JWTs carrying the signing cert in `x5c`, which the registry
    checks against the `cert_path` bundle.
    """

    __test__ = False  # not a pytest class, despite the name

    def __init__(
        self,
        workdir: Path,
        users: dict[str, str],
        anonymous_pull: bool = False,
        expires_in: int = 300,
        token_field: str = "token",
    ):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.users = dict(users)
        self.anonymous_pull = anonymous_pull
        self.expires_in = expires_in
        self.token_field = token_field
        self.calls: list[dict] = []  # one per token request: scopes, account, granted
        self.issued: list[str] = []  # every token handed out, to look for leaks
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self._cert_der = cert.public_bytes(serialization.Encoding.DER)
        Path(workdir).mkdir(parents=True, exist_ok=True)
        self.cert_path = Path(workdir) / "token-issuer.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.port = free_port()
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    def sign(self, claims: dict) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self._cert_der).decode()]}
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        sig = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)

    def _grant(self, account: str | None, scopes: list[str]) -> list[dict]:
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3:
                continue
            kind, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1].split(",")
            if account is None:
                actions = [a for a in actions if a == "pull"] if self.anonymous_pull else []
            if actions:
                access.append({"type": kind, "name": name, "actions": actions})
        return access

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path != "/token":
                    self.send_error(404)
                    return
                query = parse_qs(url.query)
                account = None
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    try:
                        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    except ValueError:
                        user, password = "", ""
                    if issuer.users.get(user) != password or not user:
                        issuer.calls.append({"scopes": query.get("scope", []), "rejected": True})
                        self._reply(401, {"errors": [{"code": "UNAUTHORIZED"}]})
                        return
                    account = user
                scopes = query.get("scope", [])
                access = issuer._grant(account, scopes)
                issuer.calls.append({"scopes": scopes, "account": account, "access": access})
                now = int(time.time())
                claims = {
                    "iss": ISSUER,
                    "sub": account or "",
                    "aud": query.get("service", [""])[0],
                    "exp": now + issuer.expires_in,
                    "nbf": now - 10,
                    "iat": now,
                    "jti": uuid.uuid4().hex,
                    "access": access,
                }
                token = issuer.sign(claims)
                issuer.issued.append(token)
                self._reply(
                    200,
                    {
                        issuer.token_field: token,
                        "expires_in": issuer.expires_in,
                        "issued_at": datetime.datetime.now(datetime.UTC).isoformat(),
                    },
                )

            def _reply(self, status: int, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def start(self) -> TestTokenIssuer:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class TokenRegistry:
    """A real registry with token auth plus the test token issuer it trusts."""

    def __init__(self, workdir: Path, users: dict[str, str], **issuer_options: object):
        self.issuer = TestTokenIssuer(workdir, users, **issuer_options)  # type: ignore[arg-type]
        self.server = RegistryServer(
            workdir, auth="token", token_realm=self.issuer.realm, token_cert=self.issuer.cert_path
        )
        self.users = self.issuer.users
        self.host, self.url, self.root = self.server.host, self.server.url, self.server.root

    @property
    def username(self) -> str:
        return next(iter(self.users))

    @property
    def password(self) -> str:
        return self.users[self.username]

    def start(self) -> TokenRegistry:
        self.issuer.start()
        try:
            self.server.start()
            return self
        except BaseException:
            self.issuer.stop()
            raise

    def stop(self) -> None:
        self.server.stop()
        self.issuer.stop()

    def requests(self) -> list[AccessLogEntry]:
        return self.server.requests()

    def stored_blobs(self) -> dict[str, int]:
        return self.server.stored_blobs()

    def upload_sessions(self, repo: str) -> list[str]:
        return self.server.upload_sessions(repo)


def docker_config(dirpath: Path, host: str, user: str, password: str) -> Path:
    """Write a `$DOCKER_CONFIG/config.json` holding `user:password` for `host`."""
    dirpath.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path = dirpath / "config.json"
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    os.chmod(path, 0o600)
    return path
