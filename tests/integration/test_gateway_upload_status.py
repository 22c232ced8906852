"""An uploader follows a STOW-RS upload through the pipeline by the ``Upload-Id`` its answer carries
(``GET /api/v1/uploads/{upload_id}``, docs/gateway.md "Status and results"), on the running stack.

Until the twenty-third session a STOW-RS answer carried no id the gateway's status routes take, and the
patient query is a clinician's: a PACS that stored a study by DICOMweb could not read its status.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
from pydicom.uid import generate_uid

from .support import mr_instance
from .test_gateway_support import GATEWAY, bearer, builders, new_tenant

SETTLED = {"deidentified", "analysed", "failed", "quarantined"}


async def test_a_pacs_follows_its_stow_upload_by_the_upload_id_until_every_instance_is_de_identified(
    mongo,
) -> None:
    tenant = new_tenant("it-us")
    patient = f"PID-US-{uuid.uuid4().hex[:8]}"
    study, series = generate_uid(), generate_uid()
    body = builders.multipart_body(
        [mr_instance(study_uid=study, series_uid=series, patient_id=patient)[0] for _ in range(3)]
    )
    pacs = bearer("it-us-pacs", tenant, "uploader")
    async with httpx.AsyncClient(base_url=GATEWAY, timeout=30) as client:
        stored = await client.post(
            f"/dicomweb/studies/{study}",
            content=body.data,
            headers={**pacs, "Content-Type": body.content_type, "Accept": "application/dicom+json"},
        )
        assert stored.status_code == 200, stored.text
        upload_id = stored.headers["upload-id"]

        first = await client.get(f"/api/v1/uploads/{upload_id}", headers=pacs)
        assert first.status_code == 200, first.text
        assert first.json()["instances_total"] == 3
        imaging_ids = [i["imaging_id"] for i in first.json()["instances"]]
        assert len(set(imaging_ids)) == 3

        deadline = time.monotonic() + 120
        latest: dict[str, Any] = first.json()
        answers = [stored, first]
        while not all(i["status"] in SETTLED for i in latest["instances"]):
            assert time.monotonic() < deadline, latest["counts"]
            await asyncio.sleep(1)
            answer = await client.get(f"/api/v1/uploads/{upload_id}", headers=pacs)
            assert answer.status_code == 200, answer.text
            answers.append(answer)
            latest = answer.json()
        counts = latest["counts"]
        assert counts["deidentified"] + counts["analysed"] == 3, counts
        assert sum(counts.values()) == latest["instances_total"] == 3
        # The same instances, and statuses, as the status route and the clinician's patient query read.
        for instance in latest["instances"]:
            one = await client.get(f"/api/v1/imaging/{instance['imaging_id']}", headers=pacs)
            assert one.json()["status"] == instance["status"]
        clinician = bearer("it-us-clinician", tenant, "clinician")
        by_patient = await client.get(f"/api/v1/imaging/patient/{patient}", headers=clinician)
        assert sorted(i["imaging_id"] for i in by_patient.json()["instances"]) == sorted(imaging_ids)

        # Another hospital's uploader learns nothing of it: the answer an unknown id gets.
        other = await client.get(
            f"/api/v1/uploads/{upload_id}", headers=bearer("it-us-pacs", new_tenant(), "uploader")
        )
        assert other.status_code == 404, other.text
        unknown = await client.get(f"/api/v1/uploads/{uuid.uuid4()}", headers=pacs)
        assert other.json() == unknown.json()
        answers += [by_patient, other]

    assert all(patient not in a.text for a in answers)
    # The gateway's read model finds an upload's instances by index (used by MongoDB; FerretDB v1
    # keeps it and still scans).
    indexes = await mongo["gateway"]["instances"].index_information()
    assert any(dict(ix["key"]) == {"tenant": 1, "upload_id": 1} for ix in indexes.values()), indexes
