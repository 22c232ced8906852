"""An in-memory stand-in for the few pymongo collection calls the deid records and linkage vault make
(equality on dotted paths, ``$exists``/``$lt``/``$gt``/``$ne``, ``$or``/``$and``; ``$set``,
``$unset``, ``$addToSet``, ``$pop``), so their claim logic runs in unit tests without a server."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from pymongo.errors import DuplicateKeyError

_ABSENT = object()


def _get(doc: dict[str, Any], path: str) -> Any:
    value: Any = doc
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def _matches(doc: dict[str, Any], query: dict[str, Any]) -> bool:
    for key, condition in query.items():
        if key == "$or":
            if not any(_matches(doc, q) for q in condition):
                return False
            continue
        if key == "$and":
            if not all(_matches(doc, q) for q in condition):
                return False
            continue
        value = _get(doc, key)
        if isinstance(condition, dict) and condition and all(k.startswith("$") for k in condition):
            for op, operand in condition.items():
                if op == "$exists" and (value is not _ABSENT) != operand:
                    return False
                if op == "$lt" and (value is _ABSENT or not value < operand):
                    return False
                if op == "$gt" and (value is _ABSENT or not value > operand):
                    return False
                if op == "$ne" and value == operand:
                    return False
        elif value is _ABSENT or value != condition:
            return False
    return True


def _apply(doc: dict[str, Any], update: dict[str, Any]) -> None:
    for path, value in update.get("$set", {}).items():
        *parents, last = path.split(".")
        target = doc
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = copy.deepcopy(value)
    for path in update.get("$unset", {}):
        *parents, last = path.split(".")
        target = doc
        for part in parents:
            target = target.get(part, {})
        target.pop(last, None)
    for path, end in update.get("$pop", {}).items():
        items = doc.get(path) or []
        if items:
            items.pop(0 if end < 0 else -1)
    for path, value in update.get("$addToSet", {}).items():
        items = doc.setdefault(path, [])
        if value not in items:
            items.append(copy.deepcopy(value))


@dataclass
class _Result:
    matched_count: int
    modified_count: int = 0
    deleted_count: int = 0


class _Cursor:
    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self._docs = docs

    def sort(self, key: str, direction: int) -> _Cursor:
        self._docs.sort(key=lambda d: d[key], reverse=direction < 0)
        return self

    def limit(self, n: int) -> _Cursor:
        self._docs = self._docs[:n]
        return self

    def __aiter__(self) -> _Cursor:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if not self._docs:
            raise StopAsyncIteration
        return self._docs.pop(0)


class FakeCollection:
    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}

    async def find_one(self, query: dict[str, Any], projection: Any = None) -> dict[str, Any] | None:
        for doc in self.docs.values():
            if _matches(doc, query):
                return copy.deepcopy(doc)
        return None

    def find(self, query: dict[str, Any], projection: Any = None) -> _Cursor:
        return _Cursor([copy.deepcopy(d) for d in self.docs.values() if _matches(d, query)])

    async def insert_one(self, doc: dict[str, Any]) -> None:
        if doc["_id"] in self.docs:
            raise DuplicateKeyError("duplicate _id")
        self.docs[doc["_id"]] = copy.deepcopy(doc)

    async def replace_one(self, query: dict[str, Any], doc: dict[str, Any], upsert: bool = False) -> None:
        self.docs[doc["_id"]] = copy.deepcopy(doc)

    async def update_one(
        self, query: dict[str, Any], update: dict[str, Any], upsert: bool = False
    ) -> _Result:
        for doc in self.docs.values():
            if _matches(doc, query):
                before = copy.deepcopy(doc)
                _apply(doc, update)
                return _Result(1, int(before != doc))
        return _Result(0)

    async def find_one_and_update(
        self, query: dict[str, Any], update: dict[str, Any], return_document: Any = None
    ) -> dict[str, Any] | None:
        for doc in self.docs.values():
            if _matches(doc, query):
                _apply(doc, update)
                return copy.deepcopy(doc)
        return None

    async def delete_one(self, query: dict[str, Any]) -> _Result:
        for key, doc in list(self.docs.items()):
            if _matches(doc, query):
                del self.docs[key]
                return _Result(1, deleted_count=1)
        return _Result(0)


class FakeDatabase(dict[str, FakeCollection]):
    def __missing__(self, name: str) -> FakeCollection:
        self[name] = FakeCollection()
        return self[name]
