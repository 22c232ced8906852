"""Hostile input over HTTP, the broad sweep: one table of DICOM and HTTP attacks sent to the running
gateway (and to a second gateway with small limits, so every limit is tried at the limit and one
past it without moving gigabytes). Each must answer 4xx with a reason (a request-level error code, or
a FailedSOPSequence item with its Failure Reason), never 5xx, echo no planted value, and leave
nothing behind: no ``upload.received`` / ``upload.completed`` for the tenant of the rejected cases,
nothing in the ingest catalogue. Every service stays ready afterwards.

The gateway's own tests (``test_gateway*.py``) go deep on each rule; this file is the corpus sweep.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from enclave_common import topics
from enclave_gateway.linger import LINGER_IDLE_S
from pydicom.uid import generate_uid

from .conftest import SERVICE_PORTS
from .support import PHI, mr_instance
from .test_gateway_support import GATEWAY, TopicWatch, bearer, builders, gateway_process

#: The corpus writes invalid values on purpose; pydicom warns while writing them.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

RUN = uuid.uuid4().hex[:8]
#: Every rejected case uploads under this tenant; nothing may ever be received for it.
REJECTED_TENANT = f"hostile-{RUN}"
#: The limits of the second gateway (every limit at the limit and just past it).
SMALL = {
    "max_parts": 8,
    "max_instance_bytes": 64 * 1024,
    "max_request_bytes": 160 * 1024,
    "idle_s": 2.0,
    "header_timeout_s": 2.0,
}
PLANTED = (*PHI.values(), builders.PLANTED_PATIENT_ID, builders.PLANTED_PATIENT_NAME)
KIB = 1024


@dataclass(frozen=True)
class Case:
    """One hostile request and what the gateway must answer."""

    name: str
    build: Callable[[], tuple[str, dict[str, str], bytes]]  # (path, headers, body)
    status: int | tuple[int, ...]
    #: request-level error code, or the PS3.18 Failure Reason of the (only) failed instance
    reason: str | int | None = None
    gateway: str = "main"  # or "small": the second gateway with SMALL limits
    extra: dict[str, Any] = field(default_factory=dict)


def related(*parts: bytes, **kwargs: Any) -> tuple[str, dict[str, str], bytes]:
    body = builders.multipart_body(list(parts), **kwargs)
    return "/dicomweb/studies", {"Content-Type": body.content_type}, body.data


def raw(
    content_type: str | None, data: bytes, path: str = "/dicomweb/studies"
) -> tuple[str, dict[str, str], bytes]:
    return path, ({"Content-Type": content_type} if content_type else {}), data


def native_pixels_labelled_rle() -> bytes:
    """Native Pixel Data under the RLE Lossless transfer syntax: no reader downstream decodes it."""
    data = instance(pixel_bytes=64)
    native, rle = (uid.encode().ljust(20, b"\0") for uid in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5"))
    assert data.count(native) == 1
    return data.replace(native, rle)


def accepting(accept: str) -> tuple[str, dict[str, str], bytes]:
    """A well-formed STOW-RS request whose Accept admits no response the gateway sends."""
    path, headers, body = related(instance())
    return path, {**headers, "Accept": accept}, body


def content_lengths_disagree() -> tuple[str, dict[str, str], bytes]:
    """A part with two Content-Length fields, the true length and another (a smuggling shape)."""
    data = instance(pixel_bytes=64)
    head = b"--cd\r\nContent-Length: %d\r\nContent-Length: %d\r\n\r\n" % (len(data), len(data) + 10)
    return raw("multipart/related; boundary=cd", head + data + b"\r\n--cd--")


def instance(**fields: Any) -> bytes:
    return builders.make_instance(pixel_bytes=fields.pop("pixel_bytes", 2048), **fields)


def with_private_blob(size: int) -> bytes:
    """A bare dataset whose private OB element before the Study/Series UIDs is ``size`` bytes."""
    data = builders.make_instance(with_meta=False)
    at = data.find(b"\x10\x00\x10\x00")  # PatientName (0010,0010): insert a private (0009,1010) before it
    blob = struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, size) + bytes(size)
    creator = struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 6) + b"ENCLV "
    return data[:at] + creator + blob + data[at:]


def _fixed_uid() -> str:
    """A valid UID of constant length (so an instance's size can be set to the byte)."""
    return f"2.25.1{uuid.uuid4().int:039d}"


def instance_of_size(size: int) -> bytes:
    """A valid Part 10 MR instance of exactly ``size`` bytes (pixel bytes adjusted until it fits)."""
    pixels = max(2, size - 400)
    for _ in range(4):
        data = builders.make_instance(pixel_bytes=pixels, sop_instance_uid=_fixed_uid())
        if len(data) == size:
            return data
        pixels += size - len(data)
    raise AssertionError(f"could not build an instance of {size} bytes (got {len(data)})")


def one_past_instance_limit() -> bytes:
    """An instance at the size limit plus one byte (a valid instance always has an even length)."""
    return instance_of_size(SMALL["max_instance_bytes"]) + b"\x00"


def request_of_size(size: int) -> tuple[str, dict[str, str], bytes]:
    """Three valid instances, each under the instance limit, in a body of exactly ``size`` bytes
    (one byte past a limit goes into the epilogue, which counts towards the request size)."""
    each = 52 * KIB
    framing = len(builders.multipart_body([b"", b"", b""]).data)
    rest = size - framing - 2 * each
    extra = b""
    if rest % 2:
        rest, extra = rest - 1, b"x"
    parts = [instance_of_size(each), instance_of_size(each), instance_of_size(rest)]
    body = builders.multipart_body(parts, epilogue=extra)
    assert len(body.data) == size, (len(body.data), size)
    return "/dicomweb/studies", {"Content-Type": body.content_type}, body.data


def meta_without_group2() -> bytes:
    bare = builders.make_instance(with_meta=False)
    return bytes(128) + b"DICM" + bare


def huge_meta_group_length() -> bytes:
    data = instance()
    return data[:140] + struct.pack("<I", 0x7FFFFFF0) + data[144:]


def tags_out_of_order() -> bytes:
    data = builders.make_instance(with_meta=False)
    at = data.find(b"\x10\x00\x20\x00")  # PatientID moved in front of SOPClassUID
    end = at + 8 + struct.unpack_from("<H", data, at + 6)[0]
    return data[at:end] + data[:at] + data[end:]


def big_endian() -> bytes:
    return builders.pydicom_file("MR_small_bigendian.dcm")


def deflate_garbage() -> bytes:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    data = builders.make_instance(DeflatedExplicitVRLittleEndian, pixel_bytes=4000)
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    return data[:meta_end] + b"\xff" * 64


def empty_parts(n: int) -> tuple[str, dict[str, str], bytes]:
    boundary = "b0undary"
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n\r\n" for _ in range(n)
    )
    return raw(f'multipart/related; type="application/dicom"; boundary={boundary}', body + b"--b0undary--")


