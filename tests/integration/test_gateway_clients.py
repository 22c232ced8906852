"""Real DICOMweb clients against the running gateway: what they send is accepted, what we answer
parses in them, and the instances reach ingest (read-model status moves to ``stored``)."""

from __future__ import annotations

import asyncio
import io

import httpx
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from .support import mr_instance
from .test_gateway_support import (
    GATEWAY,
    bearer,
    builders,
    new_tenant,
    wait_for_status,
    wait_patient_statuses,
)

#: pydicom's own files (distinct SOP Instance UIDs, different transfer syntaxes and SOP classes).
PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm")
#: Stored by ingest; deid (when live) may then de-identify or quarantine it (e.g. burned-in text risk).
PAST_RECEIVED = {"stored", "deidentified", "quarantined", "analysed"}


def _read(name: str) -> Dataset:
    return pydicom.dcmread(io.BytesIO(builders.pydicom_file(name)))


def _client(tenant: str) -> DICOMwebClient:
    return DICOMwebClient(url=f"{GATEWAY}/dicomweb", headers=bearer("it-pacs", tenant, "uploader"))


def _referenced(response: Dataset) -> list[str]:
    return [item.ReferencedSOPInstanceUID for item in response.get("ReferencedSOPSequence", [])]


async def test_python_dicomweb_client_single_instance_reaches_ingest():
    tenant = new_tenant()
    ds = _read("CT_small.dcm")
    response = await asyncio.to_thread(_client(tenant).store_instances, [ds])
    assert _referenced(response) == [ds.SOPInstanceUID]
    assert "FailedSOPSequence" not in response or len(response.FailedSOPSequence) == 0
    item = response.ReferencedSOPSequence[0]
    assert item.ReferencedSOPClassUID == ds.SOPClassUID
    assert item.RetrieveURL.endswith(f"/instances/{ds.SOPInstanceUID}")
    async with httpx.AsyncClient(timeout=30) as client:
        (instance,) = await wait_patient_statuses(client, GATEWAY, tenant, ds.PatientID, 1, PAST_RECEIVED)
    assert instance["duplicate"] == "new"


async def test_a_client_following_a_retrieve_url_learns_that_retrieval_is_not_offered():
    tenant = new_tenant()
    ds = _read("MR_small.dcm")
    client = _client(tenant)
    response = await asyncio.to_thread(client.store_instances, [ds])
    retrieve_url = response.ReferencedSOPSequence[0].RetrieveURL
    with pytest.raises(requests.HTTPError) as raised:  # what the client does with a RetrieveURL
        await asyncio.to_thread(
            client.retrieve_instance, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )
    async with httpx.AsyncClient(timeout=30) as http:
        plain = await http.get(retrieve_url, headers=bearer("it-pacs", tenant, "uploader", "clinician"))
    for answer in (raised.value.response, plain):
        assert answer.status_code == 404
        detail = answer.json()["detail"]
        assert detail["code"] == "no_such_route"
        assert "WADO-RS" in detail["message"] and "not offered" in detail["message"]
        assert ds.SOPInstanceUID not in answer.text and str(ds.PatientID) not in answer.text


async def test_python_dicomweb_client_batch_of_pydicom_files():
    tenant = new_tenant()
    datasets = [_read(name) for name in PYDICOM_FILES]
    response = await asyncio.to_thread(_client(tenant).store_instances, datasets)
    assert sorted(_referenced(response)) == sorted(ds.SOPInstanceUID for ds in datasets)
    async with httpx.AsyncClient(timeout=30) as client:
        for patient_id in {ds.PatientID for ds in datasets}:
            expected = sum(1 for ds in datasets if ds.PatientID == patient_id)
            await wait_patient_statuses(client, GATEWAY, tenant, patient_id, expected, PAST_RECEIVED)


async def test_python_dicomweb_client_reads_a_partial_failure():
    """One good instance and one of another study, posted to the first study's URL: 202, and the
    client's parsed response names the stored one and the failed one with reason 0xC409."""
    tenant = new_tenant()
    good, good_ds = mr_instance()
    other, other_ds = mr_instance()
    client = _client(tenant)
    body = builders.python_dicomweb_client_body([good, other])
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(
            f"{GATEWAY}/dicomweb/studies/{good_ds.StudyInstanceUID}",
            content=body.data,
            headers={**client._session.headers, "Content-Type": body.content_type},  # noqa: SLF001
        )
    assert response.status_code == 202, response.text
    parsed = Dataset.from_json(response.json())
    assert _referenced(parsed) == [good_ds.SOPInstanceUID]
    (failed,) = parsed.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == other_ds.SOPInstanceUID
    assert failed.FailureReason == 0xC409


