"""Ingest re-reads the identity of what the gateway accepted; the patient id must read the same as at
the gateway (``enclave_common.pseudonyms.patient_id_text``), or the two derive different patient keys."""

from __future__ import annotations

import os
import zlib
from io import BytesIO

import pydicom
import pytest
from enclave_ingest.dicom_check import InvalidInstance, read_identity
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, MRImageStorage, generate_uid

#: (Specific Character Set, PatientID as the hospital wrote it, the text both services key it by)
PATIENT_IDS = [
    ("ISO_IR 192", "HÜNTER-山田", "HÜNTER-山田"),
    ("ISO_IR 192", "HUNTPID-" + "Å" * 30, "HUNTPID-" + "Å" * 30),  # 38 characters, 68 bytes
    ("ISO_IR 100", "MÜLLER-0042", "MÜLLER-0042"),
    ("GB18030", "王伟-7", "王伟-7"),
    ("", "PLAIN-0001  ", "PLAIN-0001"),
    ("", ["FIRST", "SECOND"], "FIRST\\SECOND"),
]


def encoded(charset: str, patient_id: str | list[str]) -> bytes:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize(("charset", "written", "expected"), PATIENT_IDS)
def test_the_patient_id_is_read_in_its_character_set(charset, written, expected) -> None:
    assert read_identity(encoded(charset, written), complete=True).patient_id == expected


def deflated(pixel_bytes: int) -> bytes:
    """A deflated instance with incompressible pixel data (it stays ``pixel_bytes`` long deflated)."""
    ds = pydicom.dcmread(BytesIO(encoded("ISO_IR 192", "HÜNTER-山田")))
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = pixel_bytes // 1024, 512, 16, 16, 15
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    ds.add_new(0x7FE00010, "OW", os.urandom(pixel_bytes))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_a_deflated_instance_past_the_prefix_is_read_from_its_prefix() -> None:
    """Found by a pipeline hunt: pydicom inflates the whole rest of a deflated file at once, so the
    4 MiB prefix of a larger deflated instance was a truncated stream; the instance, accepted by the
    gateway, was refused by ingest as unparseable (the hospital saw "unexpected_error")."""
    data = deflated(5 * 1024 * 1024)
    prefix = data[: 4 * 1024 * 1024]
    identity = read_identity(prefix, complete=False)
    assert identity.patient_id == "HÜNTER-山田"
    assert identity.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert read_identity(data, complete=True) == identity


def test_a_corrupt_deflated_stream_is_an_invalid_instance() -> None:
    data = deflated(1024)
    stream = BytesIO(data)
    read_preamble(stream, False)
    _read_file_meta_info(stream)  # the deflated dataset starts here
    corrupt = data[: stream.tell()] + b"\xff" * 64 + data[stream.tell() + 64 :]
    with pytest.raises(InvalidInstance, match="could not be parsed"):
        read_identity(corrupt, complete=True)


def with_vr(data: bytes, element_header: bytes, vr: bytes) -> bytes:
    """Rewrite the VR of the short-VR element whose tag and VR start with ``element_header``."""
    assert data.count(element_header) == 1
    return data.replace(element_header, element_header[:4] + vr)


@pytest.mark.parametrize(
    ("element_header", "vr", "reason"),
    [
        (b"\x20\x00\x0e\x00UI", b"FD", "SeriesInstanceUID (0020,000E) has VR FD; it must be UI"),
        (b"\x08\x00\x18\x00UI", b"SH", "SOPInstanceUID (0008,0018) has VR SH; it must be UI"),
        (b"\x10\x00\x20\x00LO", b"FD", "PatientID (0010,0020) has VR FD; it must be LO"),
    ],
    ids=["series-uid-as-FD", "sop-instance-uid-as-SH", "patient-id-as-FD"],
)
def test_a_required_attribute_under_another_vr_is_an_invalid_instance(element_header, vr, reason) -> None:
    """Found by a conformance review: a SeriesInstanceUID written as FD (6 bytes, no whole double)
    raised while its value was converted, outside the checks' error handling, and the hospital saw
    ``unexpected_error`` with a stack location for a reason."""
    data = with_vr(encoded("ISO_IR 192", "HÜNTER-山田"), element_header, vr)
    with pytest.raises(InvalidInstance) as refused:
        read_identity(data, complete=True)
    assert refused.value.code == "invalid_instance"
    assert refused.value.reason == reason


