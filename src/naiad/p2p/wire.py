"""Small helpers for the JSON-over-HTTP API between peers and schedulers: reading bodies strictly."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

MAX_BODY = 8 << 20


def bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; 400 for anything else."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise bad_request("body too large")
    try:
        body = await request.json()
    except ValueError:
        raise bad_request("body is not JSON") from None
    if not isinstance(body, dict):
        raise bad_request("body is not a JSON object")
    return body


def field(body: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    """body[name], checked to be of `kind` (bool is not an int here); 400 if missing or wrong."""
    if name not in body:
        if default is ...:
            raise bad_request(f"missing field {name}")
        return default
    value = body[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad_request(f"field {name} must be {kind.__name__}")
    return value


def int_list(body: dict[str, Any], name: str, limit: int) -> list[int]:
    values = field(body, name, list, [])
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
    if len(values) > limit or not ok:
        raise bad_request(f"field {name} must be a list of at most {limit} piece indices")
    return values
