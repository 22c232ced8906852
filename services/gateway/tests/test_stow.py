"""The STOW-RS response: status rule, DICOM JSON shape, and that real clients read it."""

from __future__ import annotations

import json

import pydicom
import pytest
from corpus import builders as corpus  # tests/conftest.py puts this directory on sys.path
from dicomweb_client.api import DICOMwebClient
from enclave_gateway.multipart import (
    PartData,
    PartEnd,
    PartStart,
    TooManyPartsError,
    iter_events,
    parse_body_format,
    parser_for,
)
from enclave_gateway.stow import (
    DICOM_JSON_MEDIA_TYPE,
    STOW_RESPONSE_TYPES,
    FailedInstance,
    StoredInstance,
    build_stow_response,
    negotiate,
    request_error_body,
    stow_status,
)
from enclave_gateway.validation import (
    FailureReason,
    InstanceInfo,
    InstanceInspector,
    ValidationFailure,
    WarningReason,
)

BASE = "https://gateway.example/dicomweb"
MR = "1.2.840.10008.5.1.4.1.1.4"


def stored(n: int, study: str = "1.2.3", warning: WarningReason | None = None) -> StoredInstance:
    return StoredInstance(MR, f"1.2.3.4.{n}", study, "1.2.3.4", warning)


@pytest.mark.parametrize(
    ("accepted", "failed", "status"),
    [
        ([stored(1)], [], 200),
        ([stored(1), stored(2)], [], 200),
        ([stored(1)], [FailedInstance(FailureReason.CANNOT_UNDERSTAND)], 202),
        ([stored(1, warning=WarningReason.COERCION_OF_DATA_ELEMENTS)], [], 202),
        ([], [FailedInstance(FailureReason.SOP_CLASS_NOT_SUPPORTED, MR, "1.2")], 409),
        ([], [FailedInstance(FailureReason.CANNOT_UNDERSTAND)] * 3, 409),
    ],
)
def test_status_rule(accepted, failed, status) -> None:
    assert stow_status(accepted, failed) == status


def test_response_references_stored_and_failed_instances() -> None:
    failed = [
        FailedInstance(FailureReason.STUDY_INSTANCE_UID_MISMATCH, MR, "1.2.9"),
        FailedInstance(FailureReason.CANNOT_UNDERSTAND),
    ]
    body = build_stow_response(
        BASE + "/", [stored(1), stored(2, warning=WarningReason.ELEMENTS_DISCARDED)], failed
    )
    ds = pydicom.Dataset.from_json(json.dumps(body))
    assert ds.RetrieveURL == f"{BASE}/studies/1.2.3"
    first, second = ds.ReferencedSOPSequence
    assert first.ReferencedSOPInstanceUID == "1.2.3.4.1"
    assert first.RetrieveURL == f"{BASE}/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.1"
    assert "WarningReason" not in first
    assert second.WarningReason == 0xB006
    mismatch, unreadable = ds.FailedSOPSequence
    assert (mismatch.ReferencedSOPInstanceUID, mismatch.FailureReason) == ("1.2.9", 0xC409)
    assert unreadable.FailureReason == 0xC000
    assert unreadable.ReferencedSOPInstanceUID in (None, "")
    assert body["00081198"]["vr"] == "SQ"
    assert body["00081199"]["Value"][0]["00081150"] == {"vr": "UI", "Value": [MR]}


def test_study_level_retrieve_url() -> None:
    two_studies = build_stow_response(BASE, [stored(1, "1.2.3"), stored(2, "1.2.4")], [])
    assert "Value" not in two_studies["00081190"]
    from_url = build_stow_response(BASE, [stored(1)], [], study_instance_uid="1.2.3")
    assert from_url["00081190"]["Value"] == [f"{BASE}/studies/1.2.3"]
    none_stored = build_stow_response(BASE, [], [FailedInstance(FailureReason.CANNOT_UNDERSTAND)], "1.2.3")
    assert "Value" not in none_stored["00081190"]
    assert "00081199" not in none_stored


def test_request_error_body_says_what_and_what_is_allowed() -> None:
    body = request_error_body(TooManyPartsError("Request has more than 10000 parts, the maximum per request"))
    assert body == {
        "status": 413,
        "error": "too_many_parts",
        "message": "Request has more than 10000 parts, the maximum per request",
    }


# --------------------------------------------------------------------------- the edge, end to end (pure)


