"""Generate ``enclave_deid/profile_table.py`` from machine-readable copies of PS3.15 Table E.1-1.

Two PyPI packages ship the table; neither alone has everything, so the generator merges them:

* ``dicom-anonymizer`` 2.1.0 ships the Basic Profile column of the **2024b** edition
  (``dicom_anonymization_databases/dicomfields_2024b.py``): the newest machine-readable copy on PyPI.
* ``dicom-standard`` 0.1.0 (Innolitics) ships the whole table with every option column
  (``standard/confidentiality_profile_attributes.json``), extracted on 2020-04-07 from the edition
  current then (2020b).

The Basic Profile column comes from 2024b; option columns come from the 2020 extraction, for the
attributes that extraction lists. Attributes new since 2020 therefore get their Basic Profile action
under every option (never less removal than the profile). Run with:

    uv run --group profile-source python services/deid/tools/generate_profile.py
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

from pydicom.datadict import keyword_for_tag

BASIC_EDITION = "2024b"
OPTIONS_EDITION = "2020b"
BASIC_GROUPS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}
OPTION_KEYS = (
    ("rtnUIDsOpt", "retain_uids"),
    ("rtnDevIdOpt", "retain_device_identity"),
    ("rtnInstIdOpt", "retain_institution_identity"),
    ("rtnPatCharsOpt", "retain_patient_characteristics"),
    ("rtnLongFullDatesOpt", "retain_longitudinal_full_dates"),
    ("rtnLongModifDatesOpt", "retain_longitudinal_modified_dates"),
    ("cleanDescOpt", "clean_descriptors"),
    ("cleanStructContOpt", "clean_structured_content"),
    ("cleanGraphOpt", "clean_graphics"),
)
OUTPUT = Path(__file__).resolve().parents[1] / "src" / "enclave_deid" / "profile_table.py"
HEX = r"\s*(0x[0-9A-Fa-f]{4})\s*"
ENTRY = re.compile(rf"\({HEX},{HEX}(?:,{HEX},{HEX})?,?\s*\),\s*#\s*([^\n]*)")


def _package_file(distribution: str, suffix: str) -> Path:
    files = importlib.metadata.files(distribution) or []
    for entry in files:
        if str(entry).replace("\\", "/").endswith(suffix):
            return Path(str(entry.locate()))
    raise SystemExit(f"{distribution} does not ship {suffix}; install the profile-source group")


def _basic_profile() -> dict[tuple[int, int, int, int], tuple[str, str]]:
    """(group, element, group mask, element mask) -> (name, action) from the 2024b Basic Profile."""
    path = _package_file("dicom-anonymizer", f"dicomfields_{BASIC_EDITION}.py")
    rows: dict[tuple[int, int, int, int], tuple[str, str]] = {}
    text = path.read_text(encoding="utf-8")
    sections = re.split(r"^([A-Z_]+) = \[", text, flags=re.MULTILINE)
    for list_name, body in zip(sections[1::2], sections[2::2], strict=True):
        action = BASIC_GROUPS.get(list_name)
        if action is None:
            continue
        for match in ENTRY.finditer(body.split("]", 1)[0]):
            group, element = int(match.group(1), 16), int(match.group(2), 16)
            gmask = int(match.group(3), 16) if match.group(3) else 0xFFFF
            emask = int(match.group(4), 16) if match.group(4) else 0xFFFF
            key = (group, element, gmask, emask)
            if key in rows:
                raise SystemExit(f"({group:04X},{element:04X}) listed twice in the basic profile source")
            rows[key] = (match.group(5).strip(), action)
    return rows


def _option_columns() -> tuple[dict[int, dict[str, str]], str]:
    path = _package_file("dicom-standard", "standard/confidentiality_profile_attributes.json")
    options: dict[int, dict[str, str]] = {}
    private_safe = ""
    for row in json.loads(path.read_text(encoding="utf-8")):
        columns = {ours: row[theirs] for theirs, ours in OPTION_KEYS if row.get(theirs)}
        tag = row["tag"].strip("()").split(",")
        if "GGGG" in row["tag"]:
            private_safe = row.get("rtnSafePrivOpt", "")
            continue
        if not all(re.fullmatch(r"[0-9A-F]{4}", part) for part in tag):
            continue
        options[int(tag[0] + tag[1], 16)] = columns
    return options, private_safe


def main() -> None:
    basic = _basic_profile()
    options, private_safe = _option_columns()
    option_names = [ours for _, ours in OPTION_KEYS]
    exact: list[str] = []
    masked: list[str] = []
    for (group, element, gmask, emask), (name, action) in sorted(basic.items()):
        tag = (group << 16) | element
        columns = options.get(tag, {}) if gmask == 0xFFFF and emask == 0xFFFF else {}
        cells = ", ".join(repr(columns.get(option, "")) for option in option_names)
        keyword = keyword_for_tag(tag) if gmask == 0xFFFF and emask == 0xFFFF else ""
        row = f"({keyword or name!r}, {action!r}, {cells})"
        if gmask == 0xFFFF and emask == 0xFFFF:
            exact.append(f"    0x{tag:08X}: {row},")
        else:
            masked.append(f"    (0x{(gmask << 16) | emask:08X}, 0x{tag:08X}, {row}),")
    missing_options = sorted(set(options) - {(g << 16) | e for g, e, _, _ in basic})
    anonymizer = importlib.metadata.version("dicom-anonymizer")
    standard = importlib.metadata.version("dicom-standard")
    text = f'''"""PS3.15 Annex E Table E.1-1 as data.

GENERATED by services/deid/tools/generate_profile.py: do not edit.
Basic Profile column: PS3.15 {BASIC_EDITION} (dicom-anonymizer {anonymizer}).
Option columns: PS3.15 {OPTIONS_EDITION} (dicom-standard {standard}, extracted 2020-04-07);
attributes added to the table after {OPTIONS_EDITION} have empty option cells.
"""

from typing import Final

BASIC_PROFILE_EDITION: Final = {BASIC_EDITION!r}
OPTIONS_EDITION: Final = {OPTIONS_EDITION!r}
OPTION_COLUMNS: Final = {tuple(option_names)!r}
PRIVATE_ATTRIBUTES_SAFE_PRIVATE_ACTION: Final = {private_safe!r}

# tag -> (keyword or name, basic profile action, *option actions in OPTION_COLUMNS order)
TABLE_E1_1: Final[dict[int, tuple[str, ...]]] = {{
{chr(10).join(exact)}
}}

# (mask, masked tag, row) for repeating groups such as (50xx,xxxx) and (60xx,3000)
MASKED_ROWS: Final[tuple[tuple[int, int, tuple[str, ...]], ...]] = (
{chr(10).join(masked)}
)

# Attributes the {OPTIONS_EDITION} extraction lists that the {BASIC_EDITION} column no longer does.
RETIRED_FROM_TABLE: Final[tuple[int, ...]] = ({"".join(f"0x{t:08X}, " for t in missing_options)})

# Attributes the {OPTIONS_EDITION} extraction lists: their empty option cells mean "no exception"; the
# others were added to the table after it and have no option cells at all.
IN_OPTIONS_EDITION: Final[frozenset[int]] = frozenset(({"".join(f"0x{t:08X}, " for t in sorted(options))}))
'''
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}: {len(exact)} attributes, {len(masked)} masked rows")


if __name__ == "__main__":
    main()
