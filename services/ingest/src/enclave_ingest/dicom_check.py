"""Defence in depth: ingest re-parses what the gateway accepted and re-checks what it must hold.

The gateway already validated the instance; this catches a gateway bug or a forged chunk stream.
Only the decrypted header prefix is parsed (bounded memory); errors never quote DICOM values.
"""

from __future__ import annotations

import io
import re
import zlib
from dataclasses import dataclass

import pydicom
from enclave_common.errors import PermanentError
from enclave_common.pseudonyms import patient_id_text
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.valuerep import VR

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
#: The default bound of an inflated header (ingest's ``header_prefix_bytes``).
DEFAULT_MAX_HEADER_BYTES = 4 * 1024 * 1024
REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID")


class InvalidInstance(PermanentError):
    code = "invalid_instance"


@dataclass(frozen=True)
class InstanceIdentity:
    """Identifying values read from the instance. PHI: never log, never publish (pseudonymise first)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    transfer_syntax_uid: str


def read_identity(
    prefix: bytes, *, complete: bool, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> InstanceIdentity:
    """Parse the header in ``prefix`` (the whole instance when ``complete``) and check the required attributes.
    A deflated dataset is inflated to at most ``max_header_bytes`` (ingest's header prefix size).

    Whatever the bytes, the outcome is an identity or :class:`InvalidInstance`, whose reason names
    attributes and exception types, never a value (pydicom's own messages quote the value).
    """
    try:
        ds = _read_header(prefix, max_header_bytes)
    except (MemoryError, RecursionError):
        raise
    except Exception as exc:  # any parse failure of these bytes: a hostile or broken instance
        hint = "" if complete else " (the header may be larger than the configured prefix)"
        raise InvalidInstance(f"instance header could not be parsed ({type(exc).__name__}){hint}") from exc
    for name in REQUIRED:
        _check_vr(ds, name)
    values = {name: _value_text(ds, name) for name in REQUIRED}
    missing = [name for name in REQUIRED if not values[name]]
    if missing:
        raise InvalidInstance(f"required attributes missing or empty: {', '.join(missing)}")
    for name in REQUIRED[:4]:
        if len(values[name]) > 64 or not _UID.match(values[name]):
            raise InvalidInstance(f"{name} is not a valid UID (PS3.5 9.1: digits and dots, at most 64 chars)")
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not ts:
        ts = "1.2.840.10008.1.2.1" if not ds.is_implicit_VR else "1.2.840.10008.1.2"
    return InstanceIdentity(
        sop_class_uid=values["SOPClassUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        study_instance_uid=values["StudyInstanceUID"],
        series_instance_uid=values["SeriesInstanceUID"],
        patient_id=values["PatientID"],
        transfer_syntax_uid=ts,
    )


def _check_vr(ds: Dataset, keyword: str) -> None:
    """In an explicit-VR dataset the attribute must have its standard VR (or UN, which pydicom reads
    by its dictionary VR): pydicom converts a value by the VR written in the stream. Before the
    sixteenth session a SeriesInstanceUID written as FD reached the conversion and ended the instance
    as ``unexpected_error``, with a stack location for a reason."""
    element = ds.get_item(keyword)
    standard = dictionary_VR(keyword)
    if element is None or element.VR in (None, standard, VR.UN):
        return
    raise InvalidInstance(f"{keyword} ({_tag_text(keyword)}) has VR {element.VR}; it must be {standard}")


def _value_text(ds: Dataset, keyword: str) -> str:
    """The attribute's value as text; a value pydicom cannot convert is an invalid instance."""
    try:
        if keyword == "PatientID":
            return patient_id_text(ds.get(keyword))
        return str(ds.get(keyword, "") or "").strip()
    except (MemoryError, RecursionError):
        raise
    except Exception as exc:
        raise InvalidInstance(
            f"{keyword} ({_tag_text(keyword)}) could not be read as its value representation "
            f"({type(exc).__name__})"
        ) from exc


def _tag_text(keyword: str) -> str:
    tag = Tag(keyword)
    return f"{tag.group:04X},{tag.element:04X}"


def _read_header(prefix: bytes, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> Dataset:
    """The dataset before Pixel Data. A deflated dataset is inflated to at most ``max_header_bytes``
    (what the header prefix holds of a dataset that is not deflated) and what is there is parsed, as
    a prefix is: pydicom inflates the whole rest of a file in one call, which fails on a prefix (a
    truncated stream) and, on a whole file, would hold all of it inflated (a decompression bomb).
    Until the fourteenth session every deflated instance past the 4 MiB prefix was refused as
    unparseable after the gateway had accepted it; until a later security hunt (F8) the inflated
    header was bounded by the compressed size instead, and a highly compressible deflated instance smaller than
    the prefix was refused (``invalid_instance``, OSError) as its header came out cut short."""
    stream = io.BytesIO(prefix)
    if read_preamble(stream, True) is not None:  # a Part 10 file (force: None, rewound, if not)
        meta = _read_file_meta_info(stream)
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            head = inflater.decompress(memoryview(prefix)[stream.tell() :], max_header_bytes)
            ds = read_dataset(io.BytesIO(head), False, True, stop_when=_at_pixel_data)
            ds.file_meta = meta
            return ds
    return pydicom.dcmread(io.BytesIO(prefix), stop_before_pixels=True, force=True)


def _at_pixel_data(tag: object, vr: object, length: object) -> bool:
    return int(tag) >= 0x7FE00010  # type: ignore[call-overload]
