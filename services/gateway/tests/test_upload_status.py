"""``GET /api/v1/uploads/{upload_id}`` and the ``Upload-Id`` header (docs/gateway.md, "Status and
results"): one upload's instances with their statuses counted, for the roles that read status.

Until the twenty-third session a STOW-RS answer (PS3.18: SOP UIDs, no imaging ids) left an uploader
no way to read the status of what it sent: the patient query is a clinician's, and the status route
needs an imaging id only the form upload answered.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from corpus import builders
from pymongo.errors import ServerSelectionTimeoutError
from route_harness import Exchange, Harness, asgi_request, gateway_routes
from test_access_answers import the_event, upload

PLANTED = "PHI-MRN-55120-UP"


async def get(harness: Harness, path: str, role: str, tenant: str = "hospital-a") -> Exchange:
    token = harness.token(tenant, role, subject=f"it-{role}")
    return await asgi_request(harness.app, "GET", path.encode(), [("authorization", f"Bearer {token}")], [])


async def stowed(harness: Harness) -> tuple[Exchange, str]:
    """A STOW-RS of three instances, one of them truncated (202), and its upload id."""
    instances = [builders.make_instance(patient_id=PLANTED) for _ in range(2)]
    answer = await upload(
        harness,
        "/dicomweb/studies",
        builders.multipart_body(
            [*instances, builders.truncate(builders.make_instance(patient_id=PLANTED), 600)]
        ),
    )
    assert answer.status == 202, answer.body
    upload_id = answer.header("upload-id")
    assert upload_id is not None
    return answer, upload_id


async def test_a_stow_upload_is_read_back_by_its_upload_id_with_its_statuses_counted(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    stow, upload_id = await stowed(harness)
    mine = sorted(d["_id"] for d in harness.read_model.docs.values() if d["upload_id"] == upload_id)
    assert len(mine) == 2  # the truncated instance was refused: it has no record

    read = await get(harness, f"/api/v1/uploads/{upload_id}", "uploader")
    assert read.status == 200, read.body
    body = json.loads(read.body)
    assert (body["upload_id"], body["instances_total"], body["next_after"]) == (upload_id, 2, None)
    assert body["counts"] == {
        "received": 2,
        "stored": 0,
        "deidentified": 0,
        "analysed": 0,
        "failed": 0,
        "quarantined": 0,
    }
    assert [i["imaging_id"] for i in body["instances"]] == mine
    assert all(i["status"] == "received" and i["upload_id"] == upload_id for i in body["instances"])
    event = the_event(harness, read)
    assert (event["action"], event["outcome"], event["target"]) == (
        "read_status",
        "success",
        f"upload:{upload_id}",
    )

    # The pipeline moves one instance on, and fails the other: the counts follow.
    harness.read_model.docs[mine[0]].update(rank=3)
    harness.read_model.docs[mine[1]].update(rank=9, terminal="failed", reason_code="unparseable")
    again = json.loads((await get(harness, f"/api/v1/uploads/{upload_id}", "clinician")).body)
    assert {k: v for k, v in again["counts"].items() if v} == {"analysed": 1, "failed": 1}
    assert [i["status"] for i in again["instances"]] == ["analysed", "failed"]
    # A researcher reads status too (no PHI: pseudonymous keys only).
    assert (await get(harness, f"/api/v1/uploads/{upload_id}", "researcher")).status == 200
    assert PLANTED not in stow.body.decode() + read.body.decode() + json.dumps(again)


async def test_a_form_upload_names_the_same_id_in_its_body_and_header(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    answer = await upload(
        harness, "/api/v1/imaging/upload", builders.form_data_body([builders.make_instance()])
    )
    assert answer.status == 200, answer.body
    assert answer.header("upload-id") == json.loads(answer.body)["upload_id"]


async def test_an_upload_with_nothing_accepted_has_no_upload_id(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    cut = builders.truncate(builders.make_instance(patient_id=PLANTED), 600)
    answer = await upload(harness, "/dicomweb/studies", builders.multipart_body([cut]))
    assert answer.status == 409, answer.body
    assert answer.header("upload-id") is None


async def test_the_instances_are_paged_in_imaging_id_order_and_counted_whole(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    _, upload_id = await stowed(harness)
    first = json.loads((await get(harness, f"/api/v1/uploads/{upload_id}?limit=1", "uploader")).body)
    assert (len(first["instances"]), first["instances_total"], first["counts"]["received"]) == (1, 2, 2)
    assert first["next_after"] == first["instances"][0]["imaging_id"]
    second = json.loads(
        (
            await get(harness, f"/api/v1/uploads/{upload_id}?limit=1&after={first['next_after']}", "uploader")
        ).body
    )
    assert second["next_after"] is None
    assert second["instances"][0]["imaging_id"] > first["next_after"]


@pytest.mark.parametrize(
    ("role", "tenant", "status"),
    [
        ("uploader", "hospital-b", 404),  # another tenant's upload does not exist for it
        ("caregiver", "hospital-a", 404),  # a grant names one patient, not an upload
        ("admin", "hospital-a", 403),
        ("auditor", "hospital-a", 403),
    ],
)
async def test_who_may_not_read_an_upload_learns_nothing_of_it(
    tmp_path: Path, role: str, tenant: str, status: int
) -> None:
    harness = gateway_routes(tmp_path)
    _, upload_id = await stowed(harness)
    refused = await get(harness, f"/api/v1/uploads/{upload_id}", role, tenant)
    assert refused.status == status, refused.body
    assert upload_id not in refused.body.decode() and "received" not in refused.body.decode()
    if role != "uploader":
        # Refused before anything was read (a caregiver's grant names no upload).
        assert harness.read_model.upload_reads == []
    unknown = await get(harness, "/api/v1/uploads/0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "uploader", tenant)
    assert unknown.status == 404, unknown.body
    if status == 404:
        # The same answer as an id that exists nowhere, recorded under the id asked for.
        assert json.loads(refused.body) == json.loads(unknown.body)
        assert the_event(harness, refused)["target"] == f"upload:{upload_id}"
        assert the_event(harness, unknown)["target"] == "upload:0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "after=nonsense", "patient=x"])
async def test_a_malformed_read_of_an_upload_is_the_common_422(tmp_path: Path, query: str) -> None:
    harness = gateway_routes(tmp_path)
    _, upload_id = await stowed(harness)
    refused = await get(harness, f"/api/v1/uploads/{upload_id}?{query}", "uploader")
    assert refused.status == 422, refused.body
    assert json.loads(refused.body)["error"] == "invalid_request"
    assert the_event(harness, refused)["outcome"] == "rejected"


async def test_an_id_that_is_no_upload_id_is_a_422_never_echoed_or_recorded(tmp_path: Path) -> None:
    """The path is checked before anything is looked up; client text is not recorded."""
    harness = gateway_routes(tmp_path)
    refused = await get(harness, f"/api/v1/uploads/{PLANTED}", "uploader")
    assert refused.status == 422, refused.body
    assert json.loads(refused.body)["problems"][0]["field"] == "path.upload_id"
    assert PLANTED not in refused.body.decode()
    event = the_event(harness, refused)
    assert event["target"] is None and PLANTED not in json.dumps(event)
    assert harness.read_model.gets == [] and harness.read_model.upload_reads == []


async def test_a_database_that_does_not_answer_is_a_recorded_503(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    _, upload_id = await stowed(harness)
    harness.read_model.broken = ServerSelectionTimeoutError("no primary")
    failed = await get(harness, f"/api/v1/uploads/{upload_id}", "uploader")
    assert failed.status == 503, failed.body
    event = the_event(harness, failed)
    assert (event["outcome"], event["status_code"]) == ("error", 503)
