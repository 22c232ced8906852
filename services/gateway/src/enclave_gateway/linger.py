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

So, on the upload routes, an answer that comes before the body ended is held while the rest of the
body is read and dropped: it goes out as it is once the body ends, and with ``Connection: close``
(uvicorn then closes the connection after it) when the body stays silent for ``idle_s`` or is not in
after ``total_s``. A request that asked for ``100-continue`` and sent nothing yet is answered at once
with ``Connection: close``: its client waits for that answer before it sends the body. Written by hand:
neither uvicorn nor Starlette bounds this.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from enclave_common.body_limit import route_path
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: As nginx's ``lingering_timeout``: the longest silence while the rest of a refused body is dropped.
LINGER_IDLE_S = 5.0
#: As nginx's ``lingering_time``: the longest the rest of a refused body is read for.
LINGER_TOTAL_S = 30.0


class LingeringAnswer:
    """``routes``: path templates (``/studies/{study}``) of the routes that read their own bodies."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Collection[str],
        idle_s: float = LINGER_IDLE_S,
        total_s: float = LINGER_TOTAL_S,
    ) -> None:
        self.app = app
        self.routes = [compile_path(template)[0] for template in routes]
        self.idle_s = idle_s
        self.total_s = total_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not any(p.match(route_path(scope)) for p in self.routes):
            await self.app(scope, receive, send)
            return
        body_ended = False  # the last body message was received, or the client left
        received_any = False
        held: Message | None = None  # the answer's start, while the rest of the body is dropped
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

        async def drained() -> bool:
            """Read and drop the rest of the body: True when it ended in time."""
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.total_s
            while not body_ended:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                try:
                    async with asyncio.timeout(min(self.idle_s, remaining)):
                        message = await tracked_receive()
                except TimeoutError:
                    return False
                if message["type"] == "http.disconnect":
                    return False
            return True

        async def lingering_send(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and not body_ended:
                held = message
                return
            if held is not None and message["type"] == "http.response.body":
                start, held = held, None
                waits_for_answer = expects_continue and not received_any
                if message.get("more_body", False) or waits_for_answer or not await drained():
                    start = {**start, "headers": [*start.get("headers", ()), (b"connection", b"close")]}
                await send(start)
            await send(message)

        await self.app(scope, tracked_receive, lingering_send)
