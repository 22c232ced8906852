"""Builders for the gateway's edge-input corpus: valid instances, hostile instances, request bodies.

Request bodies are built the way real clients build them: the Python ``dicomweb-client`` through its
own encoder, the npm ``dicomweb-client`` (``multipartEncode`` in src/message.js, including the NUL
padding it leaves after the closing boundary when it sends several instances), Orthanc's DICOMweb
plugin STOW client (``StowClientJob``: unquoted boundary, per-part Content-Length, no leading CRLF),
and ``httpx`` for multipart/form-data. Hostile inputs are derived from those.
"""

from __future__ import annotations

import random
import struct
import uuid
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import httpx
import pydicom.data
from dicomweb_client.web import DICOMwebClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

PYDICOM_TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
PLANTED_PATIENT_ID = "PHI-PID-7731-SECRET"
PLANTED_PATIENT_NAME = "Secretname^Plantedperson"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1.1"


def pydicom_file(name: str) -> bytes:
    """A file bundled with pydicom (never fetched from the internet)."""
    return (PYDICOM_TEST_FILES / name).read_bytes()


def make_dataset(
    *,
    sop_instance_uid: str | None = None,
    study_uid: str = STUDY_UID,
    series_uid: str = SERIES_UID,
    sop_class_uid: str = MRImageStorage,
    patient_id: str | None = PLANTED_PATIENT_ID,
    pixel_bytes: int = 64,
) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid() if sop_instance_uid is None else sop_instance_uid
    ds.Modality = "MR"
    ds.PatientName = PLANTED_PATIENT_NAME
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = 1
    wide = pixel_bytes >= 512 and pixel_bytes % 512 == 0
    ds.Rows = pixel_bytes // 512 if wide else 1
    ds.Columns = 256 if wide else pixel_bytes // 2
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * (pixel_bytes // 256) + bytes(pixel_bytes % 256)
    return ds


def encode(ds: Dataset, *, syntax: str = ExplicitVRLittleEndian, with_meta: bool = True) -> bytes:
    """Encode a dataset as a PS3.10 file (``with_meta``) or as a bare dataset."""
    buffer = BytesIO()
    if with_meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(buffer, enforce_file_format=True)
    else:
        ds.save_as(buffer, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    return buffer.getvalue()


def make_instance(
    syntax: str = ExplicitVRLittleEndian, *, with_meta: bool = True, **dataset_fields: object
) -> bytes:
    return encode(make_dataset(**dataset_fields), syntax=syntax, with_meta=with_meta)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- hostile instances


def truncate(data: bytes, keep: int) -> bytes:
    return data[:keep]


def pixel_data_offset(data: bytes) -> int:
    """Offset of the PixelData element header in an explicit-VR little-endian file."""
    at = data.rfind(b"\xe0\x7f\x10\x00")
    assert at > 0
    return at


def with_bad_vr(data: bytes) -> bytes:
    """Replace the VR of the Modality element (0008,0060) with bytes that are no VR."""
    at = data.find(b"\x08\x00\x60\x00CS")
    assert at > 0
    return data[: at + 4] + b"Q!" + data[at + 6 :]


def with_element_vr(data: bytes, tag: int, vr: bytes, *, undefined_length: bool = False) -> bytes:
    """Rewrite the VR of the top-level element ``tag`` (written with a short VR) of an explicit-VR
    little-endian file, keeping its value. A long VR (UN) takes the 12-byte header; with
    ``undefined_length`` the value becomes an empty sequence of undefined length instead."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    at = data.find(head)
    while at >= 0 and data[at + 4 : at + 6] not in (b"AE", b"CS", b"LO", b"PN", b"SH", b"UI", b"US"):
        at = data.find(head, at + 1)
    assert at > 0, hex(tag)
    length = struct.unpack_from("<H", data, at + 6)[0]
    value = data[at + 8 : at + 8 + length]
    if undefined_length:
        element = head + vr + b"\0\0" + struct.pack("<I", 0xFFFFFFFF) + b"\xfe\xff\xdd\xe0" + bytes(4)
    elif vr in (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"):
        element = head + vr + b"\0\0" + struct.pack("<I", length) + value
    else:
        element = head + vr + struct.pack("<H", length) + value
    return data[:at] + element + data[at + 8 + length :]


def with_huge_pixel_length(data: bytes, length: int = 0xFFFFFFF0) -> bytes:
    """Declare a PixelData length far beyond what is sent (explicit VR: tag, VR, 2 reserved, 4 length)."""
    at = pixel_data_offset(data)
    return data[: at + 8] + struct.pack("<I", length) + data[at + 12 :]


def nested_sequences(depth: int, *, patient_id: str = PLANTED_PATIENT_ID) -> bytes:
    """A bare explicit-VR dataset whose ReferencedSeriesSequence nests ``depth`` levels deep."""

    def element(tag: int, vr: bytes, value: bytes) -> bytes:
        group, elem = tag >> 16, tag & 0xFFFF
        if vr in (b"SQ", b"OB", b"UN", b"UT"):
            return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", group, elem, vr, len(value)) + value

    def uid(text: str) -> bytes:
        raw = text.encode()
        return raw + b"\x00" * (len(raw) % 2)

    def text(value: str) -> bytes:
        raw = value.encode()
        return raw + b" " * (len(raw) % 2)

    inner = b""
    for _ in range(depth):
        item = element(0x00081115, b"SQ", inner) if inner else b""
        inner = struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item
    sequence = element(0x00081115, b"SQ", inner)
    return (
        element(0x00080016, b"UI", uid(MRImageStorage))
        + element(0x00080018, b"UI", uid("1.2.3.4.5"))
        + sequence
        + element(0x00100020, b"LO", text(patient_id))
        + element(0x0020000D, b"UI", uid(STUDY_UID))
        + element(0x0020000E, b"UI", uid(SERIES_UID))
    )


def deflate_bomb(inflated_bytes: int = 64 * 1024 * 1024) -> bytes:
    """A deflated-TS file whose PixelData of zeros inflates about 1000 times its size."""
    ds = make_dataset(pixel_bytes=2)
    header = encode(ds, syntax=ExplicitVRLittleEndian, with_meta=False)
    header = header[: pixel_data_offset(header)]
    meta = encode(make_dataset(pixel_bytes=2), syntax=DeflatedExplicitVRLittleEndian)
    meta = meta[: 132 + 12 + struct.unpack_from("<I", meta, 140)[0]]
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [compressor.compress(header + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, inflated_bytes))]
    zeros = bytes(1024 * 1024)
    for _ in range(inflated_bytes // len(zeros)):
        parts.append(compressor.compress(zeros))
    parts.append(compressor.flush())
    return meta + b"".join(parts)


NON_DICOM_SAMPLES: dict[str, bytes] = {
    "png": b"\x89PNG\r\n\x1a\n" + bytes(200),
    "json": b'{"00100020": {"vr": "LO", "Value": ["x"]}}' * 8,
    "html": b"<html><body>not dicom</body></html>" * 8,
    "zeros": bytes(512),
    "ones": b"\xff" * 512,
    "short": b"DICM",
    "random": random.Random(7).randbytes(4096),
}


# --------------------------------------------------------------------------- request bodies


@dataclass(frozen=True)
class Body:
    content_type: str
    data: bytes


def python_dicomweb_client_body(instances: list[bytes]) -> Body:
    """Exactly what ``dicomweb_client.DICOMwebClient.store_instances`` posts (its own encoder)."""
    content_type = (
        'multipart/related; type="application/dicom"; boundary="0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"'
    )
    return Body(content_type, DICOMwebClient._encode_multipart_message(instances, content_type))


def npm_dicomweb_client_body(instances: list[bytes], boundary: str | None = None) -> Body:
    """``multipartEncode`` of dcmjs-org/dicomweb-client: the buffer is sized for one footer per
    instance but only one is written, so N instances leave (N-1) footers' worth of NUL bytes."""
    boundary = boundary or str(uuid.uuid4())
    header = f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    footer = f"\r\n--{boundary}--".encode()
    total = sum(len(header) + len(instance) + len(footer) for instance in instances)
    out = bytearray(total)
    position = 0
    for instance in instances:
        out[position : position + len(header)] = header
        out[position + len(header) : position + len(header) + len(instance)] = instance
        position += len(header) + len(instance)
    out[position : position + len(footer)] = footer
    content_type = f'multipart/related; type="application/dicom"; boundary="{boundary}"'
    return Body(content_type, bytes(out))


def orthanc_body(instances: list[bytes]) -> Body:
    """Orthanc DICOMweb plugin STOW client: unquoted 73-character boundary, Content-Length per part."""
    boundary = f"{uuid.uuid4()}-{uuid.uuid4()}"
    chunks = [
        f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {len(instance)}\r\n\r\n".encode()
        + instance
        + b"\r\n"
        for instance in instances
    ]
    chunks.append(f"--{boundary}--".encode())
    return Body(f'multipart/related; type="application/dicom"; boundary={boundary}', b"".join(chunks))


def form_data_body(instances: list[bytes]) -> Body:
    """multipart/form-data as httpx sends it for ``files=[("file", ...), ...]``."""
    files = [("file", (f"instance-{i}.dcm", data, "application/dicom")) for i, data in enumerate(instances)]
    request = httpx.Request("POST", "http://gateway.invalid/api/v1/imaging/upload", files=files)
    return Body(request.headers["content-type"], request.read())


def multipart_body(
    parts: list[bytes],
    *,
    boundary: str = "enclave-boundary-42",
    quoted: bool = True,
    leading_crlf: bool = False,
    preamble: bytes = b"",
    epilogue: bytes = b"",
    content_length: bool = False,
    extra_headers: list[str] | None = None,
    part_type: str | None = "application/dicom",
) -> Body:
    """A hand-shaped multipart/related body for edge cases."""
    out = bytearray(preamble)
    for index, part in enumerate(parts):
        crlf = index > 0 or leading_crlf or bool(preamble)
        out += (b"\r\n" if crlf else b"") + f"--{boundary}\r\n".encode()
        headers = []
        if part_type is not None:
            headers.append(f"Content-Type: {part_type}")
        if content_length:
            headers.append(f"Content-Length: {len(part)}")
        headers.extend(extra_headers or [])
        out += "".join(f"{header}\r\n" for header in headers).encode() + b"\r\n" + part
    out += f"\r\n--{boundary}--".encode() + epilogue
    shown = f'"{boundary}"' if quoted else boundary
    return Body(f'multipart/related; type="application/dicom"; boundary={shown}', bytes(out))


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    """Cut ``data`` into chunks of the given sizes, cycling through them."""
    chunks = []
    position = 0
    index = 0
    while position < len(data):
        size = max(1, sizes[index % len(sizes)])
        chunks.append(data[position : position + size])
        position += size
        index += 1
    return chunks
