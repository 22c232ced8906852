"""Per-study keys: the layer that makes crypto-shredding one study exact.

Hierarchy (refines docs/crypto-format.md section 1)::

    KEK (LocalKeyring version / AWS KMS key)
     └── wraps the STUDY KEY (AES-256, one per tenant+study), stored as a small record
          └── wraps each object's DEK (the object header's key slot, key id ``study:<tenant>:<study>``)
               └── encrypts the object's segments

Object headers only ever hold a DEK wrapped by the study key, and the study key exists only in its
record (wrapped by the KEK). So: *rotation* re-wraps study-key records under the new KEK version and
touches no object; *shredding* deletes every copy of one study-key record, after which no object of
that study can be decrypted by anyone, whatever KEK they hold.

Records live in the originals bucket under ``keys/`` (the readers of originals, ingest and deid,
already have that bucket; no service reads another's database). Written by hand: no library
provides this record format; the wrapping itself is the keyring's AES-GCM / KMS.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Protocol

from enclave_common.crypto.errors import KeyNotFoundError
from enclave_common.crypto.keyring import LocalKeyring
from enclave_common.crypto.providers import KeyEncryptionKeyProvider
from enclave_common.crypto.wrapped_key import KeyContext, WrappedKey

STUDY_KEY_RECORD_FORMAT = "enclave.study-key.v1"


def study_key_id(tenant: str, study_key: str) -> str:
    return f"study:{tenant}:{study_key}"


def study_key_context(tenant: str, study_key: str) -> KeyContext:
    """Context the *study key* is wrapped under by the KEK (distinct purpose from a DEK context)."""
    return {"purpose": "study-key", "tenant": tenant, "study_key": study_key}


@dataclass(frozen=True)
class StudyKeyRecord:
    tenant: str
    study_key: str
    wrapped: WrappedKey

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": STUDY_KEY_RECORD_FORMAT,
                "tenant": self.tenant,
                "study_key": self.study_key,
                "wrapped": self.wrapped.to_json_dict(),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> StudyKeyRecord:
        data = json.loads(raw)
        if data.get("format") != STUDY_KEY_RECORD_FORMAT:
            raise KeyNotFoundError(f"study key record is not of format {STUDY_KEY_RECORD_FORMAT}")
        return cls(data["tenant"], data["study_key"], WrappedKey.from_json_dict(data["wrapped"]))


def new_study_key(kek: KeyEncryptionKeyProvider, tenant: str, study_key: str) -> tuple[bytes, StudyKeyRecord]:
    """A fresh random study key and its record wrapped by the current KEK version."""
    plain, wrapped = kek.generate_data_key(study_key_context(tenant, study_key))
    return plain, StudyKeyRecord(tenant, study_key, wrapped)


def open_study_key(kek: KeyEncryptionKeyProvider, record: StudyKeyRecord) -> bytes:
    return kek.unwrap(record.wrapped, study_key_context(record.tenant, record.study_key))


def rewrap_study_key(kek: KeyEncryptionKeyProvider, record: StudyKeyRecord) -> StudyKeyRecord:
    """The same study key wrapped by the KEK's current version (rotation: no object changes)."""
    return StudyKeyRecord(
        record.tenant,
        record.study_key,
        kek.rewrap(record.wrapped, study_key_context(record.tenant, record.study_key)),
    )


def object_key_provider(tenant: str, study_key: str, plain_study_key: bytes) -> KeyEncryptionKeyProvider:
    """The provider that wraps/unwraps object DEKs under a study key (AES-256-GCM, context-bound)."""
    return LocalKeyring(
        key_id=study_key_id(tenant, study_key), versions={1: plain_study_key}, current_version=1
    )


def random_study_key() -> bytes:
    return secrets.token_bytes(32)


class StudyKeyStore(Protocol):
    """Where study-key records live (the object store in production)."""

    async def load(self, tenant: str, study_key: str) -> StudyKeyRecord | None: ...

    async def save(self, record: StudyKeyRecord) -> None: ...

    async def destroy(self, tenant: str, study_key: str) -> int: ...
