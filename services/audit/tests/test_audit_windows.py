"""``BucketedAuditHistory`` (the service's anomaly history: minute and hour buckets and ``$max``
documents in ``anomaly_windows``) answers as ``InMemoryAuditHistory`` (the reference over the records)
for the same records, whatever their order of delivery and however often one is delivered.

Until the twenty-third session only the reference was unit-tested for the newer rules; the bucketed one
ran only on the stack.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from enclave_audit.anomaly import InMemoryAuditHistory
from enclave_audit.records import record_from_event
from enclave_audit.windows import BucketedAuditHistory

from .conftest import access

T0 = datetime(2024, 5, 6, 14, 0, tzinfo=UTC)
KEYS = ["a" * 32, "b" * 32, "c" * 32]


class FakeWindows:
    """``anomaly_windows`` as the history uses it: upserts by ``_id`` with ``$max`` and ``$addToSet``."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}

    def update_one(self, query: dict[str, Any], update: dict[str, Any], upsert: bool = False) -> None:
        assert upsert and set(query) == {"_id"}
        doc = self.docs.setdefault(query["_id"], {"_id": query["_id"]})
        for field, value in update.get("$max", {}).items():
            doc[field] = value if field not in doc else max(doc[field], value)
        for field, value in update.get("$addToSet", {}).items():
            items = doc.setdefault(field, [])
            items.extend(v for v in value["$each"] if v not in items)

    def find_one(self, query: dict[str, Any], **_: Any) -> dict[str, Any] | None:
        return self.docs.get(query["_id"])


def _event(n: int, kind: str, *, actor: str, key: str, at: datetime) -> dict[str, Any]:
    action, detail, outcome = {
        "lift": ("manage_restrictions", "restriction_lifted restricted_by=x restricted_at=y", "success"),
        "undo": (
            "manage_restrictions",
            "restriction_not_lifted restricted_by=x cause=restricted_again",
            "rejected",
        ),
        "read": ("read_results_phi", "role", "success"),
        "lookup": ("query_patient_key", "role", "success"),
        "study": ("read_status", "role", "success"),
    }[kind]
    env = access(
        n, actor=actor, action=action, target=f"patient:{key}/study:s{n % 4}", time=at, outcome=outcome
    )
    env["data"]["detail"] = detail
    return env


@pytest.mark.parametrize("seed", range(8))
def test_the_bucketed_history_answers_as_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    events = [
        _event(
            n,
            rng.choice(["lift", "undo", "read", "lookup", "study"]),
            actor=rng.choice(["adm-1", "aud-1"]),
            key=rng.choice(KEYS),
            at=T0 + timedelta(minutes=rng.randrange(0, 48 * 60)),
        )
        for n in range(60)
    ]
    reference, windows = InMemoryAuditHistory(), FakeWindows()
    bucketed = BucketedAuditHistory({"anomaly_windows": windows, "alerts": None})
    delivered = events + rng.sample(events, 10)  # some delivered twice
    rng.shuffle(delivered)
    seen: set[str] = set()
    for env in delivered:
        record = record_from_event(env, "enclave.access.recorded.v1")
        bucketed.observe(record, record.event_id)
        if record.event_id not in seen:  # the trail stores each event once
            seen.add(record.event_id)
            reference.add(record)
    for actor in ("adm-1", "aud-1"):
        for key in KEYS:
            assert bucketed.last_restriction_lift(
                actor=actor, tenant="hospital-a", patient_key=key
            ) == reference.last_restriction_lift(actor=actor, tenant="hospital-a", patient_key=key), (
                actor,
                key,
            )
        for hours in (1, 6, 24):
            # Whole hours: the buckets round a window out to whole hours (minutes for studies).
            until = T0 + timedelta(hours=30)
            since = until - timedelta(hours=hours)
            assert bucketed.count_patient_key_lookups(
                actor=actor, tenant="hospital-a", since=since, until=until - timedelta(microseconds=1)
            ) == reference.count_patient_key_lookups(
                actor=actor, tenant="hospital-a", since=since, until=until - timedelta(microseconds=1)
            ), (actor, hours)
            assert bucketed.count_distinct_studies(
                actor=actor, tenant="hospital-a", since=since, until=until - timedelta(microseconds=1)
            ) == reference.count_distinct_studies(
                actor=actor, tenant="hospital-a", since=since, until=until - timedelta(microseconds=1)
            ), (actor, hours)
