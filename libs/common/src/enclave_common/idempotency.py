"""The idempotency guard: which event ids a service has already fully processed.

Stored in the service's own MongoDB database, one document per event id, with ``_id`` as the
event id (MongoDB's unique index on ``_id`` rejects a second insert). A consumer marks an id only
after the handler's effects are durable and then commits the Kafka offset; a crash in between
makes Kafka redeliver, the guard says "not yet processed", and the idempotent handler runs again.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol

from pymongo.errors import DuplicateKeyError


class ProcessedEvents(Protocol):
    async def seen(self, event_id: str) -> bool: ...

    async def mark(self, event_id: str, topic: str) -> None: ...


class MongoProcessedEvents:
    """Guard backed by a collection in the service's own database."""

    def __init__(self, database: Any, collection: str = "processed_events") -> None:
        self._collection = database[collection]

    async def seen(self, event_id: str) -> bool:
        return await self._collection.find_one({"_id": event_id}, projection={"_id": 1}) is not None

    async def mark(self, event_id: str, topic: str) -> None:
        try:
            await self._collection.insert_one({"_id": event_id, "topic": topic, "at": datetime.now(UTC)})
        except DuplicateKeyError:
            return


class InMemoryProcessedEvents:
    """For unit tests only: forgets everything on restart."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}

    async def seen(self, event_id: str) -> bool:
        return event_id in self.ids

    async def mark(self, event_id: str, topic: str) -> None:
        self.ids.setdefault(event_id, topic)


class IdempotentByBusinessKey:
    """No event-id guard, for a consumer whose every write is idempotent by its business key (the
    gateway's read model: one update per event whose result does not depend on repetition or order).

    A redelivered event then changes nothing by itself, and the guard's read before and write after
    every event (two database commands, where the handler's own work is one) buy nothing. ``seen``
    is always False and ``mark`` does nothing; use it only with such handlers.
    """

    async def seen(self, event_id: str) -> bool:
        return False

    async def mark(self, event_id: str, topic: str) -> None:
        return None
