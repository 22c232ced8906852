"""Every Table E.1-1 action code on a listed attribute, at top level and three sequences deep."""

from __future__ import annotations

from datetime import date, timedelta
from io import BytesIO

import pytest
from deid_keys import ALL_OPTIONS
from enclave_deid.deidentify import DeidContext, deidentify
from enclave_deid.instance_io import write_instance
from enclave_deid.policy import DeidPolicy
from enclave_deid.profile_table import TABLE_E1_1
from enclave_deid.profiles import ActionCode, resolve_profile
from pydicom import dcmread
from pydicom._dicom_dict import DicomDictionary
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

TENANT = "tenant-a"
VALUES = {
    "LO": "SECRET SMITHSON",
    "SH": "SECRETSH",
    "LT": "SECRET SMITHSON TEXT",
    "ST": "SECRET SMITHSON TEXT",
    "PN": "SMITHSON^JOHANNA",
    "CS": "SECRETCS",
    "DA": "20010203",
    "DT": "20010203040506",
    "TM": "040506",
    "UI": "1.2.3.4.5.6.7.8.9",
}
SKIP = {0x00100010, 0x00100020}  # pseudonymised, tested in test_consistency
BASIC = DeidPolicy()
# Three standard sequences the table does not list: the walk keeps them and recurses into their items.
NESTING = sorted(
    t for t, row in DicomDictionary.items() if row[0] == "SQ" and row[3] == "" and t not in TABLE_E1_1
)[:3]


def _example(code: ActionCode, policy: DeidPolicy) -> tuple[int, str]:
    """The first attribute of the table with this resolved action and a VR we can fill."""
    actions = resolve_profile(policy).actions
    for tag, action in sorted(actions.items()):
        vr = DicomDictionary.get(tag, ("",))[0]
        if (
            action is code
            and tag not in SKIP
            and tag >> 16 > 2
            and (vr in VALUES or (code is ActionCode.X_Z_U_STAR and vr == "SQ"))
        ):
            return tag, vr
    raise AssertionError(f"no attribute with action {code} under {policy}")


CASES = [(code, BASIC) for code in ActionCode if code not in (ActionCode.K, ActionCode.C)]
CASES += [(ActionCode.K, ALL_OPTIONS), (ActionCode.C, ALL_OPTIONS)]


def _element_dataset(tag: int, vr: str) -> Dataset:
    holder = Dataset()
    if vr == "SQ":
        reference = Dataset()
        reference.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        reference.ReferencedSOPInstanceUID = VALUES["UI"]
        holder.add_new(tag, "SQ", Sequence([reference]))
    else:
        holder.add_new(tag, vr, VALUES[vr])
    return holder


def _instance(tag: int, vr: str, transfer_syntax: str) -> bytes:
    """A small CT-like instance holding the attribute at top level and inside three nested sequences."""
    ds = _element_dataset(tag, vr)
    ds.PatientName = "SMITHSON^JOHANNA"
    ds.PatientID = "MRN-0042"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.826.0.1.99.1"
    ds.StudyInstanceUID = "1.2.826.0.1.99.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.99.3"
    innermost = _element_dataset(tag, vr)
    for sequence_tag in reversed(NESTING):
        outer = Dataset()
        outer.add_new(sequence_tag, "SQ", Sequence([innermost]))
        innermost = outer
    for elem in innermost:
        ds.add(elem)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    return write_instance(ds)


def _nested(ds: Dataset) -> Dataset:
    for sequence_tag in NESTING:
        ds = ds[sequence_tag].value[0]
    return ds


