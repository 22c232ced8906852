"""The database client as the services and their commands open it (no I/O until first used), and
the paged walk their long-running commands use."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection

from enclave_common.settings import BaseServiceSettings


def mongo_client(settings: BaseServiceSettings, **options: Any) -> AsyncMongoClient[dict[str, Any]]:
    """Timezone-aware dates, and a database that does not answer fails within 5 s instead of
    pymongo's 30 (a request answers 503, a command stops)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        settings.mongo_url.get_secret_value(), tz_aware=True, serverSelectionTimeoutMS=5000, **options
    )
    return client


async def paged(
    collection: AsyncCollection[dict[str, Any]],
    query: Mapping[str, Any],
    projection: Mapping[str, Any] | None = None,
    *,
    page: int = 100,
) -> AsyncIterator[dict[str, Any]]:
    """Every document matching ``query``, in ``_id`` order, read ``page`` at a time with a fresh
    query each: a command may take hours over them (reading, re-writing or decrypting an object per
    document) without a server cursor timing out under it, and memory holds one page. A document is
    seen at most once even if it is updated meanwhile; one that starts matching during the walk is
    missed if its ``_id`` sorts before the walk's position (run the command again)."""
    if page < 1:
        raise ValueError("page must be at least 1")
    if projection is not None and not projection.get("_id", True):
        raise ValueError("the walk resumes after the last _id: the projection must keep it")
    after: Any = None
    while True:
        filter_ = dict(query) if after is None else {"$and": [dict(query), {"_id": {"$gt": after}}]}
        docs = [doc async for doc in collection.find(filter_, projection).sort("_id", 1).limit(page)]
        for doc in docs:
            yield doc
        if len(docs) < page:
            return
        after = docs[-1]["_id"]
