"""Text in a value whose VR cannot hold text (an adversarial hunt against the running stack).

An instance whose SliceThickness (DS) held "HUNTPHI " kept it in the de-identified copy: pydicom reads
such a value as raw bytes, and the walk kept the attributes the table does not list, or keeps, as they
were. A value that is not valid for its VR is free text in disguise. Now a DS, IS, AS, DA, DT or TM value
the walk would release unchanged is kept only when it has its VR's shape, and is made zero-length
otherwise; a malformed UID kept as it is (a class UID, Retain UIDs) is remapped. Valid values are kept
byte for byte.
"""

from __future__ import annotations

import warnings
from io import BytesIO

import pydicom
import pytest
from deid_keys import ALL_OPTIONS
from enclave_deid.deidentify import DeidContext, deidentify
from enclave_deid.instance_io import read_instance, write_instance
from enclave_deid.policy import DeidPolicy, SafePrivateAttribute
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

TENANT = "tenant-a"
CREATOR = "ACME HUNT 1.0"
POLICIES = {
    "basic": DeidPolicy(),
    "modified dates": DeidPolicy(retain_longitudinal_modified_dates=True),
    "all options": ALL_OPTIONS,
    "retain uids": DeidPolicy(retain_uids=True),
    "safe private": DeidPolicy(
        retain_safe_private=True,
        safe_private_attributes=(SafePrivateAttribute(creator=CREATOR, group=0x0029, element=0x01),),
    ),
}
SYNTAXES = {"explicit": ExplicitVRLittleEndian, "implicit": ImplicitVRLittleEndian}
#: tag -> (VR written, value): text where the VR allows none, in each place a value is kept as it is.
MALFORMED = {
    0x00180050: ("DS", b"HUNTPHI "),  # SliceThickness: not in Table E.1-1 (kept)
    0x00280030: ("DS", b"0.5\\HUNTPHI2 "),  # PixelSpacing: one of two values
    0x00180088: ("LO", b"HUNTPHI3"),  # SpacingBetweenSlices (DS) written as LO
    0x00200013: ("IS", b"HUNTPHI4"),  # InstanceNumber
    0x00101010: ("AS", b"HUNTPHI5"),  # PatientAge: kept by Retain Patient Characteristics
    0x00101030: ("DS", b"HUNTPHI6"),  # PatientWeight: kept by Retain Patient Characteristics
    0x00141020: ("DA", b"HUNTPHI7"),  # ExpiryDate: not listed (shifted, or a dummy)
    0x00080416: ("DT", b"HUNTPHI8"),  # ExpirationDateTime: not listed (shifted, or a dummy)
    0x00140103: ("TM", b"HUNTPHI9"),  # SecondaryReviewTime: not listed
    0x00080030: ("TM", b"HUNTPHI10 "),  # StudyTime: cleaned (kept) under Modified Dates
    0x00291001: ("DS", b"HUNTPHI11 "),  # a private DS the Safe Private policy keeps
}
#: In a ReferencedImageSequence item: a class UID (kept as it is) and an instance UID (Retain UIDs).
MALFORMED_UIDS = {0x00081150: b"HUNTPHI12", 0x00081155: b"HUNTPHI13 "}
VALID = {
    0x00180050: ("DS", b" 1.5 "),
    0x00280030: ("DS", b"1e-3\\-.5  "),
    0x00180088: ("DS", b"+2.0E+01"),
    0x00200013: ("IS", b" 3 "),
    0x00201041: ("DS", b"-12.3456789012345678"),  # SliceLocation: longer than 16, still a number
    0x00101010: ("AS", b"045Y"),
    0x00141020: ("DA", b"20240301"),
    0x00080416: ("DT", b"20240301101112.5+0100 "),
    0x00140103: ("TM", b"101112.123 "),
    0x00080030: ("TM", b"10:11:12"),
}


def _raw(tag: int, vr: str, value: bytes, implicit: bool) -> RawDataElement:
    return RawDataElement(BaseTag(tag), vr, len(value), value, 0, implicit, True, True, False)


