"""A client that closes the connection before its body ended (a PACS that timed out, a cancelled
upload): answered and counted as 499 "client closed request", nginx's convention, not as a 500 bug;
recorded as a rejected upload saying so; nothing of the request is handed off or recorded, not even
an instance that was complete and sealed before the client left (docs/gateway.md, Storing instances).

Until the sixteenth session Starlette's ``ClientDisconnect`` left the route: the request was
counted as a 500, logged at error level with a traceback, and ``EnclaveHTTPErrorsHigh`` could page.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from corpus import builders
from enclave_common import topics
from route_harness import asgi_request, gateway_routes, stow_request

UPLOAD_TOPICS = {topics.UPLOAD_CHUNK, topics.UPLOAD_RECEIVED, topics.UPLOAD_COMPLETED}


def _two_instances() -> tuple[bytes, bytes]:
    return builders.make_instance(), builders.make_instance()


@pytest.mark.parametrize(
    ("route", "body_of"),
    [
        ("/dicomweb/studies", builders.multipart_body),
        ("/api/v1/imaging/upload", builders.form_data_body),
    ],
)
async def test_an_upload_the_client_abandons_is_a_499_that_keeps_nothing(
    tmp_path: Path, route: str, body_of: object
) -> None:
    harness = gateway_routes(tmp_path)
    first, second = _two_instances()
    body = body_of([first, second])  # type: ignore[operator]
    # The first instance whole (sealed), and a part of the second: then the client is gone.
    cut = body.data.index(second) + 1000
    exchange = await asgi_request(
        harness.app,
        "POST",
        route.encode(),
        [
            ("authorization", f"Bearer {harness.token('hospital-a', 'uploader')}"),
            ("content-type", body.content_type),
            ("content-length", str(len(body.data))),
        ],
        [body.data[:5000], body.data[5000:cut]],
        disconnect=True,
    )

    assert exchange.status == 499
    assert harness.requests_counted(route, 499) == 1
    assert harness.requests_counted(route, 500) == 0
    assert not UPLOAD_TOPICS & set(harness.publisher.topics())
    assert harness.read_model.docs == {}
    [aborted] = harness.publisher.access_events()  # the request's one event: no allowed decision
    assert (aborted["action"], aborted["outcome"], aborted["status_code"], aborted["detail"]) == (
        "upload",
        "rejected",
        499,
        "client_closed_request",
    )
    assert aborted["correlation_id"] == exchange.header("x-request-id")


async def test_the_same_upload_sent_whole_is_handed_off(tmp_path: Path) -> None:
    """The control: the cut, not the instances, made the difference above."""
    harness = gateway_routes(tmp_path)
    body = builders.multipart_body(list(_two_instances()))
    exchange = await stow_request(harness, [body.data], content_type=body.content_type)
    assert exchange.status == 200
    assert set(harness.publisher.topics()) >= UPLOAD_TOPICS
    assert len(harness.read_model.docs) == 2
