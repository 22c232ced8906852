"""Streaming parser for STOW-RS and upload request bodies, with every size limit enforced as bytes arrive.

Bodies come as ``multipart/related; type="application/dicom"`` (STOW-RS, PS3.18 §10.5),
``multipart/form-data`` (the upload API) or a single ``application/dicom`` instance. The parser is a
push parser: :meth:`MultipartParser.feed` takes chunks of any size (1 byte to megabytes) and returns
part events; it never holds a whole part, only the unscanned tail of the current chunk (at most the
delimiter length) and the header block of the current part (at most ``max_part_header_bytes``).

Written by hand, not with ``python-multipart``: that library rejects a preamble before the first
boundary (allowed by RFC 2046 §5.1.1), does not report a body that ends before the closing boundary,
and has no per-part header or part-count limits. Header *parameters* (Content-Type, Content-Disposition)
are still parsed with ``python_multipart.parse_options_header``.

Every rejection is a :class:`RequestBodyError` subclass carrying ``status_code`` (400, 413 or 415) and a
stable ``code``; messages say what was wrong and what is allowed and never quote body bytes.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum

from enclave_common.errors import EnclaveError
from enclave_common.settings import DEFAULT_MAX_INSTANCE_BYTES
from python_multipart.multipart import parse_options_header

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

DICOM_MEDIA_TYPE = "application/dicom"
_CRLF = b"\r\n"
_LWSP = b" \t"
_HEADER_NAME = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_MAX_BOUNDARY_LENGTH = 200  # RFC 2046 says 70; Orthanc sends a 73-character boundary (UUID-UUID).


# --------------------------------------------------------------------------- errors


class RequestBodyError(EnclaveError):
    """The request body cannot be accepted as a whole; ``status_code`` is the HTTP status to answer."""

    code = "bad_request_body"
    status_code = 400


class UnsupportedMediaTypeError(RequestBodyError):
    code = "unsupported_media_type"
    status_code = 415


class MissingBoundaryError(RequestBodyError):
    """No boundary parameter, or the body does not contain the declared boundary."""

    code = "missing_boundary"


class MalformedMultipartError(RequestBodyError):
    code = "malformed_multipart"


class RepeatedBoundaryError(MalformedMultipartError):
    code = "repeated_boundary"


class PartHeaderError(MalformedMultipartError):
    """A part's header block is malformed, too large or has too many fields (header flood)."""

    code = "bad_part_headers"


class EmptyPartError(MalformedMultipartError):
    code = "empty_part"


class NoPartsError(MalformedMultipartError):
    code = "no_parts"


class NoFileFieldError(NoPartsError):
    """A form upload whose parts are all other form fields: nothing to store."""

    code = "no_file_field"


class PartLengthMismatchError(MalformedMultipartError):
    code = "part_length_mismatch"


class TruncatedBodyError(MalformedMultipartError):
    code = "truncated_body"


class TooManyPartsError(RequestBodyError):
    code = "too_many_parts"
    status_code = 413


class InstanceTooLargeError(RequestBodyError):
    code = "instance_too_large"
    status_code = 413


class RequestTooLargeError(RequestBodyError):
    code = "request_too_large"
    status_code = 413


# --------------------------------------------------------------------------- limits and events


@dataclass(frozen=True, slots=True)
class BodyLimits:
    """Limits enforced while the body streams; defaults from design.md ("Limits")."""

    max_parts: int = 10_000
    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES
    max_request_bytes: int = 4 * GIB
    max_part_header_bytes: int = 16 * KIB
    max_part_headers: int = 32
    max_preamble_bytes: int = 64 * KIB
    allow_empty_parts: bool = False


class BodyKind(Enum):
    RELATED = "multipart/related"
    FORM_DATA = "multipart/form-data"
    SINGLE_DICOM = DICOM_MEDIA_TYPE


@dataclass(frozen=True, slots=True)
class BodyFormat:
    """What the request's Content-Type says about the body."""

    kind: BodyKind
    boundary: bytes | None = None
    part_type: str = DICOM_MEDIA_TYPE  # default type of a part without its own Content-Type


