"""A request's line and headers must arrive within ``http_header_timeout_s``: a connection that sends
nothing, or a head a byte at a time (slowloris), was held open by uvicorn for as long as the client
liked. Served by a real uvicorn on loopback, with the protocol ``run_service`` gives it."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from enclave_common import service
from enclave_common.header_timeout import header_timeout_protocol
from enclave_common.service import detail_error_body
from enclave_common.settings import BaseServiceSettings
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import Server

TIMEOUT_S = 0.6
SETTING = "ENCLAVE_DEMO_HTTP_HEADER_TIMEOUT_S"
HEAD = b"GET /slow HTTP/1.1\r\nHost: demo\r\nX-Padding: " + b"p" * 40 + b"\r\n\r\n"


class DemoSettings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ENCLAVE_DEMO_", extra="ignore", frozen=True)
    service_name: str = "demo"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body (``/slow``: then waits 1.5 times the limit), answers 200 with the body's
    length; ``/unread`` answers 401 at once without reading the body, as an access check does."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/unread":
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":
        await asyncio.sleep(TIMEOUT_S * 1.5)
    payload = str(size).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


@contextmanager
def serving(protocol: type[asyncio.Protocol]) -> Iterator[int]:
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        http=protocol,
        log_level="warning",
        lifespan="off",
        timeout_keep_alive=30,
    )
    server = Server(config)  # not uvicorn.Server, which a test below replaces
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def timeouts() -> list[bool]:
    return []


@pytest.fixture
def port(timeouts: list[bool]) -> Iterator[int]:
    with serving(header_timeout_protocol(TIMEOUT_S, SETTING, detail_error_body, timeouts.append)) as bound:
        yield bound


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _responses(data: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in ``data`` (each has a Content-Length)."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        found.append((status, rest[:length]))
        data = rest[length:]
    return found


def _assert_header_timeout(status: int, body: bytes) -> None:
    assert status == 408
    detail = json.loads(body)["detail"]
    assert detail["code"] == "header_timeout"
    assert (
        SETTING in detail["message"]
        and f"{TIMEOUT_S:g} seconds of the connection's opening" in detail["message"]
    )


def test_a_head_that_stops_part_way_gets_408_naming_the_setting(port: int, timeouts: list[bool]) -> None:
    with _connect(port) as sock:
        sock.sendall(HEAD[:20])
        began = time.monotonic()
        data = _read_all(sock)  # the server closes after its answer
    assert TIMEOUT_S * 0.9 <= time.monotonic() - began < TIMEOUT_S + 2
    [(status, body)] = _responses(data)
    _assert_header_timeout(status, body)
    assert b"demo" not in body  # nothing the client sent is echoed
    head = data.partition(b"\r\n\r\n")[0].lower()
    assert b"\r\ndate: " in head and b"\r\nserver: uvicorn" in head  # as on every other answer
    assert timeouts == [True]


def test_a_head_sent_a_byte_at_a_time_is_cut_at_the_limit_in_all(port: int) -> None:
    """The clock counts time in all: a head that never goes idle for long is still cut."""
    with _connect(port) as sock:
        began = time.monotonic()
        answered = b""
        for byte in HEAD[:-4]:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(TIMEOUT_S / 10)
            sock.setblocking(False)
            try:
                answered += sock.recv(65536)
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
            if answered:
                break
        answered += _read_all(sock)
    assert time.monotonic() - began < TIMEOUT_S + 2
    [(status, body)] = _responses(answered)
    _assert_header_timeout(status, body)


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(port: int, timeouts: list[bool]) -> None:
    with _connect(port) as sock:
        began = time.monotonic()
        assert _read_all(sock) == b""
    assert TIMEOUT_S * 0.9 <= time.monotonic() - began < TIMEOUT_S + 2
    assert timeouts == [False]


def test_a_head_in_time_is_served_however_long_the_route_and_the_body_take(
    port: int, timeouts: list[bool]
) -> None:
    """Only the head is timed: a route slower than the limit, and a body sent over longer than it, are
    answered."""
    body = b"x" * 30
    head = b"POST /slow HTTP/1.1\r\nHost: demo\r\nContent-Length: 30\r\nConnection: close\r\n\r\n"
    with _connect(port) as sock:
        sock.sendall(head)
        for i in range(0, 30, 10):
            time.sleep(TIMEOUT_S / 2)
            sock.sendall(body[i : i + 10])
        data = _read_all(sock)
    assert _responses(data) == [(200, b"30")]
    assert timeouts == []


def test_on_a_kept_alive_connection_the_next_head_is_timed_from_its_first_byte(port: int) -> None:
    """Idle time between requests is the keep-alive timeout's (30 s here), not this limit's; the next
    request's head gets the limit again from its first byte."""
    with _connect(port) as sock:
        sock.sendall(b"GET /fast HTTP/1.1\r\nHost: demo\r\n\r\n")
        assert sock.recv(65536).endswith(b"\r\n\r\n0")
        time.sleep(TIMEOUT_S * 1.5)  # idle, longer than the head's limit: still open
        sock.sendall(b"GET /fast HTTP/1.1\r\nHost: demo\r\n\r\n")
        assert sock.recv(65536).endswith(b"\r\n\r\n0")
        sock.sendall(b"GET /fast HTTP/1.1\r\nHo")
        data = _read_all(sock)
    [(status, body)] = _responses(data)
    _assert_header_timeout(status, body)


