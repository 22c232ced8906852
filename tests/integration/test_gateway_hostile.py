"""The hostile corpus over HTTP, against a second gateway process with small limits.

Every answer is the right per-instance failure or a 4xx whose body says what was wrong and what is
allowed, never a 5xx; nothing reaches the upload topics for what was refused; the gateway is alive
and accepting afterwards. Each case runs in its own tenant, so the topics tell exactly what each
case published.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import httpx
import pytest
from enclave_common import topics
from enclave_deid.config import DeidSettings
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from .support import PHI, mr_instance
from .test_gateway_support import GATEWAY, TopicWatch, bearer, builders, gateway_process, new_tenant

MAX_INSTANCE = 64 * 1024
MAX_REQUEST = 256 * 1024
MAX_PARTS = 3
IDLE_TIMEOUT_S = 2
MAX_HEADER = 8 * 1024
MIN_RATE = 16 * 1024  # bytes/s, after the grace period
RATE_GRACE_S = 1.0
LIMITS = {
    "ENCLAVE_GATEWAY_MAX_HEADER_BYTES": str(MAX_HEADER),
    "ENCLAVE_GATEWAY_BODY_MIN_RATE_BYTES_PER_S": str(MIN_RATE),
    "ENCLAVE_GATEWAY_BODY_MIN_RATE_GRACE_S": str(RATE_GRACE_S),
    "ENCLAVE_GATEWAY_MAX_INSTANCE_BYTES": str(MAX_INSTANCE),
    "ENCLAVE_GATEWAY_MAX_REQUEST_BYTES": str(MAX_REQUEST),
    "ENCLAVE_GATEWAY_MAX_PARTS": str(MAX_PARTS),
    "ENCLAVE_GATEWAY_BODY_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
}
UPLOAD_TOPICS = (topics.UPLOAD_CHUNK, topics.UPLOAD_RECEIVED, topics.UPLOAD_COMPLETED)


@pytest.fixture(scope="module")
def small_gateway(tmp_path_factory: pytest.TempPathFactory):
    with gateway_process(tmp_path_factory.mktemp("gw-limits"), LIMITS) as gateway:
        yield gateway


def _instance_of_size(size: int) -> bytes:
    """A valid instance of exactly ``size`` bytes (the pixel data absorbs the difference)."""
    uid = generate_uid()  # one UID for both: generated UIDs differ in length, which shifted the size
    base = builders.make_instance(pixel_bytes=1024, patient_id=PHI["PatientID"], sop_instance_uid=uid)
    data = builders.make_instance(
        pixel_bytes=1024 + size - len(base), patient_id=PHI["PatientID"], sop_instance_uid=uid
    )
    assert len(data) == size
    return data


def _valid() -> bytes:
    return mr_instance()[0]


DICOMDIR = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage: a file-set's directory
HARDCOPY = "1.2.840.10008.5.1.1.29"  # Hardcopy Grayscale Image Storage, retired


def _of_sop_class(sop_class_uid: str) -> bytes:
    return builders.make_instance(
        patient_id=PHI["PatientID"], sop_instance_uid=generate_uid(), sop_class_uid=sop_class_uid
    )


def _series_uid_as_fd() -> bytes:
    """SeriesInstanceUID (0020,000E) written with VR FD: the conformance review's case, which the
    gateway accepted and ingest failed as ``unexpected_error``."""
    return builders.with_element_vr(_valid(), 0x0020000E, b"FD")


@dataclass(frozen=True)
class Case:
    """One request and what must come back: an HTTP status, and either the request-level error
    code or the FailureReason of each failed instance; ``accepted`` instances must be published."""

    name: str
    body: builders.Body
    status: int
    error: str | None = None
    failure_reasons: tuple[int, ...] = ()
    accepted: int = 0
    study: str | None = None


def _related(parts: list[bytes], **kwargs: object) -> builders.Body:
    return builders.multipart_body(parts, **kwargs)  # type: ignore[arg-type]


def _cases() -> list[Case]:
    valid, ds = mr_instance()
    truncated = builders.truncate(_valid(), len(valid) - 100)
    bad_vr = builders.with_bad_vr(builders.make_instance(patient_id=PHI["PatientID"]))
    bare = builders.make_instance(
        with_meta=False, patient_id=PHI["PatientID"], sop_instance_uid=generate_uid()
    )
    huge_length = builders.with_huge_pixel_length(builders.make_instance(patient_id=PHI["PatientID"]))
    three = [_valid() for _ in range(3)]
    padded = builders.orthanc_body(three)
    epilogue_at_limit = MAX_REQUEST - len(padded.data)
    at_request_limit = builders.Body(
        padded.content_type, padded.data + b"\r\n" + b" " * (epilogue_at_limit - 2)
    )
    past_request_limit = builders.Body(padded.content_type, at_request_limit.data + b" ")
    assert len(at_request_limit.data) == MAX_REQUEST
    return [
        Case("uid_with_another_vr", _related([_series_uid_as_fd()]), 409, failure_reasons=(0xA900,)),
        Case(
            "modality_with_another_vr",
            _related([builders.with_element_vr(_valid(), 0x00080060, b"FD")]),
            409,
            failure_reasons=(0xA900,),
        ),
        Case("dicomdir_sop_class", _related([_of_sop_class(DICOMDIR)]), 409, failure_reasons=(0x0122,)),
        Case("retired_sop_class", _related([_of_sop_class(HARDCOPY)]), 409, failure_reasons=(0x0122,)),
        Case("truncated", _related([truncated]), 409, failure_reasons=(0xC000,)),
        Case("bad_vr", _related([bad_vr]), 409, failure_reasons=(0xC000,)),
        Case("huge_declared_length", _related([huge_length]), 409, failure_reasons=(0xC000,)),
        *(
            Case(f"non_dicom_{kind}", _related([sample]), 409, failure_reasons=(0xC000,))
            for kind, sample in builders.NON_DICOM_SAMPLES.items()
        ),
        Case("no_meta_bare_dataset_is_accepted", _related([bare]), 200, accepted=1),
        Case(
            "mixed_good_and_truncated",
            _related([_valid(), truncated]),
            202,
            failure_reasons=(0xC000,),
            accepted=1,
        ),
        Case(
            "study_uid_mismatch",
            _related([valid, _valid()]),
            202,
            failure_reasons=(0xC409,),
            accepted=1,
            study=ds.StudyInstanceUID,
        ),
        Case("empty_part", _related([_valid(), b""]), 400, "empty_part"),
        Case(
            "no_parts", builders.Body(_related([]).content_type, b"--enclave-boundary-42--"), 400, "no_parts"
        ),
        Case(
            "missing_boundary_parameter",
            builders.Body('multipart/related; type="application/dicom"', _related([_valid()]).data),
            400,
            "missing_boundary",
        ),
        Case(
            "wrong_boundary",
            builders.Body(
                _related([_valid()]).content_type.replace("enclave-boundary-42", "other"),
                _related([_valid()]).data,
            ),
            400,
            "missing_boundary",
        ),
        Case(
            "truncated_body",
            builders.Body(_related([valid]).content_type, _related([valid]).data[:-30]),
            400,
            "truncated_body",
        ),
        Case("wrong_content_type", builders.Body("text/plain", valid), 415, "unsupported_media_type"),
        Case(
            "wrong_related_type",
            builders.Body("multipart/related; type=application/json; boundary=x", valid),
            415,
            "unsupported_media_type",
        ),
        Case("instance_at_limit", _related([_instance_of_size(MAX_INSTANCE)]), 200, accepted=1),
        Case(
            "instance_past_limit", _related([_instance_of_size(MAX_INSTANCE + 2)]), 413, "instance_too_large"
        ),
        Case(
            "single_part_past_limit",
            builders.Body("application/dicom", _instance_of_size(MAX_INSTANCE + 2)),
            413,
            "instance_too_large",
        ),
        Case("parts_at_limit", _related([_valid() for _ in range(MAX_PARTS)]), 200, accepted=MAX_PARTS),
        Case("parts_past_limit", _related([_valid() for _ in range(MAX_PARTS + 1)]), 413, "too_many_parts"),
        Case("request_at_limit", at_request_limit, 200, accepted=3),
        Case("request_past_limit", past_request_limit, 413, "request_too_large"),
    ]


async def test_hostile_corpus_over_http(small_gateway):
    cases = _cases()
    tenants = {case.name: new_tenant("it-hostile") for case in cases}
    async with TopicWatch(*UPLOAD_TOPICS) as watch:
        async with httpx.AsyncClient(timeout=60) as client:
            for case in cases:
                url = f"{small_gateway.url}/dicomweb/studies" + (f"/{case.study}" if case.study else "")
                headers = {
                    **bearer("it-hostile", tenants[case.name], "uploader"),
                    "Content-Type": case.body.content_type,
                }
                answer = await client.post(url, content=case.body.data, headers=headers)
                assert answer.status_code == case.status, (case.name, answer.status_code, answer.text)
                text = answer.text
                for value in PHI.values():
                    assert value not in text, case.name
                if case.error is not None:
                    body = answer.json()
                    assert body["error"] == case.error, (case.name, body)
                    assert body["status"] == case.status and len(body["message"]) > 20
                else:
                    parsed = Dataset.from_json(answer.json())
                    reasons = tuple(item.FailureReason for item in parsed.get("FailedSOPSequence", []))
                    assert reasons == case.failure_reasons, case.name
                    assert len(parsed.get("ReferencedSOPSequence", [])) == case.accepted, case.name
        published = await watch.read(lambda env: env.tenant in tenants.values())
    for case in cases:
        events = [e for e in published if e.tenant == tenants[case.name]]
        chunked = {
            e.data["instance_upload_id"] for e in events if e.type == topics.event_type(topics.UPLOAD_CHUNK)
        }
        received = [e for e in events if e.type == topics.event_type(topics.UPLOAD_RECEIVED)]
        completed = [e for e in events if e.type == topics.event_type(topics.UPLOAD_COMPLETED)]
        assert len(chunked) == len(received) == case.accepted, case.name
        assert {e.data["instance_upload_id"] for e in received} == chunked, case.name
        assert len(completed) == (1 if case.accepted else 0), case.name
        if completed:
            assert completed[0].data["rejected"] == len(case.failure_reasons), case.name
    assert small_gateway.alive()
    await _still_accepts(small_gateway.url)


async def test_the_stack_gateway_refuses_an_instance_larger_than_deid_can_process():
    """The running gateway, on its default settings, refuses at upload an instance above deid's
    limit: before the twelfth session it acknowledged up to 2 GiB, and deid then quarantined
    anything over 768 MiB (``instance_too_large``), so the hospital learned it only from the status.
    The part declares its size, so the refusal comes before its bytes; nothing of the request,
    including the valid instance before it, is handed off."""
    deid_limit = DeidSettings.model_fields["max_instance_bytes"].default
    tenant = new_tenant("it-hostile")
    body = _related([_valid(), b"\x00" * 1024], content_length=False)
    oversized = body.data.replace(
        b"Content-Type: application/dicom\r\n\r\n\x00",
        f"Content-Type: application/dicom\r\nContent-Length: {deid_limit + 1}\r\n\r\n\x00".encode(),
    )
    assert oversized != body.data
    async with TopicWatch(*UPLOAD_TOPICS) as watch:
        async with httpx.AsyncClient(timeout=60) as client:
            answer = await client.post(
                f"{GATEWAY}/dicomweb/studies",
                content=oversized,
                headers={**bearer("it-hostile", tenant, "uploader"), "Content-Type": body.content_type},
            )
        published = await watch.read(lambda env: env.tenant == tenant)
    assert answer.status_code == 413, answer.text
    error = answer.json()
    assert error["error"] == "instance_too_large"
    assert f"the maximum instance size is {deid_limit} bytes" in error["message"]
    assert published == []


async def test_upload_api_names_each_rejection(small_gateway):
    """The form-data upload API gives, per refused file, the problem and a message saying what is allowed."""
    tenant = new_tenant("it-hostile")
    files = [
        ("file", ("good.dcm", _valid(), "application/dicom")),
        ("file", ("cut.dcm", builders.truncate(_valid(), 5000), "application/dicom")),
        ("file", ("photo.png", builders.NON_DICOM_SAMPLES["png"], "image/png")),
    ]
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(
            f"{small_gateway.url}/api/v1/imaging/upload",
            files=files,
            headers=bearer("it-portal", tenant, "uploader"),
        )
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert [a["filename"] for a in body["accepted"]] == ["good.dcm"]
    rejected = {r["filename"]: r for r in body["rejected"]}
    assert rejected["cut.dcm"]["problem"] == "truncated" and rejected["cut.dcm"]["failure_reason"] == 0xC000
    assert rejected["photo.png"]["problem"] == "part_media_type"
    assert "accepted: application/dicom" in rejected["photo.png"]["message"]
    for value in PHI.values():
        assert value not in answer.text


async def test_upload_api_names_the_attribute_under_another_vr_and_the_sop_class_it_refuses(small_gateway):
    """Per file: an attribute the pipeline reads written under another VR is refused at upload, naming
    the attribute, both VRs and the instance; a class that is no composite instance Storage SOP class
    (a DICOMDIR, a retired class) is refused as 0x0122, naming the class and what is accepted."""
    tenant = new_tenant("it-hostile")
    files = [
        ("file", ("series-fd.dcm", _series_uid_as_fd(), "application/dicom")),
        ("file", ("dicomdir.dcm", _of_sop_class(DICOMDIR), "application/dicom")),
        ("file", ("hardcopy.dcm", _of_sop_class(HARDCOPY), "application/dicom")),
    ]
    async with TopicWatch(*UPLOAD_TOPICS) as watch:
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.post(
                f"{small_gateway.url}/api/v1/imaging/upload",
                files=files,
                headers=bearer("it-portal", tenant, "uploader"),
            )
        published = await watch.read(lambda env: env.tenant == tenant)
    assert answer.status_code == 409, answer.text
    rejected = {r["filename"]: r for r in answer.json()["rejected"]}
    wrong_vr = rejected["series-fd.dcm"]
    assert (wrong_vr["problem"], wrong_vr["failure_reason"]) == ("wrong_vr", 0xA900)
    assert wrong_vr["message"] == "SeriesInstanceUID (0020,000E) has VR FD; it must be UI (PS3.6)"
    for name, title in (("dicomdir.dcm", "Media Storage Directory Storage"), ("hardcopy.dcm", "Hardcopy")):
        refusal = rejected[name]
        assert (refusal["problem"], refusal["failure_reason"]) == ("sop_class_not_allowed", 0x0122), refusal
        assert (
            title in refusal["message"]
            and "accepted: the Storage SOP classes of PS3.4 Annex B" in (refusal["message"])
        )
    for value in PHI.values():
        assert value not in answer.text
    assert published == []


async def test_upload_api_refuses_a_form_without_files(small_gateway):
    """A form whose only fields are not files is a 400 that names the file fields, not an empty 200."""
    headers = bearer("it-portal", new_tenant("it-hostile"), "uploader")
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(
            f"{small_gateway.url}/api/v1/imaging/upload",
            files=[("comment", (None, "see attached"))],
            headers=headers,
        )
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert body["error"] == "no_file_field"
    assert "'file'" in body["message"] and "'files'" in body["message"]


async def _get_with_head_of(url: str, size: int) -> tuple[int, bytes]:
    """GET /healthz whose request line and headers (each with its CRLF) are exactly ``size`` bytes."""
    host, port = url.removeprefix("http://").split(":")
    line = b"GET /healthz HTTP/1.1\r\n"
    fixed = line + b"Host: 127.0.0.1\r\nConnection: close\r\n"
    padding = size - len(fixed) - len(b"X-Pad: \r\n")
    head = fixed + b"X-Pad: " + b"a" * padding + b"\r\n"
    assert len(head) == size
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + b"\r\n")
    await writer.drain()
    response = await reader.read()
    writer.close()
    status = int(response.split(b" ", 2)[1])
    return status, response.partition(b"\r\n\r\n")[2]


async def test_request_head_is_limited_at_the_configured_size(small_gateway):
    """Request line plus headers: at the limit served, one byte past it 431 saying what is allowed."""
    status, _ = await _get_with_head_of(small_gateway.url, MAX_HEADER)
    assert status == 200
    status, body = await _get_with_head_of(small_gateway.url, MAX_HEADER + 1)
    assert status == 431
    answer = json.loads(body)
    assert answer["error"] == "headers_too_large"
    assert (
        f"{MAX_HEADER + 1} bytes" in answer["message"] and f"at most {MAX_HEADER} bytes" in answer["message"]
    )
    assert small_gateway.alive()


async def test_slow_body_is_cut_off_with_408(small_gateway):
    """A client that stops sending mid-body gets 408 after the idle timeout; nothing is published."""
    tenant = new_tenant("it-hostile")
    body = _related([_valid()])
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {body.content_type}\r\n"
        f"Content-Length: {len(body.data)}\r\n{_header_lines(bearer('it-slow', tenant, 'uploader'))}\r\n"
    ).encode()
    async with TopicWatch(*UPLOAD_TOPICS) as watch:
        reader, writer = await asyncio.open_connection("127.0.0.1", small_gateway.port)
        try:
            writer.write(head + body.data[: len(body.data) // 2])
            await writer.drain()
            started = asyncio.get_running_loop().time()
            response = await asyncio.wait_for(reader.read(65536), IDLE_TIMEOUT_S + 10)
            waited = asyncio.get_running_loop().time() - started
            # headers and body may arrive in separate segments: read until the body is complete
            while b"\r\n\r\n" in response:
                head_part, _, body_part = response.partition(b"\r\n\r\n")
                lengths = [
                    int(line.split(b":", 1)[1])
                    for line in head_part.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                if len(body_part) >= (lengths[0] if lengths else 0):
                    break
                more = await asyncio.wait_for(reader.read(65536), 10)
                if not more:
                    break
                response += more
        finally:
            writer.close()
        published = await watch.read(lambda env: env.tenant == tenant)
    status_line, _, rest = response.partition(b"\r\n")
    assert status_line.split()[1] == b"408", response[:300]
    assert b"body_timeout" in rest and b"keep streaming" in rest
    assert IDLE_TIMEOUT_S - 0.5 <= waited < IDLE_TIMEOUT_S + 8
    assert published == []
    await _still_accepts(small_gateway.url)


async def _post_paced(url: str, tenant: str, body: builders.Body, bytes_per_s: int) -> tuple[int, bytes]:
    """POST a STOW body in 1 KiB pieces at about ``bytes_per_s``; the status and body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {body.content_type}\r\n"
        f"Content-Length: {len(body.data)}\r\nConnection: close\r\n"
        f"{_header_lines(bearer('it-pace', tenant, 'uploader'))}\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    first = asyncio.create_task(reader.read(65536))  # the answer may come before the body is sent
    try:
        writer.write(head)
        for start in range(0, len(body.data), 1024):
            if first.done():
                break
            writer.write(body.data[start : start + 1024])
            await writer.drain()
            await asyncio.sleep(1024 / bytes_per_s)
    except ConnectionError:
        pass  # the gateway answered and closed while we were still sending
    response = await asyncio.wait_for(first, 30)
    try:
        while more := await asyncio.wait_for(reader.read(65536), 10):
            response += more
    except ConnectionError:
        pass
    writer.close()
    status = int(response.split(b" ", 2)[1])
    return status, response.partition(b"\r\n\r\n")[2]


