"""What an upload route answers before it has read the whole body: the rest is read and dropped
first, for a bounded time, as nginx's lingering close does.

An upload can be answered before its body is in: 401/403/429 from the access guard, 503
``too_many_uploads`` or ``spool_unavailable``, 413 past a size limit, 400 for a malformed body, 408
for a body too slow. uvicorn (0.54, httptools) then reads and drops the rest of the body itself, but
any byte that arrives after the answer cancels its keep-alive timer and nothing starts it again: a
client that sent one more chunk and stopped held its connection for good, outside every pace rule
(found by the eighteenth session's review; the 401 path had always done so). Answering with
``Connection: close`` at once instead would make the kernel reset the connection over the unread
bytes, and a client still sending (most send the whole body before they read) would see the reset,
not the answer.

So, on the upload routes, an answer that comes before the body ended goes out at once, with
``Connection: close``, all but its end: a client that reads while it sends (curl, Go) stops sending.
Then the rest of the body is read and dropped, for as long as it keeps arriving (never silent for
``idle_s``, in all ``total_s``), as nginx's lingering close does, and only then is the answer ended and
the connection closed: a client that reads the answer only once it has sent its body gets it, not a
reset, whenever it sent the body in time. The drain runs after the app returned, so the request's
latency, access log and span do not count it; at most ``max_draining`` drains run at once, past it
the answer ends at once. A request that asked for ``100-continue`` and sent nothing yet is not
drained: its client sends no body after the answer. Written by hand: neither uvicorn nor Starlette
bounds this.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable

from enclave_common.body_limit import route_path
from enclave_common.service import route_templates
from starlette.routing import BaseRoute, Route, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: As nginx's ``lingering_timeout``: the longest silence while the rest of a refused body is dropped.
LINGER_IDLE_S = 5.0
#: As nginx's ``lingering_time``: the longest the rest of a refused body is read for.
LINGER_TOTAL_S = 30.0
#: Drains running at once per process, past which an answer ends without one (each holds a task and
#: up to uvicorn's 64 KiB read buffer for at most ``LINGER_TOTAL_S``).
MAX_DRAINING = 256


#: Methods whose requests carry no body the routes read (RFC 9110 gives them no defined body meaning).
BODILESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def body_routes(routes: Iterable[BaseRoute]) -> tuple[str, ...]:
    """Path templates of the routes that take a request body (any method but GET, HEAD and OPTIONS),
    those of included routers too: each may be answered before its body ended (the common body limit's
    413 and 408 part-way, or the uploads' own refusals), so each drains the rest. Derived from the app,
    not listed by hand: until the twenty-first session a new route with a body had to be added to a
    list, or a refusal part-way could reach its client as a reset connection."""
    return tuple(
        dict.fromkeys(
            path
            for path, route in route_templates(routes)
            if isinstance(route, Route) and set(route.methods or ()) - BODILESS_METHODS
        )
    )


def declares_body(scope: Scope) -> bool:
    """Whether the request has a body (RFC 9112 6.3): a Transfer-Encoding, or a Content-Length other
    than 0. Without either, an HTTP/1.1 request has none."""
    chunked = False
    length = b""
    for name, value in scope.get("headers", ()):
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            chunked = True
        elif lowered == b"content-length":
            length = value.strip()
    return chunked or length.lstrip(b"0") != b""


class LingeringAnswer:
    """``routes``: path templates (``/studies/{study}``) of the routes that read their own bodies."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Collection[str],
        idle_s: float = LINGER_IDLE_S,
        total_s: float = LINGER_TOTAL_S,
        max_draining: int = MAX_DRAINING,
    ) -> None:
        self.app = app
        self.routes = [compile_path(template)[0] for template in routes]
        self.idle_s = idle_s
        self.total_s = total_s
        self.max_draining = max_draining
        self.draining = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not any(p.match(route_path(scope)) for p in self.routes):
            await self.app(scope, receive, send)
            return
        # The last body message was received, or the client left; or no body was declared (a DELETE
        # answered without reading one keeps its connection, not a ``Connection: close``).
        body_ended = not declares_body(scope)
        received_any = False
        lingering = False  # the answer started before the body ended
        end_held = False  # its last body message is held until the drain is over
        expects_continue = any(
            name.lower() == b"expect" and value.lower() == b"100-continue"
            for name, value in scope.get("headers", ())
        )

        async def tracked_receive() -> Message:
            nonlocal body_ended, received_any
            message = await receive()
            if message["type"] == "http.request":
                received_any = True
                body_ended = not message.get("more_body", False)
            else:
                body_ended = True  # http.disconnect: nothing more will come
            return message

        async def lingering_send(message: Message) -> None:
            nonlocal lingering, end_held
            if message["type"] == "http.response.start" and not body_ended:
                lingering = True
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"connection" for name, _ in headers):
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            elif lingering and message["type"] == "http.response.body" and not message.get("more_body"):
                end_held = True
                message = {**message, "more_body": True}
            await send(message)

        await self.app(scope, tracked_receive, lingering_send)
        if not end_held:
            return
        if not (expects_continue and not received_any) and self.draining < self.max_draining:
            self.draining += 1
            try:
                await self._drain(tracked_receive, lambda: body_ended)
            finally:
                self.draining -= 1
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _drain(self, receive: Receive, ended: Callable[[], bool]) -> None:
        """Read and drop the rest of the body until it ends, stays silent ``idle_s`` or ``total_s``
        passed, or the client leaves."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_s
        while not ended():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(min(self.idle_s, remaining)):
                    message = await receive()
            except TimeoutError:
                return
            if message["type"] == "http.disconnect":
                return
