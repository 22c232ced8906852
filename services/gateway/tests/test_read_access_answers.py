"""A read or query is recorded once its answer was read from the gateway's database, before it is
sent, and its event claims the answer the client got (docs/gateway.md, "Status codes common to every
route").

Until the twentieth session an allowed read or query was recorded at its decision, as ``success``
with status 200, and the data was read after that: a lookup the database did not answer was answered
503 while its record said 200. A status read whose first lookup (the one the decision needs) failed
was not recorded at all, and the status and analysis routes read the instance's record twice.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from enclave_common import topics
from pymongo.errors import ServerSelectionTimeoutError
from route_harness import PSEUDONYMIZER, Exchange, Harness, asgi_request, gateway_routes
from test_access_answers import the_event

IMAGING_ID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
ANALYSIS_ID = "an-" + "0" * 32
PLANTED = "PHI-MRN-55102-QZ"
PATIENT_KEY = PSEUDONYMIZER.pseudonym("hospital-a", "patient", PLANTED)


def stored(harness: Harness, **fields: Any) -> None:
    harness.read_model.docs[IMAGING_ID] = {
        "_id": IMAGING_ID,
        "tenant": "hospital-a",
        "upload_id": "up-1",
        "patient_key": PATIENT_KEY,
        "study_key": "st-1",
        **fields,
    }


async def get(harness: Harness, path: str, role: str = "clinician") -> Exchange:
    headers = [("authorization", f"Bearer {harness.token('hospital-a', role)}")]
    return await asgi_request(harness.app, "GET", path.encode(), headers)


async def silent(*_: object, **__: object) -> None:
    raise ServerSelectionTimeoutError("no server answered")


READS = [
    (f"/api/v1/imaging/{IMAGING_ID}", "read_status", "get"),
    (f"/api/v1/imaging/{IMAGING_ID}/analysis", "read_results_phi", "analysis"),
    (f"/api/v1/imaging/patient/{PLANTED}", "query_patient", "for_patient"),
    ("/api/v1/research/analyses", "read_results_deid", "analyses_of"),
]


@pytest.mark.parametrize(("path", "action", "lookup"), READS)
async def test_a_read_is_recorded_once_as_the_200_it_is(
    tmp_path: Path, path: str, action: str, lookup: str
) -> None:
    harness = gateway_routes(tmp_path)
    stored(harness, latest_analysis=f"ev-1|{ANALYSIS_ID}|completed")
    answer = await get(harness, path)
    assert answer.status == 200, answer.body
    event = the_event(harness, answer)
    assert (event["action"], event["outcome"]) == (action, "success")
    if action != "read_results_deid":
        assert event["target"].startswith(f"patient:{PATIENT_KEY}")


@pytest.mark.parametrize(("path", "action", "lookup"), READS)
async def test_a_read_the_database_does_not_answer_is_recorded_as_the_503_it_gets(
    tmp_path: Path, path: str, action: str, lookup: str
) -> None:
    """Whether the lookup fails before the decision (the instance's record) or after it (the
    analysis, the patient's instances, the research listing)."""
    harness = gateway_routes(tmp_path)
    stored(harness, latest_analysis=f"ev-1|{ANALYSIS_ID}|completed")
    setattr(harness.read_model, lookup, silent)
    answer = await get(harness, path)
    assert answer.status == 503, answer.body
    assert json.loads(answer.body)["detail"]["code"] == "dependency_unavailable"
    event = the_event(harness, answer)
    assert (event["action"], event["outcome"], event["detail"]) == (action, "error", "dependency_unavailable")
    if lookup == "get":
        assert event["target"] == IMAGING_ID  # the record that names the patient was not read
    elif action != "read_results_deid":
        assert event["target"].startswith(f"patient:{PATIENT_KEY}")
    assert PLANTED not in json.dumps(harness.publisher.access_events())


@pytest.mark.parametrize("path", [f"/api/v1/imaging/{IMAGING_ID}", f"/api/v1/imaging/{IMAGING_ID}/analysis"])
async def test_the_instance_routes_read_the_record_once(tmp_path: Path, path: str) -> None:
    harness = gateway_routes(tmp_path)
    stored(harness)
    answer = await get(harness, path)
    assert answer.status == 200, answer.body
    assert harness.read_model.gets == [IMAGING_ID]


async def test_a_read_whose_event_kafka_refuses_sends_none_of_its_data(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    stored(harness)
    send = harness.publisher.send

    async def refuse_access(topic: str, envelope: Any, *, key: str) -> Any:
        if topic == topics.ACCESS_RECORDED:
            raise ConnectionError("not acknowledged")
        return await send(topic, envelope, key=key)

    harness.publisher.send = refuse_access  # type: ignore[method-assign]
    answer = await get(harness, f"/api/v1/imaging/{IMAGING_ID}")
    assert answer.status == 503, answer.body
    assert PATIENT_KEY.encode() not in answer.body and b"up-1" not in answer.body


async def test_a_query_parameter_out_of_range_is_recorded_as_rejected(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    answer = await get(harness, "/api/v1/research/analyses?limit=0")
    assert answer.status == 422, answer.body
    event = the_event(harness, answer)
    assert (event["action"], event["outcome"]) == ("read_results_deid", "rejected")


async def test_another_tenants_instance_is_recorded_as_not_found(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    stored(harness, tenant="hospital-b")
    answer = await get(harness, f"/api/v1/imaging/{IMAGING_ID}")
    assert answer.status == 404, answer.body
    event = the_event(harness, answer)
    assert (event["outcome"], event["detail"], event["target"]) == ("not_found", "not_found", IMAGING_ID)


async def test_a_query_is_recorded_after_its_lookup_and_before_its_answer(tmp_path: Path) -> None:
    """The order the trail claims: the patient's instances were read, then the access was recorded
    (until the twentieth session the record came first, before the lookup that could still fail)."""
    harness = gateway_routes(tmp_path)
    stored(harness)
    order: list[str] = []
    for_patient, send = harness.read_model.for_patient, harness.publisher.send

    async def looked_up(*args: Any) -> Any:
        order.append("lookup")
        return await for_patient(*args)

    async def published(topic: str, envelope: Any, *, key: str) -> Any:
        order.append(topic)
        return await send(topic, envelope, key=key)

    harness.read_model.for_patient = looked_up  # type: ignore[method-assign]
    harness.publisher.send = published  # type: ignore[method-assign]
    answer = await get(harness, f"/api/v1/imaging/patient/{PLANTED}")
    assert answer.status == 200, answer.body
    assert order == ["lookup", topics.ACCESS_RECORDED]


async def test_a_read_the_server_cancels_is_one_event_claiming_its_500(tmp_path: Path) -> None:
    """uvicorn cancels what still runs when its graceful-shutdown timeout ends: a read cancelled during
    its lookup is recorded as the 500 ``request_cancelled`` the gateway answers, once."""
    harness = gateway_routes(tmp_path)
    stored(harness)
    reached = asyncio.Event()

    async def stalled(*_: Any) -> Any:
        reached.set()
        await asyncio.Event().wait()

    harness.read_model.for_patient = stalled  # type: ignore[method-assign]
    exchange = Exchange()
    headers = [("authorization", f"Bearer {harness.token('hospital-a', 'clinician')}")]
    path = f"/api/v1/imaging/patient/{PLANTED}".encode()
    task = asyncio.ensure_future(asgi_request(harness.app, "GET", path, headers, exchange=exchange))
    await asyncio.wait_for(reached.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert exchange.status == 500
    assert json.loads(exchange.body)["error"] == "request_cancelled"
    event = the_event(harness, exchange)
    assert (event["action"], event["outcome"], event["detail"]) == (
        "query_patient",
        "error",
        "request_cancelled",
    )