async def test_a_trickling_body_is_cut_off_below_the_minimum_rate(small_gateway):
    """Above the minimum rate a body is stored; well below it, 408 body_too_slow once the grace
    period is over, saying the rate seen and the rate required, and nothing is published."""
    tenant = new_tenant("it-hostile")
    async with TopicWatch(*UPLOAD_TOPICS) as watch:
        status, answer = await _post_paced(small_gateway.url, tenant, _related([_valid()]), MIN_RATE // 8)
        published = await watch.read(lambda env: env.tenant == tenant)
    assert status == 408, answer[:300]
    refused = json.loads(answer)
    assert refused["error"] == "body_too_slow"
    assert f"at least {MIN_RATE} bytes/s" in refused["message"]
    assert published == []
    status, answer = await _post_paced(small_gateway.url, tenant, _related([_valid()]), MIN_RATE * 4)
    assert status == 200, answer[:300]


def _header_lines(headers: dict[str, str]) -> str:
    return "".join(f"{name}: {value}\r\n" for name, value in headers.items())


async def _still_accepts(url: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        assert (await client.get(f"{url}/readyz")).status_code == 200
        body = _related([_valid()])
        answer = await client.post(
            f"{url}/dicomweb/studies",
            content=body.data,
            headers={
                **bearer("it-after", new_tenant("it-hostile"), "uploader"),
                "Content-Type": body.content_type,
            },
        )
        assert answer.status_code == 200, answer.text


async def test_compressed_bodies_and_a_study_url_that_is_no_uid_are_request_errors():
    """Found by an API hunt: a gzip body was answered 400 missing_boundary, an unknown encoding was
    read as plain (200), and a study URL that is no UID failed every instance (0xC409) after the
    whole body. Each is now a request-level refusal naming what is allowed, and nothing is published."""
    tenant = new_tenant("it-hostile-line")
    body = _related([_valid()])
    headers = {**bearer("it-hostile", tenant, "uploader"), "Content-Type": body.content_type}
    cases = [
        ("/dicomweb/studies", {"Content-Encoding": "gzip"}, 415, "unsupported_media_type", "uncompressed"),
        ("/dicomweb/studies", {"Content-Encoding": "br"}, 415, "unsupported_media_type", "uncompressed"),
        ("/dicomweb/studies/not-a-uid", {}, 400, "bad_study_uid", "at most 64 characters"),
        ("/dicomweb/studies/1.02.3", {}, 400, "bad_study_uid", "leading zero"),
    ]
    async with TopicWatch(topics.UPLOAD_CHUNK) as watch:
        async with httpx.AsyncClient(timeout=60) as client:
            for path, extra, status, code, hint in cases:
                answer = await client.post(
                    f"{GATEWAY}{path}", content=body.data, headers={**headers, **extra}
                )
                assert answer.status_code == status, (path, extra, answer.text)
                assert answer.json()["error"] == code and hint in answer.json()["message"], answer.text
            plain = await client.post(
                f"{GATEWAY}/dicomweb/studies",
                content=body.data,
                headers={**headers, "Content-Encoding": "identity"},
            )
            assert plain.status_code == 200, plain.text
        chunks = await watch.read(lambda env: env.tenant == tenant)
    assert len(chunks) >= 1  # the identity upload only
    assert all(c.data["upload_id"] == chunks[0].data["upload_id"] for c in chunks)