def tiny_parts(n: int) -> tuple[str, dict[str, str], bytes]:
    return related(*[b"x%d" % i for i in range(n)])


def headers_per_part(n: int) -> tuple[str, dict[str, str], bytes]:
    return related(instance(), extra_headers=[f"X-Flood-{i}: {'v' * 10}" for i in range(n)])


def part_header_bytes(size: int) -> tuple[str, dict[str, str], bytes]:
    # "Content-Type: application/dicom\r\n" + "X-Big: <v>\r\n" + "\r\n" => size bytes of header block
    fixed = len("Content-Type: application/dicom\r\n") + len("X-Big: \r\n") + 2
    return related(instance(), extra_headers=[f"X-Big: {'v' * (size - fixed)}"])


def study_mismatch() -> tuple[str, dict[str, str], bytes]:
    path, headers, body = related(instance())
    return f"/dicomweb/studies/{generate_uid()}", headers, body


CASES: list[Case] = [
    # ---- DICOM: per-instance refusals (409 + FailedSOPSequence with the Failure Reason)
    Case("truncated_pixel_data", lambda: related(instance()[:-62]), 409, 0xC000),
    Case("truncated_in_header", lambda: related(instance()[:300]), 409, 0xC000),
    Case("truncated_in_file_meta", lambda: related(instance()[:150]), 409, 0xC000),
    Case("dicm_without_file_meta", lambda: related(meta_without_group2()), 409, 0xC000),
    Case("file_meta_huge_group_length", lambda: related(huge_meta_group_length()), 409, 0xC000),
    Case("bad_vr", lambda: related(builders.with_bad_vr(instance())), 409, 0xC000),
    Case(
        "huge_declared_pixel_length",
        lambda: related(builders.with_huge_pixel_length(instance())),
        409,
        0xC000,
    ),
    Case(
        "declared_length_past_end",
        lambda: related(builders.with_huge_pixel_length(instance(), 10_000)),
        409,
        0xC000,
    ),
    Case("tags_out_of_order", lambda: related(tags_out_of_order()), 409, 0xC000),
    Case("native_pixel_data_under_rle", lambda: related(native_pixels_labelled_rle()), 409, 0xC000),
    Case("sequence_depth_17", lambda: related(builders.nested_sequences(17)), 409, 0xC000),
    Case("sequence_depth_5000", lambda: related(builders.nested_sequences(5000)), 409, 0xC000),
    Case("deflate_bomb", lambda: related(builders.deflate_bomb()), 409, 0xA700),
    Case("deflate_garbage", lambda: related(deflate_garbage()), 409, 0xC000),
    Case("header_window_past_1mib", lambda: related(with_private_blob(1024 * KIB + 16)), 409, 0xA700),
    Case("uid_leading_zero", lambda: related(instance(sop_instance_uid="1.02.3")), 409, 0xA900),
    Case("uid_letters", lambda: related(instance(sop_instance_uid="1.2.abc")), 409, 0xA900),
    Case("uid_too_long", lambda: related(instance(series_uid="1." + "2" * 70)), 409, 0xA900),
    Case("uid_double_dot", lambda: related(instance(study_uid="1..2")), 409, 0xA900),
    Case(
        "missing_sop_instance_uid",
        lambda: related(builders.make_instance(with_meta=False, sop_instance_uid="")),
        409,
        0xA900,
    ),
    Case(
        "missing_patient_id",
        lambda: related(builders.make_instance(with_meta=False, patient_id=None)),
        409,
        0xA900,
    ),
    Case("patient_id_over_64", lambda: related(instance(patient_id="P" * 65)), 409, 0xA900),
    Case("study_uid_mismatch_with_url", study_mismatch, 409, 0xC409),
    Case("big_endian_transfer_syntax", lambda: related(big_endian()), 409, 0xC122),
    Case("verification_sop_class", lambda: related(instance(sop_class_uid="1.2.840.10008.1.1")), 409, 0x0122),
    *[
        Case(f"not_dicom_{name}", (lambda d=data: related(d)), 409, 0xC000)
        for name, data in sorted(builders.NON_DICOM_SAMPLES.items())
    ],
    Case("part_type_text_plain", lambda: related(instance(), part_type="text/plain"), 409, 0xC000),
    # ---- multipart abuse: request-level refusals (400/413/415 + error code)
    Case("no_content_type", lambda: raw(None, instance()), 415, "unsupported_media_type"),
    Case("accept_only_dicom_xml", lambda: accepting("application/dicom+xml"), 406, "not_acceptable"),
    Case("content_type_text_plain", lambda: raw("text/plain", instance()), 415, "unsupported_media_type"),
    Case(
        "related_type_png",
        lambda: raw('multipart/related; type="image/png"; boundary=x', b"--x--"),
        415,
        "unsupported_media_type",
    ),
    Case(
        "missing_boundary_parameter",
        lambda: raw('multipart/related; type="application/dicom"', instance()),
        400,
        "missing_boundary",
    ),
    Case(
        "boundary_not_in_body",
        lambda: raw('multipart/related; type="application/dicom"; boundary=nothere', related(instance())[2]),
        400,
        "missing_boundary",
    ),
    Case("boundary_201_chars", lambda: related(instance(), boundary="b" * 201), 400, "missing_boundary"),
    Case(
        "repeated_boundary",
        lambda: raw(
            "multipart/related; boundary=rb",
            b"--rb\r\n--rb\r\nContent-Type: application/dicom\r\n\r\nx\r\n--rb--",
        ),
        400,
        "repeated_boundary",
    ),
    Case(
        "garbage_after_boundary",
        lambda: raw("multipart/related; boundary=gb", b"--gbXYZ\r\n\r\nx\r\n--gb--"),
        400,
        "malformed_multipart",
    ),
    Case("one_empty_part", lambda: empty_parts(1), 400, "empty_part"),
    Case("ten_thousand_empty_parts", lambda: empty_parts(10_000), 400, "empty_part"),
    Case("no_parts", lambda: raw("multipart/related; boundary=np", b"--np--"), 400, "no_parts"),
    Case(
        "body_ends_before_close",
        lambda: raw(
            "multipart/related; boundary=tb", b"--tb\r\nContent-Type: application/dicom\r\n\r\n" + instance()
        ),
        400,
        "truncated_body",
    ),
    Case(
        "part_content_length_lies",
        lambda: raw(
            "multipart/related; boundary=cl",
            b"--cl\r\nContent-Length: 5000\r\n\r\n" + instance(pixel_bytes=64) + b"\r\n--cl--",
        ),
        400,
        "part_length_mismatch",
    ),
    Case("part_content_lengths_disagree", content_lengths_disagree, 400, "bad_part_headers"),
    Case(
        "malformed_part_header_line",
        lambda: raw("multipart/related; boundary=mh", b"--mh\r\nthis is no header\r\n\r\nx\r\n--mh--"),
        400,
        "bad_part_headers",
    ),
    Case("part_header_flood_33", lambda: headers_per_part(32), 400, "bad_part_headers"),
    Case("part_header_block_past_16kib", lambda: part_header_bytes(16 * KIB + 64), 400, "bad_part_headers"),
    Case(
        "preamble_past_64kib",
        lambda: related(instance(), preamble=b"p" * (64 * KIB + 1) + b"\r\n"),
        400,
        "missing_boundary",
    ),
    Case(
        "part_declares_over_2gib",
        lambda: raw("multipart/related; boundary=big", b"--big\r\nContent-Length: 2147483649\r\n\r\nDICM"),
        413,
        "instance_too_large",
    ),
    Case("application_dicom_empty", lambda: raw("application/dicom", b""), 400, "empty_part"),
    # ---- every configurable limit, at the limit (accepted by the request) and one past it (small gateway)
    Case(
        "parts_at_limit_8",
        lambda: tiny_parts(SMALL["max_parts"]),
        409,
        None,
        "small",
        {"failed": SMALL["max_parts"]},
    ),
    Case("parts_past_limit_9", lambda: tiny_parts(SMALL["max_parts"] + 1), 413, "too_many_parts", "small"),
    Case(
        "instance_past_limit_by_bytes",
        lambda: related(one_past_instance_limit()),
        413,
        "instance_too_large",
        "small",
    ),
    Case(
        "instance_past_limit_declared",
        lambda: related(one_past_instance_limit(), content_length=True),
        413,
        "instance_too_large",
        "small",
    ),
    Case(
        "single_dicom_past_limit",
        lambda: raw("application/dicom", one_past_instance_limit()),
        413,
        "instance_too_large",
        "small",
    ),
    Case(
        "request_past_limit",
        lambda: request_of_size(SMALL["max_request_bytes"] + 1),
        413,
        "request_too_large",
        "small",
    ),
]

