"""Builders of envelopes and chained records for the audit tests (no PHI, deterministic ids), as fixtures."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from enclave_audit.chain import HashChain
from enclave_audit.records import AuditRecord, record_from_event

BASE_TIME = datetime(2024, 5, 6, 14, 0, tzinfo=UTC)


def envelope(
    event_type: str = "enclave.instance.stored",
    *,
    n: int = 0,
    data: dict[str, Any] | None = None,
    actor: str = "svc-ingest",
    source: str = "ingest",
    time: datetime | None = None,
    tenant: str = "hospital-a",
) -> dict[str, Any]:
    return {
        "id": str(uuid.UUID(int=n + 1)),
        "type": event_type,
        "source": source,
        "time": (time or BASE_TIME + timedelta(seconds=n)).isoformat(),
        "schema_version": "1.0",
        "correlation_id": f"upload-{n // 10}",
        "causation_id": None,
        "tenant": tenant,
        "actor": actor,
        "data": data
        if data is not None
        else {"upload_id": f"upload-{n // 10}", "study_key": f"study-{n % 7}"},
    }


def access(
    n: int = 0,
    *,
    actor: str = "dr-who",
    action: str = "retrieve",
    target: str | None = "/studies/study-1",
    outcome: str = "success",
    roles: list[str] | None = None,
    source_address: str | None = "10.1.2.3",
    time: datetime | None = None,
) -> dict[str, Any]:
    data = {
        "actor": actor,
        "roles": roles or ["clinician"],
        "action": action,
        "target": target,
        "outcome": outcome,
        "status_code": 200 if outcome == "success" else 403,
        "source_address": source_address,
    }
    return envelope("enclave.access.recorded", n=n, data=data, actor=actor, source="gateway", time=time)


def chained_records(count: int) -> list[AuditRecord]:
    chain = HashChain()
    return list(iter_chained(chain, count))


def iter_chained(chain: HashChain, count: int, start: int = 0) -> Iterator[AuditRecord]:
    for n in range(start, start + count):
        env = envelope(n=n) if n % 3 else access(n, target=f"/studies/study-{n % 5}")
        topic = "enclave.instance.stored.v1" if n % 3 else "enclave.access.recorded.v1"
        yield chain.append(record_from_event(env, topic, received_at=BASE_TIME + timedelta(seconds=n)))


@pytest.fixture
def make_envelope():
    return envelope


@pytest.fixture
def make_access():
    return access


@pytest.fixture
def make_chain():
    return chained_records
