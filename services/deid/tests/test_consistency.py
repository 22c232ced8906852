"""Same patient on different days -> same pseudonym, date shift and UID mapping; other tenant -> different."""

from __future__ import annotations

from io import BytesIO

from deid_keys import ALL_OPTIONS, HmacKeys
from enclave_deid.deidentify import DeidContext, deidentify
from pydicom import dcmread
from pydicom.data import get_testdata_file


def _upload(study_date: str, tenant: str, keys: HmacKeys, sop_instance_uid: str | None = None):
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyDate = study_date
    if sop_instance_uid:
        ds.SOPInstanceUID = sop_instance_uid
    return deidentify(ds, ALL_OPTIONS, keys, DeidContext(tenant))


def test_same_patient_different_days_same_pseudonym_shift_and_uids(keys) -> None:
    monday = _upload("20040119", "tenant-a", keys)
    later = _upload("20040301", "tenant-a", HmacKeys())  # a fresh key object: as after a restart
    assert monday.patient_pseudonym == later.patient_pseudonym
    assert monday.dataset.PatientID == later.dataset.PatientID == monday.patient_pseudonym
    assert monday.linkage.date_shift_days == later.linkage.date_shift_days
    assert monday.study_instance_uid == later.study_instance_uid
    assert monday.dataset.FrameOfReferenceUID == later.dataset.FrameOfReferenceUID
    shift = monday.linkage.date_shift_days
    assert shift is not None
    assert shift != 0
    # intervals survive: the two study dates stay 42 days apart
    from datetime import datetime

    first = datetime.strptime(monday.dataset.StudyDate, "%Y%m%d")
    second = datetime.strptime(later.dataset.StudyDate, "%Y%m%d")
    assert (second - first).days == 42


def test_other_tenant_gets_other_pseudonym_shift_and_uids(keys) -> None:
    a = _upload("20040119", "tenant-a", keys)
    b = _upload("20040119", "tenant-b", keys)
    assert a.patient_pseudonym != b.patient_pseudonym
    assert a.study_instance_uid != b.study_instance_uid
    assert a.sop_instance_uid != b.sop_instance_uid
    assert a.linkage.date_shift_days != b.linkage.date_shift_days


def test_uid_mapping_consistent_within_study_and_in_file_meta(keys) -> None:
    one = _upload("20040119", "tenant-a", keys, sop_instance_uid="1.2.826.0.1.99.10")
    two = _upload("20040119", "tenant-a", keys, sop_instance_uid="1.2.826.0.1.99.11")
    assert one.study_instance_uid == two.study_instance_uid
    assert one.series_instance_uid == two.series_instance_uid
    assert one.sop_instance_uid != two.sop_instance_uid
    assert one.sop_instance_uid.startswith("2.25.")
    assert one.dataset.file_meta.MediaStorageSOPInstanceUID == one.sop_instance_uid
    assert one.dataset.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # class UIDs are kept
    assert one.dataset.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


def test_linkage_holds_originals_and_hides_them_in_repr(keys) -> None:
    original = dcmread(get_testdata_file("CT_small.dcm"))
    result = _upload("20040119", "tenant-a", keys)
    linkage = result.linkage
    assert linkage.patient_id == original.PatientID
    assert linkage.patient_name == str(original.PatientName)
    assert linkage.uids[result.study_instance_uid] == original.StudyInstanceUID
    assert linkage.uids[result.sop_instance_uid] == original.SOPInstanceUID
    assert original.PatientID not in repr(linkage)
    assert str(original.PatientName) not in repr(result)


def test_nested_references_follow_the_same_mapping(keys) -> None:
    ds = dcmread(get_testdata_file("rtplan.dcm"))
    referenced = ds.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID
    result = deidentify(ds, ALL_OPTIONS, keys, DeidContext("tenant-a"))
    assert result.dataset.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == keys.uid(
        "tenant-a", referenced
    )
    buffer = BytesIO()
    result.dataset.save_as(buffer, enforce_file_format=True)
    assert referenced.encode() not in buffer.getvalue()
