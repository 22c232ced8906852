"""Ingest re-reads the identity of what the gateway accepted; the patient id must read the same as at
the gateway (``enclave_common.pseudonyms.patient_id_text``), or the two derive different patient keys."""

from __future__ import annotations

import os
from io import BytesIO

import pydicom
import pytest
from enclave_ingest.dicom_check import InvalidInstance, read_identity
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
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
