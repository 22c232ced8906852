"""From an encrypted original to an encrypted de-identified copy (or a quarantine decision).

The CPU-bound part (decrypt, parse, burned-in check, de-identify, write, encrypt) runs in one worker
thread, so the consumer's event loop keeps heart-beating to Kafka. pydicom needs the whole instance in
memory: the decrypted original lives until the dataset is parsed, and pydicom's writer copies each
value twice while it encodes it, so the peak is 3x the instance size (measured), hence
``max_instance_bytes``; and each parsed data element or sequence item costs about 1 KiB of Python
objects whatever its size in bytes (0.4 KiB an element, 1.3 KiB an empty item), hence
``max_elements``, counted before the parse (``complexity.count_elements``). The writer writes straight into the encryptor (no plaintext output buffer).
Plaintext never touches the disk; the ciphertext of the copy is spooled to a temporary file for a
streamed (multipart) upload.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import IO

from enclave_common.crypto import (
    CryptoError,
    EncryptingSink,
    KeyEncryptionKeyProvider,
    ObjectEncryptor,
    ObjectIdentity,
    decrypt_object,
    encrypt_to_temp_file,
)
from enclave_common.errors import PermanentError
from enclave_common.events import InstanceStored, ObjectRef
from enclave_common.settings import DEFAULT_MAX_ELEMENTS_PER_INSTANCE
from enclave_common.storage import S3ObjectStore
from enclave_common.study_key_objects import StudyKeyObjects
from pydicom.dataset import Dataset

from enclave_deid.burned_in import assess_burned_in_risk
from enclave_deid.complexity import (
    InflatesTooLarge,
    NestedTooDeeply,
    TooManyElements,
    count_elements,
)
from enclave_deid.deidentify import DeidContext, LinkageRecord, PseudonymKeys, deidentify
from enclave_deid.instance_io import read_instance, write_instance_to
from enclave_deid.policy import DeidPolicy
from enclave_deid.profile_supplement import TABLE_EDITION

SEGMENT_SIZE = 1024 * 1024
#: Up to this size the decrypted original is kept while writing, for instance_io's spliced writer.
SPLICE_SOURCE_MAX_BYTES = 4 * 1024 * 1024


class InstanceTooLarge(PermanentError):
    code = "instance_too_large"


class InstanceTooComplex(PermanentError):
    code = "instance_too_complex"


class OriginalUndecryptable(PermanentError):
    code = "original_undecryptable"


class OriginalChanged(PermanentError):
    """The original is not the content the record was made from (its SHA-256 differs)."""

    code = "original_changed"


class UnreadableInstance(PermanentError):
    code = "unreadable_dicom"


class UnsupportedInstance(PermanentError):
    code = "unsupported_instance"


#: Failures that are about the instance itself: it is quarantined with their code and reason (a
#: recorded outcome, visible in its status), not dead-lettered. A key problem
#: (``original_undecryptable``) or a shredded study stays a dead-lettered permanent error.
WITHHELD = (InstanceTooLarge, InstanceTooComplex, UnreadableInstance, UnsupportedInstance)


@dataclass(frozen=True)
class Released:
    """The de-identified copy is stored; what the event and the linkage vault need."""

    object: ObjectRef
    patient_pseudonym: str
    deid_study_uid: str
    deid_series_uid: str
    deid_instance_uid: str
    linkage: LinkageRecord
    kek_id: str
    size: int


@dataclass(frozen=True)
class Quarantined:
    """Nothing was released, for ``reason`` (attributes and limits only, never a value): burned-in
    identifying text, or an overlay embedded in Pixel Data that cannot be cleared, is possible
    (``burned_in_risk``), or the instance could not be de-identified (``code`` of the :data:`WITHHELD`
    error)."""

    reason: str
    code: str = "burned_in_risk"


@dataclass(frozen=True)
class _Written:
    #: The ciphertext, in an unnamed temporary file at its start (closed after the upload).
    ciphertext: IO[bytes]
    patient_pseudonym: str
    deid_study_uid: str
    deid_series_uid: str
    deid_instance_uid: str
    linkage: LinkageRecord
    size: int


def deid_object_identity(tenant: str, study_key: str, object_key: str) -> ObjectIdentity:
    """Identity of a de-identified object: the study key is ingest's ``study_key`` of the event (its
    DEK context is therefore ``{"tenant": tenant, "study_key": study_key}``), the object key its key."""
    return ObjectIdentity(tenant, study_key, object_key)


class DeidPipeline:
    def __init__(
        self,
        *,
        store: S3ObjectStore,
        study_keys: StudyKeyObjects,
        deid_kek: KeyEncryptionKeyProvider,
        keys: PseudonymKeys,
        bucket: str,
        max_instance_bytes: int,
        max_elements: int = DEFAULT_MAX_ELEMENTS_PER_INSTANCE,
        work_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.study_keys = study_keys
        self.deid_kek = deid_kek
        self.keys = keys
        self.bucket = bucket
        self.max_instance_bytes = max_instance_bytes
        self.max_elements = max_elements
        self.work_dir = work_dir

    async def run(
        self, tenant: str, stored: InstanceStored, policy: DeidPolicy, object_key: str
    ) -> Released | Quarantined:
        """De-identify one stored original under ``policy``; store the copy at ``object_key``."""
        self.check_size(stored.size)
        return await self.run_original(tenant, stored.study_key, stored.object, policy, object_key)

    async def run_original(
        self,
        tenant: str,
        study_key: str,
        original: ObjectRef,
        policy: DeidPolicy,
        object_key: str,
        *,
        expected_sha256: str | None = None,
    ) -> Released | Quarantined:
        """De-identify the original at ``original`` (of study ``study_key``); with ``expected_sha256``,
        :class:`OriginalChanged` unless its decrypted content has that digest (``enclave-deid-redo``).
        Raises ``StudyKeyShredded`` for a crypto-shredded study."""
        provider = await self.study_keys.object_provider(tenant, study_key)
        body = await self.store.open(original.bucket, original.key, original.version_id)
        source = ObjectIdentity(tenant, study_key, original.key)
        target = deid_object_identity(tenant, study_key, object_key)
        try:
            outcome = await asyncio.to_thread(
                self._transform, body, source, provider, tenant, policy, target, expected_sha256
            )
        finally:
            body.close()
        if isinstance(outcome, Quarantined):
            return outcome
        with outcome.ciphertext:
            put = await self.store.put(self.bucket, object_key, outcome.ciphertext)
        return Released(
            object=ObjectRef(bucket=self.bucket, key=object_key, version_id=put.version_id),
            patient_pseudonym=outcome.patient_pseudonym,
            deid_study_uid=outcome.deid_study_uid,
            deid_series_uid=outcome.deid_series_uid,
            deid_instance_uid=outcome.deid_instance_uid,
            linkage=outcome.linkage,
            kek_id=self.deid_kek.current_key_id,
            size=outcome.size,
        )

    def check_size(self, size: int) -> None:
        if size > self.max_instance_bytes:
            raise InstanceTooLarge(
                f"instance is {size} bytes; de-identification holds an instance in memory and accepts at "
                f"most {self.max_instance_bytes} bytes (ENCLAVE_DEID_MAX_INSTANCE_BYTES)"
            )

    def check_complexity(self, plaintext: bytes) -> None:
        """Count the data elements and sequence items before pydicom builds an object for each (the
        count allocates nothing per element and stops at the limit); a deflated dataset is inflated
        for it at most up to ``max_instance_bytes``."""
        try:
            count_elements(plaintext, self.max_elements, self.max_instance_bytes)
        except TooManyElements:
            raise InstanceTooComplex(
                f"instance has more than {self.max_elements} data elements and sequence items; "
                "de-identification holds each in memory (about 1 KiB apiece) and accepts at most "
                f"{self.max_elements} (ENCLAVE_DEID_MAX_ELEMENTS_PER_INSTANCE)"
            ) from None
        except NestedTooDeeply:
            raise InstanceTooComplex(
                "instance has sequences nested too deeply to be parsed (past Python's recursion limit)"
            ) from None
        except InflatesTooLarge:
            raise InstanceTooLarge(
                f"the deflated dataset inflates to more than {self.max_instance_bytes} bytes; "
                "de-identification holds an instance in memory and accepts at most "
                f"{self.max_instance_bytes} bytes (ENCLAVE_DEID_MAX_INSTANCE_BYTES)"
            ) from None

    # -- the worker thread --------------------------------------------------------------------------------

    def _transform(
        self,
        body: IO[bytes],
        source: ObjectIdentity,
        provider: KeyEncryptionKeyProvider,
        tenant: str,
        policy: DeidPolicy,
        target: ObjectIdentity,
        expected_sha256: str | None = None,
    ) -> _Written | Quarantined:
        plaintext = self._decrypt_bounded(body, source, provider)
        if expected_sha256 is not None and hashlib.sha256(plaintext).hexdigest() != expected_sha256:
            raise OriginalChanged(
                "the original's SHA-256 is not the one the de-identified record was made from; "
                "it is not de-identified again"
            )
        self.check_complexity(plaintext)
        buffer = BytesIO(plaintext)  # shares the bytes object: no copy
        # Small instances keep their bytes so the writer can copy unchanged elements from them; for
        # large ones (pixel data dominates) that gains little and would hold a second copy in memory.
        original = plaintext if len(plaintext) <= SPLICE_SOURCE_MAX_BYTES else None
        del plaintext
        try:
            dataset = read_instance(buffer)
        except Exception as exc:
            raise UnreadableInstance(
                f"the original does not parse as a DICOM Part 10 file ({type(exc).__name__})"
            ) from None
        dataset.buffer = None  # the parsed elements hold their own bytes: let the decrypted copy go
        del buffer
        try:
            reason = assess_burned_in_risk(dataset)
        except Exception as exc:
            raise UnsupportedInstance(
                f"the attributes that say whether the pixels may carry text could not be read "
                f"({type(exc).__name__}); Modality, ImageType, SOPClassUID, the burned-in flags and the "
                "Image Pixel and overlay bit attributes must be valid for their VR"
            ) from None
        if reason is not None:
            return Quarantined(reason)
        try:
            result = deidentify(dataset, policy, self.keys, DeidContext(tenant))
        except Exception as exc:
            raise UnsupportedInstance(
                f"the instance could not be de-identified ({type(exc).__name__}); "
                "storable DICOM instances with a SOP Instance UID are supported"
            ) from None
        ciphertext, size = self._encrypt_to_file(result.dataset, target, original)
        written = _Written(
            ciphertext=ciphertext,
            patient_pseudonym=result.patient_pseudonym,
            deid_study_uid=result.study_instance_uid,
            deid_series_uid=result.series_instance_uid,
            deid_instance_uid=result.sop_instance_uid,
            linkage=result.linkage,
            size=size,
        )
        return written

    def _decrypt_bounded(
        self, body: IO[bytes], identity: ObjectIdentity, provider: KeyEncryptionKeyProvider
    ) -> bytes:
        pieces: list[bytes] = []
        size = 0
        try:
            for piece in decrypt_object(body, identity, provider):
                pieces.append(piece)
                size += len(piece)
                self.check_size(size)
        except CryptoError as exc:
            raise OriginalUndecryptable(f"the original did not decrypt: {exc}") from None
        plaintext = b"".join(pieces)
        pieces.clear()
        return plaintext

    def _encrypt_to_file(
        self, dataset: Dataset, identity: ObjectIdentity, original: bytes | None = None
    ) -> tuple[IO[bytes], int]:
        """Write the Part 10 file of ``dataset`` straight into the encryptor; (ciphertext file, plaintext size)."""
        dek, wrapped = self.deid_kek.generate_data_key(identity.key_context())
        encryptor = ObjectEncryptor(dek, wrapped, identity, segment_size=SEGMENT_SIZE)

        def write_plaintext(sink: EncryptingSink) -> None:
            try:
                write_instance_to(dataset, sink, original)  # type: ignore[arg-type]
            except Exception as exc:
                raise UnsupportedInstance(
                    f"the de-identified instance could not be written as Part 10 ({type(exc).__name__})"
                ) from None

        return encrypt_to_temp_file(
            write_plaintext, encryptor, directory=self.work_dir, prefix="deid-ciphertext-"
        )


def describe_policy(policy: DeidPolicy) -> tuple[str, list[str]]:
    """(profile, options) as the event names them: the Basic Profile edition and the option fields."""
    return f"PS3.15 {TABLE_EDITION} Basic Application Confidentiality Profile", [
        option.column for option in policy.options
    ]
