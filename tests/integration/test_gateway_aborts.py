"""A client that closes the connection in the middle of an upload's body, on a raw socket, against a
gateway process of its own (its log and its metrics are this test's alone).

The request is counted and logged as 499 "client closed request" (nginx's convention), at info, not
as a 500 with an error-level traceback that ``EnclaveHTTPErrorsHigh`` and the runbook's "500: a bug"
would read as a gateway failure; the access trail records the upload as rejected, saying why; and
nothing of the request reaches the upload topics, not even an instance the client had sent whole
before it left. Until the sixteenth session Starlette's ``ClientDisconnect`` escaped the route.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
from enclave_common import topics

from .support import mr_instance
from .test_gateway_support import TopicWatch, bearer, builders, gateway_process, new_tenant

UPLOAD_TOPICS = (topics.UPLOAD_CHUNK, topics.UPLOAD_RECEIVED, topics.UPLOAD_COMPLETED)
#: nginx's $request_id: recorded as the same 128 bits in UUID form.
NGINX_ID = "5d0c7a1e9b3f4c2a8e6d1f0b7c9a3e5d"
RECORDED_ID = "5d0c7a1e-9b3f-4c2a-8e6d-1f0b7c9a3e5d"


@pytest.fixture(scope="module")
def own_gateway(tmp_path_factory: pytest.TempPathFactory):
    with gateway_process(tmp_path_factory.mktemp("gw-aborts"), {}) as gateway:
        yield gateway


async def _post_and_close(port: int, path: str, token: str, body: builders.Body, sent: int) -> None:
    """Declare the whole body, send its first ``sent`` bytes, then close the socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {body.content_type}\r\nContent-Length: {len(body.data)}\r\n"
        f"X-Request-ID: {NGINX_ID}\r\n\r\n"
    ).encode()
    writer.write(head + body.data[:sent])
    await writer.drain()
    await asyncio.sleep(0.5)  # the gateway reads what arrived, and waits for the rest
    writer.close()
    await writer.wait_closed()


def _counted(metrics: str, route: str, status: int) -> float:
    pattern = (
        rf'enclave_http_requests_total\{{method="POST",route="{re.escape(route)}",status="{status}"\}} (\S+)'
    )
    found = re.search(pattern, metrics)
    return float(found.group(1)) if found else 0.0


async def _wait_counted(url: str, route: str, status: int, expected: float) -> str:
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            metrics = (await client.get(f"{url}/metrics")).text
            if _counted(metrics, route, status) >= expected or time.monotonic() > deadline:
                return metrics
            await asyncio.sleep(0.2)


@pytest.mark.parametrize(
    ("route", "body_of", "whole_first"),
    [
        # The reviewer's repro: two instances declared (~20 KB), 5,000 bytes sent.
        ("/dicomweb/studies", builders.multipart_body, False),
        # The first instance whole (validated and sealed in the gateway), the second cut.
        ("/dicomweb/studies", builders.multipart_body, True),
        ("/api/v1/imaging/upload", builders.form_data_body, True),
    ],
)
async def test_an_upload_the_client_abandons_is_a_499_that_hands_nothing_off(
    own_gateway, route: str, body_of, whole_first: bool
) -> None:
    tenant = new_tenant("it-abort")
    token = bearer("it-pacs", tenant, "uploader")["Authorization"].removeprefix("Bearer ")
    first, second = mr_instance()[0], mr_instance()[0]
    body = body_of([first, second])
    sent = body.data.index(second) + 1000 if whole_first else 5000
    async with httpx.AsyncClient(timeout=10) as client:
        before = (await client.get(f"{own_gateway.url}/metrics")).text
    log_size = own_gateway.log_path.stat().st_size

    async with TopicWatch(*UPLOAD_TOPICS, topics.ACCESS_RECORDED) as watch:
        await _post_and_close(own_gateway.port, route, token, body, sent)
        metrics = await _wait_counted(own_gateway.url, route, 499, _counted(before, route, 499) + 1)
        published = await watch.read(lambda env: env.tenant == tenant)

    assert _counted(metrics, route, 499) == _counted(before, route, 499) + 1
    assert _counted(metrics, route, 500) == _counted(before, route, 500)
    access_type = topics.event_type(topics.ACCESS_RECORDED)
    assert [e.type for e in published if e.type != access_type] == []
    access = [e for e in published if e.type == access_type]
    assert [
        (e.data["action"], e.data["outcome"], e.data["status_code"], e.data["detail"]) for e in access
    ] == [
        ("upload", "rejected", 499, "client_closed_request"),  # not preceded by a success 200 any more
    ]
    assert {e.correlation_id for e in access} == {RECORDED_ID}

    with own_gateway.log_path.open("rb") as log:
        log.seek(log_size)
        lines = [json.loads(line) for line in log.read().splitlines() if line.startswith(b"{")]
    assert [line for line in lines if line.get("level") in ("error", "critical")] == []
    assert not any("Exception in ASGI application" in line.get("event", "") for line in lines)
    (request,) = [
        line for line in lines if line.get("event") == "http request" and line.get("route") == route
    ]
    assert (request["status"], request["level"]) == (499, "info")
    assert own_gateway.alive()


async def test_the_gateway_takes_the_same_upload_sent_whole(own_gateway) -> None:
    """The control: after the aborts, the same kind of request, completed, is stored."""
    tenant = new_tenant("it-abort")
    body = builders.multipart_body([mr_instance()[0], mr_instance()[0]])
    async with TopicWatch(topics.UPLOAD_COMPLETED) as watch:
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.post(
                f"{own_gateway.url}/dicomweb/studies",
                content=body.data,
                headers={**bearer("it-pacs", tenant, "uploader"), "Content-Type": body.content_type},
            )
        assert answer.status_code == 200, answer.text
        completed = await watch.read(lambda env: env.tenant == tenant)
    assert [e.data["accepted"] for e in completed] == [2]
