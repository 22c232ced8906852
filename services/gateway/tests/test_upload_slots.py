"""The bound on uploads received at once (``ENCLAVE_GATEWAY_MAX_CONCURRENT_UPLOADS``).

Each upload in progress holds about 1 to 2.5 MiB outside the spool's budgets, and until the
eighteenth session nothing bounded how many ran at once. At the limit an upload is taken; past it
it is answered 503 ``too_many_uploads`` with ``Retry-After`` before its body is read, recorded as a
rejected upload, and nothing of it is handed off. Other routes do not count. A slot is given back
however the upload ends: answered, refused, abandoned by its client (499), failed on a bug, or
cancelled."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from corpus import builders
from enclave_common import topics
from route_harness import Exchange, Harness, asgi_request, gateway_routes, stow_request

UPLOAD_TOPICS = {topics.UPLOAD_CHUNK, topics.UPLOAD_RECEIVED, topics.UPLOAD_COMPLETED}
ROUTES = {
    "/dicomweb/studies": builders.multipart_body,
    "/api/v1/imaging/upload": builders.form_data_body,
}


def upload(
    harness: Harness, route: str = "/dicomweb/studies", *, instance: bytes | None = None, **kwargs: Any
) -> Any:
    """The request of one upload (a coroutine): the body in two pieces, so ``hold`` stops it half-way."""
    body = ROUTES[route]([instance if instance is not None else builders.make_instance()])  # type: ignore[operator]
    half = len(body.data) // 2
    return asgi_request(
        harness.app,
        "POST",
        route.encode(),
        [
            ("authorization", f"Bearer {harness.token('hospital-a', 'uploader')}"),
            ("content-type", body.content_type),
        ],
        [body.data[:half], body.data[half:]],
        **kwargs,
    )


async def in_progress(harness: Harness, count: int) -> None:
    for _ in range(1000):
        if harness.uploads.slots.in_use == count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{harness.uploads.slots.in_use} uploads in progress, not {count}")


def metric(harness: Harness, name: str, **labels: str) -> float | None:
    return harness.registry.get_sample_value(name, labels)


@pytest.mark.parametrize("route", sorted(ROUTES))
async def test_at_the_limit_uploads_are_taken_and_just_past_it_refused_before_the_body_is_read(
    tmp_path: Path, route: str
) -> None:
    harness = gateway_routes(tmp_path, max_concurrent_uploads=2)
    hold = asyncio.Event()
    held = [asyncio.ensure_future(upload(harness, route, hold=hold)) for _ in range(2)]
    await in_progress(harness, 2)
    assert metric(harness, "enclave_gateway_uploads_in_progress") == 2

    refused: Exchange = await upload(harness, route)

    assert refused.status == 503
    assert refused.header("retry-after") == "10"
    assert refused.header("content-type") == "application/json"
    body = json.loads(refused.body)
    assert body == {"status": 503, "error": "too_many_uploads", "message": body["message"]}
    assert "receiving 2 uploads, the most it takes at once" in body["message"]
    assert "ENCLAVE_GATEWAY_MAX_CONCURRENT_UPLOADS=2" in body["message"]
    assert "nothing of this upload was read or kept" in body["message"]
    assert refused.body_messages_read == 0, "the body of a refused upload is not read"
    assert not UPLOAD_TOPICS & set(harness.publisher.topics())
    assert harness.read_model.docs == {}
    mine = [
        e for e in harness.publisher.access_events() if e["correlation_id"] == refused.header("x-request-id")
    ]
    assert [(e["action"], e["outcome"], e["status_code"], e["detail"]) for e in mine] == [
        ("upload", "rejected", 503, "too_many_uploads"),  # the answer, not the allowed decision before it
    ]
    assert metric(harness, "enclave_gateway_uploads_refused_total", reason="too_many_uploads") == 1
    assert harness.requests_counted(route, 503) == 1

    hold.set()
    for answer in await asyncio.gather(*held):
        assert answer.status == 200, answer.body  # the second of two at a limit of two was taken
    assert harness.uploads.slots.in_use == 0
    assert metric(harness, "enclave_gateway_uploads_in_progress") == 0
    assert (await upload(harness, route)).status == 200


async def test_other_routes_are_answered_while_every_upload_slot_is_held(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path, max_concurrent_uploads=1)
    hold = asyncio.Event()
    held = asyncio.ensure_future(upload(harness, hold=hold))
    await in_progress(harness, 1)
    clinician = [("authorization", f"Bearer {harness.token('hospital-a', 'clinician')}")]
    status = await asgi_request(
        harness.app, "GET", b"/api/v1/imaging/01890a5d-ac96-774b-bcce-b302099a8057", clinician
    )
    assert status.status == 404  # answered (no such instance), not refused for want of a slot
    patient = await asgi_request(harness.app, "GET", b"/api/v1/imaging/patient/P-1", clinician)
    assert patient.status == 200
    health = await asgi_request(harness.app, "GET", b"/healthz", [])
    assert health.status == 200
    assert harness.uploads.slots.in_use == 1
    hold.set()
    assert (await held).status == 200


async def _answered(harness: Harness) -> Exchange:
    return await upload(harness)


async def _all_refused(harness: Harness) -> Exchange:
    return await upload(harness, instance=b"not DICOM at all" * 20)  # 409: no instance stored


async def _request_error(harness: Harness) -> Exchange:
    return await asgi_request(
        harness.app,
        "POST",
        b"/dicomweb/studies",
        [
            ("authorization", f"Bearer {harness.token('hospital-a', 'uploader')}"),
            ("content-type", "multipart/related; type=application/dicom"),  # no boundary: 400
        ],
        [b"--x\r\n\r\n"],
    )


async def _abandoned(harness: Harness) -> Exchange:
    body = builders.multipart_body([builders.make_instance()])
    return await stow_request(harness, [body.data[:1000]], content_type=body.content_type, disconnect=True)


async def _failed_on_a_bug(harness: Harness) -> Exchange:
    async def broken(*_: Any) -> None:
        raise RuntimeError("a bug in the read model")

    harness.read_model.record_uploads = broken  # type: ignore[method-assign]
    exchange = Exchange()
    with pytest.raises(RuntimeError, match="a bug in the read model"):
        await upload(harness, exchange=exchange)
    del harness.read_model.record_uploads  # the next upload is recorded again
    return exchange


async def _cancelled(harness: Harness) -> Exchange:
    exchange = Exchange()
    task = asyncio.ensure_future(upload(harness, hold=asyncio.Event(), exchange=exchange))
    await in_progress(harness, 1)
    task.cancel()  # a stop that cancels the requests still open (HTTP_DRAIN_S)
    with pytest.raises(asyncio.CancelledError):
        await task
    return exchange


@pytest.mark.parametrize(
    ("ending", "status"),
    [
        (_answered, 200),
        (_all_refused, 409),
        (_request_error, 400),
        (_abandoned, 499),
        (_failed_on_a_bug, 500),
        (_cancelled, 500),  # request_cancelled, answered by the gateway before the cancellation goes on
    ],
    ids=["answered", "all-refused", "request-error", "client-abort", "bug", "cancelled"],
)
async def test_the_slot_is_given_back_however_the_upload_ends(
    tmp_path: Path, ending: Callable[[Harness], Any], status: int
) -> None:
    harness = gateway_routes(tmp_path, max_concurrent_uploads=1)
    for _ in range(3):  # a slot kept once would refuse every later upload at a limit of one
        exchange = await ending(harness)
        assert exchange.status == status, exchange.body
        if ending is _cancelled:
            assert json.loads(exchange.body)["error"] == "request_cancelled"
            assert exchange.header("x-request-id")
        assert harness.uploads.slots.in_use == 0
    after = await upload(harness)
    assert after.status == 200, after.body
    assert metric(harness, "enclave_gateway_uploads_refused_total", reason="too_many_uploads") == 0
