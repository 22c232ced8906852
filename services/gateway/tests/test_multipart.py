"""The streaming multipart parser: real client shapes, every limit at and past it, hostile framing."""

from __future__ import annotations

import pytest
from corpus import builders as corpus  # tests/conftest.py puts this directory on sys.path
from enclave_gateway.multipart import (
    BodyKind,
    BodyLimits,
    EmptyPartError,
    InstanceTooLargeError,
    MalformedMultipartError,
    MissingBoundaryError,
    MultipartParser,
    NoPartsError,
    PartData,
    PartEnd,
    PartHeaderError,
    PartLengthMismatchError,
    PartStart,
    RepeatedBoundaryError,
    RequestBodyError,
    RequestTooLargeError,
    TooManyPartsError,
    TruncatedBodyError,
    UnsupportedMediaTypeError,
    aiter_events,
    iter_events,
    parse_body_format,
    parser_for,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

INSTANCES = [b"first instance bytes", b"\r\n--not-the-boundary\r\n second", bytes(range(256)) * 40]


def parse(content_type: str, chunks: list[bytes], limits: BodyLimits | None = None) -> list[tuple]:
    """Parse and return, per part, (headers, body bytes, size reported by PartEnd)."""
    parser = parser_for(parse_body_format(content_type), limits)
    parts: list[list] = []
    for event in iter_events(parser, chunks):
        if isinstance(event, PartStart):
            assert event.index == len(parts)
            parts.append([event.headers, bytearray(), None])
        elif isinstance(event, PartData):
            assert event.data, "no empty data events"
            parts[event.index][1] += event.data
        else:
            assert isinstance(event, PartEnd)
            parts[event.index][2] = event.size
    return [(headers, bytes(body), size) for headers, body, size in parts]


def bodies_of(body, chunk_sizes=(1 << 20,), limits=None) -> list[bytes]:
    parsed = parse(body.content_type, corpus.split(body.data, list(chunk_sizes)), limits)
    for _, data, size in parsed:
        assert size == len(data)
    return [data for _, data, _ in parsed]


# --------------------------------------------------------------------------- real clients


@pytest.mark.parametrize(
    "shape",
    [
        corpus.python_dicomweb_client_body,
        corpus.npm_dicomweb_client_body,
        corpus.orthanc_body,
        corpus.form_data_body,
    ],
    ids=["python-dicomweb-client", "npm-dicomweb-client", "orthanc", "httpx-form-data"],
)
@pytest.mark.parametrize("chunk_sizes", [(1,), (7, 3, 64), (1 << 20,)], ids=["1-byte", "mixed", "whole"])
def test_real_client_bodies_give_back_every_instance(shape, chunk_sizes) -> None:
    body = shape(INSTANCES)
    assert bodies_of(body, chunk_sizes) == INSTANCES


def test_real_client_single_instance_and_dicom_files() -> None:
    files = [corpus.pydicom_file("CT_small.dcm"), corpus.pydicom_file("MR_small.dcm")]
    for shape in (corpus.python_dicomweb_client_body, corpus.npm_dicomweb_client_body, corpus.orthanc_body):
        assert bodies_of(shape(files[:1]), (4096,)) == files[:1]
        assert bodies_of(shape(files), (1000, 17)) == files


def test_orthanc_unquoted_long_boundary_and_content_length() -> None:
    body = corpus.orthanc_body(INSTANCES)
    fmt = parse_body_format(body.content_type)
    assert fmt.kind is BodyKind.RELATED
    assert len(fmt.boundary) == 73  # longer than RFC 2046's 70, as Orthanc sends it
    headers = [h for h, _, _ in parse(body.content_type, [body.data])]
    assert [h.content_length for h in headers] == [len(i) for i in INSTANCES]
    assert all(h.media_type == "application/dicom" for h in headers)


def test_npm_client_nul_padding_after_close_is_ignored() -> None:
    body = corpus.npm_dicomweb_client_body(INSTANCES)
    assert body.data.endswith(b"\x00" * 10)
    assert bodies_of(body) == INSTANCES


def test_form_data_exposes_field_and_filename() -> None:
    body = corpus.form_data_body(INSTANCES[:2])
    headers = [h for h, _, _ in parse(body.content_type, [body.data])]
    assert [h.form_field for h in headers] == ["file", "file"]
    assert [h.filename for h in headers] == ["instance-0.dcm", "instance-1.dcm"]


def test_single_part_application_dicom() -> None:
    data = corpus.pydicom_file("MR_small.dcm")
    parsed = parse("application/dicom", corpus.split(data, [333]))
    assert [(h.media_type, body) for h, body, _ in parsed] == [("application/dicom", data)]


@pytest.mark.parametrize(
    "options",
    [
        {"quoted": False},
        {"leading_crlf": True},
        {"preamble": b"This is a preamble, ignored.\r\nSecond line"},
        {"epilogue": b"\r\nepilogue text\r\n"},
        {"content_length": True},
        {"part_type": None},
        {"extra_headers": ["Content-Location: /studies/1", "X-Folded: a", " continued"]},
    ],
)
def test_rfc2046_variants_are_accepted(options) -> None:
    body = corpus.multipart_body(INSTANCES, **options)
    for sizes in ((1,), (5, 11), (1 << 16,)):
        assert bodies_of(body, sizes) == INSTANCES


def test_part_without_content_type_takes_the_body_type() -> None:
    body = corpus.multipart_body(INSTANCES[:1], part_type=None)
    [(headers, _, _)] = parse(body.content_type, [body.data])
    assert headers.media_type == "application/dicom"


def test_transport_padding_after_boundary() -> None:
    body = b"--b  \t\r\nContent-Type: application/dicom\r\n\r\nxyz\r\n--b-- \r\n"
    assert bodies_of(corpus.Body("multipart/related; boundary=b", body)) == [b"xyz"]


async def test_async_stream_of_chunks() -> None:
    body = corpus.orthanc_body(INSTANCES)

    async def stream():
        for chunk in corpus.split(body.data, [10]):
            yield chunk

    sizes = [e.size async for e in aiter_events(body.content_type, stream()) if isinstance(e, PartEnd)]
    assert sizes == [len(i) for i in INSTANCES]


# --------------------------------------------------------------------------- content type


@pytest.mark.parametrize(
    ("content_type", "error"),
    [
        (None, UnsupportedMediaTypeError),
        ("", UnsupportedMediaTypeError),
        ("text/plain", UnsupportedMediaTypeError),
        ("application/json", UnsupportedMediaTypeError),
        ('multipart/related; type="application/dicom+json"; boundary=x', UnsupportedMediaTypeError),
        ('multipart/related; type="application/dicom"', MissingBoundaryError),
        ("multipart/form-data", MissingBoundaryError),
        ('multipart/related; boundary=""', MissingBoundaryError),
        ("multipart/related; boundary=" + "x" * 201, MissingBoundaryError),
    ],
)
def test_unacceptable_content_types(content_type, error) -> None:
    with pytest.raises(error) as caught:
        parse_body_format(content_type)
    assert caught.value.status_code == (415 if error is UnsupportedMediaTypeError else 400)
    assert "accepted" in str(caught.value) or "boundary" in str(caught.value)


@pytest.mark.parametrize(
    "content_type",
    [
        'multipart/related; type="application/dicom"; boundary="abc"',
        "multipart/related; type=application/dicom; boundary=abc",
        'Multipart/Related;boundary=abc;type="Application/DICOM"',
        "multipart/related; boundary=abc",
    ],
)
def test_acceptable_content_type_spellings(content_type) -> None:
    fmt = parse_body_format(content_type)
    assert (fmt.kind, fmt.boundary) == (BodyKind.RELATED, b"abc")


# --------------------------------------------------------------------------- framing errors


def _expect(error, content_type: str, data: bytes, limits: BodyLimits | None = None, sizes=(1, 1 << 20)):
    for size in sizes:
        with pytest.raises(error) as caught:
            parse(content_type, corpus.split(data, [size]) if data else [], limits)
        assert isinstance(caught.value, RequestBodyError)
        message = str(caught.value)
        assert message
        assert "\x00" not in message
    return caught.value


def test_wrong_boundary_is_missing_boundary() -> None:
    body = corpus.multipart_body(INSTANCES, boundary="actual")
    err = _expect(MissingBoundaryError, "multipart/related; boundary=declared", body.data)
    assert err.status_code == 400


def test_missing_boundary_gives_up_after_the_preamble_limit() -> None:
    limits = BodyLimits(max_preamble_bytes=1024)
    parser = MultipartParser(b"declared", limits)
    parser.feed(b"x" * 1000)
    with pytest.raises(MissingBoundaryError):
        parser.feed(b"x" * 100)


def test_empty_body_and_no_parts() -> None:
    _expect(MissingBoundaryError, "multipart/related; boundary=b", b"")
    _expect(NoPartsError, "multipart/related; boundary=b", b"--b--\r\n")
    _expect(EmptyPartError, "application/dicom", b"")


def test_body_ending_before_closing_boundary() -> None:
    body = corpus.multipart_body(INSTANCES)
    for cut in (len(body.data) - 1, len(body.data) - 3, len(body.data) // 2, 30):
        _expect(TruncatedBodyError, body.content_type, body.data[:cut])


def test_repeated_boundary() -> None:
    data = b"--b\r\n--b\r\nContent-Type: application/dicom\r\n\r\nabc\r\n--b--"
    _expect(RepeatedBoundaryError, "multipart/related; boundary=b", data)


def test_boundary_followed_by_garbage() -> None:
    data = b"--b\r\nContent-Type: application/dicom\r\n\r\nabc\r\n--bX\r\n\r\ndef\r\n--b--"
    _expect(MalformedMultipartError, "multipart/related; boundary=b", data)


def test_empty_part_is_refused_by_default_and_counted_when_allowed() -> None:
    body = corpus.multipart_body([b"abc", b"", b"def"])
    err = _expect(EmptyPartError, body.content_type, body.data)
    assert "Part 1" in str(err)
    assert bodies_of(body, limits=BodyLimits(allow_empty_parts=True)) == [b"abc", b"", b"def"]


def test_ten_thousand_empty_parts() -> None:
    body = corpus.multipart_body([b""] * 10_000, part_type=None)
    _expect(EmptyPartError, body.content_type, body.data, sizes=(1 << 20,))
    allowed = BodyLimits(allow_empty_parts=True)
    assert len(bodies_of(body, limits=allowed)) == 10_000
    over = corpus.multipart_body([b""] * 10_001, part_type=None)
    err = _expect(TooManyPartsError, over.content_type, over.data, allowed, sizes=(1 << 20,))
    assert err.status_code == 413
    assert "10000" in str(err)


@pytest.mark.parametrize("limit", [1, 3])
def test_part_count_at_and_past_the_limit(limit) -> None:
    limits = BodyLimits(max_parts=limit)
    at = corpus.multipart_body([b"x"] * limit)
    assert len(bodies_of(at, limits=limits)) == limit
    past = corpus.multipart_body([b"x"] * (limit + 1))
    _expect(TooManyPartsError, past.content_type, past.data, limits)


def test_instance_size_at_and_past_the_limit() -> None:
    limits = BodyLimits(max_instance_bytes=1000)
    at = corpus.multipart_body([b"a" * 1000, b"b" * 10])
    assert bodies_of(at, (1, 999, 1 << 20), limits) == [b"a" * 1000, b"b" * 10]
    past = corpus.multipart_body([b"b" * 10, b"a" * 1001])
    err = _expect(InstanceTooLargeError, past.content_type, past.data, limits)
    assert err.status_code == 413
    assert "1000" in str(err)


def test_declared_content_length_past_the_limit_fails_before_the_body() -> None:
    limits = BodyLimits(max_instance_bytes=1000)
    parser = MultipartParser(b"b", limits)
    with pytest.raises(InstanceTooLargeError):
        parser.feed(b"--b\r\nContent-Length: 1001\r\n\r\n")


def test_content_length_must_match_the_part() -> None:
    for declared in (2, 4, "x1", "-1", "\u00b2", "3\u00b9"):  # "²".isdigit() is True: it was a 500
        data = f"--b\r\nContent-Length: {declared}\r\n\r\nabc\r\n--b--".encode()
        _expect((PartLengthMismatchError, PartHeaderError), "multipart/related; boundary=b", data)


def test_content_length_headers_that_disagree_are_refused() -> None:
    """Two Content-Length fields with different values: which frames the part is ambiguous (a request
    smuggling shape; found by an API hunt), so the request is refused. Repeated equal values frame it."""
    type_ = "multipart/related; boundary=b"
    for first, second in ((3, 4), (3, 2), (3, "3x")):
        data = f"--b\r\nContent-Length: {first}\r\nContent-Length: {second}\r\n\r\nabc\r\n--b--".encode()
        err = _expect(PartHeaderError, type_, data)
        assert "Content-Length headers that disagree" in str(err) and err.status_code == 400
    same = b"--b\r\nContent-Length: 3\r\nContent-length:  3\r\n\r\nabc\r\n--b--"
    assert [body for _, body, _ in parse(type_, [same])] == [b"abc"]


def test_single_dicom_instance_limit() -> None:
    limits = BodyLimits(max_instance_bytes=100)
    assert bodies_of(corpus.Body("application/dicom", b"x" * 100), (7,), limits) == [b"x" * 100]
    _expect(InstanceTooLargeError, "application/dicom", b"x" * 101, limits)


def test_request_size_at_and_past_the_limit() -> None:
    body = corpus.multipart_body([b"a" * 100, b"b" * 100])
    limits = BodyLimits(max_request_bytes=len(body.data))
    assert len(bodies_of(body, (13,), limits)) == 2
    err = _expect(RequestTooLargeError, body.content_type, body.data + b"\r\n", limits)
    assert err.status_code == 413
    single = BodyLimits(max_request_bytes=10)
    _expect(RequestTooLargeError, "application/dicom", b"x" * 11, single)


def test_header_flood_by_count() -> None:
    limits = BodyLimits(max_part_headers=32)
    at = corpus.multipart_body([b"x"], extra_headers=[f"X-H{i}: v" for i in range(31)])
    assert bodies_of(at, limits=limits) == [b"x"]
    past = corpus.multipart_body([b"x"], extra_headers=[f"X-H{i}: v" for i in range(32)])
    _expect(PartHeaderError, past.content_type, past.data, limits)


def test_header_flood_by_size_never_buffers_past_the_limit() -> None:
    limits = BodyLimits(max_part_header_bytes=1024)
    at = corpus.multipart_body([b"x"], part_type=None, extra_headers=["X-Big: " + "v" * (1024 - 7)])
    assert bodies_of(at, limits=limits) == [b"x"]
    parser = MultipartParser(b"b", limits)
    parser.feed(b"--b\r\nX-Endless: ")

    def flood() -> None:
        for _ in range(100):
            parser.feed(b"v" * 64)
            assert parser.buffered_bytes <= 1024 + 64

    with pytest.raises(PartHeaderError):
        flood()


@pytest.mark.parametrize("line", [b"no colon here", b": empty name", b"Bad Name: v", b"\x00: v"])
def test_malformed_header_lines(line) -> None:
    data = b"--b\r\n" + line + b"\r\n\r\nabc\r\n--b--"
    _expect(PartHeaderError, "multipart/related; boundary=b", data)


def test_memory_stays_bounded_for_a_large_part() -> None:
    parser = MultipartParser(b"enclave-boundary")
    parser.feed(b"--enclave-boundary\r\nContent-Type: application/dicom\r\n\r\n")
    chunk = b"\r\n--enclave" * (1 << 16)  # near-misses of the delimiter everywhere
    seen = 0
    for _ in range(64):
        for event in parser.feed(chunk):
            if isinstance(event, PartData):
                seen += len(event.data)
        assert parser.buffered_bytes < len(b"\r\n--enclave-boundary")
    assert seen + parser.buffered_bytes == 64 * len(chunk)


# --------------------------------------------------------------------------- properties


def _outcome(content_type: str, chunks: list[bytes], limits: BodyLimits | None = None):
    try:
        return [(h.fields, body) for h, body, _ in parse(content_type, chunks, limits)]
    except RequestBodyError as error:
        return type(error)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=5),
    sizes=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=8),
    shape=st.sampled_from(["python", "npm", "orthanc", "form", "preamble"]),
)
def test_any_chunking_gives_the_same_parts(parts, sizes, shape) -> None:
    builders = {
        "python": corpus.python_dicomweb_client_body,
        "npm": corpus.npm_dicomweb_client_body,
        "orthanc": corpus.orthanc_body,
        "form": corpus.form_data_body,
        "preamble": lambda p: corpus.multipart_body(p, preamble=b"pre\r\n", epilogue=b"post"),
    }
    body = builders[shape](parts)
    whole = _outcome(body.content_type, [body.data])
    assert [data for _, data in whole] == parts
    assert _outcome(body.content_type, corpus.split(body.data, sizes)) == whole
    assert _outcome(body.content_type, corpus.split(body.data, [1])) == whole


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=400),
    sizes=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=5),
)
def test_arbitrary_bytes_only_raise_request_body_errors(data, sizes) -> None:
    body = b"--b\r\n" + data
    limits = BodyLimits(max_parts=4, max_part_headers=4, max_part_header_bytes=64, max_instance_bytes=200)
    whole = _outcome("multipart/related; boundary=b", [body], limits)
    assert _outcome("multipart/related; boundary=b", corpus.split(body, sizes), limits) == whole