async def test_orthanc_and_npm_shaped_requests_are_stored():
    tenant = new_tenant()
    headers = bearer("it-pacs", tenant, "uploader")
    patient = f"PID-{tenant}"
    orthanc = [mr_instance(patient_id=patient) for _ in range(3)]
    npm = [mr_instance(patient_id=patient) for _ in range(3)]
    async with httpx.AsyncClient(timeout=60) as client:
        body = builders.orthanc_body([data for data, _ in orthanc])

        async def chunked():  # Orthanc streams with Transfer-Encoding: chunked
            for piece in builders.split(body.data, [65536, 7, 4096]):
                yield piece

        answer = await client.post(
            f"{GATEWAY}/dicomweb/studies",
            content=chunked(),
            headers={**headers, "Content-Type": body.content_type},
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].startswith("application/dicom+json")
        assert sorted(_referenced(Dataset.from_json(answer.json()))) == sorted(
            ds.SOPInstanceUID for _, ds in orthanc
        )

        body = builders.npm_dicomweb_client_body([data for data, _ in npm])
        assert body.data.endswith(b"\x00")  # the npm client's trailing NUL padding is really there
        answer = await client.post(
            f"{GATEWAY}/dicomweb/studies",
            content=body.data,
            headers={**headers, "Content-Type": body.content_type},
        )
        assert answer.status_code == 200, answer.text
        assert sorted(_referenced(Dataset.from_json(answer.json()))) == sorted(
            ds.SOPInstanceUID for _, ds in npm
        )
        await wait_patient_statuses(client, GATEWAY, tenant, patient, 6, PAST_RECEIVED)


async def test_single_part_application_dicom():
    tenant = new_tenant()
    data, ds = mr_instance()
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(
            f"{GATEWAY}/dicomweb/studies/{ds.StudyInstanceUID}",
            content=data,
            headers={**bearer("it-pacs", tenant, "uploader"), "Content-Type": "application/dicom"},
        )
        assert answer.status_code == 200, answer.text
        parsed = Dataset.from_json(answer.json())
        assert _referenced(parsed) == [ds.SOPInstanceUID]
        assert parsed.RetrieveURL.endswith(f"/dicomweb/studies/{ds.StudyInstanceUID}")
        assert answer.headers["content-type"].startswith("application/dicom+json")


async def test_a_client_declining_dicom_json_gets_the_same_answer_as_application_json():
    tenant = new_tenant()
    data, ds = mr_instance()
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(
            f"{GATEWAY}/dicomweb/studies",
            content=data,
            headers={
                **bearer("it-pacs", tenant, "uploader"),
                "Content-Type": "application/dicom",
                "Accept": "application/dicom+json;q=0, application/json",
            },
        )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert _referenced(Dataset.from_json(answer.json())) == [ds.SOPInstanceUID]


async def test_form_upload_returns_imaging_ids_and_status_advances():
    tenant = new_tenant()
    uploads = [mr_instance() for _ in range(2)]
    headers = bearer("it-portal", tenant, "uploader")
    files = [("files", (f"scan-{i}.dcm", data, "application/dicom")) for i, (data, _) in enumerate(uploads)]
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(f"{GATEWAY}/api/v1/imaging/upload", files=files, headers=headers)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["rejected"] == []
        assert [a["filename"] for a in body["accepted"]] == ["scan-0.dcm", "scan-1.dcm"]
        assert [a["sop_instance_uid"] for a in body["accepted"]] == [ds.SOPInstanceUID for _, ds in uploads]
        for accepted in body["accepted"]:
            assert accepted["status"] == "received"
            url = f"{GATEWAY}/api/v1/imaging/{accepted['imaging_id']}"
            status = await wait_for_status(client, url, headers, PAST_RECEIVED)
            assert status["imaging_id"] == accepted["imaging_id"]
            assert status["upload_id"] == body["upload_id"]
            assert status["study_key"] and status["series_key"]
