"""Per-instance DICOM validation on the bytes of one part, while they stream.

:class:`InstanceInspector` is fed a part's body chunk by chunk. It hashes and counts every byte,
keeps only the first ``header_window_bytes`` of the dataset to parse its header, and walks the
element structure of the *whole* instance with memory bounded by the sequence-depth limit, so that:

- a failure of the header (transfer syntax, SOP class, required attributes, UIDs) is known as soon
  as the header has arrived, before the pixel data streams (``feed`` returns it);
- truncation is detected at the end of the part by comparing every declared element length,
  PixelData's included, with the bytes received (pydicom reads some truncated files silently);
- bad VRs, tags out of order, lengths that overrun their item, huge declared lengths, sequences
  nested beyond the limit and deflate bombs fail without ever being buffered.

The element walker is written by hand because pydicom cannot read a stream incrementally; pydicom is
used for what it does well: parsing the buffered header (``read_dataset``), its data dictionary (VR
of implicit-VR tags), its UID syntax and UID registry. Values are read as raw bytes so that pydicom
never converts (and so never logs) a value. Failure messages name tags and limits, never values.

Failure reason codes are those of PS3.18 Table I.2-2 (Store Instances Response Failure Reason);
0xC409 (Study Instance UID mismatch) is implementation-specific in the Cxxx "cannot understand" range,
the code dcm4chee-arc uses for the same condition.
"""

from __future__ import annotations

import hashlib
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from io import BytesIO

from enclave_common.pseudonyms import patient_id_text
from enclave_common.settings import DEFAULT_MAX_ELEMENTS_PER_INSTANCE, DEFAULT_MAX_INSTANCE_BYTES
from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import RE_VALID_UID, UID

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


class FailureReason(IntEnum):
    """Failure Reason (0008,1197) values, PS3.18 Table I.2-2."""

    PROCESSING_FAILURE = 0x0110
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
    STUDY_INSTANCE_UID_MISMATCH = 0xC409


class WarningReason(IntEnum):
    """Warning Reason (0008,1196) values, PS3.18 Table I.2-1."""

    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xB007


IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"

DEFAULT_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {
        IMPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_LITTLE_ENDIAN,
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
        "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
        "1.2.840.10008.1.2.5",  # RLE Lossless
    }
)


MEDIA_STORAGE_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"
#: PS3.4 Table GG.3-1, the Non-Patient Object Storage SOP classes: objects of no patient, study or
#: series (hanging protocols, palettes, implant templates, protocols, inventories).
NON_PATIENT_STORAGE_SOP_CLASSES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.5.1.4.38.1",  # Hanging Protocol Storage
        "1.2.840.10008.5.1.4.39.1",  # Color Palette Storage
        "1.2.840.10008.5.1.4.43.1",  # Generic Implant Template Storage
        "1.2.840.10008.5.1.4.44.1",  # Implant Assembly Template Storage
        "1.2.840.10008.5.1.4.45.1",  # Implant Template Group Storage
        "1.2.840.10008.5.1.4.1.1.200.1",  # CT Defined Procedure Protocol Storage
        "1.2.840.10008.5.1.4.1.1.200.3",  # Protocol Approval Storage
        "1.2.840.10008.5.1.4.1.1.200.7",  # XA Defined Procedure Protocol Storage
        "1.2.840.10008.5.1.4.1.1.201.1",  # Inventory Storage
    }
)
_DEFAULT_SOP_CLASSES_TEXT = (
    "the Storage SOP classes of PS3.4 Annex B (composite instances of a patient) that are not retired"
)


def _sop_class_excluded(uid: str) -> str | None:
    """Why the default allow-list leaves out ``uid``, or None when it is a composite instance Storage
    SOP class of PS3.4 Annex B. pydicom's UID registry says which classes are retired, and which are
    DICOS or DICONDE (security screening, industrial testing: not PS3.4)."""
    entry = UID_dictionary.get(uid)
    if entry is None:
        return "it is not in the DICOM UID registry (PS3.6 Annex A) this gateway knows"
    name, kind, info, retired, _keyword = entry
    if kind != "SOP Class" or "Storage" not in name or "Commitment" in name:
        return "it is not a Storage SOP class"
    if uid == MEDIA_STORAGE_DIRECTORY_STORAGE:
        return "it is the directory (DICOMDIR) of a file-set, not a composite instance"
    if retired:
        return "it is retired"
    if uid in NON_PATIENT_STORAGE_SOP_CLASSES:
        return "it stores a non-patient object (PS3.4 Annex GG), without the patient, study and series"
    if info:
        return f"it belongs to {info}, not to PS3.4"
    return None


def storage_sop_classes() -> frozenset[str]:
    """The default SOP class allow-list: the composite instance Storage SOP classes of PS3.4 Annex B in
    pydicom's UID registry. Until the sixteenth session any class with "Storage" in its name passed,
    so a DICOMDIR (Media Storage Directory Storage) and retired classes were de-identified."""
    return frozenset(uid for uid in UID_dictionary if _sop_class_excluded(uid) is None)


_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_PATIENT_ID = 0x00100020
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
_PIXEL_DATA = 0x7FE00010
_LAST_HEADER_TAG = _SERIES_INSTANCE_UID
_REQUIRED_UIDS = {
    _SOP_CLASS_UID: "SOPClassUID (0008,0016)",
    _SOP_INSTANCE_UID: "SOPInstanceUID (0008,0018)",
    _STUDY_INSTANCE_UID: "StudyInstanceUID (0020,000D)",
    _SERIES_INSTANCE_UID: "SeriesInstanceUID (0020,000E)",
}

