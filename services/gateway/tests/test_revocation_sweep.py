"""A revocation in effect but not in the audit trail (Kafka refused its event, and nobody repeated the
DELETE) is recorded by the gateway's own sweep, once older than its request's publish could take."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from enclave_common import topics
from enclave_common.auth import Action, Grant, GrantKind
from enclave_common.auth.grants import InMemoryGrantStore
from enclave_gateway.access import GATEWAY_ACTOR, AccessRecorder
from enclave_gateway.handoff import Handoff
from enclave_gateway.revocations import UnrecordedRevocations
from route_harness import AckingPublisher
from test_unaudited_grants import Refusing

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
GRACE_S = 60.0


def grant(grant_id: str, tenant: str = "hospital-a") -> Grant:
    return Grant(
        grant_id=grant_id,
        kind=GrantKind.PATIENT,
        grantee="carol",
        tenant=tenant,
        patient_key="pk-" + grant_id,
        actions=frozenset({Action.READ_STATUS}),
        not_before=NOW - timedelta(days=1),
        expires_at=NOW + timedelta(days=1),
        justification="daughter, consent on file",
        created_by="root",
        created_at=NOW - timedelta(days=1),
    )


async def revoked(store: InMemoryGrantStore, grant_id: str, at: datetime, tenant: str = "hospital-a") -> None:
    await store.create(grant(grant_id, tenant))
    assert await store.revoke(grant_id, tenant=tenant, revoked_by="admin-" + grant_id, now=at)


def sweeper(store: InMemoryGrantStore, publisher: Any) -> UnrecordedRevocations:
    return UnrecordedRevocations(
        store, AccessRecorder(Handoff(publisher, timeout_s=5)), grace_s=GRACE_S, interval_s=1
    )


async def test_old_unrecorded_revocations_are_recorded_by_the_gateway_and_noted() -> None:
    store = InMemoryGrantStore()
    await revoked(store, "old-a", NOW - timedelta(minutes=5))
    await revoked(store, "old-b", NOW - timedelta(minutes=2), tenant="hospital-b")
    await revoked(store, "recent", NOW - timedelta(seconds=GRACE_S / 2))  # its DELETE may still publish
    await revoked(store, "recorded", NOW - timedelta(minutes=9))
    await store.mark_revocation_recorded("recorded", tenant="hospital-a")
    await store.create(grant("active"))
    publisher = AckingPublisher()

    assert await sweeper(store, publisher).sweep_once(NOW) == 2
    events = [(t, e) for t, e in publisher.sent]
    assert [t for t, _ in events] == [topics.ACCESS_RECORDED] * 2
    (_, first), (_, second) = events
    assert (first.tenant, second.tenant) == ("hospital-a", "hospital-b")
    assert first.actor == GATEWAY_ACTOR
    assert first.data == {
        "actor": GATEWAY_ACTOR,
        "roles": [],
        "action": "manage_grants",
        "target": "patient:pk-old-a",
        "outcome": "success",
        "status_code": 200,
        "source_address": None,
        "detail": f"grant_revoked:old-a revoked_by=admin-old-a revoked_at={(NOW - timedelta(minutes=5)).isoformat()}"
        " recorded_late",
    }
    for grant_id, tenant in (("old-a", "hospital-a"), ("old-b", "hospital-b")):
        assert (await store.get(grant_id, tenant=tenant)).revocation_recorded is True  # type: ignore[union-attr]
    assert (await store.get("recent", tenant="hospital-a")).revocation_recorded is False  # type: ignore[union-attr]
    assert await sweeper(store, publisher).sweep_once(NOW) == 0  # nothing is recorded twice


async def test_a_refused_record_leaves_the_revocation_for_the_next_round() -> None:
    store = InMemoryGrantStore()
    await revoked(store, "old", NOW - timedelta(minutes=5))
    publisher = AckingPublisher()
    with pytest.raises(Exception, match="Kafka|leader|unavailable"):
        await sweeper(store, Refusing(publisher, topics.ACCESS_RECORDED, times=1)).sweep_once(NOW)
    assert (await store.get("old", tenant="hospital-a")).revocation_recorded is False  # type: ignore[union-attr]
    assert await sweeper(store, publisher).sweep_once(NOW) == 1
    assert (await store.get("old", tenant="hospital-a")).revocation_recorded is True  # type: ignore[union-attr]


async def test_a_grant_that_cannot_be_recorded_does_not_hold_back_the_others() -> None:
    """A failure of one grant that is neither Kafka nor the database (its event does not build, say)
    is logged with the grant's id, and the round goes on with the next."""
    store = InMemoryGrantStore()
    await revoked(store, "broken", NOW - timedelta(minutes=9))
    await revoked(store, "fine", NOW - timedelta(minutes=5))
    publisher = AckingPublisher()
    sweep = sweeper(store, publisher)
    real = sweep._record

    async def record(grant: Grant) -> None:
        if grant.grant_id == "broken":
            raise ValueError("an event that does not build")
        await real(grant)

    sweep._record = record  # type: ignore[method-assign]
    assert await sweep.sweep_once(NOW) == 1
    assert (await store.get("fine", tenant="hospital-a")).revocation_recorded is True  # type: ignore[union-attr]
    assert (await store.get("broken", tenant="hospital-a")).revocation_recorded is False  # type: ignore[union-attr]


async def test_a_database_that_never_answers_does_not_stop_the_sweep() -> None:
    """Each round is bounded: the database client has no operation timeout of its own."""
    calls = 0

    class Silent(InMemoryGrantStore):
        async def unrecorded_revocations(self, *, before: datetime, limit: int) -> list[Grant]:
            nonlocal calls
            calls += 1
            await asyncio.sleep(3600)
            return []

    sweep = UnrecordedRevocations(
        Silent(), AccessRecorder(Handoff(AckingPublisher(), timeout_s=5)), grace_s=0.05, interval_s=0.05
    )  # type: ignore[arg-type]
    task = asyncio.create_task(sweep.run_forever())
    await asyncio.sleep(0.6)
    task.cancel()
    assert calls >= 2
