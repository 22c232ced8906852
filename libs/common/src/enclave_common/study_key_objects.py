"""Study-key records kept in the originals bucket, where both ingest (writer) and deid (reader) find
them without reading each other's database. See ``enclave_common.crypto.study_keys``."""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable

from enclave_common.crypto import (
    KeyEncryptionKeyProvider,
    StudyKeyRecord,
    object_key_provider,
    open_study_key,
)
from enclave_common.crypto.errors import KeyNotFoundError
from enclave_common.envelope import Envelope
from enclave_common.errors import PermanentError
from enclave_common.events import KeyEvent
from enclave_common.storage import S3ObjectStore

KEY_PREFIX = "keys/"


class StudyKeyShredded(PermanentError):
    code = "study_key_shredded"


class StudyKeyObjects:
    def __init__(self, store: S3ObjectStore, bucket: str, kek: KeyEncryptionKeyProvider) -> None:
        self._store = store
        self._bucket = bucket
        self._kek = kek
        self._cache: dict[tuple[str, str], bytes] = {}
        #: Studies whose key record this process saw in the bucket (see ensure_saved).
        self._saved: set[tuple[str, str]] = set()

    @staticmethod
    def object_key(tenant: str, study_key: str) -> str:
        return f"{KEY_PREFIX}{tenant}/{study_key}.json"

    async def save(self, record: StudyKeyRecord) -> None:
        await self._store.put(
            self._bucket, self.object_key(record.tenant, record.study_key), io.BytesIO(record.to_json())
        )
        self._cache.pop((record.tenant, record.study_key), None)

    async def load(self, tenant: str, study_key: str) -> StudyKeyRecord | None:
        if not await self._store.exists(self._bucket, self.object_key(tenant, study_key)):
            return None
        return StudyKeyRecord.from_json(
            await self._store.read(self._bucket, self.object_key(tenant, study_key))
        )

    async def ensure_saved(self, record: StudyKeyRecord) -> None:
        """Write ``record`` unless the bucket holds this study's key record already.

        Looked up once per study per process, not for every instance: the lookup (HEAD and GET) cost
        ingest ~15 ms per instance, a fifth of its time. A crash between claiming a study's key and
        saving it is still repaired, by the first instance of the study after the restart."""
        study = (record.tenant, record.study_key)
        if study in self._saved:
            return
        if await self.load(record.tenant, record.study_key) is None:
            await self.save(record)
        if len(self._saved) > 65_536:
            self._saved.clear()
        self._saved.add(study)

    async def destroy(self, tenant: str, study_key: str) -> int:
        self._cache.pop((tenant, study_key), None)
        self._saved.discard((tenant, study_key))
        return await self._store.delete_all_versions(self._bucket, self.object_key(tenant, study_key))

    async def object_provider(self, tenant: str, study_key: str) -> KeyEncryptionKeyProvider:
        """The provider that opens this study's object DEKs; raises StudyKeyShredded if it is gone."""
        plain = self._cache.get((tenant, study_key))
        if plain is None:
            record = await self.load(tenant, study_key)
            if record is None:
                raise StudyKeyShredded("the study's key does not exist (never created, or crypto-shredded)")
            try:
                plain = open_study_key(self._kek, record)
            except KeyNotFoundError as exc:
                raise StudyKeyShredded(f"the study's key cannot be opened: {exc}") from exc
            if len(self._cache) > 1024:
                self._cache.clear()
            self._cache[(tenant, study_key)] = plain
        return object_key_provider(tenant, study_key, plain)

    def remember(self, tenant: str, study_key: str, plain: bytes) -> None:
        self._cache[(tenant, study_key)] = plain

    def forget(self, tenant: str, study_key: str) -> None:
        self._cache.pop((tenant, study_key), None)
        self._saved.discard((tenant, study_key))


def shred_listener(
    current: Callable[[], StudyKeyObjects | None],
) -> Callable[[Envelope], Awaitable[None]]:
    """A ``key.shredded`` handler dropping the shredded study's key from a process's cache.

    ``current`` returns the service's StudyKeyObjects (None before startup loaded the keys).
    """

    async def forget_shredded(envelope: Envelope) -> None:
        event = envelope.payload(KeyEvent)
        keys = current()
        if event.operation == "shredded" and event.study_key and keys is not None:
            keys.forget(envelope.tenant, event.study_key)

    return forget_shredded