def test_a_client_answered_before_its_body_cannot_hold_the_connection_with_the_rest(
    port: int, timeouts: list[bool]
) -> None:
    """Answered 401 without its body being read, the client sends one byte of it and goes silent:
    uvicorn drops the byte and cancels its keep-alive timer, and held such a connection for good (the
    review of the twenty-first session). The bytes after an answer count against the limit."""
    with _connect(port) as sock:
        sock.sendall(b"POST /unread HTTP/1.1\r\nHost: demo\r\nContent-Length: 2\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 401 ")
        sock.sendall(b"x")
        began = time.monotonic()
        assert _read_all(sock) == b""
    assert time.monotonic() - began < TIMEOUT_S + 2
    assert timeouts == [False]


def test_a_stalled_pipelined_head_does_not_cut_the_answer_before_it(port: int) -> None:
    with _connect(port) as sock:
        sock.sendall(HEAD + b"GET /fast HTTP/1.1\r\nHo")
        data = _read_all(sock)
    [(first, first_body), (second, second_body)] = _responses(data)
    assert (first, first_body) == (200, b"0")
    _assert_header_timeout(second, second_body)


def test_the_limit_defaults_to_20_s_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    assert DemoSettings().http_header_timeout_s == 20.0
    monkeypatch.setenv(SETTING, "2.5")
    assert DemoSettings().http_header_timeout_s == 2.5
    for wrong in ("0", "601"):
        monkeypatch.setenv(SETTING, wrong)
        with pytest.raises(ValidationError, match="http_header_timeout_s"):
            DemoSettings()


class RecordingServer:
    configs: list[uvicorn.Config] = []

    def __init__(self, config: uvicorn.Config) -> None:
        self.configs.append(config)
        self.started = True

    def run(self, sockets: Any = None) -> None:
        pass


def test_run_service_serves_every_service_with_the_limit_in_its_error_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The protocol run_service gives uvicorn answers in the app's own error shape, names the
    service's setting, and counts each timeout in the service's registry."""
    registry = CollectorRegistry()

    def shaped(status: int, code: str, message: str, **fields: Any) -> dict[str, Any]:
        return {"error": {"status": status, "code": code, "message": message}}

    def make_app() -> FastAPI:
        built = FastAPI()
        built.state.runtime = SimpleNamespace(check_configuration=lambda: None, registry=registry)
        built.state.error_body = shaped
        return built

    RecordingServer.configs = []
    monkeypatch.setattr(uvicorn, "Server", RecordingServer)
    monkeypatch.setattr(service, "configure_logging", lambda *_: None)
    monkeypatch.setattr("sys.argv", ["enclave-demo"])
    monkeypatch.setenv(SETTING, str(TIMEOUT_S))
    service.run_service(make_app, DemoSettings())
    [config] = RecordingServer.configs
    assert isinstance(config.http, type) and issubclass(config.http, HttpToolsProtocol)

    with serving(config.http) as bound, _connect(bound) as sock:
        sock.sendall(HEAD[:10])
        data = _read_all(sock)
        with _connect(bound) as idle:
            assert _read_all(idle) == b""
    [(status, body)] = _responses(data)
    error = json.loads(body)["error"]
    assert (status, error["code"]) == (408, "header_timeout")
    assert SETTING in error["message"]

    def count(answered: str) -> float | None:
        return registry.get_sample_value("enclave_http_header_timeouts_total", {"answered": answered})

    assert (count("true"), count("false")) == (1.0, 1.0)
