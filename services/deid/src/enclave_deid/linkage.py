"""The linkage vault: pseudonym -> original identifiers, encrypted record by record, in the deid database.

Each record (one per de-identified instance) is AES-256-GCM under its own DEK, generated and wrapped by
the linkage KEK with the context ``{tenant, purpose: "deid-linkage", patient_pseudonym}``; the
associated data also names the instance, so a record moved to another patient or instance does not
open. Hand-written framing (a JSON document with the wrapped key, nonce and ciphertext), because the
object format of ``enclave_common.crypto`` is made for objects addressed by study, not database rows.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import secrets
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from enclave_common.crypto import KeyEncryptionKeyProvider, WrappedKey, encode_key_context
from enclave_common.crypto.wrapped_key import KeyContext
from enclave_common.errors import PermanentError
from pymongo.asynchronous.database import AsyncDatabase

from enclave_deid.deidentify import LinkageRecord

COLLECTION = "linkage"
_AAD_LABEL = b"enclave.deid.linkage.v1\x00"
_NONCE_BYTES = 12


class LinkageUnreadable(PermanentError):
    code = "linkage_unreadable"


def linkage_context(tenant: str, patient_pseudonym: str) -> KeyContext:
    """Key context of a linkage record's DEK (bound to every wrap: AAD or KMS EncryptionContext)."""
    return {"tenant": tenant, "purpose": "deid-linkage", "patient_pseudonym": patient_pseudonym}


def _aad(tenant: str, patient_pseudonym: str, instance_key: str) -> bytes:
    return _AAD_LABEL + encode_key_context(
        {**linkage_context(tenant, patient_pseudonym), "instance_key": instance_key}
    )


def seal_linkage(
    kek: KeyEncryptionKeyProvider,
    record: LinkageRecord,
    instance_key: str,
    study_key: str,
    patient_key: str | None = None,
) -> dict[str, Any]:
    """The stored document of ``record``.

    In clear are only opaque ids: tenant, pseudonym, instance key, study key (what crypto-shredding a
    study erases the linkage by) and the upload-side patient key (what a break-glass read names in
    its audit record, so that the patient's trail shows it).
    """
    context = linkage_context(record.tenant, record.patient_pseudonym)
    dek, wrapped = kek.generate_data_key(context)
    nonce = secrets.token_bytes(_NONCE_BYTES)
    plaintext = json.dumps(dataclasses.asdict(record), sort_keys=True).encode()
    ciphertext = AESGCM(dek).encrypt(
        nonce, plaintext, _aad(record.tenant, record.patient_pseudonym, instance_key)
    )
    return {
        "_id": f"{record.tenant}|{instance_key}",
        "tenant": record.tenant,
        "patient_pseudonym": record.patient_pseudonym,
        "instance_key": instance_key,
        "study_key": study_key,
        **({"patient_key": patient_key} if patient_key is not None else {}),
        "wrapped_key": wrapped.to_json_dict(),
        "nonce": base64.b64encode(nonce).decode(),
        "ciphertext": base64.b64encode(ciphertext).decode(),
        "created_at": datetime.now(UTC),
    }


def open_linkage(kek: KeyEncryptionKeyProvider, doc: dict[str, Any]) -> dict[str, Any]:
    """Decrypt one stored linkage document (PHI: only the break-glass path calls this)."""
    tenant, pseudonym, instance_key = doc["tenant"], doc["patient_pseudonym"], doc["instance_key"]
    try:
        dek = kek.unwrap(WrappedKey.from_json_dict(doc["wrapped_key"]), linkage_context(tenant, pseudonym))
        plaintext = AESGCM(dek).decrypt(
            base64.b64decode(doc["nonce"]),
            base64.b64decode(doc["ciphertext"]),
            _aad(tenant, pseudonym, instance_key),
        )
    except InvalidTag as exc:
        raise LinkageUnreadable(
            "a linkage record did not authenticate (moved, tampered or wrong key)"
        ) from exc
    record: dict[str, Any] = json.loads(plaintext)
    return record


def rewrap_linkage(kek: KeyEncryptionKeyProvider, doc: dict[str, Any]) -> dict[str, Any] | None:
    """The new ``wrapped_key`` of a record under the current KEK version, or None if it already is."""
    wrapped = WrappedKey.from_json_dict(doc["wrapped_key"])
    rewrapped = kek.rewrap(wrapped, linkage_context(doc["tenant"], doc["patient_pseudonym"]))
    return None if rewrapped == wrapped else rewrapped.to_json_dict()


class LinkageVault:
    """Where sealed linkage records live (the deid service's own database, collection ``linkage``)."""

    def __init__(
        self, db: AsyncDatabase[dict[str, Any]], kek: KeyEncryptionKeyProvider | None = None
    ) -> None:
        self.collection = db[COLLECTION]
        #: The linkage KEK; set at startup (key files and KMS clients are I/O).
        self.kek = kek

    def _kek(self) -> KeyEncryptionKeyProvider:
        if self.kek is None:
            raise RuntimeError("the linkage KEK is loaded at startup; the vault is not ready")
        return self.kek

    async def store(
        self, record: LinkageRecord, instance_key: str, study_key: str, *, patient_key: str | None = None
    ) -> None:
        """Seal (in a worker thread: a KMS call blocks) and store the linkage of one instance."""
        await self.save(await self.seal(record, instance_key, study_key, patient_key=patient_key))

    async def seal(
        self, record: LinkageRecord, instance_key: str, study_key: str, *, patient_key: str | None = None
    ) -> dict[str, Any]:
        """The sealed document of one instance's linkage, not stored (``enclave-deid-redo`` stores it
        once the record names the copy it belongs to)."""
        return await asyncio.to_thread(
            seal_linkage, self._kek(), record, instance_key, study_key, patient_key
        )

    async def erase_study(self, tenant: str, study_key: str) -> int:
        """Delete the linkage of a crypto-shredded study (every record carries its study key)."""
        erased = await self.collection.delete_many({"tenant": tenant, "study_key": study_key})
        return erased.deleted_count

    async def erase_instance(self, tenant: str, instance_key: str) -> int:
        """Delete the linkage of one instance (its released copy was withdrawn: ``enclave-deid-redo``)."""
        erased = await self.collection.delete_one({"_id": f"{tenant}|{instance_key}"})
        return erased.deleted_count

    async def disclose(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Decrypt stored records. PHI: call only after the break-glass access was recorded."""
        kek = self._kek()
        return await asyncio.to_thread(lambda: [open_linkage(kek, doc) for doc in docs])

    async def ensure_indexes(self) -> None:
        await self.collection.create_index([("tenant", 1), ("patient_pseudonym", 1)])
        await self.collection.create_index([("tenant", 1), ("study_key", 1)])

    async def save(self, doc: dict[str, Any]) -> None:
        """Store (or replace, for a new version of the instance) one sealed record."""
        await self.collection.replace_one({"_id": doc["_id"]}, doc, upsert=True)

    async def find(self, tenant: str, patient_pseudonym: str) -> list[dict[str, Any]]:
        cursor = self.collection.find({"tenant": tenant, "patient_pseudonym": patient_pseudonym})
        return [doc async for doc in cursor]