def _instance(syntax: str, planted: dict[int, tuple[str, bytes]], uids: dict[int, bytes]) -> bytes:
    """An MR instance with ``planted`` values written as the raw bytes given (pydicom would refuse to
    encode text as a DS), and ``uids`` in a ReferencedImageSequence item."""
    ds = Dataset()
    ds.PatientName, ds.PatientID = "SMITHSON^JOHANNA", "MRN-0042"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.99.881"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.99.882"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.99.883"
    ds.StudyDate = "20240301"
    ds.Modality = "MR"
    ds.add_new(0x00290010, "LO", CREATOR)
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.99.884"
    ds.ReferencedImageSequence = Sequence([item])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    parsed = read_instance(write_instance(ds))  # raw elements are written as they are
    implicit = syntax == ImplicitVRLittleEndian
    for tag, (vr, value) in planted.items():
        parsed[tag] = _raw(tag, vr, value, implicit)
    referenced = parsed.ReferencedImageSequence[0]
    for tag, value in uids.items():
        referenced[tag] = _raw(tag, "UI", value, implicit)
    return write_instance(parsed)


def _deidentify(original: bytes, policy: DeidPolicy, keys) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = deidentify(read_instance(original), policy, keys, DeidContext(TENANT))
    copy = write_instance(result.dataset, original)
    assert write_instance(result.dataset) == copy
    return copy


def _read_back(copy: bytes) -> pydicom.Dataset:
    """The copy as pydicom reads it, every value decoded without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = pydicom.dcmread(BytesIO(copy))
        for elem in ds.iterall():
            _ = elem.value
    return ds


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("policy_name", POLICIES)
def test_text_in_numbers_dates_times_ages_and_uids_is_not_released(
    policy_name: str, syntax: str, keys
) -> None:
    original = _instance(SYNTAXES[syntax], MALFORMED, MALFORMED_UIDS)
    assert original.count(b"HUNTPHI") == len(MALFORMED) + len(MALFORMED_UIDS)
    copy = _deidentify(original, POLICIES[policy_name], keys)
    assert b"HUNTPHI" not in copy
    output = _read_back(copy)
    for tag in (0x00180050, 0x00280030, 0x00180088, 0x00200013, 0x00140103):
        assert output[tag].is_empty, hex(tag)  # present (it may be Type 2), zero-length
    for tag in (0x00141020, 0x00080416):  # unlisted dates: a dummy (Basic Profile) or zero-length (shifted)
        assert str(output[tag].value) in ("", "19000101", "19000101000000"), hex(tag)
    referenced = output.ReferencedImageSequence[0]
    assert referenced.ReferencedSOPClassUID == keys.uid(TENANT, "HUNTPHI12")  # remapped, still a UID
    assert referenced.ReferencedSOPInstanceUID == keys.uid(TENANT, "HUNTPHI13")


def test_under_the_options_that_keep_them_malformed_values_are_zero_length(keys) -> None:
    original = _instance(ExplicitVRLittleEndian, MALFORMED, {})
    output = _read_back(_deidentify(original, ALL_OPTIONS, keys))
    assert output["PatientAge"].is_empty and output["PatientWeight"].is_empty
    assert output["StudyTime"].is_empty
    assert output.PatientIdentityRemoved == "YES"


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("policy_name", POLICIES)
def test_valid_values_are_kept_byte_for_byte(policy_name: str, syntax: str, keys) -> None:
    policy = POLICIES[policy_name]
    original = _instance(SYNTAXES[syntax], VALID, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        output = read_instance(_deidentify(original, policy, keys))
    kept = [0x00180050, 0x00280030, 0x00180088, 0x00200013, 0x00201041, 0x00140103]
    if policy.retain_patient_characteristics:
        kept.append(0x00101010)
    for tag in kept:
        assert output.get_item(tag).value == VALID[tag][1], hex(tag)
    for tag in (0x00141020, 0x00080416):  # unlisted dates are never released as they are (now shifted)
        assert b"20240301" not in output.get_item(tag).value, hex(tag)
    if policy.retain_longitudinal_modified_dates:
        assert output.get_item(0x00080030).value == VALID[0x00080030][1]  # StudyTime, pre-3.0 form
