"""The restriction stores' contract, in memory (the MongoDB store runs it on FerretDB:
tests/integration/test_gateway_restrictions.py), and the MongoDB document's round trip."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from enclave_common.auth import InMemoryRestrictionStore, LiftedRestriction, Restriction
from enclave_common.auth.restrictions import RestrictionContended
from enclave_common.auth.restrictions_mongo import (
    MongoRestrictionStore,
    restriction_from_document,
    restriction_to_document,
)
from enclave_common.service import failure_answer

AT = datetime(2026, 11, 24, 9, 30, tzinfo=UTC)
BECAUSE = "end of employment"


def restriction(patient_key: str, tenant: str = "hospital-a", by: str = "admin-1") -> Restriction:
    return Restriction(tenant, patient_key, "privacy office request", by, AT)


async def lifted(store: InMemoryRestrictionStore, which: Restriction, by: str = "a2") -> Restriction | None:
    return await store.lift(which, lifted_by=by, lifted_at=AT, justification=BECAUSE)


async def test_the_first_restriction_stands_and_a_second_one_gets_it_back() -> None:
    store = InMemoryRestrictionStore()
    assert await store.restrict(restriction("k1")) is None
    assert await store.restrict(restriction("k1", by="admin-2")) == restriction("k1")
    assert await store.get("hospital-a", "k1") == restriction("k1")


async def test_every_method_is_scoped_by_tenant() -> None:
    store = InMemoryRestrictionStore()
    await store.restrict(restriction("k1"))
    assert await store.get("hospital-b", "k1") is None
    assert await lifted(store, restriction("k1", tenant="hospital-b"), by="x") is None
    assert await store.list("hospital-b", limit=10) == []
    assert await store.get("hospital-a", "k1") == restriction("k1")


async def test_lift_removes_that_restriction_once_and_keeps_it_in_the_history() -> None:
    store = InMemoryRestrictionStore()
    await store.restrict(restriction("k1"))
    assert await lifted(store, restriction("k1", by="someone-else")) is None
    assert await lifted(store, restriction("k1")) == restriction("k1")
    assert await lifted(store, restriction("k1")) is None
    assert await store.get("hospital-a", "k1") is None
    assert store.history == [LiftedRestriction(restriction("k1"), "a2", AT, BECAUSE)]


class FakeCollection:
    """insert_one that finds the key taken, and find_one that finds nothing: a restriction lifted
    between the insert and the read, again and again."""

    def __init__(self) -> None:
        self.inserts = 0

    async def insert_one(self, doc: dict[str, object]) -> None:
        from pymongo.errors import DuplicateKeyError

        self.inserts += 1
        raise DuplicateKeyError("E11000")

    async def find_one(self, query: dict[str, object]) -> None:
        return None


async def test_a_restriction_contended_three_times_is_a_transient_error_not_a_bug() -> None:
    collection = FakeCollection()
    store = MongoRestrictionStore({"restrictions": collection, "restriction_history": None})  # type: ignore[arg-type]
    with pytest.raises(RestrictionContended) as contended:
        await store.restrict(restriction("k1"))
    assert collection.inserts == 3
    assert failure_answer(contended.value) == (503, "restriction_contended")


async def test_list_pages_in_patient_key_order() -> None:
    store = InMemoryRestrictionStore()
    for key in ("k3", "k1", "k2"):
        await store.restrict(restriction(key))
    assert [r.patient_key for r in await store.list("hospital-a", limit=2)] == ["k1", "k2"]
    assert [r.patient_key for r in await store.list("hospital-a", limit=2, after="k2")] == ["k3"]


def test_the_document_is_keyed_by_the_pseudonym_and_reads_back_timezone_aware() -> None:
    doc = restriction_to_document(restriction("k1"))
    assert doc["_id"] == "k1" and doc["tenant"] == "hospital-a"
    naive = {**doc, "restricted_at": AT.replace(tzinfo=None)}  # as pymongo reads a date without tz_aware
    assert restriction_from_document(naive) == restriction("k1")
