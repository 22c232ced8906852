"""The generated table and its resolution under options."""

from __future__ import annotations

import pytest
from enclave_deid.policy import DeidPolicy, SafePrivateAttribute
from enclave_deid.profile_supplement import ADDED_AFTER_2024B, ENCLAVE_REMOVED, TABLE_EDITION
from enclave_deid.profile_table import BASIC_PROFILE_EDITION, TABLE_E1_1
from enclave_deid.profiles import MERGED_TABLE, ActionCode, resolve_profile
from pydantic import ValidationError


def test_table_is_the_2024b_basic_profile_with_every_code() -> None:
    assert BASIC_PROFILE_EDITION == "2024b"
    assert len(TABLE_E1_1) > 600
    codes = {row[1] for row in TABLE_E1_1.values()}
    assert codes == {"D", "Z", "X", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
    assert TABLE_E1_1[0x00100010][1] == "Z"
    assert TABLE_E1_1[0x00080018][1] == "U"


def test_the_merged_table_is_2025b_plus_enclaves_removals() -> None:
    """The 2024b column with the 34 rows 2025b added (its other 617 rows are the same in 2025b)."""
    assert TABLE_EDITION == "2025b"
    assert len(ADDED_AFTER_2024B) == 34 and len(ENCLAVE_REMOVED) == 3
    assert len(MERGED_TABLE) == len(TABLE_E1_1) + 34 + 3 == 617 + 37


def test_options_override_the_basic_profile() -> None:
    basic = resolve_profile(DeidPolicy())
    assert (
        basic.action_for(0x00181000) is ActionCode.X_Z_D or basic.action_for(0x00181000) is not ActionCode.K
    )
    device = resolve_profile(DeidPolicy(retain_device_identity=True))
    assert device.action_for(0x00181000) is ActionCode.K  # Device Serial Number
    dates = resolve_profile(DeidPolicy(retain_longitudinal_modified_dates=True))
    assert dates.action_for(0x00080020) is ActionCode.C  # Study Date
    uids = resolve_profile(DeidPolicy(retain_uids=True))
    assert uids.action_for(0x0020000D) is ActionCode.K
    assert uids.action_for(0x00081120) is ActionCode.X  # Referenced Patient Sequence stays removed


def test_repeating_groups_resolve_through_masks() -> None:
    basic = resolve_profile(DeidPolicy())
    assert basic.action_for(0x60023000) is ActionCode.X  # Overlay Data, group 6002
    assert basic.action_for(0x50100010) is ActionCode.X  # Curve data
    assert basic.action_for(0x00280010) is None  # Rows: not listed, kept


def test_policy_rejects_bad_safe_private_entries() -> None:
    with pytest.raises(ValidationError, match="odd"):
        SafePrivateAttribute(creator="ACME", group=0x0010, element=0x01)
    with pytest.raises(ValidationError):
        SafePrivateAttribute(creator="ACME", group=0x0019, element=0x1001)
