"""Planted PHI (support.PHI) never leaves the gateway in clear: not in its log, not in any event on
any topic for the upload (the chunk topic is sealed and left out), not in an error body."""

from __future__ import annotations

import json

import httpx
from enclave_common import topics

from .support import PHI, STATE, mr_instance
from .test_gateway_support import GATEWAY, TopicWatch, bearer, builders, new_tenant

LOG = STATE / "logs" / "gateway.log"
CLEAR_TOPICS = tuple(t for t in topics.ALL_TOPICS if t != topics.UPLOAD_CHUNK)


def _assert_no_phi(text: str, where: str) -> None:
    leaked = [name for name, value in PHI.items() if value.lower() in text.lower()]
    assert not leaked, f"{leaked} found in {where}"


async def test_planted_phi_stays_out_of_logs_events_and_error_bodies():
    tenant = new_tenant("it-phi")
    uploader = bearer("it-phi-pacs", tenant, "uploader")
    good, good_ds = mr_instance()
    other_study, _ = mr_instance()
    truncated = builders.truncate(mr_instance()[0], 6000)
    log_offset = LOG.stat().st_size
    bodies: list[str] = []
    async with TopicWatch(*CLEAR_TOPICS) as watch:
        async with httpx.AsyncClient(timeout=60) as client:
            stow = builders.python_dicomweb_client_body([good, other_study, truncated])
            answer = await client.post(
                f"{GATEWAY}/dicomweb/studies/{good_ds.StudyInstanceUID}",
                content=stow.data,
                headers={**uploader, "Content-Type": stow.content_type},
            )
            assert answer.status_code == 202, answer.text
            bodies.append(answer.text)
            form = await client.post(
                f"{GATEWAY}/api/v1/imaging/upload",
                files=[("file", ("cut.dcm", truncated, "application/dicom"))],
                headers=uploader,
            )
            assert form.status_code == 409
            bodies.append(form.text)
            refused = [
                await client.post(
                    f"{GATEWAY}/dicomweb/studies",
                    content=good,
                    headers={**uploader, "Content-Type": "text/plain"},
                ),
                await client.post(
                    f"{GATEWAY}/dicomweb/studies",
                    content=good,
                    headers={**uploader, "Content-Type": "multipart/related; boundary=nowhere"},
                ),
                await client.post(
                    f"{GATEWAY}/api/v1/grants",
                    json={
                        "grantee": "it-cg",
                        "patient_id": PHI["PatientID"],
                        "actions": ["read_status"],
                        "expires_at": PHI["PatientBirthDate"],
                        "justification": PHI["PatientName"],
                    },
                    headers=bearer("it-phi-admin", tenant, "admin"),
                ),
                await client.post(
                    f"{GATEWAY}/api/v1/break-glass",
                    json={
                        "patient_id": PHI["PatientID"],
                        "justification": "x",
                        "extra": PHI["InstitutionName"],
                    },
                    headers=bearer("it-phi-doc", tenant, "clinician"),
                ),
                await client.get(f"{GATEWAY}/api/v1/imaging/patient/{PHI['PatientID']}", headers=uploader),
            ]
            assert [r.status_code for r in refused] == [415, 400, 422, 422, 403]
            bodies.extend(r.text for r in refused)
            found = await client.get(
                f"{GATEWAY}/api/v1/imaging/patient/{PHI['PatientID']}",
                headers=bearer("it-phi-doc", tenant, "clinician"),
            )
            assert found.status_code == 200 and len(found.json()["instances"]) == 1
            bodies.append(found.text)
            for instance in found.json()["instances"]:
                bodies.append(
                    (
                        await client.get(
                            f"{GATEWAY}/api/v1/imaging/{instance['imaging_id']}", headers=uploader
                        )
                    ).text
                )
        events = await watch.read(lambda env: env.tenant == tenant, settle=3.0)
    for index, body in enumerate(bodies):
        _assert_no_phi(body, f"response body #{index}")
    kinds = {e.type for e in events}
    assert (
        topics.event_type(topics.UPLOAD_RECEIVED) in kinds
        and topics.event_type(topics.ACCESS_RECORDED) in kinds
    )
    for event in events:
        _assert_no_phi(event.to_bytes().decode(), f"event {event.type}")
        _assert_no_phi(json.dumps(event.data), f"event {event.type}")
    _assert_no_phi(LOG.read_bytes()[log_offset:].decode(errors="replace"), "gateway.log")