@dataclass(frozen=True, slots=True)
class PartHeaders:
    """Header fields of one part; names are lower-cased, values decoded as Latin-1."""

    fields: tuple[tuple[str, str], ...] = ()
    default_type: str = DICOM_MEDIA_TYPE

    def get(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.fields:
            if key == wanted:
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self.fields if key == wanted]

    @property
    def media_type(self) -> str:
        """The part's media type, lower-cased, without parameters (the body's ``type`` if absent)."""
        raw = self.get("content-type")
        if raw is None or not raw.strip():
            return self.default_type
        media, _ = parse_options_header(raw)
        return media.decode("latin-1").lower()

    @property
    def content_length(self) -> int | None:
        raw = self.get("content-length")
        return None if raw is None else int(raw)

    @property
    def filename(self) -> str | None:
        """Filename from Content-Disposition (form-data uploads), if any."""
        raw = self.get("content-disposition")
        if raw is None:
            return None
        _, params = parse_options_header(raw)
        name = params.get(b"filename")
        return None if name is None else name.decode("utf-8", "replace")

    @property
    def form_field(self) -> str | None:
        raw = self.get("content-disposition")
        if raw is None:
            return None
        _, params = parse_options_header(raw)
        name = params.get(b"name")
        return None if name is None else name.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class PartStart:
    index: int
    headers: PartHeaders


@dataclass(frozen=True, slots=True)
class PartData:
    index: int
    data: bytes


@dataclass(frozen=True, slots=True)
class PartEnd:
    index: int
    size: int


PartEvent = PartStart | PartData | PartEnd


# --------------------------------------------------------------------------- content type


def parse_body_format(content_type: str | None) -> BodyFormat:
    """Interpret the request Content-Type, raising 415/400 with what is accepted."""
    accepted = (
        'accepted: multipart/related; type="application/dicom"; boundary=..., '
        "multipart/form-data; boundary=..., application/dicom"
    )
    if content_type is None or not content_type.strip():
        raise UnsupportedMediaTypeError(f"Request has no Content-Type; {accepted}")
    media_raw, params = parse_options_header(content_type)
    media = media_raw.decode("latin-1").strip().lower()
    if media == DICOM_MEDIA_TYPE:
        return BodyFormat(BodyKind.SINGLE_DICOM)
    if media not in (BodyKind.RELATED.value, BodyKind.FORM_DATA.value):
        raise UnsupportedMediaTypeError(f"Media type {_printable(media)!r} is not accepted; {accepted}")
    kind = BodyKind(media)
    part_type = DICOM_MEDIA_TYPE if kind is BodyKind.RELATED else "application/octet-stream"
    if kind is BodyKind.RELATED:
        declared = params.get(b"type")
        if declared is not None:
            type_value = declared.decode("latin-1").strip().lower()
            if type_value != DICOM_MEDIA_TYPE:
                raise UnsupportedMediaTypeError(
                    f"multipart/related type {_printable(type_value)!r} is not accepted; "
                    'only type="application/dicom" (PS3.18 §10.5) is'
                )
    boundary = params.get(b"boundary")
    if boundary is None or not boundary:
        raise MissingBoundaryError(f"{media} Content-Type has no boundary parameter; add boundary=...")
    if len(boundary) > _MAX_BOUNDARY_LENGTH:
        raise MissingBoundaryError(
            f"Boundary is {len(boundary)} characters long; at most {_MAX_BOUNDARY_LENGTH} are accepted"
        )
    if any(b < 0x20 or b > 0x7E for b in boundary) or boundary.endswith(b" "):
        raise MissingBoundaryError(
            "Boundary contains characters RFC 2046 does not allow (controls, non-ASCII)"
        )
    return BodyFormat(kind, boundary=boundary, part_type=part_type)


def _printable(text: str, limit: int = 80) -> str:
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text)
    return cleaned[:limit]


# --------------------------------------------------------------------------- the push parser


class _State(Enum):
    PREAMBLE = 1
    AFTER_BOUNDARY = 2
    HEADERS = 3
    BODY = 4
    EPILOGUE = 5


@dataclass(slots=True)
class _Part:
    index: int
    size: int = 0
    declared_length: int | None = None