def test_a_required_attribute_written_as_un_is_read_by_its_standard_vr() -> None:
    data = encoded("ISO_IR 192", "HÜNTER-山田")
    at = data.index(b"\x20\x00\x0e\x00UI")
    length = int.from_bytes(data[at + 6 : at + 8], "little")
    un = data[:at] + b"\x20\x00\x0e\x00UN\x00\x00" + length.to_bytes(4, "little") + data[at + 8 :]
    assert read_identity(un, complete=True) == read_identity(data, complete=True)


def test_a_value_pydicom_cannot_convert_is_an_invalid_instance_that_quotes_nothing(monkeypatch) -> None:
    """Defence in depth: whatever conversion error pydicom raises while the identity is read (its
    messages quote the value) ends as ``invalid_instance`` naming the attribute and the error type."""
    from enclave_ingest import dicom_check
    from pydicom.errors import BytesLengthException

    def conversion_fails(value: object) -> str:
        raise BytesLengthException("Instead received b'HUNTER' with length 6")

    monkeypatch.setattr(dicom_check, "patient_id_text", conversion_fails)
    with pytest.raises(InvalidInstance) as refused:
        read_identity(encoded("", "HUNTER"), complete=True)
    assert refused.value.reason == (
        "PatientID (0010,0020) could not be read as its value representation (BytesLengthException)"
    )


def test_a_header_pydicom_fails_on_in_any_way_is_an_invalid_instance(monkeypatch) -> None:
    from enclave_ingest import dicom_check
    from pydicom.errors import BytesLengthException

    def parse_fails(prefix: bytes, *bound: int) -> None:
        raise BytesLengthException("b'HUNTER'")

    monkeypatch.setattr(dicom_check, "_read_header", parse_fails)
    with pytest.raises(InvalidInstance, match=r"could not be parsed \(BytesLengthException\)$") as refused:
        read_identity(encoded("", "HUNTER"), complete=True)
    assert "HUNTER" not in refused.value.reason


def deflated_with_items(items: int) -> bytes:
    """A deflated instance whose header holds a private sequence of ``items`` empty items before the
    identity's last attributes: highly compressible (8 bytes an item inflated, almost nothing deflated)."""
    ds = pydicom.dcmread(BytesIO(encoded("ISO_IR 192", "HÜNTER-山田")))
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    body = fp.getvalue()
    at = body.index(b"\x20\x00\x0d\x00")  # StudyInstanceUID: the items go before it
    items_sq = (
        b"\x19\x00\x10\x00LO\x04\x00HUNT"
        + b"\x19\x00\x10\x10SQ\x00\x00\xff\xff\xff\xff"
        + b"\xfe\xff\x00\xe0\x00\x00\x00\x00" * items
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    )
    body = body[:at] + items_sq + body[at:]
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return bytes(128) + b"DICM" + meta.getvalue() + compressor.compress(body) + compressor.flush()


def test_a_highly_compressible_deflated_header_is_inflated_up_to_the_header_bound() -> None:
    """Found by a security hunt (F8): the header was inflated to at most the compressed size, so a
    valid deflated instance smaller than the prefix whose header inflates past its own size (here
    ~0.8 MB from a few KiB) was refused as ``invalid_instance`` after the gateway had accepted it."""
    data = deflated_with_items(100_000)
    assert len(data) < 16 * 1024
    identity = read_identity(data, complete=True, max_header_bytes=4 * 1024 * 1024)
    assert identity.patient_id == "HÜNTER-山田"
    assert identity.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert read_identity(data, complete=True) == identity  # the default bound is the 4 MiB prefix


def test_a_deflated_header_past_the_bound_is_parsed_as_far_as_it_goes_and_a_bomb_stays_bounded(
    monkeypatch,
) -> None:
    """Past the bound the inflated header is cut there and parsed like a prefix cut short: here the
    identity lies beyond it, so the instance is refused as the header of a non-deflated instance
    larger than the prefix is; the inflater never yields more than the bound (a bomb of 64 MB)."""
    from enclave_ingest import dicom_check

    produced: list[int] = []
    real = zlib.decompressobj

    class Recording:
        def __init__(self, *args: object) -> None:
            self._inner = real(*args)

        def decompress(self, data: bytes, max_length: int = 0) -> bytes:
            out = self._inner.decompress(data, max_length)
            produced.append(len(out))
            return out

    monkeypatch.setattr(dicom_check.zlib, "decompressobj", Recording)
    bomb = deflated_with_items(8_000_000)  # 64 MB inflated
    with pytest.raises(InvalidInstance, match="could not be parsed"):
        read_identity(bomb, complete=True, max_header_bytes=1024 * 1024)
    assert produced and max(produced) <= 1024 * 1024
    # a bound past the identity reads it, from the same bytes
    assert read_identity(deflated_with_items(1000), complete=True, max_header_bytes=64 * 1024).patient_id
