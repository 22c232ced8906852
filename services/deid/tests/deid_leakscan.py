"""A leak scanner: collect every identifying value of an original instance, find it in the output bytes.

Identifying values are those of the attributes PS3.15 Table E.1-1 acts on (other than keeping them) and of
every private attribute with a text VR, at any depth. Each is searched in the output as the raw bytes it
had in the original file, as the string encoded in the file's character set, and as UTF-8; PN values are
also searched component by component. Values that also occur in the original's pixel data, inside values of
attributes the policy retains, or inside dummies the de-identifier writes are excluded: a hit on them would
prove nothing.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from enclave_deid.policy import DeidPolicy
from enclave_deid.profiles import ActionCode, ResolvedProfile, resolve_profile
from pydicom.charset import convert_encodings, encode_string
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID_dictionary

TEXT_VRS = {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
BINARY_VRS = {"OB", "OW", "UN"}
MIN_LENGTH = 4
# Values the de-identifier writes itself (dummies, marks): an identifier inside one of them is a coincidence.
WRITTEN_BY_DEID = {"19000101000000", "000000", "000D", "REMOVED", "ENCLAVE_DEID", "YES", "MODIFIED"}


@dataclass(frozen=True)
class Identifier:
    keyword: str
    needles: tuple[bytes, ...]


def _removed_by(profile: ResolvedProfile, tag: int) -> bool:
    """True when the policy removes, blanks or replaces the attribute (not kept, not cleaned in place)."""
    action = profile.action_for(tag)
    return action is not None and action not in (ActionCode.K, ActionCode.C)


def _walk(dataset: Dataset) -> Iterator[DataElement]:
    for elem in dataset:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value or ():
                yield from _walk(item)


def _strings(elem: DataElement) -> list[str]:
    value = elem.value
    values = value if isinstance(value, (list, MultiValue)) else [value]
    return [str(v).strip() for v in values if v is not None and str(v).strip()]


def identifying_values(original: Dataset, policy: DeidPolicy) -> tuple[list[Identifier], set[str]]:
    """Identifying values of ``original``, and the values of attributes the policy retains."""
    profile = resolve_profile(policy)
    encodings = convert_encodings(original.get("SpecificCharacterSet") or "ISO_IR 6")
    found: list[Identifier] = []
    retained: set[str] = set()
    for elem in _walk(original):
        if elem.tag.is_private and elem.VR in BINARY_VRS and elem.tag.element >= 0x1000:
            value = elem.value if isinstance(elem.value, bytes) else b""
            if len(value) >= 16 and len(set(value[:64])) >= 4:  # e.g. a Siemens CSA header
                found.append(Identifier(str(elem.tag), (value[:64],)))
            continue
        if elem.VR not in TEXT_VRS:
            continue
        private = elem.tag.is_private
        if not private and not _removed_by(profile, elem.tag) and elem.VR != "PN":
            retained.update(_strings(elem))
            continue
        if private and elem.tag.element < 0x1000:
            continue  # private creator names a vendor, not a person
        for text in _strings(elem):
            parts = {text}
            if elem.VR == "PN":
                parts.update(re.split(r"[\^=]", text))
            for part in parts:
                part = part.strip()
                if len(part) < MIN_LENGTH or (elem.VR == "UI" and part in UID_dictionary):
                    continue
                needles = {part.encode("utf-8")}
                with contextlib.suppress(UnicodeError, LookupError):
                    needles.add(encode_string(part, encodings))
                found.append(Identifier(elem.keyword or str(elem.tag), tuple(needles)))
    return found, retained


def find_leaks(original: Dataset, output: bytes, policy: DeidPolicy) -> list[str]:
    """Keywords of identifying values of ``original`` that occur anywhere in ``output``.

    Generated ``2.25.<decimal>`` UIDs are blanked first: their digits come from an HMAC and would match
    short numeric identifiers by chance.
    """
    identifiers, retained = identifying_values(original, policy)
    output = re.sub(rb"2\.25\.\d+", b"", output)
    pixels = original.get("PixelData") or b""
    innocent = "\x00".join(retained | WRITTEN_BY_DEID)
    hits = []
    for identifier in identifiers:
        for needle in identifier.needles:
            text = needle.decode("utf-8", errors="ignore")
            if text in innocent or needle in pixels:
                continue
            if needle in output:
                hits.append(identifier.keyword)
                break
    return hits
