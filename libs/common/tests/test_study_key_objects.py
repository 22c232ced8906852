"""Study-key records in the bucket: ingest checks once per study per process that the record is
there (writing it if a crash left it unsaved), not for every instance; shredding forgets that."""

from __future__ import annotations

import io
from typing import Any

from enclave_common.crypto import LocalKeyring, new_study_key
from enclave_common.study_key_objects import StudyKeyObjects


class CountingStore:
    """The S3ObjectStore calls StudyKeyObjects makes, in memory, counted."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}
        self.calls: list[str] = []

    async def exists(self, bucket: str, key: str) -> bool:
        self.calls.append("exists")
        return (bucket, key) in self.objects

    async def read(self, bucket: str, key: str) -> bytes:
        self.calls.append("read")
        return self.objects[(bucket, key)]

    async def put(self, bucket: str, key: str, body: io.BytesIO) -> Any:
        self.calls.append("put")
        self.objects[(bucket, key)] = body.read()

    async def delete_all_versions(self, bucket: str, key: str) -> int:
        self.calls.append("delete")
        return 1 if self.objects.pop((bucket, key), None) is not None else 0


async def test_the_bucket_is_checked_once_per_study_and_an_unsaved_record_is_written() -> None:
    store = CountingStore()
    keys = StudyKeyObjects(store, "originals", LocalKeyring.generate("kek"))  # type: ignore[arg-type]
    _, record = new_study_key(LocalKeyring.generate("kek"), "hospital-a", "study-1")

    await keys.ensure_saved(record)  # a claimed key whose record is not in the bucket yet: written
    assert store.calls == ["exists", "put"]
    assert ("originals", keys.object_key("hospital-a", "study-1")) in store.objects

    for _ in range(5):  # every later instance of the study: no object-store call
        await keys.ensure_saved(record)
    assert store.calls == ["exists", "put"]


async def test_a_record_already_in_the_bucket_is_not_rewritten_and_shredding_forgets_it() -> None:
    store = CountingStore()
    keys = StudyKeyObjects(store, "originals", LocalKeyring.generate("kek"))  # type: ignore[arg-type]
    _, record = new_study_key(LocalKeyring.generate("kek"), "hospital-a", "study-1")
    store.objects[("originals", keys.object_key("hospital-a", "study-1"))] = record.to_json()

    await keys.ensure_saved(record)
    assert store.calls == ["exists", "read"]

    keys.forget("hospital-a", "study-1")  # key.shredded seen: the next instance looks again
    await keys.ensure_saved(record)
    assert store.calls == ["exists", "read", "exists", "read"]

    await keys.destroy("hospital-a", "study-1")
    await keys.ensure_saved(record)
    assert store.calls[-3:] == ["delete", "exists", "put"]
