"""Make an event envelope safe and stable to keep forever in the audit trail.

Events carry no PHI by contract; this is the belt to that pair of braces. Fields whose *name* looks
like a direct identifier (patient name, patient id, birth date, ...) are removed, and the query
string of path or URL fields is cut; only the paths of what was removed are kept, so the removal
itself is visible. Values are also brought into the JSON subset that
hashes the same before and after a trip through MongoDB and RFC 8785: integers beyond 2**53 become
strings, long strings (sealed bytes, base64 blobs) are replaced by their SHA-256 and length.
Written by hand: no library does this policy.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

#: Normalised field names (lower case, letters and digits only) that must never be stored.
PHI_FIELD_NAMES: Final = frozenset(
    {
        "patientname",
        "patientsname",
        "patientid",
        "patientsid",
        "otherpatientids",
        "otherpatientnames",
        "patientbirthdate",
        "patientsbirthdate",
        "birthdate",
        "dateofbirth",
        "dob",
        "patientaddress",
        "patientsaddress",
        "patienttelephonenumbers",
        "patientstelephonenumbers",
        "patientmothersbirthname",
        "patientsmothersbirthname",
        "ssn",
        "socialsecuritynumber",
        "medicalrecordnumber",
        "mrn",
    }
)

#: Fields holding a path or URL: their query string (search terms, maybe PHI) is dropped.
URL_FIELD_NAMES: Final = frozenset(
    {"target", "path", "url", "uri", "href", "location", "referer", "referrer"}
)

#: Strings longer than this are kept as a digest: the record stays small and still binds the value.
MAX_STRING_LENGTH: Final = 2048
#: JSON numbers that every RFC 8785 implementation and MongoDB represent exactly.
MAX_SAFE_INTEGER: Final = 2**53 - 1
#: Nesting deeper than this is cut: an envelope is not a place for deep trees.
MAX_DEPTH: Final = 16

_NON_ALNUM = re.compile(r"[^a-z0-9]")


def is_phi_field_name(name: str) -> bool:
    """True when ``name`` looks like a direct patient identifier (``PatientName``, ``birth_date``, ...)."""
    return _NON_ALNUM.sub("", name.lower()) in PHI_FIELD_NAMES


@dataclass
class SanitizedEnvelope:
    """The cleaned envelope and the paths (names only, never values) of what was removed."""

    envelope: dict[str, Any]
    removed_fields: list[str] = field(default_factory=list)


def sanitize_envelope(envelope: Mapping[str, Any]) -> SanitizedEnvelope:
    """Copy ``envelope`` into storable JSON, dropping PHI-named fields and oversized values."""
    removed: list[str] = []
    cleaned = _clean_mapping(envelope, "", removed, 0)
    return SanitizedEnvelope(envelope=cleaned, removed_fields=removed)


def _clean_mapping(value: Mapping[Any, Any], path: str, removed: list[str], depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for raw_key, item in value.items():
        key = str(raw_key)
        child = f"{path}.{key}" if path else key
        if is_phi_field_name(key):
            removed.append(child)
            continue
        cleaned = _clean(item, child, removed, depth + 1)
        if isinstance(cleaned, str) and "?" in cleaned and _NON_ALNUM.sub("", key.lower()) in URL_FIELD_NAMES:
            cleaned = cleaned.split("?", 1)[0]
            removed.append(f"{child}?query")
        out[key] = cleaned
    return out


def _clean(value: Any, path: str, removed: list[str], depth: int) -> Any:
    if depth > MAX_DEPTH:
        removed.append(path)
        return None
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) <= MAX_SAFE_INTEGER else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return _clean_string(value)
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        return {"omitted": "bytes", "sha256": hashlib.sha256(data).hexdigest(), "length": len(data)}
    if isinstance(value, Mapping):
        return _clean_mapping(value, path, removed, depth)
    if isinstance(value, list | tuple):
        return [_clean(item, f"{path}[{i}]", removed, depth + 1) for i, item in enumerate(value)]
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    return _clean_string(str(value))


def _clean_string(value: str) -> str | dict[str, Any]:
    if len(value) <= MAX_STRING_LENGTH:
        return value
    data = value.encode("utf-8", "surrogatepass")
    return {"omitted": "string", "sha256": hashlib.sha256(data).hexdigest(), "length": len(value)}
