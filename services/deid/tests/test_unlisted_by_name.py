"""Attributes the 2024b table did not list (a conformance review, sixteenth session).

The patient's birth and death dates in an alternative calendar came out unchanged while Patient's Birth
Date was blanked: they are standard LO/CS attributes the table does not name, and the walk kept such
attributes when their values were well-shaped. The review listed about 250 such attributes. Now:

* Table E.1-1 rows added after 2024b are applied (``profile_supplement.ADDED_AFTER_2024B``);
* the alternative-calendar dates, which no edition lists, are removed under every option;
* an unlisted attribute whose name says it holds a person's name, a birth, a death, an address or a
  telephone number is removed; an unlisted description or comment is free text; an unlisted
  identifier becomes a keyed pseudonym (equal values stay equal).
"""

from __future__ import annotations

from io import BytesIO

import pytest
from deid_keys import ALL_OPTIONS
from enclave_deid.deidentify import DeidContext, deidentify
from enclave_deid.instance_io import read_instance, write_instance
from enclave_deid.policy import DeidPolicy
from enclave_deid.profile_supplement import ADDED_AFTER_2024B, ENCLAVE_REMOVED
from enclave_deid.profile_table import OPTION_COLUMNS, TABLE_E1_1
from enclave_deid.profiles import ActionCode, resolve_profile
from pydicom.datadict import dictionary_has_tag, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

TENANT = "tenant-a"
MARK = "HUNTALT"
POLICIES = {
    "basic": DeidPolicy(),
    "modified dates": DeidPolicy(retain_longitudinal_modified_dates=True),
    "all options": ALL_OPTIONS,
}


def _instance(**attributes: object) -> Dataset:
    ds = Dataset()
    ds.PatientName = "SMITHSON^JOHANNA"
    ds.PatientID = "MRN-0042"
    ds.PatientBirthDate = "19610412"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.99.991"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.99.992"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.99.993"
    ds.StudyDate = "20190312"
    ds.Modality = "MR"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _deidentify(ds: Dataset, keys, policy: DeidPolicy) -> bytes:
    result = deidentify(read_instance(write_instance(ds)), policy, keys, DeidContext(TENANT))
    return write_instance(result.dataset)


@pytest.mark.parametrize("policy_name", POLICIES)
def test_birth_and_death_dates_in_an_alternative_calendar_are_removed(policy_name: str, keys) -> None:
    ds = _instance(
        PatientBirthDateInAlternativeCalendar="1340/01/23",
        PatientDeathDateInAlternativeCalendar="1402/07/01",
        PatientAlternativeCalendar="I",
    )
    out = _deidentify(ds, keys, POLICIES[policy_name])
    assert b"1340/01/23" not in out and b"1402/07/01" not in out
    result = read_instance(BytesIO(out))
    for keyword in (
        "PatientBirthDateInAlternativeCalendar",
        "PatientDeathDateInAlternativeCalendar",
        "PatientAlternativeCalendar",
    ):
        assert keyword not in result
    assert result.get("PatientBirthDate") in (None, "")


def test_rows_added_after_2024b_and_enclaves_own_are_resolved_with_their_option_cells() -> None:
    assert not (ADDED_AFTER_2024B.keys() | ENCLAVE_REMOVED.keys()) & TABLE_E1_1.keys()
    for tag, row in {**ADDED_AFTER_2024B, **ENCLAVE_REMOVED}.items():
        assert len(row) == 2 + len(OPTION_COLUMNS)
        if dictionary_has_tag(tag):
            assert keyword_for_tag(tag) == row[0], hex(tag)
    basic = resolve_profile(DeidPolicy())
    assert basic.action_for(0x00102162) is ActionCode.X  # Ethnic Groups
    assert basic.action_for(0x0040A034) is ActionCode.X  # Effective Start DateTime
    assert basic.action_for(0x300A0054) is ActionCode.U  # Table Top Position Alignment UID
    characteristics = resolve_profile(DeidPolicy(retain_patient_characteristics=True))
    assert characteristics.action_for(0x00102162) is ActionCode.K
    dates = resolve_profile(DeidPolicy(retain_longitudinal_modified_dates=True))
    assert dates.action_for(0x0040A034) is ActionCode.C
    for policy in POLICIES.values():
        assert resolve_profile(policy).action_for(0x00100033) is ActionCode.X


def test_a_2025b_row_removes_what_the_2024b_table_kept(keys) -> None:
    ds = _instance()
    ds.add(DataElement(0x00181010, "LO", f"{MARK}-SC-DEVICE"))  # Secondary Capture Device ID
    ds.add(DataElement(0x00400556, "ST", f"{MARK} context"))  # Acquisition Context Description
    result = read_instance(BytesIO(_deidentify(ds, keys, DeidPolicy())))
    assert 0x00181010 not in result and 0x00400556 not in result
    kept = read_instance(BytesIO(_deidentify(ds, keys, DeidPolicy(retain_device_identity=True))))
    assert kept[0x00181010].value == f"{MARK}-SC-DEVICE"  # Retain Device Identity keeps it (K)


@pytest.mark.parametrize("policy_name", POLICIES)
def test_unlisted_names_addresses_descriptions_and_identifiers_by_their_name(policy_name: str, keys) -> None:
    ds = _instance(
        NTPSourceAddress=f"{MARK}1.example.org",
        ContactDisplayName=f"{MARK}2 Smithson",
        HangingProtocolUserGroupName=f"{MARK}3 group",
        DoseComment="SMITHSON said so",  # free text holding the patient's name
        ReconstructionDescription="recon for JOHANNA",
        DeviceID="SCANNER-0006",  # a device, not a person: kept under Retain Device Identity
        SequenceName="*tfl3d1",  # a name of a thing: kept
        SegmentLabel="Left hippocampus",
    )
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [_frame(f"{MARK}7"), _frame(f"{MARK}7"), _frame(f"{MARK}8")]
    )
    out = _deidentify(ds, keys, POLICIES[policy_name])
    assert MARK.encode() not in out and b"SMITHSON" not in out and b"JOHANNA" not in out
    result = read_instance(BytesIO(out))
    for keyword in ("NTPSourceAddress", "ContactDisplayName", "HangingProtocolUserGroupName"):
        assert keyword not in result
    assert result.SequenceName == "*tfl3d1" and result.SegmentLabel == "Left hippocampus"
    if POLICIES[policy_name].clean_descriptors:
        assert result.DoseComment == "* said so"  # Clean Descriptors: scrubbed of the instance's identifiers
        assert result.ReconstructionDescription == "recon for *"
    else:
        assert result.DoseComment == "REMOVED" and result.ReconstructionDescription == "REMOVED"
    if POLICIES[policy_name].retain_device_identity:
        assert result.DeviceID == "SCANNER-0006"  # as the table's K cells keep the devices it lists
    else:
        assert result.DeviceID == keys.pseudonym(TENANT, "identifier", "SCANNER-0006")[:64]
    stacks = [frame.FrameContentSequence[0].StackID for frame in result.PerFrameFunctionalGroupsSequence]
    assert stacks[0] == stacks[1] != stacks[2]  # equal values stay equal: frames still group by stack
    assert all(len(stack) <= 16 for stack in stacks)  # SH


def _frame(stack_id: str) -> Dataset:
    content = Dataset()
    content.StackID = stack_id
    content.InStackPositionNumber = 1
    frame = Dataset()
    frame.FrameContentSequence = Sequence([content])
    return frame