@dataclass
class MultipartParser:
    """Push parser for one multipart body (RFC 2046 §5.1) with :class:`BodyLimits` enforced per chunk.

    Accepts a preamble (with or without the leading CRLF real clients send), transport padding after
    a boundary, parts with or without Content-Length (checked when present), and an epilogue of any
    length (the npm ``dicomweb-client`` pads the body with NUL bytes after the closing boundary).
    """

    boundary: bytes
    limits: BodyLimits = field(default_factory=BodyLimits)
    default_part_type: str = DICOM_MEDIA_TYPE

    def __post_init__(self) -> None:
        self._dash_boundary = b"--" + self.boundary
        self._delimiter = _CRLF + self._dash_boundary
        self._state = _State.PREAMBLE
        self._buffer = bytearray()
        self._received = 0
        self._parts = 0
        self._part: _Part | None = None
        self._preamble_seen = 0
        self._finished = False
        self._header_scan_from = 0

    @property
    def parts_seen(self) -> int:
        return self._parts

    @property
    def bytes_received(self) -> int:
        return self._received

    @property
    def buffered_bytes(self) -> int:
        """Bytes held between feeds: proves memory stays bounded whatever the part size."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> list[PartEvent]:
        """Consume one chunk of the body and return the events it completes."""
        if not chunk:
            return []
        self._received += len(chunk)
        if self._received > self.limits.max_request_bytes:
            raise RequestTooLargeError(
                f"Request body exceeds {self.limits.max_request_bytes} bytes, the maximum request size"
            )
        if self._state is _State.EPILOGUE:
            return []
        self._buffer += chunk
        events: list[PartEvent] = []
        while self._step(events):
            pass
        return events

    def close(self) -> list[PartEvent]:
        """Signal the end of the body; raises if it ended before the closing boundary."""
        if self._state is _State.EPILOGUE:
            return []
        if self._state is _State.PREAMBLE:
            raise MissingBoundaryError(
                "Request body does not contain the boundary declared in its Content-Type "
                "(expected a line '--<boundary>' before the first part)"
            )
        raise TruncatedBodyError(
            f"Request body ended inside part {self._parts} before the closing boundary '--<boundary>--'; "
            "a complete multipart body is required"
        )

    # -- state machine: each step consumes what it can and says whether to run again

    def _step(self, events: list[PartEvent]) -> bool:
        if self._state is _State.PREAMBLE:
            return self._scan_preamble()
        if self._state is _State.AFTER_BOUNDARY:
            return self._after_boundary(events)
        if self._state is _State.HEADERS:
            return self._read_headers(events)
        if self._state is _State.BODY:
            return self._read_body(events)
        self._buffer.clear()
        return False

    def _scan_preamble(self) -> bool:
        buf = self._buffer
        if self._preamble_seen == 0 and buf.startswith(self._dash_boundary):  # only at the very start
            del buf[: len(self._dash_boundary)]
            self._state = _State.AFTER_BOUNDARY
            return True
        at = buf.find(self._delimiter)
        if at >= 0:
            self._preamble_seen += at
            self._check_preamble()
            del buf[: at + len(self._delimiter)]
            self._state = _State.AFTER_BOUNDARY
            return True
        keep = len(self._delimiter) - 1
        if len(buf) > keep:
            self._preamble_seen += len(buf) - keep
            del buf[: len(buf) - keep]
        self._check_preamble()
        return False

    def _check_preamble(self) -> None:
        if self._preamble_seen > self.limits.max_preamble_bytes:
            raise MissingBoundaryError(
                f"No boundary line found in the first {self.limits.max_preamble_bytes} bytes of the body: "
                "the body must start with '--<boundary>' as declared in its Content-Type"
            )

    def _after_boundary(self, events: list[PartEvent]) -> bool:
        buf = self._buffer
        if len(buf) < 2:
            return False
        if buf.startswith(b"--"):
            del buf[:2]
            if self._parts == 0:
                raise NoPartsError("Multipart body has no parts; at least one instance is required")
            self._state = _State.EPILOGUE
            self._finished = True
            buf.clear()
            return False
        stripped = 0
        while stripped < len(buf) and buf[stripped] in _LWSP:
            stripped += 1
            if stripped > 256:
                raise MalformedMultipartError("Boundary line has more than 256 bytes of trailing whitespace")
        if len(buf) - stripped < 2:
            return False
        if buf[stripped : stripped + 2] != _CRLF:
            raise MalformedMultipartError(
                "Boundary must be followed by CRLF or '--'; found other bytes (a boundary string must not "
                "occur inside a part)"
            )
        del buf[: stripped + 2]
        self._start_part()
        self._header_scan_from = 0
        self._state = _State.HEADERS
        return True

    def _start_part(self) -> None:
        self._parts += 1
        if self._parts > self.limits.max_parts:
            raise TooManyPartsError(
                f"Request has more than {self.limits.max_parts} parts, the maximum per request"
            )
        self._part = _Part(index=self._parts - 1)

    def _read_headers(self, events: list[PartEvent]) -> bool:
        buf = self._buffer
        if buf.startswith(_CRLF):
            block = b""
            consumed = 2
        else:
            end = buf.find(b"\r\n\r\n", self._header_scan_from)
            if end < 0:
                self._header_scan_from = max(0, len(buf) - 3)  # never rescan what was searched
                if len(buf) > self.limits.max_part_header_bytes:
                    raise PartHeaderError(
                        f"Header block of part {self._parts - 1} exceeds "
                        f"{self.limits.max_part_header_bytes} bytes, the maximum per part"
                    )
                return False
            block = bytes(buf[:end])
            consumed = end + 4
        if len(block) > self.limits.max_part_header_bytes:
            raise PartHeaderError(
                f"Header block of part {self._parts - 1} exceeds {self.limits.max_part_header_bytes} "
                "bytes, the maximum per part"
            )
        del buf[:consumed]
        headers = self._parse_headers(block)
        part = self._current()
        lengths = {value.strip() for value in headers.get_all("content-length")}
        if len(lengths) > 1:  # RFC 9112 6.3: which one frames the part is ambiguous, so neither does
            raise PartHeaderError(
                f"Part {part.index} has {len(lengths)} Content-Length headers that disagree; send one "
                "(or none: the boundary ends the part)"
            )
        raw_length = headers.get("content-length")
        if raw_length is not None:
            text = raw_length.strip()
            if not (text.isascii() and text.isdigit()) or len(text) > 18:  # "²".isdigit() is True
                raise PartHeaderError(
                    f"Part {part.index} has a Content-Length that is not a non-negative integer"
                )
            part.declared_length = int(text)
            self._check_instance_size(part.declared_length, declared=True)
        events.append(PartStart(part.index, headers))
        self._state = _State.BODY
        return True

    def _parse_headers(self, block: bytes) -> PartHeaders:
        index = self._parts - 1
        fields: list[tuple[str, str]] = []
        for line in block.split(_CRLF) if block else []:
            if line[:1] in (b" ", b"\t") and fields:
                folded_name, folded_value = fields[-1]
                fields[-1] = (folded_name, folded_value + " " + line.strip().decode("latin-1"))
                continue
            if line.rstrip() == self._dash_boundary:
                raise RepeatedBoundaryError(
                    f"Boundary repeated with no part between (at part {index}); each boundary must be "
                    "followed by a part's headers and body"
                )
            name, sep, value = line.partition(b":")
            if not sep or not _HEADER_NAME.match(name):
                raise PartHeaderError(
                    f"Part {index} has a malformed header line; expected 'Name: value' lines, then an "
                    "empty line"
                )
            fields.append((name.decode("ascii").lower(), value.strip().decode("latin-1")))
            if len(fields) > self.limits.max_part_headers:
                raise PartHeaderError(
                    f"Part {index} has more than {self.limits.max_part_headers} header fields, "
                    "the maximum per part"
                )
        return PartHeaders(tuple(fields), default_type=self.default_part_type)

    def _read_body(self, events: list[PartEvent]) -> bool:
        buf = self._buffer
        part = self._current()
        at = buf.find(self._delimiter)
        if at < 0:
            safe = len(buf) - (len(self._delimiter) - 1)
            if safe > 0:
                self._emit(events, part, bytes(buf[:safe]))
                del buf[:safe]
            return False
        if at:
            self._emit(events, part, bytes(buf[:at]))
        del buf[: at + len(self._delimiter)]
        self._end_part(events, part)
        self._state = _State.AFTER_BOUNDARY
        return True

    def _emit(self, events: list[PartEvent], part: _Part, data: bytes) -> None:
        part.size += len(data)
        self._check_instance_size(part.size, declared=False)
        if part.declared_length is not None and part.size > part.declared_length:
            raise PartLengthMismatchError(
                f"Part {part.index} is longer than its Content-Length of {part.declared_length} bytes"
            )
        events.append(PartData(part.index, data))

    def _end_part(self, events: list[PartEvent], part: _Part) -> None:
        if part.size == 0 and not self.limits.allow_empty_parts:
            raise EmptyPartError(f"Part {part.index} has an empty body; every part must carry one instance")
        if part.declared_length is not None and part.size != part.declared_length:
            raise PartLengthMismatchError(
                f"Part {part.index} has {part.size} bytes but its Content-Length says {part.declared_length}"
            )
        events.append(PartEnd(part.index, part.size))
        self._part = None

    def _check_instance_size(self, size: int, *, declared: bool) -> None:
        if size > self.limits.max_instance_bytes:
            what = "declares" if declared else "exceeds"
            raise InstanceTooLargeError(
                f"Part {self._parts - 1} {what} {size if declared else self.limits.max_instance_bytes} "
                f"bytes; the maximum instance size is {self.limits.max_instance_bytes} bytes"
            )

    def _current(self) -> _Part:
        if self._part is None:  # pragma: no cover - guarded by the state machine
            raise MalformedMultipartError("Part data outside a part")
        return self._part


class SingleInstanceParser:
    """The same event interface for a bare ``application/dicom`` body: one part, the whole body."""

    def __init__(self, limits: BodyLimits | None = None) -> None:
        self.limits = limits or BodyLimits()
        self._size = 0
        self._started = False
        self._closed = False

    def feed(self, chunk: bytes) -> list[PartEvent]:
        if not chunk:
            return []
        self._size += len(chunk)
        if self._size > self.limits.max_request_bytes:
            raise RequestTooLargeError(
                f"Request body exceeds {self.limits.max_request_bytes} bytes, the maximum request size"
            )
        if self._size > self.limits.max_instance_bytes:
            raise InstanceTooLargeError(
                f"Instance exceeds {self.limits.max_instance_bytes} bytes, the maximum instance size"
            )
        events: list[PartEvent] = []
        if not self._started:
            self._started = True
            events.append(PartStart(0, PartHeaders((("content-type", DICOM_MEDIA_TYPE),))))
        events.append(PartData(0, chunk))
        return events

    def close(self) -> list[PartEvent]:
        if not self._started:
            raise EmptyPartError("application/dicom request has an empty body; one instance is required")
        return [PartEnd(0, self._size)]


BodyParser = MultipartParser | SingleInstanceParser


def parser_for(body_format: BodyFormat, limits: BodyLimits | None = None) -> BodyParser:
    """Build the push parser that fits the request's Content-Type."""
    limits = limits or BodyLimits()
    if body_format.kind is BodyKind.SINGLE_DICOM:
        return SingleInstanceParser(limits)
    assert body_format.boundary is not None
    return MultipartParser(body_format.boundary, limits, default_part_type=body_format.part_type)


def iter_events(parser: BodyParser, chunks: Iterable[bytes]) -> Iterator[PartEvent]:
    """Drive ``parser`` over a synchronous chunk source (tests, benchmarks, fuzzing)."""
    for chunk in chunks:
        yield from parser.feed(chunk)
    yield from parser.close()


async def aiter_events(
    content_type: str | None, body: AsyncIterable[bytes], limits: BodyLimits | None = None
) -> AsyncIterator[PartEvent]:
    """Stream part events from a request body (e.g. Starlette's ``request.stream()``)."""
    parser = parser_for(parse_body_format(content_type), limits)
    async for chunk in body:
        for event in parser.feed(chunk):
            yield event
    for event in parser.close():
        yield event
