"""The pseudonymous keys every service uses for one instance, computed the same way everywhere.

Kinds are fixed here so the gateway (which sees the instance first) and ingest (which re-derives
them from the decrypted instance) always agree. Keys are per-tenant keyed HMACs (see
``enclave_common.crypto.Pseudonymizer``): opaque, unguessable without the pseudonym key.
"""

from __future__ import annotations

import base64
from collections.abc import MutableSequence
from dataclasses import dataclass

from enclave_common.crypto import Pseudonymizer
from enclave_common.errors import ConfigurationError


@dataclass(frozen=True)
class InstanceKeys:
    patient_key: str
    study_key: str
    series_key: str
    instance_key: str


def instance_keys(
    pseudonymizer: Pseudonymizer,
    tenant: str,
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    sop_instance_uid: str,
) -> InstanceKeys:
    return InstanceKeys(
        patient_key=pseudonymizer.pseudonym(tenant, "patient", patient_id),
        study_key=pseudonymizer.pseudonym(tenant, "study", study_uid),
        series_key=pseudonymizer.pseudonym(tenant, "series", series_uid),
        instance_key=pseudonymizer.pseudonym(tenant, "instance", sop_instance_uid),
    )


def patient_id_text(value: object) -> str:
    """PatientID (0010,0020) as the patient key is derived from it, by the gateway from the upload and
    by ingest from the decrypted instance: pydicom's value, which it decodes with the instance's Specific
    Character Set, without padding; several values (a backslash in the bytes) joined as written. Until
    the fourteenth session the gateway decoded the raw bytes as ASCII, so a non-ASCII id (HÜNTER, 山田)
    got another key than ingest's and its instances were missing from the patient query."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bytes):  # not decoded by pydicom (no string VR known): read as the default set
        return value.decode("latin-1").rstrip("\x00 ").strip()
    if isinstance(value, MutableSequence | tuple):  # pydicom's MultiValue (not a PersonName: an id
        return "\\".join(str(part).strip() for part in value)  # written as PN is one value)
    return str(value).strip()


def pseudonymizer_from_base64(value: str | None, setting: str) -> Pseudonymizer:
    """Build the pseudonymizer from a base64 setting; the message names the setting, never the value."""
    if not value:
        raise ConfigurationError(f"{setting} is not set: a base64 key of at least 32 bytes is required")
    try:
        key = base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise ConfigurationError(f"{setting} is not valid base64") from exc
    if len(key) < 32:
        raise ConfigurationError(f"{setting} must decode to at least 32 bytes")
    return Pseudonymizer(key)
