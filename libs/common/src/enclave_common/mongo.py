"""The database client as the services and their commands open it (no I/O until first used)."""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient

from enclave_common.settings import BaseServiceSettings


def mongo_client(settings: BaseServiceSettings, **options: Any) -> AsyncMongoClient[dict[str, Any]]:
    """Timezone-aware dates, and a database that does not answer fails within 5 s instead of
    pymongo's 30 (a request answers 503, a command stops)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        settings.mongo_url.get_secret_value(), tz_aware=True, serverSelectionTimeoutMS=5000, **options
    )
    return client
