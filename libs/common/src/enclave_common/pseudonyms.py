"""The pseudonymous keys every service uses for one instance, computed the same way everywhere.

Kinds are fixed here so the gateway (which sees the instance first) and ingest (which re-derives
them from the decrypted instance) always agree. Keys are per-tenant keyed HMACs (see
``enclave_common.crypto.Pseudonymizer``): opaque, unguessable without the pseudonym key.
"""

from __future__ import annotations

import base64
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
