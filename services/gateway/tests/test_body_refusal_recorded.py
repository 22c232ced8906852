"""A grant or break-glass body the common body limit refused is recorded with the answer the client
got, 413 ``body_too_large`` or 408 ``body_timeout`` (docs/gateway.md, "Grants and break-glass").

After its refusal the body limit shows the route a client that left, and until the review of the
nineteenth session such a request was recorded as 499 ``client_closed_request``: an auditor read an
answer the client never got.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from route_harness import gateway_routes
from test_access_answers import PLANTED, grant_body, post_json
from test_unaudited_grants import events_of

ROUTES = {"/api/v1/grants": "admin", "/api/v1/break-glass": "clinician"}


def body_for(path: str) -> bytes:
    if path == "/api/v1/grants":
        return grant_body()
    return json.dumps({"patient_id": PLANTED, "justification": "x" * 12}).encode()


@pytest.mark.parametrize("path", sorted(ROUTES))
async def test_a_chunked_body_past_the_limit_is_recorded_413(tmp_path: Path, path: str) -> None:
    harness = gateway_routes(tmp_path)
    body = body_for(path)
    pieces = [body[:-1], *[b" " * 8192] * 10, body[-1:]]  # no Content-Length, over 64 KiB in all
    role = ROUTES[path]
    answer = await post_json(harness, path, body, role, pieces, chunked=True)
    assert answer.status == 413, answer.body
    [event] = events_of(harness, answer)
    assert (event["outcome"], event["status_code"], event["detail"]) == ("rejected", 413, "body_too_large")
    assert event["target"] is None
    assert PLANTED not in json.dumps(event)


@pytest.mark.parametrize("path", sorted(ROUTES))
async def test_a_body_that_stops_is_recorded_408(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    monkeypatch.setenv("ENCLAVE_GATEWAY_BODY_TIMEOUT_S", "0.3")
    harness = gateway_routes(tmp_path)
    body = body_for(path)
    role = ROUTES[path]
    answer = await asyncio.wait_for(
        # hold: never set, the last piece never comes
        post_json(harness, path, body, role, [body[:10], body[10:]], hold=asyncio.Event()),
        10,
    )
    assert answer.status == 408, answer.body
    [event] = events_of(harness, answer)
    assert (event["outcome"], event["status_code"], event["detail"]) == ("rejected", 408, "body_timeout")


async def test_a_client_that_leaves_mid_body_is_still_recorded_499(tmp_path: Path) -> None:
    """No refusal of the body limit: the client left, as before."""
    harness = gateway_routes(tmp_path)
    body = grant_body()
    answer = await post_json(harness, "/api/v1/grants", body, "admin", [body[:10]], disconnect=True)
    assert answer.status == 499
    [event] = events_of(harness, answer)
    assert (event["status_code"], event["detail"]) == (499, "client_closed_request")
