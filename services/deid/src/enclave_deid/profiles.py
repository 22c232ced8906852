"""PS3.15 Annex E actions resolved for one policy: a dict from tag to action, built once per policy.

The table itself is data: generated (``profile_table``, 2024b) plus the hand-written rows of later
editions and Enclave's own removals (``profile_supplement``). Hand-written here, because the table
leaves it to the implementer: which option wins when two enabled options disagree, which of the
alternatives of a combined code (X/Z, Z/D, ...) we take, and the treatment of attributes the table
does not list.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

from pydicom.datadict import dictionary_has_tag, dictionary_VR

from enclave_deid.policy import DeidOption, DeidPolicy
from enclave_deid.profile_supplement import ADDED_AFTER_2024B, ENCLAVE_REMOVED
from enclave_deid.profile_table import IN_OPTIONS_EDITION, MASKED_ROWS, OPTION_COLUMNS, TABLE_E1_1

#: The generated table with the rows added after its edition and Enclave's own removals
#: (``profile_supplement``); those rows carry their own option cells.
MERGED_TABLE: dict[int, tuple[str, ...]] = {**TABLE_E1_1, **ADDED_AFTER_2024B, **ENCLAVE_REMOVED}
_OWN_OPTION_CELLS = IN_OPTIONS_EDITION | ADDED_AFTER_2024B.keys() | ENCLAVE_REMOVED.keys()


class ActionCode(StrEnum):
    """Action codes of Table E.1-1 (PS3.15 E.1.1)."""

    D = "D"
    Z = "Z"
    X = "X"
    K = "K"
    C = "C"
    U = "U"
    Z_D = "Z/D"
    X_Z = "X/Z"
    X_D = "X/D"
    X_Z_D = "X/Z/D"
    X_Z_U_STAR = "X/Z/U*"


# Which alternative of a combined code we apply. Without the IOD's attribute type at hand we take the one
# that keeps the instance valid whatever the type: D keeps a Type 1 attribute present, Z a Type 2 one.
# X/Z/U* applies U to UIDs (and keeps the sequences that hold them), Z otherwise.
COMBINED_CHOICE: dict[ActionCode, ActionCode] = {
    ActionCode.Z_D: ActionCode.D,
    ActionCode.X_Z: ActionCode.Z,
    ActionCode.X_D: ActionCode.D,
    ActionCode.X_Z_D: ActionCode.D,
}

# When two enabled options give different actions for one attribute, the more protective wins.
_STRENGTH = {ActionCode.X: 3, ActionCode.C: 2, ActionCode.K: 1}
_DATE_VRS = frozenset({"DA", "DT", "TM"})


@dataclass(frozen=True)
class ResolvedProfile:
    """Table E.1-1 with the policy's options applied: tag -> action, and the masked repeating-group rows."""

    actions: dict[int, ActionCode]
    masked: tuple[tuple[int, int, ActionCode], ...]

    def action_for(self, tag: int) -> ActionCode | None:
        """The action the table gives ``tag`` after options, or None when the table does not list it."""
        action = self.actions.get(tag)
        if action is not None:
            return action
        if 0x5000 <= (tag >> 16) <= 0x60FF:
            for mask, value, masked_action in self.masked:
                if tag & mask == value:
                    return masked_action
        return None


def _resolve_row(
    row: tuple[str, ...], enabled: frozenset[str], vr: str, *, in_options_edition: bool
) -> ActionCode:
    chosen: ActionCode | None = None
    for column, cell in zip(OPTION_COLUMNS, row[2:], strict=True):
        if cell and column in enabled:
            candidate = ActionCode(cell)
            if chosen is None or _STRENGTH[candidate] > _STRENGTH[chosen]:
                chosen = candidate
    if chosen is not None:
        return chosen
    basic = ActionCode(row[1])
    # Rows added to the table after the options edition have no option cells; the Modified Dates option
    # (E.3.6) covers every date, so dates the Basic Profile would remove are shifted instead. A row the
    # options edition lists without a cell has no exception: Patient's Birth Date stays Z (before the
    # thirteenth session it was shifted with the study dates, which kept the patient's exact age).
    if (
        not in_options_edition
        and "retain_longitudinal_modified_dates" in enabled
        and vr in _DATE_VRS
        and basic is not ActionCode.U
    ):
        return ActionCode.C
    return basic


@lru_cache(maxsize=64)
def resolve_profile(policy: DeidPolicy) -> ResolvedProfile:
    """Table E.1-1 resolved for ``policy`` (cached: policies are frozen and few)."""
    enabled = frozenset(
        option.column for option in policy.options if option is not DeidOption.RETAIN_SAFE_PRIVATE
    )
    actions = {
        tag: _resolve_row(
            row,
            enabled,
            dictionary_VR(tag) if dictionary_has_tag(tag) else "",
            in_options_edition=tag in _OWN_OPTION_CELLS,
        )
        for tag, row in MERGED_TABLE.items()
    }
    masked = tuple(
        (mask, value, _resolve_row(row, enabled, "", in_options_edition=True))
        for mask, value, row in MASKED_ROWS
    )
    return ResolvedProfile(actions=actions, masked=masked)
