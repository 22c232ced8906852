"""GroupedInserts: concurrent requests' read-model inserts share insert_many commands, and each
request learns only its own duplicates and failures."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from enclave_gateway.readmodel import DUPLICATE_KEY, GroupedInserts
from pymongo.errors import BulkWriteError, ServerSelectionTimeoutError


class FakeCollection:
    """insert_many that takes a round trip (released by the test) and knows which ids exist."""

    def __init__(self, existing: set[str] = frozenset(), refused: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.calls: list[list[str]] = []
        self.existing = set(existing)
        self.refused = set(refused)
        self.release = asyncio.Event()
        self.unreachable = False

    async def insert_many(self, docs: list[dict[str, Any]], ordered: bool) -> None:
        assert ordered is False
        self.calls.append([d["_id"] for d in docs])
        await self.release.wait()
        if self.unreachable:
            raise ServerSelectionTimeoutError("no server")
        errors = []
        for index, doc in enumerate(docs):
            if doc["_id"] in self.existing:
                errors.append({"index": index, "code": DUPLICATE_KEY})
            elif doc["_id"] in self.refused:
                errors.append({"index": index, "code": 121})  # document failed validation
            else:
                self.existing.add(doc["_id"])
        if errors:
            raise BulkWriteError({"writeErrors": errors})


def docs(*ids: str) -> list[dict[str, Any]]:
    return [{"_id": i} for i in ids]


async def test_inserts_arriving_during_a_write_go_together_in_the_next_one() -> None:
    collection = FakeCollection()
    inserts = GroupedInserts(collection)
    first = asyncio.ensure_future(inserts.insert(docs("a")))
    await asyncio.sleep(0)
    later = [asyncio.ensure_future(inserts.insert(docs(x))) for x in ("b", "c")]
    await asyncio.sleep(0)
    collection.release.set()
    assert await asyncio.gather(first, *later) == [[], [], []]
    assert collection.calls == [["a"], ["b", "c"]]


async def test_each_request_learns_its_own_duplicates() -> None:
    collection = FakeCollection(existing={"y"})
    collection.release.set()
    inserts = GroupedInserts(collection)
    one = asyncio.ensure_future(inserts.insert(docs("w", "x")))
    two = asyncio.ensure_future(inserts.insert(docs("y", "z")))
    assert await one == []
    assert await two == [0]


async def test_a_refused_document_fails_its_request_only() -> None:
    collection = FakeCollection(refused={"bad"})
    inserts = GroupedInserts(collection)
    first = asyncio.ensure_future(inserts.insert(docs("a")))
    await asyncio.sleep(0)
    fine = asyncio.ensure_future(inserts.insert(docs("b")))
    broken = asyncio.ensure_future(inserts.insert(docs("c", "bad")))
    await asyncio.sleep(0)
    collection.release.set()
    assert await first == [] and await fine == []
    with pytest.raises(BulkWriteError):
        await broken
    assert collection.calls == [["a"], ["b", "c", "bad"]]


async def test_an_unreachable_database_fails_every_request_of_the_group() -> None:
    collection = FakeCollection()
    collection.unreachable = True
    collection.release.set()
    inserts = GroupedInserts(collection)
    results = await asyncio.gather(
        inserts.insert(docs("a")), inserts.insert(docs("b")), return_exceptions=True
    )
    assert all(isinstance(r, ServerSelectionTimeoutError) for r in results)
    collection.unreachable = False
    assert await inserts.insert(docs("c")) == [], "the next request is written again"


async def test_a_request_that_went_away_does_not_break_the_group() -> None:
    collection = FakeCollection()
    inserts = GroupedInserts(collection)
    first = asyncio.ensure_future(inserts.insert(docs("a")))
    await asyncio.sleep(0)
    gone = asyncio.ensure_future(inserts.insert(docs("b")))
    stays = asyncio.ensure_future(inserts.insert(docs("c")))
    await asyncio.sleep(0)
    gone.cancel()
    collection.release.set()
    assert await first == [] and await stays == []
    assert collection.calls[-1] == ["b", "c"], "already queued, so written with the group"


async def test_requests_queued_behind_a_round_trip_the_database_did_not_answer_fail_with_it() -> None:
    """They would otherwise wait one more time limit for their own round trip: with a silent database
    the second group was answered after twice ENCLAVE_GATEWAY_WRITE_TIMEOUT_S (twenty-second session)."""
    collection = FakeCollection()
    collection.unreachable = True
    inserts = GroupedInserts(collection)
    first = asyncio.ensure_future(inserts.insert(docs("a")))
    await asyncio.sleep(0)
    queued = asyncio.ensure_future(inserts.insert(docs("b")))
    await asyncio.sleep(0)
    collection.release.set()
    results = await asyncio.gather(first, queued, return_exceptions=True)
    assert all(isinstance(r, ServerSelectionTimeoutError) for r in results), results
    assert collection.calls == [["a"]], "the queued request was not sent on its own"