_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_ITEM_BYTES = b"\xfe\xff\x00\xe0"  # the Item tag, little endian
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_VALID_VRS = frozenset(
    (
        b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM"
        b" UC UI UL UN UR US UT UV"
    ).split()
)
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_MAX_META_BYTES = 64 * KIB


@dataclass(frozen=True, slots=True)
class ValidationPolicy:
    """What the edge accepts per instance; every field is configurable by the service settings."""

    allowed_transfer_syntaxes: frozenset[str] = DEFAULT_TRANSFER_SYNTAXES
    allowed_sop_classes: frozenset[str] | None = None  # None: storage_sop_classes()
    header_window_bytes: int = 1 * MIB
    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES
    max_sequence_depth: int = 16
    #: Data elements plus sequence items, all nesting levels, file meta included, counted after
    #: inflation (``ENCLAVE_GATEWAY_MAX_ELEMENTS_PER_INSTANCE``); Pixel Data fragments are not counted.
    max_elements_per_instance: int = DEFAULT_MAX_ELEMENTS_PER_INSTANCE
    #: A deflated dataset is inflated whole by deid too: the same bound as an instance.
    max_inflated_bytes: int = DEFAULT_MAX_INSTANCE_BYTES
    max_inflation_ratio: int = 200
    inflation_ratio_floor_bytes: int = 16 * MIB

    def __post_init__(self) -> None:
        if EXPLICIT_VR_BIG_ENDIAN in self.allowed_transfer_syntaxes:
            raise ValueError(
                "Explicit VR Big Endian (retired) cannot be allowed: "
                "the edge validator reads little endian only"
            )

    def sop_class_allowed(self, uid: str) -> bool:
        allowed = self.allowed_sop_classes
        return uid in (allowed if allowed is not None else _STORAGE_SOP_CLASSES)

    def sop_class_refusal(self, uid: str) -> str:
        """Why ``uid`` is refused and what is accepted; ``uid`` is a valid UID, never PHI."""
        entry = UID_dictionary.get(uid)
        named = f"SOP class {uid} ({entry[0]})" if entry is not None and entry[0] else f"SOP class {uid}"
        if self.allowed_sop_classes is not None:
            return f"{named} is not accepted; accepted: the configured SOP classes"
        why = _sop_class_excluded(uid)
        return f"{named} is not accepted: {why}; accepted: {_DEFAULT_SOP_CLASSES_TEXT}"


_STORAGE_SOP_CLASSES = storage_sop_classes()


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """Identifying attributes of an instance, known as soon as its header has streamed."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str = field(repr=False)
    transfer_syntax_uid: str
    has_file_meta: bool


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """An instance accepted at the edge; ``patient_id`` is PHI and is kept out of ``repr``."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str = field(repr=False)
    transfer_syntax_uid: str
    has_file_meta: bool
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ValidationFailure:
    """An instance refused at the edge, with its PS3.18 Failure Reason.

    ``problem`` is a stable machine-readable slug; ``message`` says what was wrong and what is
    allowed without quoting any value. The UIDs are filled when the header could be read, so the
    STOW response can reference the failed instance.
    """

    reason_code: FailureReason
    message: str
    problem: str
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None


class _Refused(Exception):
    def __init__(
        self,
        reason: FailureReason,
        problem: str,
        message: str,
        *,
        sop_class_uid: str = "",
        sop_instance_uid: str = "",
    ) -> None:
        """The UIDs, given before the header is known, are kept only when they are valid UIDs."""
        super().__init__(message)
        known = uid_is_valid(sop_class_uid) and uid_is_valid(sop_instance_uid)
        self.failure = ValidationFailure(
            reason,
            message,
            problem,
            sop_class_uid if known else None,
            sop_instance_uid if known else None,
        )


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


#: Attributes the gateway, ingest or deid's release decision (burned-in text) read as values, with
#: the VR PS3.6 gives each. In an explicit-VR dataset pydicom converts a value by the VR written in
#: the stream: under another VR (a UID written as FD) reading it fails or gives another value.
_PIPELINE_ATTRIBUTES = (
    "SpecificCharacterSet",
    "ImageType",
    "SOPClassUID",
    "SOPInstanceUID",
    "Modality",
    "ConversionType",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "BurnedInAnnotation",
    "RecognizableVisualFeatures",
    "SpecimenLabelInImage",
)


def _standard_vrs() -> dict[int, tuple[str, bytes]]:
    """Tag -> (name for messages, the VR PS3.6 gives it) of each attribute in ``_PIPELINE_ATTRIBUTES``."""
    table: dict[int, tuple[str, bytes]] = {}
    for keyword in _PIPELINE_ATTRIBUTES:
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        table[tag] = (f"{keyword} {_tag_text(tag)}", str(dictionary_VR(tag)).encode())
    return table


_STANDARD_VRS = _standard_vrs()


# --------------------------------------------------------------------------- structure walker


@dataclass(slots=True)
class _Frame:
    kind: str  # "sequence" | "item" | "fragments"
    end: int | None  # absolute end offset for defined lengths
    implicit: bool
    tag: int


def _explicit_header_size(buf: bytes | bytearray | memoryview, offset: int) -> int:
    """Header bytes of the explicit-VR element (or item/delimiter tag) at ``offset``: 12 for the long
    VRs, else 8. Needs the first 6 bytes."""
    if buf[offset] | buf[offset + 1] << 8 == 0xFFFE:
        return 8
    return 12 if bytes(buf[offset + 4 : offset + 6]) in _LONG_VRS else 8


