"""A time limit on a request's head (request line and headers): 408 with what is allowed.

Uvicorn bounds only the idle time after a response (``timeout_keep_alive``). A connection that sends
nothing, or sends its request line and headers a byte at a time (slowloris), is held open for as long
as the client likes: enough such connections take every file descriptor the service has, and no
ASGI middleware can see them, because the app is called only once the head is complete. This is
uvicorn's httptools protocol with one timer more:

* a **new connection** must complete a request's head within ``timeout_s`` of opening;
* **between requests** on a kept-alive connection, the first byte after an answer starts the same
  clock (uvicorn's keep-alive timeout still closes a connection that sends nothing); bytes of a body
  the route answered without reading count too, as uvicorn drops them and each cancels its
  keep-alive timer (before the review of the twenty-first session they did not, and a client
  answered early held its connection for good by sending one more byte);
* the clock counts time in all, not idle time, so a head that keeps trickling is cut as surely as one
  that stops.

When it runs out after part of a request arrived, the client gets 408 ``header_timeout`` in the
service's error shape, naming the setting, and the connection is closed; a connection that sent no
request at all is closed without an answer (as uvicorn closes an idle kept-alive one). A head that
completes in time is handed to the app as before, and the body, and the time the app takes, are not
counted (the body has its own limits: ``body_limit``, and the gateway's upload pace rule).

Hand-written because uvicorn has no such setting (its protocols take the timer from the loop the same
way for keep-alive); Hypercorn's ``h11_max_incomplete_size`` bounds a head's size, not its time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from enclave_common.header_limit import ErrorBody

HEADER_TIMEOUT = 408


def head_timeout_response(
    error_body: ErrorBody, timeout_s: float, setting: str, default_headers: Iterable[tuple[bytes, bytes]] = ()
) -> bytes:
    """The raw HTTP/1.1 408 a timed-out head gets: uvicorn's default headers (``date``, ``server``) as
    on every other answer, JSON in the service's error shape, then close."""
    message = (
        f"The request line and headers did not arrive within {timeout_s:g} seconds of the connection's "
        f"opening or the request's first byte ({setting}); send them at once, then the body"
    )
    payload = json.dumps(error_body(HEADER_TIMEOUT, "header_timeout", message)).encode()
    defaults = b"".join(name + b": " + value + b"\r\n" for name, value in default_headers)
    return (
        b"HTTP/1.1 408 Request Timeout\r\n" + defaults + b"content-type: application/json\r\n"
        b"content-length: " + str(len(payload)).encode() + b"\r\n"
        b"connection: close\r\n\r\n" + payload
    )


def header_timeout_protocol(
    timeout_s: float, setting: str, error_body: ErrorBody, on_timeout: Callable[[bool], None]
) -> type[HttpToolsProtocol]:
    """Uvicorn's httptools protocol with the head's time limit, for ``uvicorn.Config(http=...)``.
    ``on_timeout(answered)`` is called each time a head runs out of time: True when a request had
    begun (answered 408), False for a connection that sent none (closed)."""

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_begun = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and self._between_requests():
                self._arm()
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_begun = True
            if self._head_timer is None:  # a pipelined request, read while another was answered
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            self._head_begun = False
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            # Once an answer is complete, whatever arrives (the rest of a body the route did not read,
            # then the next head) counts in all: uvicorn drops such body bytes, and each cancels its
            # keep-alive timer, so without this a client answered early could hold the connection
            # for good. (A body the gateway drains after an early answer arrives while that answer's
            # end is held, so before it is complete: not timed here.)
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._head_timer = self.loop.call_later(timeout_s, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                # A pipelined head stalled while the request before it is answered: that answer is
                # not cut; the stalled head is answered once it is sent.
                self._arm()
                return
            if self._head_begun:
                self.transport.write(
                    head_timeout_response(error_body, timeout_s, setting, self.server_state.default_headers)
                )
            on_timeout(self._head_begun)
            self.transport.close()

    return HeaderTimeoutProtocol
