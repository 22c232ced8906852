"""Identifying values in places Table E.1-1 does not name, found by a PHI hunt (thirteenth session):
each planted marker came out of de-identification before the fix, under every policy. The leak scanner
(``deid_leakscan``) searches the values of listed attributes only, so none of these showed there.

* free text in sequences the Basic Profile replaces with dummies (SR TextValue, graphic and waveform
  annotation text) and other unlisted free text: replaced with a dummy;
* URLs and URIs (RetrieveURL carries the original Study Instance UID): removed;
* an element written with a VR its tag does not have: a date as LO is treated as the date it is; a
  sequence written as OB, which cannot be walked, is removed;
* a DT with text after its time: the text is dropped, not carried into the shifted value;
* command-group elements and the Encrypted Attributes Sequence: removed;
* Patient's Birth Date and Time under Retain Longitudinal Modified Dates: removed as the Basic
  Profile says (they were shifted with the study dates, which kept the patient's exact age);
* a Retain Safe Private UID in an implicit-VR file: remapped (its VR was unknown, so it was kept).
"""

from __future__ import annotations

from io import BytesIO

import pytest
from deid_corpus import item
from deid_keys import ALL_OPTIONS
from enclave_deid.deidentify import DeidContext, deidentify
from enclave_deid.instance_io import read_instance, write_instance
from enclave_deid.policy import DeidPolicy, SafePrivateAttribute
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

TENANT = "tenant-a"
MARK = "PHIMARK"
STUDY_UID = "1.2.826.0.1.3680043.99.771"
POLICIES = {
    "basic": DeidPolicy(),
    "modified dates": DeidPolicy(retain_longitudinal_modified_dates=True),
    "all options": ALL_OPTIONS,
}


def _base(transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    ds = Dataset()
    ds.PatientName = "SMITHSON^JOHANNA"
    ds.PatientID = "MRN-0042"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.99.772"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.99.773"
    ds.StudyDate = "20240301"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds


def _deidentify(ds: Dataset, keys, policy: DeidPolicy) -> bytes:
    parsed = read_instance(write_instance(ds))
    result = deidentify(parsed, policy, keys, DeidContext(TENANT))
    return write_instance(result.dataset)


def _free_text_instance() -> Dataset:
    ds = _base()
    ds.ContentSequence = Sequence(
        [
            item(RelationshipType="CONTAINS", ValueType="TEXT", TextValue=f"Patient {MARK}1 seen"),
            item(
                RelationshipType="CONTAINS",
                ValueType="CONTAINER",
                ContinuityOfContent="SEPARATE",
                ContentSequence=Sequence(
                    [item(RelationshipType="CONTAINS", ValueType="TEXT", TextValue=f"deep {MARK}2")]
                ),
            ),
        ]
    )
    ds.GraphicAnnotationSequence = Sequence(
        [item(TextObjectSequence=Sequence([item(UnformattedTextValue=f"{MARK}3 annotated")]))]
    )
    ds.WaveformAnnotationSequence = Sequence([item(UnformattedTextValue=f"{MARK}4 rhythm")])
    ds.HL7InstanceIdentifier = f"ACC-{MARK}5^HOSP"
    ds.RetrieveURL = f"https://pacs.example.org/studies/{STUDY_UID}?who={MARK}6"
    ds.ReferencedSeriesSequence = Sequence(
        [
            item(
                RetrieveURI=f"https://pacs.example.org/wado?patient={MARK}7",
                SeriesInstanceUID=STUDY_UID + ".1",
            )
        ]
    )
    return ds


@pytest.mark.parametrize("policy_name", POLICIES)
def test_free_text_urls_and_uris_leave_nothing(policy_name: str, keys) -> None:
    out = _deidentify(_free_text_instance(), keys, POLICIES[policy_name])
    assert MARK.encode() not in out
    assert STUDY_UID.encode() not in out
    ds = read_instance(out)
    assert "RetrieveURL" not in ds
    assert ds.ContentSequence[0].TextValue == "REMOVED"  # present: Type 1 in a TEXT content item
    assert ds.ContentSequence[1].ContentSequence[0].TextValue == "REMOVED"


def test_a_date_written_as_lo_is_shifted_and_a_sequence_written_as_ob_removed(keys) -> None:
    ds = _base()
    ds.add(DataElement(0x00080021, "LO", "20240302"))  # SeriesDate, written as LO
    inner = Dataset()
    inner.PatientName = f"{MARK}^EIGHT"
    inner.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.99.779"
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, inner)
    ds.add(DataElement(0x00081115, "OB", buffer.getvalue()))  # ReferencedSeriesSequence, written as OB
    out = _deidentify(ds, keys, DeidPolicy(retain_longitudinal_modified_dates=True))
    assert MARK.encode() not in out and b"20240302" not in out and b"99.779" not in out
    result = read_instance(out)
    assert 0x00081115 not in result
    assert str(result[0x00080021].value) not in ("", "20240302") and len(str(result[0x00080021].value)) == 8


def test_text_after_a_dt_time_is_dropped_not_shifted_along(keys) -> None:
    ds = _base()
    ds.AcquisitionDateTime = f"20240301101112 {MARK}9"
    ds.FrameAcquisitionDateTime = "20240301-20240401"
    result = read_instance(_deidentify(ds, keys, DeidPolicy(retain_longitudinal_modified_dates=True)))
    assert MARK not in str(result.get("AcquisitionDateTime", ""))
    assert "20240401" not in str(result.get("FrameAcquisitionDateTime", ""))


def test_command_group_and_encrypted_attributes_are_removed(keys) -> None:
    ds = _base()
    ds.add(DataElement(0x00000902, "LO", f"{MARK}10 error"))  # ErrorComment
    ds.EncryptedAttributesSequence = Sequence(
        [
            item(
                EncryptedContentTransferSyntaxUID=ExplicitVRLittleEndian,
                EncryptedContent=MARK.encode() + b"11",
            )
        ]
    )
    out = _deidentify(ds, keys, DeidPolicy())
    assert MARK.encode() not in out
    assert "EncryptedAttributesSequence" not in read_instance(out)


def test_birth_date_and_time_are_removed_under_modified_dates_not_shifted(keys) -> None:
    ds = _base()
    ds.PatientBirthDate = "19730415"
    ds.PatientBirthTime = "101112"
    result = read_instance(_deidentify(ds, keys, DeidPolicy(retain_longitudinal_modified_dates=True)))
    assert result.get("PatientBirthDate") in (None, "")
    assert "PatientBirthTime" not in result
    assert result.StudyDate != "20240301"  # the study date is still shifted


def test_a_safe_private_uid_in_an_implicit_vr_file_is_remapped(keys) -> None:
    """(0019,xx01) of "GEMS_PETD_01" is a UID in pydicom's private dictionary; allow-listed in an
    implicit-VR file, where the reader sees no VR, it was kept unchanged."""
    ds = _base(ImplicitVRLittleEndian)
    creator = "GEMS_PETD_01"
    ds.add_new(0x00190010, "LO", creator)
    secret_uid = "1.2.826.0.1.3680043.99.7712"
    ds.add_new(0x00191001, "UI", secret_uid)
    policy = DeidPolicy(
        retain_safe_private=True,
        safe_private_attributes=(SafePrivateAttribute(creator=creator, group=0x0019, element=0x01),),
    )
    out = _deidentify(ds, keys, policy)
    assert secret_uid.encode() not in out
    assert keys.uid(TENANT, secret_uid).encode() in out
    assert read_instance(BytesIO(out)).SOPInstanceUID != "1.2.826.0.1.3680043.99.772"