class _DatasetWalker:
    """Walks data elements of a little-endian dataset stream, checking structure and declared lengths.

    Memory is the frame stack (bounded by ``max_depth``) plus at most 12 pending header bytes.
    """

    def __init__(
        self,
        implicit: bool,
        policy: ValidationPolicy,
        header_window: int,
        *,
        detect_encoding: bool = False,
        encapsulated: bool | None = False,
        elements: int = 0,
    ) -> None:
        self.implicit = implicit
        #: Data elements and sequence items seen so far (``elements``: those of the file meta).
        self.elements = elements
        self._max_elements = policy.max_elements_per_instance
        #: Whether the transfer syntax encapsulates Pixel Data (None: a syntax pydicom does not know).
        self.encapsulated = encapsulated
        self._detect_encoding = detect_encoding
        self.policy = policy
        self.position = 0
        self.frames: list[_Frame] = []
        self._pending = bytearray()
        self._skip = 0
        self._skip_tag = 0
        #: A defined-length value that is a sequence if it starts with an Item tag (a private UN or
        #: implicit-VR value, as deid's count walks it): its tag and end, while its first 4 bytes are
        #: gathered in ``_pending``.
        self._peek_tag: int | None = None
        self._peek_end = 0
        self._last_top_tag = -1
        self.header = bytearray()
        self._header_window = header_window
        self.header_cutoff: int | None = None
        #: The first attribute of the header with a VR other than its standard one; the inspector
        #: refuses it when it reads the header, naming the instance.
        self.header_vr_error: str | None = None
        #: The same for an attribute after the header: ``feed`` stops right after its element header.
        self.vr_error: str | None = None

    @property
    def sequence_depth(self) -> int:
        return sum(1 for frame in self.frames if frame.kind != "item")

    def feed(self, data: bytes | memoryview) -> int:
        """Walk ``data``; returns the bytes consumed, fewer than given only right after the header."""
        view = memoryview(data)
        if self.header_cutoff is None:
            room = self._header_window - len(self.header)
            self.header += view[:room]
        offset = 0
        size = len(view)
        while offset < size:
            if self._skip:
                step = min(self._skip, size - offset)
                self._skip -= step
                offset += step
                self.position += step
                if self.header_cutoff is None and self.position > self._header_window:
                    self._refuse_large_header()
                continue
            if self._peek_tag is not None:
                take = min(4 - len(self._pending), size - offset)
                self._pending += view[offset : offset + take]
                offset += take
                self.position += take
                if self.header_cutoff is None and self.position > self._header_window:
                    self._refuse_large_header()
                if len(self._pending) == 4:
                    self._peeked()
                continue
            if not self._pending:
                self._close_finished_frames()
                if self.header_cutoff is None and self.position > self._header_window:
                    self._refuse_large_header()
                if not self.frames and not self._detect_encoding and size - offset >= 12:
                    # A whole top-level element header is in view (the common case): read it in
                    # place instead of gathering it byte range by byte range in _pending.
                    need = self._top_level_header_size(view, offset)
                    raw = bytes(view[offset : offset + need])
                    offset += need
                    self.position += need
                    cutoff_before = self.header_cutoff
                    self._element(raw)
                    if (cutoff_before is None and self.header_cutoff is not None) or self.vr_error:
                        return offset
                    continue
            need = self._header_size_needed()
            take = min(need - len(self._pending), size - offset)
            self._pending += view[offset : offset + take]
            offset += take
            self.position += take
            if self._detect_encoding and len(self._pending) >= 6:
                self._detect_first_element_encoding()
                need = self._header_size_needed()
            if len(self._pending) < need or need == 6:
                continue
            cutoff_before = self.header_cutoff
            self._element(bytes(self._pending))
            self._pending.clear()
            if (cutoff_before is None and self.header_cutoff is not None) or self.vr_error:
                return offset  # let the inspector read the header (or refuse) before anything after it
        return offset

    def _detect_first_element_encoding(self) -> None:
        """Follow the bytes, not the file meta, for implicit/explicit VR, as pydicom does when reading."""
        self._detect_encoding = False
        self.implicit = bytes(self._pending[4:6]) not in _VALID_VRS

    def _refuse_large_header(self) -> None:
        raise _Refused(
            FailureReason.OUT_OF_RESOURCES,
            "header_too_large",
            f"Instance header (elements up to SeriesInstanceUID) is larger than "
            f"{self._header_window} bytes, the header window",
        )

    def _frame(self) -> _Frame | None:
        return self.frames[-1] if self.frames else None

    def _in_sequence(self) -> bool:
        return bool(self.frames) and self.frames[-1].kind in ("sequence", "fragments")

    def _element_implicit(self) -> bool:
        return self.frames[-1].implicit if self.frames else self.implicit

    def _top_level_header_size(self, view: memoryview, offset: int) -> int:
        """What :meth:`_header_size_needed` gives for a top-level element whose header is in view."""
        return 8 if self.implicit else _explicit_header_size(view, offset)

    def _header_size_needed(self) -> int:
        """Bytes of the next element header: 8, or 12 for explicit long VRs (6 until the VR is known)."""
        if self._in_sequence() or self._element_implicit():
            return 8
        if len(self._pending) < 6:
            return 6
        return _explicit_header_size(self._pending, 0)

    def _close_finished_frames(self) -> None:
        while self.frames:
            frame = self.frames[-1]
            if frame.end is None or self.position < frame.end:
                return
            if self.position > frame.end:
                raise _Refused(
                    FailureReason.CANNOT_UNDERSTAND,
                    "length_overrun",
                    f"Elements overrun the declared length of {frame.kind} {_tag_text(frame.tag)}",
                )
            self.frames.pop()

    def _too_many_elements(self) -> None:
        """Past ``max_elements_per_instance``: deid holds each element and item as an object of about
        1 KiB (counted inline where they are read, the walker's hottest path)."""
        raise _Refused(
            FailureReason.OUT_OF_RESOURCES,
            "too_many_elements",
            f"Instance has more than {self._max_elements} data elements and sequence items, the maximum "
            "(ENCLAVE_GATEWAY_MAX_ELEMENTS_PER_INSTANCE)",
        )

    def _element(self, raw: bytes) -> None:
        start = self.position - len(raw)
        group, element = struct.unpack_from("<HH", raw)
        tag = group << 16 | element
        if self._in_sequence():
            self._sequence_member(tag, struct.unpack_from("<I", raw, 4)[0], start)
            return
        if tag == _ITEM_DELIMITER:
            frame = self._frame()
            if frame is None or frame.kind != "item" or frame.end is not None:
                raise _Refused(
                    FailureReason.CANNOT_UNDERSTAND,
                    "unexpected_delimiter",
                    "Item delimiter outside an item of undefined length",
                )
            self.frames.pop()
            return
        if group == 0xFFFE:
            raise _Refused(
                FailureReason.CANNOT_UNDERSTAND,
                "unexpected_delimiter",
                f"Item tag {_tag_text(tag)} found where a data element was expected",
            )
        self.elements += 1
        if self.elements > self._max_elements:
            self._too_many_elements()
        if self._element_implicit():
            vr = b""
            length = struct.unpack_from("<I", raw, 4)[0]
        else:
            vr = raw[4:6]
            if vr not in _VALID_VRS:
                raise _Refused(
                    FailureReason.CANNOT_UNDERSTAND,
                    "bad_vr",
                    f"Element {_tag_text(tag)} has an invalid value representation (not one of the "
                    "PS3.5 VRs)",
                )
            length = (
                struct.unpack_from("<I", raw, 8)[0] if len(raw) == 12 else struct.unpack_from("<H", raw, 6)[0]
            )
            if not self.frames and tag in _STANDARD_VRS:
                self._check_standard_vr(tag, vr, length)
        if not self.frames:
            self._top_level(tag, start)
        self._value(tag, vr, length)

    def _check_standard_vr(self, tag: int, vr: bytes, length: int) -> None:
        """A pipeline attribute must have its standard VR, or UN of defined length (PS3.5 §6.2.2: a
        sender that does not know the VR; pydicom reads it by its dictionary VR)."""
        name, standard = _STANDARD_VRS[tag]
        if vr == standard or (vr == b"UN" and length != _UNDEFINED):
            return
        written = "UN of undefined length" if vr == b"UN" else vr.decode()
        message = f"{name} has VR {written}; it must be {standard.decode()} (PS3.6)"
        if tag > _LAST_HEADER_TAG:
            self.vr_error = message
        elif self.header_vr_error is None:
            self.header_vr_error = message

    def _top_level(self, tag: int, start: int) -> None:
        if tag <= self._last_top_tag:
            raise _Refused(
                FailureReason.CANNOT_UNDERSTAND,
                "tags_out_of_order",
                f"Element {_tag_text(tag)} is out of ascending tag order (PS3.5 §7.1)",
            )
        self._last_top_tag = tag
        if self.header_cutoff is None and tag > _LAST_HEADER_TAG:
            if start > self._header_window:
                self._refuse_large_header()
            self.header_cutoff = start
            del self.header[start:]

    def _value(self, tag: int, vr: bytes, length: int) -> None:
        implicit = self._element_implicit()
        if tag == _PIXEL_DATA and not self.frames:
            self._check_pixel_encoding(length == _UNDEFINED)
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA and vr in (b"", b"OB", b"OW"):
                self._push(_Frame("fragments", None, implicit, tag))
            elif vr == b"SQ" or (implicit and vr == b""):
                self._push(_Frame("sequence", None, implicit, tag))
            elif vr == b"UN":
                self._push(_Frame("sequence", None, True, tag))
            else:
                raise _Refused(
                    FailureReason.CANNOT_UNDERSTAND,
                    "bad_length",
                    f"Element {_tag_text(tag)} has an undefined length, allowed only for sequences and "
                    "encapsulated pixel data",
                )
            return
        self._check_length(tag, length)
        if vr == b"SQ" or (implicit and vr == b"" and _dictionary_vr(tag) == "SQ"):
            self._push(_Frame("sequence", self.position + length, implicit, tag))
            return
        if length >= 8 and (vr == b"UN" or (implicit and vr == b"")):
            # deid's count (pydicom on access) reads these as sequences of implicit-VR items: a public
            # UN whose dictionary VR is SQ, and a private value that starts with an Item tag
            if not tag >> 16 & 1:
                if vr == b"UN" and _dictionary_vr(tag) == "SQ":
                    self._push(_Frame("sequence", self.position + length, True, tag))
                    return
            else:
                self._peek_tag = tag
                self._peek_end = self.position + length
                return
        self._skip = length
        self._skip_tag = tag

    def _peeked(self) -> None:
        """The first 4 bytes of a private value are in ``_pending``: an Item tag makes it a sequence
        (they stay as the start of the item header), anything else an opaque value to skip."""
        tag, end = self._peek_tag, self._peek_end
        assert tag is not None
        self._peek_tag = None
        if bytes(self._pending) == _ITEM_BYTES:
            self._push(_Frame("sequence", end, True, tag))
            return
        self._pending.clear()
        self._skip = end - self.position
        self._skip_tag = tag

    def _check_pixel_encoding(self, fragments: bool) -> None:
        """Pixel Data in fragments (undefined length) exactly when the transfer syntax encapsulates it
        (PS3.5 A.4). Otherwise no reader decodes it: deid's burned-in-text check and the analysis
        would fail on an instance the edge had acknowledged."""
        if self.encapsulated is None or fragments == self.encapsulated:
            return
        found, expected = ("encapsulated", "native") if fragments else ("native", "encapsulated")
        raise _Refused(
            FailureReason.CANNOT_UNDERSTAND,
            "pixel_data_encoding",
            f"Pixel Data (7FE0,0010) is {found}, but the transfer syntax requires {expected} pixel data "
            "(PS3.5 A.4: fragments of undefined length exactly under an encapsulated transfer syntax)",
        )

    def _sequence_member(self, tag: int, length: int, start: int) -> None:
        frame = self.frames[-1]
        if tag == _SEQUENCE_DELIMITER:
            if frame.end is not None:
                raise _Refused(
                    FailureReason.CANNOT_UNDERSTAND,
                    "unexpected_delimiter",
                    f"Sequence delimiter inside sequence {_tag_text(frame.tag)} of defined length",
                )
            self.frames.pop()
            return
        if tag != _ITEM:
            raise _Refused(
                FailureReason.CANNOT_UNDERSTAND,
                "bad_sequence_item",
                f"Sequence {_tag_text(frame.tag)} contains {_tag_text(tag)} where an item was expected",
            )
        if frame.kind == "fragments":
            if length == _UNDEFINED:
                raise _Refused(
                    FailureReason.CANNOT_UNDERSTAND,
                    "bad_length",
                    "Encapsulated pixel data fragment has an undefined length",
                )
            self._check_length(tag, length)
            self._skip = length
            self._skip_tag = _PIXEL_DATA
            return
        self.elements += 1
        if self.elements > self._max_elements:
            self._too_many_elements()
        if length == _UNDEFINED:
            self.frames.append(_Frame("item", None, frame.implicit, frame.tag))
        else:
            self._check_length(tag, length)
            self.frames.append(_Frame("item", self.position + length, frame.implicit, frame.tag))

    def _push(self, frame: _Frame) -> None:
        self.frames.append(frame)
        if self.sequence_depth > self.policy.max_sequence_depth:
            raise _Refused(
                FailureReason.CANNOT_UNDERSTAND,
                "sequence_too_deep",
                f"Sequences are nested more than {self.policy.max_sequence_depth} levels deep, the maximum",
            )

    def _check_length(self, tag: int, length: int) -> None:
        end = self.position + length
        if end > self.policy.max_instance_bytes:
            raise _Refused(
                FailureReason.CANNOT_UNDERSTAND,
                "declared_length_too_large",
                f"Element {_tag_text(tag)} declares {length} bytes, beyond the maximum instance size of "
                f"{self.policy.max_instance_bytes} bytes",
            )
        for frame in reversed(self.frames):
            if frame.end is not None:
                if end > frame.end:
                    raise _Refused(
                        FailureReason.CANNOT_UNDERSTAND,
                        "length_overrun",
                        f"Element {_tag_text(tag)} declares {length} bytes, more than remain in its "
                        f"enclosing {frame.kind} {_tag_text(frame.tag)}",
                    )
                break

    def finish(self) -> None:
        self._close_finished_frames()
        if self._peek_tag is not None:
            self._skip, self._skip_tag = self._peek_end - self.position, self._peek_tag
            self._pending.clear()
        if self._skip:
            name = "PixelData (7FE0,0010)" if self._skip_tag == _PIXEL_DATA else _tag_text(self._skip_tag)
            raise _Refused(
                FailureReason.CANNOT_UNDERSTAND,
                "truncated",
                f"Instance is truncated: it ends {self._skip} bytes before the end of element {name} "
                "as declared by its length",
            )
        if self._pending:
            raise _Refused(
                FailureReason.CANNOT_UNDERSTAND,
                "truncated",
                "Instance is truncated: it ends inside a data element header",
            )
        if self.frames:
            frame = self.frames[-1]
            raise _Refused(
                FailureReason.CANNOT_UNDERSTAND,
                "truncated",
                f"Instance is truncated: it ends inside {frame.kind} {_tag_text(frame.tag)}",
            )


