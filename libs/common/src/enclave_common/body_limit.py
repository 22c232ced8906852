"""A limit on a request body's size (413) and on how long it may take to arrive (408).

FastAPI reads and parses a route's declared body before it resolves the route's dependencies, so
before the access guard: without a limit, a client without a token made the gateway read and parse a
body of any size (a 250 MiB JSON array took it from 0.5 to 1.7 GiB before its 401), or held a
connection open with a body that never ended. This ASGI middleware runs before routing and
authentication. A declared Content-Length over ``max_bytes`` is refused before any of the body is
read; a body without one (chunked) is counted as the route reads it and refused once past the limit;
a body the client takes more than ``timeout_s`` to send (time spent waiting for it, in all) is
refused 408. The answer closes the connection; nothing sent is echoed. The route then sees the client
as gone (``http.disconnect``), and what it answers is dropped. The refusal's status and code are
noted in the request's state (:func:`body_refusal`), so a route that records its requests records the
answer the client got, not a client that left.

Every service's HTTP app has it (``max_body_bytes``, ``ENCLAVE_<SERVICE>_MAX_BODY_BYTES``;
``body_timeout_s``, ``ENCLAVE_<SERVICE>_BODY_TIMEOUT_S``). Routes that read their own bodies with
limits and a pace rule of their own (the gateway's uploads) are named to ``ServiceRuntime.http_app``
by their path templates and are exempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from enclave_common.header_limit import ErrorBody, refuse

BODY_TOO_LARGE = 413
BODY_TIMEOUT = 408

_DISCONNECT: Message = {"type": "http.disconnect"}
#: The key in the ASGI scope's ``state`` (Starlette's ``request.state``) under which a refusal is noted.
REFUSAL_STATE_KEY = "body_limit_refusal"


def body_refusal(scope: Scope) -> tuple[int, str] | None:
    """The (status, code) this middleware answered the request with when it refused its body (413
    ``body_too_large``, 408 ``body_timeout``); None when it did not. A route reading the body then
    sees the client as gone, but the client got this answer."""
    noted = scope.get("state", {}).get(REFUSAL_STATE_KEY)
    return (noted[0], noted[1]) if isinstance(noted, tuple) else None


def route_path(scope: Scope) -> str:
    """The path routes are matched against: without the app's ``root_path`` (as Starlette does)."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, or None without one (a chunked body) or with one that is not a
    number (the HTTP server refuses that itself)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class BodyLimit:
    """``size_setting`` and ``timeout_setting``: the environment variables that set ``max_bytes`` and
    ``timeout_s``, named in the answers. ``exempt``: path templates (``/studies/{study}``) of the
    routes the limits do not apply to."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        timeout_s: float,
        size_setting: str,
        timeout_setting: str,
        error_body: ErrorBody,
        exempt: Collection[str] = (),
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.size_setting = size_setting
        self.timeout_setting = timeout_setting
        self.error_body = error_body
        self.exempt = [compile_path(template)[0] for template in exempt]

    def _is_exempt(self, scope: Scope) -> bool:
        path = route_path(scope)
        return any(pattern.match(path) for pattern in self.exempt)

    def _too_large(self, size: str) -> tuple[int, str, str]:
        message = f"The request body is {size}; at most {self.max_bytes} bytes are allowed here ({self.size_setting})"
        return BODY_TOO_LARGE, "body_too_large", message

    def _too_slow(self) -> tuple[int, str, str]:
        message = (
            f"The request body did not arrive within {self.timeout_s:g} seconds ({self.timeout_setting})"
        )
        return BODY_TIMEOUT, "body_timeout", message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_exempt(scope):
            await self.app(scope, receive, send)
            return
        # Taken before the app runs: a middleware inside may copy the scope, not its state.
        state = scope.setdefault("state", {})
        declared = declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            status, code, message = self._too_large(f"{declared} bytes (Content-Length)")
            state[REFUSAL_STATE_KEY] = (status, code)
            await refuse(send, status, self.error_body(status, code, message))
            return

        loop = asyncio.get_running_loop()
        received = 0
        waited = 0.0
        complete = False
        refused = False
        started = False

        async def refuse_once(status: int, code: str, message: str) -> Message:
            nonlocal refused
            refused = True
            if not started:  # else the answer under way is cut off, and the connection with it
                state[REFUSAL_STATE_KEY] = (status, code)
                await refuse(send, status, self.error_body(status, code, message))
            return _DISCONNECT

        async def bounded_receive() -> Message:
            nonlocal received, waited, complete
            if refused:
                return _DISCONNECT
            if complete:  # the body is in; what the route waits for now is the client leaving
                return await receive()
            began = loop.time()
            try:
                async with asyncio.timeout(self.timeout_s - waited):
                    message = await receive()
            except TimeoutError:
                return await refuse_once(*self._too_slow())
            finally:
                waited += loop.time() - began
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    return await refuse_once(*self._too_large(f"over {self.max_bytes} bytes"))
                complete = not message.get("more_body", False)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:  # the refusal was answered; what the route answers after it goes nowhere
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # What a route raised at a body it was refused (the client is gone to it): answered.