# At-the-limit uploads that are accepted go to their own tenant (they are stored, as they should be).
ACCEPTED_AT_LIMIT: list[tuple[str, Callable[[], tuple[str, dict[str, str], bytes]]]] = [
    ("instance_at_limit", lambda: related(instance_of_size(SMALL["max_instance_bytes"]))),
    ("request_at_limit", lambda: request_of_size(SMALL["max_request_bytes"])),
]


def test_the_corpus_is_broad() -> None:
    assert len(CASES) + len(HTTP_CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def small_gateway(tmp_path_factory: pytest.TempPathFactory):
    overrides = {
        "ENCLAVE_GATEWAY_MAX_PARTS": str(SMALL["max_parts"]),
        "ENCLAVE_GATEWAY_MAX_INSTANCE_BYTES": str(SMALL["max_instance_bytes"]),
        "ENCLAVE_GATEWAY_MAX_REQUEST_BYTES": str(SMALL["max_request_bytes"]),
        "ENCLAVE_GATEWAY_BODY_IDLE_TIMEOUT_S": str(SMALL["idle_s"]),
        "ENCLAVE_GATEWAY_HTTP_HEADER_TIMEOUT_S": str(SMALL["header_timeout_s"]),
    }
    with gateway_process(tmp_path_factory.mktemp("small-gateway"), overrides) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def sweep_watch():
    """Upload topics watched from before the first case, read once at the end of the module."""
    watch = TopicWatch(topics.UPLOAD_RECEIVED, topics.UPLOAD_COMPLETED)
    asyncio.run(watch.__aenter__())
    return watch


def _reason_of(body: Any) -> str | int | None:
    if isinstance(body, dict) and "error" in body:
        return body["error"]
    if isinstance(body, dict) and "00081198" in body:
        items = body["00081198"].get("Value", [])
        return items[0]["00081197"]["Value"][0] if items else None
    if isinstance(body, dict) and "rejected" in body:
        return body["rejected"][0]["failure_reason"] if body["rejected"] else None
    return None


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_request_is_refused_with_a_reason(case: Case, small_gateway, sweep_watch) -> None:
    base = small_gateway.url if case.gateway == "small" else GATEWAY
    path, headers, body = case.build()
    headers = {**headers, **bearer("hostile-sender", REJECTED_TENANT, "uploader")}
    response = httpx.post(f"{base}{path}", content=body, headers=headers, timeout=120)
    statuses = case.status if isinstance(case.status, tuple) else (case.status,)
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert 400 <= response.status_code < 500
    payload = response.json()
    for value in PLANTED:
        assert value not in response.text
    if case.reason is not None:
        assert _reason_of(payload) == case.reason, payload
    if isinstance(case.reason, int):  # per-instance: exactly one failed item, nothing referenced as stored
        assert len(payload["00081198"]["Value"]) == 1
        assert not payload.get("00081199", {}).get("Value")
    elif isinstance(case.reason, str):
        assert payload["message"], "a request-level refusal says what was wrong and what is allowed"
    if "failed" in case.extra:
        assert len(payload["00081198"]["Value"]) == case.extra["failed"]


@pytest.mark.parametrize(("name", "build"), ACCEPTED_AT_LIMIT, ids=[n for n, _ in ACCEPTED_AT_LIMIT])
def test_at_the_limit_is_accepted(name: str, build, small_gateway) -> None:
    path, headers, body = build()
    headers = {**headers, **bearer("hostile-sender", f"hostile-ok-{RUN}", "uploader")}
    response = httpx.post(f"{small_gateway.url}{path}", content=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text[:500]


# ---- HTTP-level attacks on the socket (the server, not our parser, answers some of these)


def _exchange(port: int, payload: bytes | list[tuple[bytes, float]], timeout: float = 30.0) -> bytes:
    """Send raw bytes (or (bytes, delay-after) steps) and read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        steps = payload if isinstance(payload, list) else [(payload, 0.0)]
        try:
            for data, delay in steps:
                sock.sendall(data)
                time.sleep(delay)
        except OSError:
            pass  # the server may close while we still send; its answer is what counts
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def _status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


def _request_head(path: str, headers: dict[str, str], tenant: str = REJECTED_TENANT) -> bytes:
    all_headers = {"Host": "127.0.0.1", **bearer("hostile-sender", tenant, "uploader"), **headers}
    return (
        f"POST {path} HTTP/1.1\r\n".encode()
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in all_headers.items())
        + b"\r\n"
    )


def _header_flood() -> bytes:
    flood = {f"X-Flood-{i}": "v" * 100 for i in range(2000)}
    return (
        _request_head(
            "/dicomweb/studies", {"Content-Type": "application/dicom", "Content-Length": "4", **flood}
        )
        + b"DICM"
    )


def _one_huge_header() -> bytes:
    return (
        _request_head(
            "/dicomweb/studies",
            {"Content-Type": "application/dicom", "X-Huge": "h" * 256 * 1024, "Content-Length": "4"},
        )
        + b"DICM"
    )


def _bad_content_length() -> bytes:
    return (
        _request_head("/dicomweb/studies", {"Content-Type": "application/dicom", "Content-Length": "abc"})
        + b"DICM"
    )


def _bad_chunk_size() -> bytes:
    return (
        _request_head(
            "/dicomweb/studies", {"Content-Type": "application/dicom", "Transfer-Encoding": "chunked"}
        )
        + b"zz\r\nDICM\r\n0\r\n\r\n"
    )


def _slow_loris_body() -> list[tuple[bytes, float]]:
    ct = "multipart/related; boundary=slow"
    head = _request_head("/dicomweb/studies", {"Content-Type": ct, "Content-Length": "100000"})
    return [(head, 0.2), (b"--slow\r\nContent-Type: application/dicom\r\n\r\n", 0.2), (b"DICM", 0.0)]


def _slow_trickle_then_stall() -> list[tuple[bytes, float]]:
    ct = "multipart/related; boundary=slow"
    head = _request_head("/dicomweb/studies", {"Content-Type": ct, "Content-Length": "100000"})
    return [(head, 0.5), *[(b"-", 0.5) for _ in range(4)]]


def _stalled_head() -> list[tuple[bytes, float]]:
    """Half a request head, carrying a planted value, then nothing."""
    head = _request_head("/dicomweb/studies", {"Content-Type": "application/dicom", "X-Note": PLANTED[0]})
    return [(head[: len(head) // 2], 0.0)]


def _head_a_byte_at_a_time() -> list[tuple[bytes, float]]:
    """A head that never stops for long (slowloris): a byte every 50 ms, 4 s in all."""
    head = b"GET /api/v1/imaging/" + b"0" * 40 + b" HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 40
    return [(head[i : i + 1], 0.05) for i in range(80)]


def _no_token() -> bytes:
    return b"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\nContent-Length: 4\r\n\r\nDICM"


def _garbage_token() -> bytes:
    return (
        b"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer not.a.jwt\r\n"
        b"Content-Type: application/dicom\r\nContent-Length: 4\r\n\r\nDICM"
    )


HTTP_CASES: list[tuple[str, Callable[[], bytes | list[tuple[bytes, float]]], tuple[int, ...], str]] = [
    ("request_header_flood", _header_flood, (400, 413, 431), "main"),
    ("one_256kib_header", _one_huge_header, (400, 413, 431), "main"),
    ("content_length_not_a_number", _bad_content_length, (400,), "main"),
    ("chunked_bad_chunk_size", _bad_chunk_size, (400,), "main"),
    ("slow_loris_stalled_body", _slow_loris_body, (408,), "small"),
    ("slow_trickle_then_stall", _slow_trickle_then_stall, (408,), "small"),
    ("head_stalled_part_way", _stalled_head, (408,), "small"),
    ("head_a_byte_at_a_time", _head_a_byte_at_a_time, (408,), "small"),
    ("no_bearer_token", _no_token, (401,), "main"),
    ("garbage_bearer_token", _garbage_token, (401,), "main"),
]


@pytest.mark.parametrize(("name", "payload", "statuses", "where"), HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_http_level_attack_is_refused(name, payload, statuses, where, small_gateway, sweep_watch) -> None:
    port = small_gateway.port if where == "small" else SERVICE_PORTS["gateway"]
    started = time.monotonic()
    answer = _exchange(port, payload())
    assert _status(answer) in statuses, answer[:300]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert body.strip(), "the refusal carries a reason"
    for value in PLANTED:
        assert value.encode() not in answer
    if where == "small" and 408 in statuses:
        assert time.monotonic() - started < SMALL["idle_s"] + 15, (
            "a stalled body is cut off by the idle timeout"
        )


@pytest.mark.parametrize("token", [False, True], ids=["no_token", "wrong_role"])
def test_a_refused_upload_whose_client_stalls_mid_body_is_closed(token: bool, small_gateway) -> None:
    """Refused before its body is read (401, or 403 for a role that may not upload), the client sends
    a little more and stops. uvicorn alone held such a connection for good (one byte after the answer
    cancelled its keep-alive timer); the gateway now drops the rest of the body for at most
    ``LINGER_IDLE_S`` of silence, then answers and closes (``enclave_gateway.linger``)."""
    headers = {"Host": "x", "Content-Type": "application/dicom", "Content-Length": str(1024 * 1024)}
    if token:
        headers |= bearer("hostile-sender", REJECTED_TENANT, "auditor")
    head = b"POST /dicomweb/studies HTTP/1.1\r\n" + b"".join(
        f"{k}: {v}\r\n".encode() for k, v in headers.items()
    )
    head += b"\r\n"
    started = time.monotonic()
    answer = _exchange(small_gateway.port, [(head, 0.3), (b"\0" * 4096, 0.0)], timeout=40)
    closed_after = time.monotonic() - started
    assert _status(answer) == (403 if token else 401), answer[:300]
    assert b"connection: close" in answer.lower()
    assert closed_after < LINGER_IDLE_S + 10, f"held {closed_after:.1f} s"


def test_a_connection_that_sends_no_request_is_closed_and_every_timed_out_head_counted(small_gateway) -> None:
    """uvicorn held a connection that never sent a byte for good; the gateway closes it once
    ``ENCLAVE_GATEWAY_HTTP_HEADER_TIMEOUT_S`` passes, without an answer, and counts it apart from the
    heads it answered 408."""

    def counted(answered: str) -> float:
        metrics = httpx.get(f"{small_gateway.url}/metrics", timeout=10).text
        line = f'enclave_http_header_timeouts_total{{answered="{answered}"}} '
        return sum(float(row.split()[-1]) for row in metrics.splitlines() if row.startswith(line))

    before = counted("false"), counted("true")
    started = time.monotonic()
    assert _exchange(small_gateway.port, [], timeout=30) == b""
    assert time.monotonic() - started < SMALL["header_timeout_s"] + 5
    assert _status(_exchange(small_gateway.port, _stalled_head())) == 408
    assert (counted("false"), counted("true")) == (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize("path", ["/api/v1/no-such-route", "/healthz"])
def test_a_client_answered_before_its_body_is_closed_once_it_goes_silent(path: str, small_gateway) -> None:
    """A route that answers without reading a declared body (an unknown path's 404, a GET route), and
    the client then sends one byte of it and stops: uvicorn dropped the byte, cancelled its
    keep-alive timer and held the connection for good (found by the review of the twenty-first
    session); the head's limit now counts what follows an answer."""
    with socket.create_connection(("127.0.0.1", small_gateway.port), timeout=30) as sock:
        method = "POST" if "no-such" in path else "GET"
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 ")
        sock.sendall(b"x")
        started = time.monotonic()
        while sock.recv(65536):
            pass
    assert time.monotonic() - started < SMALL["header_timeout_s"] + 5


def test_a_stalled_client_does_not_block_others(small_gateway) -> None:
    """While a slow-loris body holds a connection, other clients are served."""
    with socket.create_connection(("127.0.0.1", SERVICE_PORTS["gateway"]), timeout=30) as sock:
        sock.sendall(_slow_loris_body()[0][0] + b"--slow\r\n")
        data, _ = mr_instance()
        body = builders.multipart_body([data])
        headers = {
            "Content-Type": body.content_type,
            **bearer("hostile-sender", f"hostile-ok-{RUN}", "uploader"),
        }
        response = httpx.post(f"{GATEWAY}/dicomweb/studies", content=body.data, headers=headers, timeout=30)
        assert response.status_code == 200, response.text[:300]


# ---- after the sweep: nothing partially stored, everything still healthy (runs last in this module)


def test_zz_nothing_of_the_rejected_cases_was_received_or_stored(sweep_watch, mongo_sync) -> None:
    mine = lambda e: e.tenant == REJECTED_TENANT  # noqa: E731
    leaked = asyncio.run(sweep_watch.read(mine))
    assert leaked == [], [(e.type, e.id) for e in leaked]
    assert mongo_sync["ingest"]["instances"].count_documents({"tenant": REJECTED_TENANT}) == 0
    assert mongo_sync["gateway"]["instances"].count_documents({"tenant": REJECTED_TENANT}) == 0


def test_zz_every_service_is_ready_after_the_sweep(small_gateway) -> None:
    for name, port in SERVICE_PORTS.items():
        response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        assert response.status_code == 200, (name, response.text)
    assert httpx.get(f"{small_gateway.url}/readyz", timeout=10).status_code == 200
    assert small_gateway.alive()


@pytest.fixture(scope="module")
def mongo_sync():
    from pymongo import MongoClient

    from .conftest import MONGO_URL

    client: MongoClient[dict[str, Any]] = MongoClient(MONGO_URL, tz_aware=True, serverSelectionTimeoutMS=5000)
    yield client
    client.close()
