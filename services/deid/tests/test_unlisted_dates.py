"""Dates Table E.1-1 does not list (a conformance review, sixteenth session).

Under Retain Longitudinal Temporal Information with Modified Dates, 13 of the 120 DA/DT attributes of
pydicom's dictionary came out with their original value (Study Update DateTime beside a shifted Study
Date reveals the patient's shift); under the Basic Profile the same dates were released as they were.
PS3.15 E.1.1 Note 4 suggests handling every date by its VR: an unlisted DA or DT is now shifted with
the others under Modified Dates, and replaced by a dummy otherwise, as the table does with the X/D dates
it lists.
"""

from __future__ import annotations

from datetime import date, timedelta
from io import BytesIO

import pytest
from enclave_deid.deidentify import DeidContext, deidentify
from enclave_deid.instance_io import read_instance, write_instance
from enclave_deid.policy import DeidPolicy
from enclave_deid.profiles import resolve_profile
from pydicom.datadict import DicomDictionary
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

TENANT = "tenant-a"
DA, TIME = "20190312", "101010"
DATE_TAGS = sorted(
    tag for tag, entry in DicomDictionary.items() if entry[0] in ("DA", "DT") and tag >> 16 not in (0, 2)
)


def _every_date() -> Dataset:
    ds = Dataset()
    ds.PatientName, ds.PatientID = "SMITHSON^JOHANNA", "MRN-0042"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.99.1001"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.99.1002"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.99.1003"
    for tag in DATE_TAGS:
        vr = DicomDictionary[tag][0]
        ds.add_new(tag, vr, DA if vr == "DA" else DA + TIME)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _deidentify(policy: DeidPolicy, keys) -> Dataset:
    result = deidentify(read_instance(write_instance(_every_date())), policy, keys, DeidContext(TENANT))
    return read_instance(BytesIO(write_instance(result.dataset)))


def test_every_date_is_shifted_by_the_patients_shift_under_modified_dates(keys) -> None:
    assert len(DATE_TAGS) > 100
    policy = DeidPolicy(retain_longitudinal_modified_dates=True)
    out = _deidentify(policy, keys)
    shift = keys.date_shift_days(TENANT, keys.pseudonym(TENANT, "patient", "MRN-0042"))
    study_date = (date(2019, 3, 12) + timedelta(days=shift)).strftime("%Y%m%d")
    assert out.StudyDate == study_date
    profile = resolve_profile(policy)
    unlisted = [tag for tag in DATE_TAGS if profile.action_for(tag) is None]
    assert 0x0008041F in unlisted  # Study Update DateTime
    for tag in DATE_TAGS:
        value = str(out[tag].value) if tag in out else ""
        assert not value.startswith(DA), hex(tag)
        if tag in unlisted:
            expected = study_date if out[tag].VR == "DA" else study_date + TIME
            assert value == expected, hex(tag)  # the same shift as the study's; DT keeps its time


@pytest.mark.parametrize("policy", [DeidPolicy(), DeidPolicy(retain_patient_characteristics=True)])
def test_without_modified_dates_no_date_is_released(policy: DeidPolicy, keys) -> None:
    out = _deidentify(policy, keys)
    profile = resolve_profile(policy)
    for tag in DATE_TAGS:
        value = str(out[tag].value) if tag in out else ""
        assert DA not in value, hex(tag)
        if profile.action_for(tag) is None:
            assert value in ("19000101", "19000101000000"), hex(tag)  # a dummy, as for the X/D dates
    assert out.LongitudinalTemporalInformationModified == "REMOVED"


@pytest.mark.parametrize(
    "policy", [DeidPolicy(), DeidPolicy(retain_longitudinal_modified_dates=True)], ids=["basic", "modified"]
)
def test_an_unlisted_date_left_empty_stays_empty(policy: DeidPolicy, keys) -> None:
    """An unknown date stays unknown: a dummy would turn it into a concrete, fake one."""
    ds = _every_date()
    ds.StudyUpdateDateTime = ""  # (0008,041F), unlisted
    ds.PatientBirthDate = ""
    result = deidentify(read_instance(write_instance(ds)), policy, keys, DeidContext(TENANT))
    out = read_instance(BytesIO(write_instance(result.dataset)))
    assert out.StudyUpdateDateTime in ("", None)
