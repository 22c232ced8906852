"""X-Request-ID: a client's request id is recorded in one form (a lowercase UUID with dashes) whether
it sent a UUID in any case or nginx's 32 hex digits, and every answer names the id its request was
recorded under, also when the gateway replaced what the client sent (free text could carry PHI).
Until the sixteenth session only a lowercase dashed UUID survived (an uppercase one was recorded
lowercased, so the client's own search found nothing), anything else was replaced silently, and no
answer said which id was used."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from enclave_common.envelope import canonical_request_id
from route_harness import Exchange, Harness, asgi_request, gateway_routes

NGINX_ID = "6f1c9d0b2a4e4f7c8d3b5a1e9f0c2d4b"


def _clinician(harness: Harness) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {harness.token('hospital-a', 'clinician')}")]


@pytest.mark.parametrize(
    ("sent", "recorded"),
    [
        ("0190A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B", "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"),
        ("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"),
        (NGINX_ID, "6f1c9d0b-2a4e-4f7c-8d3b-5a1e9f0c2d4b"),
        (NGINX_ID.upper(), "6f1c9d0b-2a4e-4f7c-8d3b-5a1e9f0c2d4b"),
        (f" {NGINX_ID} ", "6f1c9d0b-2a4e-4f7c-8d3b-5a1e9f0c2d4b"),
    ],
)
async def test_a_uuid_or_an_nginx_request_id_is_recorded_and_answered_in_one_form(
    tmp_path: Path, sent: str, recorded: str
) -> None:
    harness = gateway_routes(tmp_path)
    exchange = await asgi_request(
        harness.app, "GET", b"/api/v1/imaging/patient/PX-1", [*_clinician(harness), ("x-request-id", sent)]
    )
    assert exchange.status == 200
    assert exchange.header("x-request-id") == recorded
    assert [e["correlation_id"] for e in harness.publisher.access_events()] == [recorded]


@pytest.mark.parametrize(
    "sent",
    [
        "PHI-MRN-77123-ZX",
        "{0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b}",
        "urn:uuid:0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        NGINX_ID[:-1],
        NGINX_ID + "0",
        NGINX_ID[:-1] + "g",
        "",
    ],
)
async def test_anything_else_is_replaced_and_the_answer_names_the_replacement(
    tmp_path: Path, sent: str
) -> None:
    harness = gateway_routes(tmp_path)
    exchange = await asgi_request(
        harness.app, "GET", b"/api/v1/imaging/patient/PX-1", [*_clinician(harness), ("x-request-id", sent)]
    )
    used = exchange.header("x-request-id")
    assert used is not None and uuid.UUID(used).version == 7 and str(uuid.UUID(used)) == used
    (event,) = harness.publisher.access_events()
    assert event["correlation_id"] == used
    if sent:
        assert sent not in json.dumps(event) and sent.encode() not in exchange.body


def test_canonical_request_id_refuses_what_is_no_id() -> None:
    assert canonical_request_id(None) is None
    assert (
        canonical_request_id("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b\n")
        == "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
    )
    assert canonical_request_id("0190a1b2c3d4-7e5f-8a9b-0c1d2e3f4a5b") is None  # dashes misplaced
    assert canonical_request_id("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b-0") is None


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", b"/api/v1/imaging/patient/PX-1", [], 401),  # no token
        ("GET", b"/dicomweb/studies/1.2.3/series", [], 404),  # no route
        ("GET", b"/dicomweb/studies", [], 405),
        ("HEAD", b"/api/v1/imaging/patient/PX-1", [], 401),
        ("GET", b"/healthz", [], 200),
        ("GET", b"/api/v1/imaging/patient/PX-1", [("x-big", "x" * 40_000)], 431),
    ],
)
async def test_every_answer_names_its_request_id(
    tmp_path: Path, method: str, path: bytes, headers: list[tuple[str, str]], status: int
) -> None:
    harness = gateway_routes(tmp_path)
    exchange = await asgi_request(harness.app, method, path, [*headers, ("x-request-id", NGINX_ID)])
    assert exchange.status == status
    assert exchange.header("x-request-id") == "6f1c9d0b-2a4e-4f7c-8d3b-5a1e9f0c2d4b"


async def _read_status(harness: Harness, exchange: Exchange) -> None:
    """A clinician's status read with an nginx request id, whose answer ``exchange`` keeps (the app
    may raise after it answered)."""
    await asgi_request(
        harness.app,
        "GET",
        b"/api/v1/imaging/0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        [*_clinician(harness), ("x-request-id", NGINX_ID)],
        exchange=exchange,
    )


async def test_a_bug_is_answered_500_with_the_request_id_and_still_raised_for_the_log(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    harness.read_model.broken = RuntimeError("a bug")
    exchange = Exchange()
    with pytest.raises(RuntimeError, match="a bug"):
        await _read_status(harness, exchange)
    assert exchange.status == 500
    assert exchange.header("x-request-id") == "6f1c9d0b-2a4e-4f7c-8d3b-5a1e9f0c2d4b"
    body = json.loads(exchange.body)
    assert (body["status"], body["error"]) == (500, "internal_error")
    assert "X-Request-ID" in body["message"]


async def test_a_request_the_server_cancels_is_answered_500_with_the_request_id(tmp_path: Path) -> None:
    """uvicorn cancels what still runs when its graceful-shutdown timeout ends and answers a plain 500
    itself if nothing was sent; the gateway answers first, with the header and its error shape."""
    harness = gateway_routes(tmp_path)

    async def cancelled(_: str) -> None:
        raise asyncio.CancelledError

    harness.read_model.get = cancelled  # type: ignore[method-assign]
    exchange = Exchange()
    with pytest.raises(asyncio.CancelledError):
        await _read_status(harness, exchange)
    assert exchange.status == 500
    assert exchange.header("x-request-id") == "6f1c9d0b-2a4e-4f7c-8d3b-5a1e9f0c2d4b"
    assert json.loads(exchange.body)["error"] == "request_cancelled"
