"""Overlay groups (60xx) go whole (a conformance review, sixteenth session).

Overlay Data (60xx,3000) is X in Table E.1-1 and was removed, but Overlay Description (60xx,0022) and
Overlay Label (60xx,1500), which the table does not list, kept their text, and Overlay Rows, Columns,
Type, Origin and Bit Position stayed behind: an Overlay Plane Module without its Type 1 Overlay Data.
Clean Graphics, whose C would keep a cleaned overlay, is not implemented: the whole group is removed.
"""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from deid_keys import ALL_OPTIONS
from enclave_deid.deidentify import DeidContext, deidentify
from enclave_deid.instance_io import read_instance, write_instance
from enclave_deid.policy import DeidPolicy
from pydicom.data import get_testdata_file

TENANT = "tenant-a"
MARK = "HUNTOVL"
POLICIES = {
    "basic": DeidPolicy(),
    "modified dates": DeidPolicy(retain_longitudinal_modified_dates=True),
    "all options": ALL_OPTIONS,
}


def _with_overlay(group: int) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.add_new(group << 16 | 0x0010, "US", 8)  # Overlay Rows
    ds.add_new(group << 16 | 0x0011, "US", 8)  # Overlay Columns
    ds.add_new(group << 16 | 0x0022, "LO", f"{MARK}1 description")
    ds.add_new(group << 16 | 0x0040, "CS", "G")  # Overlay Type
    ds.add_new(group << 16 | 0x0050, "SS", [1, 1])  # Overlay Origin
    ds.add_new(group << 16 | 0x0100, "US", 1)  # Overlay Bits Allocated
    ds.add_new(group << 16 | 0x0102, "US", 0)  # Overlay Bit Position
    ds.add_new(group << 16 | 0x1500, "LO", f"{MARK}2 label")
    ds.add_new(group << 16 | 0x3000, "OW", b"\xff" * 8)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("group", [0x6000, 0x601E])
@pytest.mark.parametrize("policy_name", POLICIES)
def test_the_overlay_group_is_removed_whole_with_its_text(policy_name: str, group: int, keys) -> None:
    result = deidentify(read_instance(_with_overlay(group)), POLICIES[policy_name], keys, DeidContext(TENANT))
    out = write_instance(result.dataset)
    assert MARK.encode() not in out
    copy = read_instance(BytesIO(out))
    assert not [elem.tag for elem in copy if 0x6000 <= elem.tag.group <= 0x601E]
    assert copy.Rows == 64 and "PixelData" in copy


def test_a_real_overlay_file_keeps_no_overlay_attribute(keys) -> None:
    path = get_testdata_file("MR-SIEMENS-DICOM-WithOverlays.dcm")
    with open(path, "rb") as file:
        original = read_instance(file.read())
    assert any(elem.tag.group == 0x6000 for elem in original)
    result = deidentify(original, DeidPolicy(), keys, DeidContext(TENANT))
    copy = read_instance(BytesIO(write_instance(result.dataset)))
    assert not [elem.tag for elem in copy if 0x6000 <= elem.tag.group <= 0x601E]
