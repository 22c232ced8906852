"""From a complete set of sealed chunks to an encrypted, catalogued original.

Two passes over the spooled chunks keep memory bounded: the first unseals, hashes and parses the
header prefix (validate, pseudonymise, decide on duplicates); the second unseals again and streams
the plaintext through the object encryptor into a ciphertext temp file that is uploaded. Plaintext
never touches the disk.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from enclave_common.crypto import (
    CryptoError,
    EncryptingSink,
    InstanceUnsealer,
    ObjectEncryptor,
    ObjectIdentity,
    Pseudonymizer,
    SealContext,
    encrypt_to_temp_file,
    new_study_key,
)
from enclave_common.crypto.providers import KeyEncryptionKeyProvider
from enclave_common.errors import PermanentError
from enclave_common.events import InstanceRejected, InstanceStored, ObjectRef
from enclave_common.pseudonyms import instance_keys
from enclave_common.storage import S3ObjectStore
from enclave_common.study_key_objects import StudyKeyObjects

from enclave_ingest.catalogue import Catalogue
from enclave_ingest.dicom_check import read_identity
from enclave_ingest.spool import ChunkSpool


class IntegrityError(PermanentError):
    code = "integrity"


class DuplicateConflict(PermanentError):
    code = "duplicate_conflict"


@dataclass(frozen=True)
class ChunkStreamMeta:
    tenant: str
    upload_id: str
    instance_upload_id: str
    count: int
    total_size: int
    sha256: str


@dataclass
class Outcome:
    event: InstanceStored | InstanceRejected
    new_study_key: str | None = None


class InstancePipeline:
    def __init__(
        self,
        *,
        spool: ChunkSpool,
        private_key: X25519PrivateKey,
        pseudonymizer: Pseudonymizer,
        catalogue: Catalogue,
        store: S3ObjectStore,
        study_keys: StudyKeyObjects,
        kek: KeyEncryptionKeyProvider,
        bucket: str,
        duplicate_policy: str,
        header_prefix_bytes: int,
        segment_size: int,
    ) -> None:
        self.spool = spool
        self.private_key = private_key
        self.pseudonymizer = pseudonymizer
        self.catalogue = catalogue
        self.store = store
        self.study_keys = study_keys
        self.kek = kek
        self.bucket = bucket
        self.duplicate_policy = duplicate_policy
        self.header_prefix_bytes = header_prefix_bytes
        self.segment_size = segment_size

    def _plaintext(self, meta: ChunkStreamMeta) -> Any:
        unsealer = InstanceUnsealer(self.private_key, SealContext(meta.tenant, meta.instance_upload_id))
        for sealed in self.spool.chunks(meta.instance_upload_id, meta.count):
            yield unsealer.unseal_chunk(sealed)
        unsealer.finish()

    def _first_pass(self, meta: ChunkStreamMeta) -> tuple[bytes, int, str]:
        digest = hashlib.sha256()
        prefix = bytearray()
        size = 0
        for piece in self._plaintext(meta):
            digest.update(piece)
            size += len(piece)
            if len(prefix) < self.header_prefix_bytes:
                prefix += piece[: self.header_prefix_bytes - len(prefix)]
        return bytes(prefix), size, digest.hexdigest()

    async def process(self, meta: ChunkStreamMeta) -> Outcome:
        """Store the instance (or decide it is a duplicate/rejected); idempotent for one upload id."""
        try:
            prefix, size, sha256 = await asyncio.to_thread(self._first_pass, meta)
        except CryptoError as exc:
            return self._rejected(meta, "unseal_failed", f"sealed chunks did not open: {exc}")
        if sha256 != meta.sha256 or size != meta.total_size:
            return self._rejected(
                meta, "integrity", "SHA-256 or size of the reassembled instance differs from the gateway's"
            )
        try:
            identity = read_identity(
                prefix, complete=size <= len(prefix), max_header_bytes=self.header_prefix_bytes
            )
        except PermanentError as exc:
            return self._rejected(meta, exc.code, exc.reason)
        keys = instance_keys(
            self.pseudonymizer,
            meta.tenant,
            patient_id=identity.patient_id,
            study_uid=identity.study_instance_uid,
            series_uid=identity.series_instance_uid,
            sop_instance_uid=identity.sop_instance_uid,
        )
        base = {
            "upload_id": meta.upload_id,
            "instance_upload_id": meta.instance_upload_id,
            "patient_key": keys.patient_key,
            "study_key": keys.study_key,
            "series_key": keys.series_key,
            "instance_key": keys.instance_key,
            "sop_class_uid": identity.sop_class_uid,
            "sha256": sha256,
            "size": size,
        }
        key_doc = await self.catalogue.study_key_doc(meta.tenant, keys.study_key)
        if key_doc is not None and key_doc.get("status") == "shredded":
            return self._rejected(
                meta, "study_shredded", "this study was crypto-shredded; new instances of it are not accepted"
            )
        duplicate = "new"
        for existing in await self.catalogue.stored_versions(meta.tenant, keys.instance_key):
            if existing["_id"] == meta.instance_upload_id:
                continue
            if existing["sha256"] == sha256:
                event = InstanceStored(
                    **base,
                    object=ObjectRef(**existing["object"]),
                    kek_id=existing["kek_id"],
                    duplicate="duplicate",
                )
                await self.catalogue.record(
                    meta.instance_upload_id,
                    {"tenant": meta.tenant, "status": "duplicate", "duplicate_of": existing["_id"], **base},
                )
                return Outcome(event)
            duplicate = "new_version"
        if duplicate == "new_version" and self.duplicate_policy == "reject":
            outcome = self._rejected(
                meta,
                "duplicate_conflict",
                "an instance with the same SOP Instance UID but different content is already stored; "
                "the duplicate policy is 'reject' (allowed: send identical content, or configure 'new_version')",
            )
            await self.catalogue.record(
                meta.instance_upload_id,
                {"tenant": meta.tenant, "status": "rejected", "reason_code": "duplicate_conflict", **base},
            )
            return outcome
        provider, created = await self._study_provider(meta.tenant, keys.study_key)
        object_key = f"originals/{meta.instance_upload_id}"
        stored = await self._encrypt_and_upload(meta, provider, keys.study_key, object_key)
        event = InstanceStored(
            **base,
            object=ObjectRef(bucket=self.bucket, key=object_key, version_id=stored.version_id),
            kek_id=provider.current_key_id,
            duplicate=duplicate,  # type: ignore[arg-type]
        )
        await self.catalogue.record(
            meta.instance_upload_id,
            {
                "tenant": meta.tenant,
                "status": "stored",
                **base,
                "object": event.object.model_dump(),
                "kek_id": provider.current_key_id,
                "duplicate": duplicate,
            },
        )
        return Outcome(event, new_study_key=keys.study_key if created else None)

    async def _study_provider(self, tenant: str, study_key: str) -> tuple[KeyEncryptionKeyProvider, bool]:
        record = await self.catalogue.study_key(tenant, study_key)
        created = False
        if record is None:
            doc = await self.catalogue.study_key_doc(tenant, study_key)
            if doc is not None and doc.get("status") == "shredded":
                raise PermanentError(
                    "this study was crypto-shredded; new instances of it are not accepted",
                    code="study_shredded",
                )
            plain, fresh = new_study_key(self.kek, tenant, study_key)
            record = await self.catalogue.claim_study_key(fresh)
            created = record is fresh
            if created:
                self.study_keys.remember(tenant, study_key, plain)
        await self.study_keys.ensure_saved(record)
        return await self.study_keys.object_provider(tenant, study_key), created

    async def _encrypt_and_upload(
        self, meta: ChunkStreamMeta, provider: KeyEncryptionKeyProvider, study_key: str, object_key: str
    ) -> Any:
        identity = ObjectIdentity(meta.tenant, study_key, object_key)
        dek, wrapped = provider.generate_data_key(identity.key_context())
        encryptor = ObjectEncryptor(dek, wrapped, identity, segment_size=self.segment_size)

        def write_plaintext(sink: EncryptingSink) -> None:
            for piece in self._plaintext(meta):
                sink.write(piece)

        body, _ = await asyncio.to_thread(
            encrypt_to_temp_file, write_plaintext, encryptor, directory=self.spool.root, prefix="ciphertext-"
        )
        with body:
            return await self.store.put(self.bucket, object_key, body)

    @staticmethod
    def _rejected(meta: ChunkStreamMeta, code: str, reason: str) -> Outcome:
        return Outcome(
            InstanceRejected(
                upload_id=meta.upload_id,
                instance_upload_id=meta.instance_upload_id,
                reason_code=code,
                reason=reason,
            )
        )