def _check(code: ActionCode, tag: int, vr: str, holder: Dataset, keys, shift: int | None) -> None:
    original = VALUES.get(vr)
    if code is ActionCode.X:
        assert tag not in holder
        return
    assert tag in holder, f"{code} removed the attribute"
    value = holder[tag].value
    if code in (ActionCode.Z, ActionCode.X_Z):
        assert value in (None, "", b"") or (vr == "SQ" and len(value) == 0)
    elif code is ActionCode.U:
        assert value == keys.uid(TENANT, original)
    elif code in (ActionCode.D, ActionCode.Z_D, ActionCode.X_D, ActionCode.X_Z_D):
        assert value not in (None, "")
        assert str(value) != original
        if vr == "UI":
            assert value == keys.uid(TENANT, original)
    elif code is ActionCode.X_Z_U_STAR:
        item = value[0]
        assert item.ReferencedSOPInstanceUID == keys.uid(TENANT, VALUES["UI"])
        assert item.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    elif code is ActionCode.K:
        assert str(value) == original
    elif code is ActionCode.C:
        if vr == "DA":
            expected = date(2001, 2, 3) + timedelta(days=shift)
            assert value == expected.strftime("%Y%m%d")
        else:
            assert "SMITHSON" not in str(value).upper()
            assert "SECRET" in str(value)


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize(("code", "policy"), CASES, ids=[f"{c.value}" for c, _ in CASES])
def test_action_code_top_level_and_three_deep(code, policy, transfer_syntax, keys) -> None:
    tag, vr = _example(code, policy)
    data = _instance(tag, vr, transfer_syntax)
    ds = dcmread(BytesIO(data))
    for sequence_tag in NESTING:
        assert resolve_profile(policy).action_for(sequence_tag) is None
    result = deidentify(ds, policy, keys, DeidContext(TENANT))
    out = dcmread(BytesIO(write_instance(result.dataset)))
    shift = result.linkage.date_shift_days
    _check(code, tag, vr, out, keys, shift)
    _check(code, tag, vr, _nested(out), keys, shift)
    assert any(action.path == (*NESTING, tag) for action in result.actions)


def test_all_action_codes_are_exercised() -> None:
    assert {code for code, _ in CASES} == set(ActionCode)


def test_private_attributes_removed_unless_allow_listed(keys) -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.826.0.1.99.1"
    block = ds.private_block(0x0019, "ACME SAFE", create=True)
    block.add_new(0x01, "LO", "keep me")
    block.add_new(0x02, "LO", "JOHANNA SMITHSON")
    other = ds.private_block(0x0029, "ACME CSA", create=True)
    other.add_new(0x10, "OB", b"SV10 operator SMITHSON\x00\x00")
    policy = DeidPolicy(
        retain_safe_private=True,
        safe_private_attributes=[{"creator": "ACME SAFE", "group": 0x0019, "element": 0x01}],
    )
    out = deidentify(ds, policy, keys, DeidContext(TENANT)).dataset
    assert out[0x00191001].value == "keep me"
    assert out[0x00190010].value == "ACME SAFE"
    assert 0x00191002 not in out
    assert 0x00291010 not in out
    assert 0x00290010 not in out
    basic = deidentify(Dataset(ds), BASIC, keys, DeidContext(TENANT)).dataset
    assert not [elem for elem in basic if elem.tag.is_private]


def test_marks_record_profile_and_options(keys) -> None:
    ds = dcmread(BytesIO(_instance(0x00080050, "SH", ExplicitVRLittleEndian)))
    out = dcmread(BytesIO(write_instance(deidentify(ds, ALL_OPTIONS, keys, DeidContext(TENANT)).dataset)))
    assert out.PatientIdentityRemoved == "YES"
    codes = [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113105", "113107", "113108", "113109"]
    assert all(item.CodingSchemeDesignator == "DCM" for item in out.DeidentificationMethodCodeSequence)
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert "2025b" in out.DeidentificationMethod[0]
    basic = deidentify(
        dcmread(BytesIO(_instance(0x00080050, "SH", ExplicitVRLittleEndian))),
        BASIC,
        keys,
        DeidContext(TENANT),
    )
    assert basic.dataset.LongitudinalTemporalInformationModified == "REMOVED"
    assert [item.CodeValue for item in basic.dataset.DeidentificationMethodCodeSequence] == ["113100"]


def test_clean_descriptors_scrubs_identifiers_from_kept_text(keys) -> None:
    ds = dcmread(BytesIO(_instance(0x00080050, "SH", ExplicitVRLittleEndian)))
    ds.StudyDescription = "Brain for Smithson MRN-0042"
    ds.InstitutionName = "Saint Elsewhere Hospital"
    ds.SeriesDescription = "T1 MPRAGE at Saint Elsewhere"
    out = deidentify(ds, ALL_OPTIONS, keys, DeidContext(TENANT)).dataset
    assert out.StudyDescription.startswith("Brain for")
    assert "SMITHSON" not in out.StudyDescription.upper()
    assert "MRN-0042" not in out.StudyDescription
    assert out.SeriesDescription.startswith("T1 MPRAGE")
    assert "ELSEWHERE" not in out.SeriesDescription.upper()
    basic = deidentify(
        dcmread(BytesIO(_instance(0x00080050, "SH", ExplicitVRLittleEndian))),
        BASIC,
        keys,
        DeidContext(TENANT),
    )
    assert "StudyDescription" not in basic.dataset
