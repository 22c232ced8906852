"""A read or query is recorded once its answer was read from the gateway's database, before it is
sent, and its event claims the answer the client got (docs/gateway.md, "Status codes common to every
route").

Until the twentieth session an allowed read or query was recorded at its decision, as ``success``
with status 200, and the data was read after that: a lookup the database did not answer was answered
503 while its record said 200. A status read whose first lookup (the one the decision needs) failed
was not recorded at all, and the status and analysis routes read the instance's record twice.
"""

from __future__ import annotations

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
