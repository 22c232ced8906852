"""A limit on the size of a request's head (request line and headers): 431 with what is allowed.

Uvicorn's HTTP parser has a limit of its own (httptools refused ~200 KiB, accepted 70 KiB in one
header line), but it is not configurable and answers with a bare 400. This ASGI middleware runs before
routing, authentication and the body, so an oversized head costs nothing downstream. Every service's
HTTP app has it (``max_header_bytes``, ``ENCLAVE_<SERVICE>_MAX_HEADER_BYTES``). Hand-written because
Starlette has no such middleware; it is a few lines.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

#: Builds a service's error body from (status, code, message, **fields the error adds): each service
#: keeps its own shape.
ErrorBody = Callable[..., dict[str, Any]]

HEADERS_TOO_LARGE = 431


def head_size(scope: Scope) -> int:
    """Bytes of the request line and headers as sent (name, ": ", value, CRLF per header)."""
    target = scope.get("raw_path") or scope.get("path", "").encode()
    query = scope.get("query_string") or b""
    line = len(scope.get("method", "")) + 1 + len(target) + (1 + len(query) if query else 0) + 11
    return line + sum(len(name) + len(value) + 4 for name, value in scope.get("headers", ()))


class HeaderSizeLimit:
    """``setting``: the environment variable that sets ``max_bytes``, named in the answer."""

    def __init__(self, app: ASGIApp, max_bytes: int, setting: str, error_body: ErrorBody) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.setting = setting
        self.error_body = error_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = head_size(scope)
            if size > self.max_bytes:
                message = (
                    f"The request line and headers are {size} bytes; at most {self.max_bytes} bytes are "
                    f"allowed ({self.setting})"
                )
                body = self.error_body(HEADERS_TOO_LARGE, "headers_too_large", message)
                await refuse(send, HEADERS_TOO_LARGE, body)
                return
        await self.app(scope, receive, send)


async def refuse(send: Send, status: int, body: dict[str, Any]) -> None:
    """Answer ``status`` with ``body`` (JSON) and close the connection: what the client sent past the
    head is not read."""
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
