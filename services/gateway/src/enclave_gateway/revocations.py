"""Revocations that are in effect but not in the audit trail are recorded by the gateway itself.

A grant's revocation is stored before its access event is published, and is not undone when Kafka
refuses the event (a grant back in effect would be worse than a revocation recorded late): the
grant keeps ``revocation_recorded`` False. The grant's next ``DELETE`` records it
(``grants_api``); if nobody repeats the ``DELETE``, this sweep does, once the revocation is older
than the longest its own request may still be publishing it. Each such record names the gateway as
its actor (it is no request of anyone's) and who revoked the grant and when, with ``recorded_late``,
as the ``DELETE`` path does. Two replicas sweeping the same revocation at once, or a sweep and a
repeated ``DELETE``, may record it twice: a duplicate, never a gap.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import structlog
from enclave_common.auth import Action, Grant
from enclave_common.auth.grants import GrantStore
from enclave_common.errors import dependency_failure_types

from enclave_gateway.access import AccessRecorder, access_target
from enclave_gateway.handoff import KafkaUnavailable

log = structlog.get_logger("enclave.gateway")

#: Revocations recorded per round, at most.
SWEEP_BATCH = 100


def late_revocation_detail(grant: Grant) -> str:
    """What the record of a revocation recorded after its request says (the same for the repeated
    ``DELETE`` and the sweep)."""
    assert grant.revoked_at is not None
    return (
        f"grant_revoked:{grant.grant_id} revoked_by={grant.revoked_by}"
        f" revoked_at={grant.revoked_at.isoformat()} recorded_late"
    )


class UnrecordedRevocations:
    """``grace_s``: how old a revocation must be before the sweep records it (longer than a
    ``DELETE`` may take to publish its own event); ``interval_s``: between rounds."""

    def __init__(
        self, grants: GrantStore, recorder: AccessRecorder, *, grace_s: float, interval_s: float
    ) -> None:
        self.grants = grants
        self.recorder = recorder
        self.grace = timedelta(seconds=grace_s)
        self.interval_s = interval_s

    async def sweep_once(self, now: datetime | None = None) -> int:
        """Record the revocations older than the grace that are not in the trail; how many were. A
        refused event (Kafka) or an unanswered store ends the round by raising: the rest wait. Any
        other failure of one grant is logged with its id and the round goes on, so one grant that
        cannot be recorded does not hold back the others."""
        cutoff = (now or datetime.now(UTC)) - self.grace
        recorded = 0
        for grant in await self.grants.unrecorded_revocations(before=cutoff, limit=SWEEP_BATCH):
            try:
                await self._record(grant)
            except (KafkaUnavailable, *dependency_failure_types()):
                raise
            except Exception as exc:
                log.error(
                    "a revocation could not be recorded; it is tried again next round",
                    grant_id=grant.grant_id,
                    error=type(exc).__name__,
                )
                continue
            recorded += 1
        return recorded

    async def _record(self, grant: Grant) -> None:
        await self.recorder.record_own(
            grant.tenant,
            principal=None,
            action=str(Action.MANAGE_GRANTS),
            outcome="success",
            status=200,
            target=access_target(grant.patient_key),
            detail=late_revocation_detail(grant),
        )
        await self.grants.mark_revocation_recorded(grant.grant_id, tenant=grant.tenant)
        log.info("a revocation was recorded late", grant_id=grant.grant_id)

    async def run_forever(self) -> None:
        """A round every ``interval_s``, each bounded: the database client has no operation timeout
        of its own, and a database that accepts and never answers would stop the sweep for good."""
        bound = max(self.interval_s, 2 * self.grace.total_seconds())
        while True:
            try:
                async with asyncio.timeout(bound):
                    await self.sweep_once()
            except Exception as exc:  # Kafka or the database did not answer: the next round retries
                log.warning(
                    "revocations not in the audit trail wait for the next round: Kafka or the database "
                    "did not answer",
                    error=type(exc).__name__,
                )
            await asyncio.sleep(self.interval_s)
