"""``enclave_common.mongo.paged``, the walk of the operators' long commands (ingest scrub, deid
key rotation), against a small in-memory stand-in for a collection; it also runs on FerretDB in
tests/integration (test_ingest.py, test_deid.py)."""

from __future__ import annotations

from typing import Any

import pytest
from enclave_common.mongo import paged


def _matches(doc: dict[str, Any], query: dict[str, Any]) -> bool:
    for field, want in query.items():
        if field == "$and":
            if not all(_matches(doc, q) for q in want):
                return False
        elif isinstance(want, dict) and "$gt" in want:
            if not doc.get(field, "") > want["$gt"]:
                return False
        elif doc.get(field) != want:
            return False
    return True


class _Cursor:
    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self._docs = docs

    def sort(self, field: str, direction: int) -> _Cursor:
        return _Cursor(sorted(self._docs, key=lambda d: d[field], reverse=direction < 0))

    def limit(self, n: int) -> _Cursor:
        return _Cursor(self._docs[:n] if n else self._docs)

    def __aiter__(self):
        async def gen():
            for doc in self._docs:
                yield doc

        return gen()


class _Collection:
    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.docs = docs
        self.queries: list[dict[str, Any]] = []

    def find(self, query: dict[str, Any], projection: dict[str, Any] | None = None) -> _Cursor:
        self.queries.append(query)
        found = [dict(d) for d in self.docs if _matches(d, query)]
        if projection:
            found = [{k: v for k, v in d.items() if k == "_id" or projection.get(k)} for d in found]
        return _Cursor(found)


async def _walk(collection: _Collection, query: dict[str, Any], **options: Any) -> list[str]:
    return [doc["_id"] async for doc in paged(collection, query, **options)]  # type: ignore[arg-type]


async def test_it_walks_every_match_in_id_order_a_page_at_a_time_with_a_fresh_query_each():
    docs = [{"_id": f"t|{i:03d}", "status": "stored" if i % 3 else "failed"} for i in range(25)]
    collection = _Collection(list(reversed(docs)))
    walked = await _walk(collection, {"status": "stored"}, page=4)
    assert walked == [d["_id"] for d in docs if d["status"] == "stored"]
    assert len(collection.queries) == 5  # 16 matches: 4 full pages, then an empty one


async def test_a_callers_own_id_condition_is_kept_on_every_page():
    collection = _Collection([{"_id": f"{i:02d}", "s": 1} for i in range(10)])
    walked = await _walk(collection, {"s": 1, "_id": {"$gt": "03"}}, page=2)
    assert walked == [f"{i:02d}" for i in range(4, 10)]


async def test_updates_during_the_walk_show_no_document_twice():
    collection = _Collection([{"_id": f"{i:02d}", "s": 1, "v": 0} for i in range(7)])
    seen = []
    async for doc in paged(collection, {"s": 1}, page=3):  # type: ignore[arg-type]
        seen.append(doc["_id"])
        for stored in collection.docs:  # as the rotation re-writes each object's version id
            if stored["_id"] == doc["_id"]:
                stored["v"] += 1
    assert seen == [f"{i:02d}" for i in range(7)]


async def test_a_projection_keeps_the_id_and_a_bad_page_or_projection_is_refused():
    collection = _Collection([{"_id": f"{i}", "s": 1, "big": "x"} for i in range(5)])
    assert [d async for d in paged(collection, {"s": 1}, {"s": 1}, page=2)] == [  # type: ignore[arg-type]
        {"_id": f"{i}", "s": 1} for i in range(5)
    ]
    with pytest.raises(ValueError, match="projection must keep it"):
        await _walk(collection, {"s": 1}, projection={"_id": 0, "s": 1})
    with pytest.raises(ValueError, match="at least 1"):
        await _walk(collection, {"s": 1}, page=0)
