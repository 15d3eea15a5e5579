"""An HTTP proxy for tests that sits in front of the real registry and misbehaves on demand.

Faults are armed from the test and consumed by the requests that match them:

- `fail_next(n, status=500)`: the next n matching requests get `status` and
  never reach the registry;
- `drop_next(after)`: the next matching response is cut after `after` bytes
  of its body, with the connection closed, as a flaky network would;
- `redirect_next(base)`: the next matching request is answered with a 307 to
  `base` + the request path (a registry redirecting blob GETs to storage);
- `stall_next(after, release)`: the next matching response sends `after` bytes
  of its body, then nothing more until the event `release` is set (a slow
  link, frozen at a point the test chooses);
- `hang_up_next()`: the next matching response is sent whole, then the
  connection is closed without a `Connection: close` (a server's idle timeout);
- `rewrite_range_next(rewrite)`: the next matching request reaches the
  registry with its `Range` header replaced by `rewrite(header)`, or without
  one if that is None (a server that ignores several ranges, or serves only
  the first).

Every request is recorded (method, path, request headers, status, fault), so
tests can check what the client sent, e.g. `Range` after a drop; `connections`
counts the connections clients opened. The Host
header is passed through, so the registry's Location URLs point at the proxy.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
}


@dataclasses.dataclass
class Fault:
    kind: str  # "fail", "drop", "redirect", "stall", "range" or "hangup"
    count: int
    method: str | None = None
    path_contains: str | None = None
    status: int = 500
    after: int = 0
    location: str = ""
    release: threading.Event | None = None
    rewrite: Callable[[str], str | None] | None = None

    def matches(self, method: str, path: str) -> bool:
        if self.method and method != self.method:
            return False
        return not (self.path_contains and self.path_contains not in path)


@dataclasses.dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    fault: str | None = None


class FaultProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 in front of `upstream` ("host:port")."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self.seen: list[Seen] = []
        self.connections = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._thread: threading.Thread | None = None

    # --- arming faults ----------------------------------------------------

    def fail_next(
        self, n: int, status: int = 500, method: str | None = None, path_contains: str | None = None
    ) -> None:
        with self._lock:
            self._faults.append(Fault("fail", n, method, path_contains, status=status))

    def drop_next(
        self,
        after: int,
        n: int = 1,
        method: str | None = "GET",
        path_contains: str | None = "/blobs/",
    ) -> None:
        with self._lock:
            self._faults.append(Fault("drop", n, method, path_contains, after=after))

    def redirect_next(
        self,
        base: str,
        n: int = 1,
        method: str | None = "GET",
        path_contains: str | None = "/blobs/",
    ) -> None:
        with self._lock:
            self._faults.append(Fault("redirect", n, method, path_contains, location=base))

    def stall_next(
        self,
        after: int,
        release: threading.Event,
        n: int = 1,
        method: str | None = "GET",
        path_contains: str | None = "/blobs/",
    ) -> None:
        with self._lock:
            self._faults.append(Fault("stall", n, method, path_contains, after=after, release=release))

    def hang_up_next(self, n: int = 1, method: str | None = "GET",
                     path_contains: str | None = "/blobs/") -> None:
        with self._lock:
            self._faults.append(Fault("hangup", n, method, path_contains))

    def rewrite_range_next(
        self,
        rewrite: Callable[[str], str | None],
        n: int = 1,
        method: str | None = "GET",
        path_contains: str | None = "/blobs/",
    ) -> None:
        with self._lock:
            self._faults.append(Fault("range", n, method, path_contains, rewrite=rewrite))

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self.seen.clear()

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.count > 0 and fault.matches(method, path):
                    fault.count -= 1
                    return fault
        return None

    def requests(self, method: str | None = None, path_contains: str = "") -> list[Seen]:
        with self._lock:
            return [
                s
                for s in self.seen
                if (method is None or s.method == method) and path_contains in s.path
            ]

    # --- serving ------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy.connections += 1

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._read_body()
                seen = Seen(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()}
                )
                with proxy._lock:
                    proxy.seen.append(seen)
                fault = proxy._take(self.command, self.path)
                if fault is not None and fault.kind == "fail":
                    seen.status, seen.fault = fault.status, "fail"
                    self._reply(
                        fault.status, {"errors": [{"code": "INJECTED", "message": "fault"}]}
                    )
                    return
                if fault is not None and fault.kind == "redirect":
                    seen.status, seen.fault = 307, "redirect"
                    self.send_response(307)
                    self.send_header("Location", fault.location.rstrip("/") + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._forward(body, seen, fault)

            def _forward(self, body: bytes, seen: Seen, fault: Fault | None) -> None:
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    headers = {
                        k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP
                    }
                    if fault is not None and fault.kind == "range" and fault.rewrite is not None:
                        seen.fault = "range"
                        asked = next((k for k in headers if k.lower() == "range"), "")
                        wanted = fault.rewrite(headers.pop(asked, ""))
                        if wanted is not None:
                            headers["Range"] = wanted
                    if body or self.command in ("POST", "PUT", "PATCH"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    seen.status = response.status
                    out_headers = [
                        (k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP
                    ]
                    length = response.getheader("Content-Length")
                    data = None
                    if length is None and self.command != "HEAD":
                        data = response.read()
                        out_headers.append(("Content-Length", str(len(data))))
                    self.send_response_only(response.status, response.reason)
                    for k, v in out_headers:
                        self.send_header(k, v)
                    self.end_headers()
                    if self.command == "HEAD":
                        return
                    if fault is not None and fault.kind == "drop":
                        seen.fault = "drop"
                        self.wfile.write(response.read(fault.after))
                        self.wfile.flush()
                        self.close_connection = True
                        # An abrupt end, mid-body, as when a network path fails.
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if fault is not None and fault.kind == "stall" and fault.release is not None:
                        seen.fault = "stall"
                        self.wfile.write(response.read(fault.after))
                        self.wfile.flush()
                        fault.release.wait(60)
                    if data is not None:
                        self.wfile.write(data)
                        return
                    while piece := response.read(1 << 16):
                        self.wfile.write(piece)
                    if fault is not None and fault.kind == "hangup":
                        seen.fault = "hangup"
                        self.close_connection = True
                finally:
                    conn.close()

            def _reply(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        return Handler

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
