"""Ingest re-reads the identity of what the gateway accepted; the patient id must read the same as at
the gateway (``enclave_common.pseudonyms.patient_id_text``), or the two derive different patient keys."""

from __future__ import annotations

from io import BytesIO

import pytest
from enclave_ingest.dicom_check import read_identity
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

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
