"""An upload answered before its body ended (401, 503 ``too_many_uploads``, 413 ...) reads and drops
the rest of the body for a bounded time, then answers; a client that stops sending is closed. Served
by a real uvicorn with httptools, as the gateway is: the fault was in its keep-alive handling, which
no ASGI-level harness shows."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from enclave_gateway.linger import LingeringAnswer, body_routes, declares_body
from fastapi import APIRouter, FastAPI
from starlette.types import Receive, Scope, Send

IDLE_S = 0.4
TOTAL_S = 2.0
DECLARED = 1024 * 1024


async def refuse_at_once(scope: Scope, receive: Receive, send: Send) -> None:
    """The access guard's 401: answered without reading the body."""
    if scope["type"] != "http":
        return
    body = json.dumps({"status": 401, "error": "unauthenticated"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def read_then_answer(scope: Scope, receive: Receive, send: Send) -> None:
    """An upload that read its whole body before it answered."""
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = json.dumps({"received": size}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _serve(app) -> Iterator[int]:
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, http="httptools", log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def lingering() -> Iterator[int]:
    yield from _serve(
        LingeringAnswer(refuse_at_once, routes=["/upload/{study}"], idle_s=IDLE_S, total_s=TOTAL_S)
    )


@pytest.fixture
def reading() -> Iterator[int]:
    yield from _serve(
        LingeringAnswer(read_then_answer, routes=["/upload/{study}"], idle_s=IDLE_S, total_s=TOTAL_S)
    )


@pytest.fixture
def bare() -> Iterator[int]:
    yield from _serve(refuse_at_once)


def _connect(port: int, *, length: int = DECLARED, extra: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        f"POST /upload/1.2.3 HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n".encode() + extra + b"\r\n"
    )
    sock.sendall(head)
    return sock


def _read_until_closed(sock: socket.socket, within_s: float) -> tuple[bytes, float | None]:
    """What the server sent, and after how long it closed the connection (None: still open)."""
    sock.settimeout(0.05)
    started, data = time.monotonic(), b""
    while time.monotonic() - started < within_s:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            return data, time.monotonic() - started
        data += chunk
    return data, None


def test_uvicorn_alone_holds_a_refused_upload_whose_client_stalls_for_good(bare: int) -> None:
    """Why the middleware exists: one more byte after the answer cancels uvicorn's keep-alive timer
    (0.54, httptools) and nothing closes the connection. Should this fail after an upgrade, uvicorn
    bounds it itself and linger.py can go."""
    sock = _connect(bare)
    time.sleep(0.2)  # the answer is sent
    sock.sendall(b"x" * 1024)
    data, closed_after = _read_until_closed(sock, 6.0)  # uvicorn's keep-alive timeout is 5 s
    sock.close()
    assert b" 401 " in data and closed_after is None


def test_a_refused_upload_is_answered_at_once_and_closed_after_the_idle_bound(lingering: int) -> None:
    """The answer comes while the client still sends (so a client that reads as it sends can stop);
    the connection is closed once the rest of the body stays silent for the idle bound."""
    sock = _connect(lingering)
    sock.sendall(b"x" * 1024)
    answer, _ = _read_until_closed(sock, IDLE_S / 2)
    assert b" 401 " in answer and b"connection: close" in answer.lower() and answer.endswith(b"}")
    data, closed_after = _read_until_closed(sock, 5.0)
    sock.close()
    assert data == b"" and closed_after is not None and closed_after < IDLE_S + 1.5


def test_a_refused_upload_that_trickles_is_closed_after_the_total_bound(lingering: int) -> None:
    sock = _connect(lingering)
    started, data = time.monotonic(), b""
    sock.settimeout(0.05)
    while time.monotonic() - started < TOTAL_S + 2:
        try:
            sock.sendall(b"x" * 64)  # never silent for IDLE_S, never done
        except OSError:
            break
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            time.sleep(IDLE_S / 4)
            continue
        if not chunk:
            break
        data += chunk
    elapsed = time.monotonic() - started
    sock.close()
    assert b" 401 " in data and b"connection: close" in data.lower()
    assert TOTAL_S - 0.1 <= elapsed < TOTAL_S + 1.5


def test_a_refused_upload_sent_whole_gets_its_answer_and_a_clean_close(lingering: int) -> None:
    """A client that sends its whole body before it reads (most do) reads the answer, not a reset:
    the body is drained to its end before the connection is closed."""
    sock = _connect(lingering)
    sock.sendall(b"x" * DECLARED)
    data, closed_after = _read_until_closed(sock, 5.0)
    sock.close()
    assert b" 401 " in data and b"connection: close" in data.lower() and data.endswith(b"}")
    assert closed_after is not None and closed_after < IDLE_S  # ended with the body, not by the bound


def test_at_most_max_draining_drains_run_at_once() -> None:
    """Past the bound an answer ends at once (the connection closed without a drain)."""
    for port in _serve(
        LingeringAnswer(refuse_at_once, routes=["/upload/{study}"], idle_s=5.0, total_s=10.0, max_draining=1)
    ):
        first = _connect(port)
        first.sendall(b"x" * 10)
        time.sleep(0.3)  # its drain holds the only place
        second = _connect(port)
        second.sendall(b"x" * 10)
        data, closed_after = _read_until_closed(second, 3.0)
        assert b" 401 " in data and closed_after is not None and closed_after < 1.0
        _, first_closed = _read_until_closed(first, 0.5)
        assert first_closed is None  # still draining
        first.close()
        second.close()


def test_a_refusal_before_a_100_continue_body_is_answered_at_once_and_closed(lingering: int) -> None:
    """The client waits for 100 Continue or the answer before it sends the body: it gets the answer
    at once, and no 100 Continue."""
    sock = _connect(lingering, extra=b"Expect: 100-continue\r\n")
    data, closed_after = _read_until_closed(sock, 3.0)
    sock.close()
    assert b" 401 " in data and b"100 Continue" not in data and b"connection: close" in data.lower()
    assert closed_after is not None and closed_after < IDLE_S


def test_an_upload_that_read_its_body_is_answered_as_it_is(reading: int) -> None:
    sock = _connect(reading, length=10)
    sock.sendall(b"0123456789")
    sock.settimeout(5)
    answer = sock.recv(65536)
    sock.close()
    assert b" 200 " in answer and b'{"received": 10}' in answer and b"connection: close" not in answer.lower()


def test_other_routes_are_passed_through(lingering: int) -> None:
    """Only the upload routes linger: elsewhere the answer is the app's as it is (the common body
    limit bounds those bodies)."""
    sock = socket.create_connection(("127.0.0.1", lingering), timeout=10)
    sock.sendall(b"POST /api/v1/grants HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n")
    time.sleep(0.2)
    data, _ = _read_until_closed(sock, 1.0)
    sock.close()
    assert b" 401 " in data and b"connection: close" not in data.lower()


@pytest.mark.parametrize(
    ("headers", "declared"),
    [
        ([], False),
        ([(b"content-length", b"0")], False),
        ([(b"content-length", b"00")], False),
        ([(b"content-length", b"12")], True),
        ([(b"transfer-encoding", b"chunked")], True),
        ([(b"content-length", b"0"), (b"transfer-encoding", b"chunked")], True),
    ],
)
def test_a_body_is_declared_by_a_length_or_a_transfer_encoding(headers: list, declared: bool) -> None:
    assert declares_body({"type": "http", "headers": headers}) is declared


def test_a_request_without_a_body_answered_unread_keeps_its_connection(lingering: int) -> None:
    """A DELETE, say, on a route that drains: nothing to drain, so no ``Connection: close`` and the
    connection serves the next request."""
    with socket.create_connection(("127.0.0.1", lingering), timeout=10) as sock:
        for _ in range(2):
            sock.sendall(b"DELETE /upload/1.2.3 HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = sock.recv(65536)
            assert b" 401 " in answer and b"connection: close" not in answer.lower()


def test_every_route_that_takes_a_body_drains_those_of_included_routers_too() -> None:
    """Derived from the app: a new route with a body drains without being listed anywhere."""
    inner = APIRouter()
    inner.post("/grants")(lambda: None)
    inner.delete("/grants/{grant_id}")(lambda: None)
    inner.get("/grants")(lambda: None)
    outer = APIRouter()
    outer.include_router(inner, prefix="/v1")
    outer.put("/things/{thing}")(lambda: None)
    app = FastAPI()
    app.include_router(outer, prefix="/api")
    app.get("/status")(lambda: None)
    app.patch("/status")(lambda: None)
    assert set(body_routes(app.routes)) == {
        "/api/v1/grants",
        "/api/v1/grants/{grant_id}",
        "/api/things/{thing}",
        "/status",
    }