def receive(content_type: str, data: bytes, expected_study: str | None = None):
    """What the gateway does per request, without the hand-off: parse, validate, answer."""
    parser = parser_for(parse_body_format(content_type))
    accepted: list[StoredInstance] = []
    failed: list[FailedInstance] = []
    inspector = None
    for event in iter_events(parser, corpus.split(data, [4096])):
        if isinstance(event, PartStart):
            inspector = InstanceInspector(expected_study_uid=expected_study)
        elif isinstance(event, PartData):
            inspector.feed(event.data)
        elif isinstance(event, PartEnd):
            result = inspector.finish()
            if isinstance(result, InstanceInfo):
                accepted.append(StoredInstance.from_info(result))
            else:
                assert isinstance(result, ValidationFailure)
                failed.append(FailedInstance.from_failure(result))
    return stow_status(accepted, failed), build_stow_response(BASE, accepted, failed, expected_study)


def test_mixed_request_gives_202_with_reasons() -> None:
    good = corpus.make_instance()
    body = corpus.orthanc_body([good, corpus.with_bad_vr(good), corpus.make_instance(study_uid="1.2.3.77")])
    status, response = receive(body.content_type, body.data, expected_study=corpus.STUDY_UID)
    assert status == 202
    ds = pydicom.Dataset.from_json(response)
    assert len(ds.ReferencedSOPSequence) == 1
    assert [item.FailureReason for item in ds.FailedSOPSequence] == [0xC000, 0xC409]
    assert corpus.PLANTED_PATIENT_ID not in json.dumps(response)


def test_all_refused_gives_409() -> None:
    body = corpus.npm_dicomweb_client_body(
        [corpus.NON_DICOM_SAMPLES["png"], corpus.NON_DICOM_SAMPLES["json"]]
    )
    status, response = receive(body.content_type, body.data)
    assert status == 409
    assert len(response["00081198"]["Value"]) == 2


class _FakeResponse:
    """Stands in for requests.Response in the Python client's POST path."""

    def __init__(self, status: int, body: dict) -> None:
        self.status_code = status
        self.ok = status < 400
        self.content = json.dumps(body).encode()
        self.headers = {"Content-Type": DICOM_JSON_MEDIA_TYPE}

    def json(self) -> dict:
        return json.loads(self.content)

    def raise_for_status(self) -> None:
        assert self.ok


def test_python_dicomweb_client_store_instances_round_trip(monkeypatch) -> None:
    """The real client's request parses here, and our response parses in the real client."""
    datasets = [
        pydicom.dcmread(corpus.PYDICOM_TEST_FILES / name) for name in ("CT_small.dcm", "MR_small.dcm")
    ]
    client = DICOMwebClient(url=BASE)
    seen: dict[str, object] = {}

    def fake_post(url, data, headers):
        seen["url"] = url
        body = data if isinstance(data, bytes) else b"".join(data)
        status, response = receive(headers["Content-Type"], body)
        seen["status"] = status
        return _FakeResponse(status, response)

    monkeypatch.setattr(client, "_http_post", fake_post)
    result = client.store_instances(datasets)
    assert seen["status"] == 200
    assert [item.ReferencedSOPInstanceUID for item in result.ReferencedSOPSequence] == [
        ds.SOPInstanceUID for ds in datasets
    ]
    assert "FailedSOPSequence" not in result


DJ, JS = "application/dicom+json", "application/json"


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, DJ),
        ("", DJ),
        ("application/dicom+json", DJ),
        ("application/json", JS),
        ("*/*", DJ),
        ("application/*", DJ),
        ("Application/DICOM+JSON; charset=utf-8", DJ),
        ("application/dicom+xml, application/dicom+json;q=0.5", DJ),
        ("multipart/related; type=application/dicom+xml, */*;q=0.1", DJ),
        # a declined application/dicom+json is not sent when application/json is admitted
        ("application/dicom+json;q=0, application/json", JS),
        ("application/dicom+json;q=0, */*", JS),
        ("application/json, application/dicom+json;q=0.5", JS),
        ("application/dicom+json;q=0.5, application/*;q=0.9", JS),
        ("application/dicom+xml", None),
        ("multipart/related; type=application/dicom+xml", None),
        ("text/html", None),
        ("application/dicom+json;q=0, application/dicom+xml", None),
        ("application/dicom+json;q=0, application/json;q=0, */*", None),
        ("*/*;q=0.0", None),
        ("application/dicom+json;q=nan", DJ),  # not a finite number: the range is not refused
        ("application/json;q=7, application/dicom+json", DJ),  # q is at most 1: a tie, the first offered
        ("text/*", None),
    ],
)
def test_accept_header_chooses_the_json_response_type_or_none(accept, chosen) -> None:
    """PS3.18 10.5: the origin server answers 406 when it cannot send any of the accepted media types;
    the STOW response is JSON only (application/dicom+xml is not offered), under the name the client
    prefers."""
    assert negotiate(accept, STOW_RESPONSE_TYPES) == chosen