def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


# --------------------------------------------------------------------------- deflate


class _Inflater:
    """Inflates a deflated dataset (PS3.5 §A.5) with bounded output; refuses deflate bombs."""

    _STEP = 256 * KIB
    _MAX_TRAILING = 16  # pad byte or a stray zlib trailer, both ignored by pydicom when it reads the file

    def __init__(self, policy: ValidationPolicy) -> None:
        self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
        self._policy = policy
        self.compressed = 0
        self.inflated = 0
        self._trailing = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Inflated pieces of ``data``, yielded in stream order so errors surface in that order too."""
        self.compressed += len(data)
        pending = data
        while pending:
            if self._zlib.eof:
                self._add_trailing(len(pending))
                return
            backup = self._zlib.copy()
            try:
                piece = self._zlib.decompress(pending, self._STEP)
            except zlib.error:
                # zlib drops the output of a failing call; replay byte by byte so that everything
                # before the corruption is walked, whatever the chunking.
                self._zlib = backup
                yield from self._inflate_until_error(pending)
                return
            self._account(len(piece))
            if piece:
                yield piece
            if self._zlib.eof:
                self._add_trailing(len(self._zlib.unused_data))
                return
            pending = self._zlib.unconsumed_tail

    def _inflate_until_error(self, data: bytes) -> Iterator[bytes]:
        for at in range(len(data)):
            try:
                piece = self._zlib.decompress(data[at : at + 1])
            except zlib.error:
                raise _Refused(
                    FailureReason.CANNOT_UNDERSTAND,
                    "bad_deflate",
                    "Deflated dataset is not a valid deflate stream (RFC 1951)",
                ) from None
            self._account(len(piece))
            if piece:
                yield piece
            if self._zlib.eof:
                self._add_trailing(len(data) - at - 1)
                return

    def _add_trailing(self, size: int) -> None:
        self._trailing += size
        if self._trailing > self._MAX_TRAILING:
            raise _Refused(
                FailureReason.CANNOT_UNDERSTAND,
                "trailing_bytes",
                f"More than {self._MAX_TRAILING} bytes follow the end of the deflated dataset",
            )

    def _account(self, size: int) -> None:
        self.inflated += size
        policy = self._policy
        if self.inflated > policy.max_inflated_bytes:
            raise _Refused(
                FailureReason.OUT_OF_RESOURCES,
                "deflate_bomb",
                f"Deflated dataset inflates beyond {policy.max_inflated_bytes} bytes, the maximum",
            )
        if (
            self.inflated > policy.inflation_ratio_floor_bytes
            and self.inflated > policy.max_inflation_ratio * self.compressed
        ):
            raise _Refused(
                FailureReason.OUT_OF_RESOURCES,
                "deflate_bomb",
                f"Deflated dataset inflates more than {policy.max_inflation_ratio} times its size, "
                "the maximum",
            )

    def finish(self) -> None:
        if not self._zlib.eof:
            raise _Refused(
                FailureReason.CANNOT_UNDERSTAND,
                "truncated",
                "Instance is truncated: the deflated dataset ends before its final deflate block",
            )


# --------------------------------------------------------------------------- the inspector


class InstanceInspector:
    """Validate one instance as its bytes stream in; see the module docstring.

    ``feed`` returns a :class:`ValidationFailure` as soon as one is certain (later feeds return the
    same failure and only count bytes); ``header`` is set once the identifying attributes are known;
    ``finish`` gives the verdict on the whole instance. No method raises on bad input.
    """

    def __init__(self, policy: ValidationPolicy | None = None, expected_study_uid: str | None = None) -> None:
        self.policy = policy or ValidationPolicy()
        self.expected_study_uid = expected_study_uid
        self.header: InstanceHeader | None = None
        self._sha256 = hashlib.sha256()
        self._size = 0
        self._failure: ValidationFailure | None = None
        self._prefix = bytearray()  # bytes before the dataset: preamble, DICM, file meta
        self._meta_progress: tuple[int, dict[int, bytes], int | None] | None = None
        self._has_meta = False
        self._meta_elements = 0
        self._transfer_syntax: str | None = None
        self._walker: _DatasetWalker | None = None
        self._inflater: _Inflater | None = None

    @property
    def size(self) -> int:
        return self._size

    @property
    def failure(self) -> ValidationFailure | None:
        return self._failure

    def feed(self, data: bytes) -> ValidationFailure | None:
        self._sha256.update(data)
        self._size += len(data)
        if self._failure is not None:
            return self._failure
        self._guarded(self._consume, data)
        return self._failure

    def finish(self) -> InstanceInfo | ValidationFailure:
        if self._failure is None:
            self._guarded(self._complete)
        if self._failure is not None:
            return self._failure
        header = self.header
        assert header is not None
        return InstanceInfo(
            sop_class_uid=header.sop_class_uid,
            sop_instance_uid=header.sop_instance_uid,
            study_instance_uid=header.study_instance_uid,
            series_instance_uid=header.series_instance_uid,
            patient_id=header.patient_id,
            transfer_syntax_uid=header.transfer_syntax_uid,
            has_file_meta=header.has_file_meta,
            size=self._size,
            sha256=self._sha256.hexdigest(),
        )

    # -- plumbing

    def _guarded(self, step: Callable[..., None], *args: bytes) -> None:
        try:
            step(*args)
        except _Refused as refused:
            self._fail(refused.failure)
        except (RecursionError, MemoryError):
            self._fail(
                ValidationFailure(
                    FailureReason.OUT_OF_RESOURCES, "Instance exhausted validator resources", "resources"
                )
            )
        except Exception:  # never let hostile bytes turn into a 5xx
            self._fail(
                ValidationFailure(
                    FailureReason.CANNOT_UNDERSTAND,
                    "Instance could not be parsed as DICOM",
                    "unparseable",
                )
            )

    def _fail(self, failure: ValidationFailure) -> None:
        header = self.header
        if header is not None and failure.sop_instance_uid is None:
            failure = ValidationFailure(
                failure.reason_code,
                failure.message,
                failure.problem,
                header.sop_class_uid,
                header.sop_instance_uid,
            )
        self._failure = failure
        self._walker = None
        self._inflater = None
        self._prefix = bytearray()

    def _consume(self, data: bytes) -> None:
        if self._size > self.policy.max_instance_bytes:
            raise _Refused(
                FailureReason.OUT_OF_RESOURCES,
                "instance_too_large",
                f"Instance exceeds {self.policy.max_instance_bytes} bytes, the maximum instance size",
            )
        if self._walker is None:
            self._prefix += data
            remainder = self._read_prefix(final=False)
            if remainder is None:
                return
            data = remainder
        self._dataset_bytes(data)

    def _dataset_bytes(self, data: bytes) -> None:
        if self._inflater is not None:
            for piece in self._inflater.feed(data):
                self._walk(piece)
        else:
            self._walk(data)

    def _walk(self, data: bytes) -> None:
        walker = self._walker
        assert walker is not None
        view = memoryview(data)
        while view:
            consumed = walker.feed(view)
            if self.header is None and walker.header_cutoff is not None:
                self._read_header(walker)
            if walker.vr_error is not None:
                raise _Refused(FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS, "wrong_vr", walker.vr_error)
            view = view[consumed:]

    def _complete(self) -> None:
        if self._walker is None:
            remainder = self._read_prefix(final=True)
            assert remainder is not None
            self._dataset_bytes(remainder)
        walker = self._walker
        assert walker is not None
        if self._inflater is not None:
            self._inflater.finish()
        walker.finish()
        if self.header is None:
            walker.header_cutoff = len(walker.header)
            self._read_header(walker)

    # -- preamble, DICM and file meta

    def _read_prefix(self, *, final: bool) -> bytes | None:
        """Find where the dataset starts; returns the dataset bytes seen so far, or None to wait."""
        buf = self._prefix
        if len(buf) < 132 and not final:
            return None
        start = 0
        if len(buf) >= 132 and buf[128:132] == b"DICM":
            start = 132
        elif buf[:4] == b"DICM":
            start = 4
        if start or buf[:2] == b"\x02\x00":
            meta_end = self._parse_meta(start, final=final)
            if meta_end is None:
                return None
            self._has_meta = True
            self._begin_dataset(implicit=None)
            rest = bytes(buf[meta_end:])
        else:
            if len(buf) < 8:
                raise _Refused(
                    FailureReason.CANNOT_UNDERSTAND,
                    "not_dicom",
                    "Part is too short to be a DICOM instance",
                )
            implicit = bytes(buf[4:6]) not in _VALID_VRS
            self._transfer_syntax = IMPLICIT_VR_LITTLE_ENDIAN if implicit else EXPLICIT_VR_LITTLE_ENDIAN
            self._begin_dataset(implicit=implicit)
            rest = bytes(buf)
        self._prefix = bytearray()
        return rest

    def _parse_meta(self, start: int, *, final: bool) -> int | None:
        buf = self._prefix
        if self._meta_progress is None:  # resumable: a meta fed one byte at a time is parsed once
            self._meta_progress = (start, {}, None)
        position, values, meta_end = self._meta_progress
        # meta_end comes from FileMetaInformationGroupLength when present (PS3.10 §7.1)
        while True:
            if meta_end is not None and position >= meta_end:
                break
            if len(buf) - position < 2:
                if final:
                    break
                self._check_meta_size(buf)
                return None
            group = buf[position] | buf[position + 1] << 8
            if group != 0x0002:
                if meta_end is not None:
                    raise _Refused(
                        FailureReason.CANNOT_UNDERSTAND,
                        "bad_file_meta",
                        "File meta is shorter than its FileMetaInformationGroupLength (0002,0000) says",
                    )
                break
            if len(buf) - position < 8:
                if final:
                    raise _Refused(
                        FailureReason.CANNOT_UNDERSTAND, "truncated", "Instance ends inside its file meta"
                    )
                self._check_meta_size(buf)
                return None
            tag = struct.unpack_from("<I", buf, position)[0]
            tag = (tag & 0xFFFF) << 16 | tag >> 16
            vr = bytes(buf[position + 4 : position + 6])
            if vr not in _VALID_VRS:
                raise _Refused(
                    FailureReason.CANNOT_UNDERSTAND,
                    "bad_vr",
                    f"File meta element {_tag_text(tag)} has an invalid value representation",
                )
            if vr in _LONG_VRS:
                if len(buf) - position < 12:
                    if final:
                        raise _Refused(
                            FailureReason.CANNOT_UNDERSTAND, "truncated", "Instance ends inside its file meta"
                        )
                    self._check_meta_size(buf)
                    return None
                length = struct.unpack_from("<I", buf, position + 8)[0]
                value_at = position + 12
            else:
                length = struct.unpack_from("<H", buf, position + 6)[0]
                value_at = position + 8
            if length == _UNDEFINED or value_at + length - start > _MAX_META_BYTES:
                raise _Refused(
                    FailureReason.CANNOT_UNDERSTAND,
                    "bad_file_meta",
                    f"File meta element {_tag_text(tag)} has a length beyond {_MAX_META_BYTES} bytes",
                )
            if value_at + length > len(buf):
                if final:
                    raise _Refused(
                        FailureReason.CANNOT_UNDERSTAND, "truncated", "Instance ends inside its file meta"
                    )
                self._check_meta_size(buf)
                return None
            values[tag] = bytes(buf[value_at : value_at + length])
            self._meta_elements += 1
            position = value_at + length
            if tag == 0x00020000 and length == 4:
                meta_end = position + struct.unpack_from("<I", buf, value_at)[0]
                if meta_end - start > _MAX_META_BYTES:
                    raise _Refused(
                        FailureReason.CANNOT_UNDERSTAND,
                        "bad_file_meta",
                        f"File meta declares more than {_MAX_META_BYTES} bytes, the maximum",
                    )
            self._meta_progress = (position, values, meta_end)
        raw_ts = values.get(0x00020010)
        if raw_ts is None:
            raise _Refused(
                FailureReason.CANNOT_UNDERSTAND,
                "no_transfer_syntax",
                "File meta has no TransferSyntaxUID (0002,0010), which PS3.10 requires",
            )
        self._transfer_syntax = _text(raw_ts)
        return position

    def _check_meta_size(self, buf: bytearray) -> None:
        if len(buf) > _MAX_META_BYTES + 132:
            raise _Refused(
                FailureReason.CANNOT_UNDERSTAND,
                "bad_file_meta",
                f"File meta is larger than {_MAX_META_BYTES} bytes, the maximum",
            )

    def _begin_dataset(self, *, implicit: bool | None) -> None:
        syntax = self._transfer_syntax or ""
        if syntax not in self.policy.allowed_transfer_syntaxes:
            described = syntax if RE_VALID_UID.match(syntax) and len(syntax) <= 64 else "(not a valid UID)"
            raise _Refused(
                FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED,
                "transfer_syntax_not_allowed",
                f"Transfer syntax {described} is not accepted; accepted: "
                + ", ".join(sorted(self.policy.allowed_transfer_syntaxes)),
            )
        if implicit is None:
            implicit = syntax == IMPLICIT_VR_LITTLE_ENDIAN
        if syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            self._inflater = _Inflater(self.policy)
        self._walker = _DatasetWalker(
            implicit,
            self.policy,
            self.policy.header_window_bytes,
            detect_encoding=syntax != DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
            encapsulated=UID(syntax).is_encapsulated if UID(syntax).is_transfer_syntax else None,
            elements=self._meta_elements,
        )

    # -- header attributes

    def _read_header(self, walker: _DatasetWalker) -> None:
        cutoff = walker.header_cutoff or 0
        raw = bytes(walker.header[:cutoff])
        walker.header = bytearray()
        values: dict[int, str] = {}
        with warnings.catch_warnings():  # also: an unknown character set, bytes it cannot hold
            warnings.simplefilter("ignore")
            dataset = read_dataset(BytesIO(raw), walker.implicit, True)
            for tag in _REQUIRED_UIDS:
                element = dataset.get_item(Tag(tag))
                value = element.value if element is not None else None
                values[tag] = _text(value) if isinstance(value, bytes) else ""
            if walker.header_vr_error is not None:  # before any value is converted by that VR
                raise _Refused(
                    FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                    "wrong_vr",
                    walker.header_vr_error,
                    sop_class_uid=values[_SOP_CLASS_UID],
                    sop_instance_uid=values[_SOP_INSTANCE_UID],
                )
            values[_PATIENT_ID] = patient_id_text(dataset.get("PatientID"))
        if not any(values[tag] for tag in _REQUIRED_UIDS):
            raise _Refused(
                FailureReason.CANNOT_UNDERSTAND,
                "not_dicom",
                "Part is not a DICOM instance: none of the SOP Common, Study or Series UIDs is present",
            )
        for tag, name in _REQUIRED_UIDS.items():
            if not values[tag]:
                raise _Refused(
                    FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                    "missing_attribute",
                    f"Required attribute {name} is missing or empty",
                )
            if not uid_is_valid(values[tag]):
                raise _Refused(
                    FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                    "invalid_uid",
                    f"{name} is not a valid UID (PS3.5 §9.1: digits and dots, no leading zeros, at most "
                    "64 characters)",
                )
        patient_id = values[_PATIENT_ID]
        if not patient_id:
            raise _Refused(
                FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "missing_attribute",
                "Required attribute PatientID (0010,0020) is missing or empty",
            )
        if "\ufffd" in patient_id or any(ord(c) < 0x20 for c in patient_id):
            raise _Refused(
                FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "invalid_patient_id",
                "PatientID (0010,0020) is not valid text in the instance's Specific Character Set "
                "(0008,0005): declare the character set it is written in",
            )
        if len(patient_id) > 64:
            raise _Refused(
                FailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "invalid_patient_id",
                "PatientID (0010,0020) is longer than 64 characters, the LO maximum",
            )
        self.header = InstanceHeader(
            sop_class_uid=values[_SOP_CLASS_UID],
            sop_instance_uid=values[_SOP_INSTANCE_UID],
            study_instance_uid=values[_STUDY_INSTANCE_UID],
            series_instance_uid=values[_SERIES_INSTANCE_UID],
            patient_id=patient_id,
            transfer_syntax_uid=self._transfer_syntax or "",
            has_file_meta=self._has_meta,
        )
        self._check_header(self.header)

    def _check_header(self, header: InstanceHeader) -> None:
        if not self.policy.sop_class_allowed(header.sop_class_uid):
            raise _Refused(
                FailureReason.SOP_CLASS_NOT_SUPPORTED,
                "sop_class_not_allowed",
                self.policy.sop_class_refusal(header.sop_class_uid),
            )
        if self.expected_study_uid is not None and header.study_instance_uid != self.expected_study_uid:
            raise _Refused(
                FailureReason.STUDY_INSTANCE_UID_MISMATCH,
                "study_uid_mismatch",
                "StudyInstanceUID of the instance does not match the study in the request URL",
            )


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip("\x00 ").strip()


def uid_is_valid(uid: str) -> bool:
    return len(uid) <= 64 and RE_VALID_UID.match(uid) is not None


def validate_instance(
    data: bytes, policy: ValidationPolicy | None = None, expected_study_uid: str | None = None
) -> InstanceInfo | ValidationFailure:
    """Validate a whole instance held in memory (tests, tools); the gateway streams instead."""
    inspector = InstanceInspector(policy, expected_study_uid)
    inspector.feed(data)
    return inspector.finish()
