"""The auditor API honours token revocations: an admin's ``POST /api/v1/token-revocations`` at the
gateway is recorded in the trail (``tokens_revoked subject=... revoked_before=...``), and the audit
service reads those records into the guard's revoked tokens. Until the twenty-fourth session a revoked
auditor's token still read the whole trail until it expired.

Here: which records count as a revocation, and the real API refusing a revoked token (401 ``revoked``,
recorded ``unauthenticated``) while a token issued after the revocation is answered; the consumer
storing what it honours, once, a redelivery included. On FerretDB: tests/integration/test_audit_privileges.py
(the consumer's store and read) and test_token_revocation.py (end to end)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from enclave_audit.anomaly import AnomalyDetector, AnomalyThresholds, InMemoryAuditHistory
from enclave_audit.api import access_hook, build_router
from enclave_audit.chain import HashChain
from enclave_audit.handlers import AuditConsumer, AuditMetrics
from enclave_audit.records import AuditRecord, record_from_event
from enclave_audit.store import AppendOutcome, to_document
from enclave_audit.token_revocations import revocation_recorded
from enclave_common.auth import RevokedTokens, StaticKeySource, TokenRules, TokenVerifier
from enclave_common.auth.dev_issuer import DEV_AUDIENCE, DEV_ISSUER, DevIssuer
from enclave_common.auth.fastapi import AccessGuard
from enclave_common.auth.token_revocations import InMemoryTokenRevocationStore, TokenRevocation
from enclave_common.kafka import RetryPolicy
from enclave_common.service import ServiceRuntime
from enclave_common.settings import BaseServiceSettings
from prometheus_client import CollectorRegistry

from .conftest import envelope
from .test_audit_access_answers import OPERATOR, Trail, context_over

REVOKED_AT = datetime(2026, 11, 25, 9, 30, 0, 123000, tzinfo=UTC)
SKEW = timedelta(seconds=30)


def revocation_event(
    detail: str | None, *, action: str = "revoke_tokens", status: int = 201, roles: list[str] | None = None
) -> dict[str, Any]:
    data = {
        "actor": "it-admin",
        "roles": roles or ["admin"],
        "action": action,
        "target": None,
        "outcome": "success" if status < 400 else "rejected",
        "status_code": status,
        "source_address": "10.1.2.3",
        "detail": detail,
    }
    return envelope("enclave.access.recorded", data=data, actor="it-admin", source="gateway", tenant=OPERATOR)


def stored(event: dict[str, Any], received_at: datetime = REVOKED_AT) -> dict[str, Any]:
    """The record as the consumer builds it and the store holds it (what the query projects)."""
    record = record_from_event(event, "enclave.access.recorded.v1", received_at=received_at)
    return to_document(HashChain().append(record), "k")


def made(instant: datetime = REVOKED_AT, subject: str = "aud-1") -> str:
    return f"tokens_revoked subject={subject} revoked_before={instant.isoformat()}"


def test_a_recorded_revocation_is_read_with_its_tenant_subject_and_instant() -> None:
    found = revocation_recorded(stored(revocation_event(made())), skew=SKEW)
    assert found == TokenRevocation(OPERATOR, "aud-1", REVOKED_AT, "it-admin", "")
    # A gateway clock up to the skew ahead of audit's is still a revocation.
    ahead = REVOKED_AT + timedelta(seconds=25)
    assert revocation_recorded(stored(revocation_event(made(ahead))), skew=SKEW) is not None


@pytest.mark.parametrize(
    ("detail", "action"),
    [
        # refused by the gateway: nothing revoked
        ("revocation_refused:no_justification subject=aud-1", "revoke_tokens"),
        (None, "revoke_tokens"),  # denied (403) or unauthenticated
        # another change of access
        (f"tokens_revoked subject=aud-1 revoked_before={REVOKED_AT.isoformat()}", "manage_grants"),
        # not what the gateway writes
        ("tokens_revoked subject=aud-1 revoked_before=yesterday", "revoke_tokens"),
        ("tokens_revoked subject=aud-1", "revoke_tokens"),
        (f"tokens_revoked subject=aud 1 revoked_before={REVOKED_AT.isoformat()}", "revoke_tokens"),
    ],
)
def test_a_record_that_revokes_nothing_is_no_revocation(detail: str | None, action: str) -> None:
    assert revocation_recorded(stored(revocation_event(detail, action=action)), skew=SKEW) is None


@pytest.mark.parametrize(
    "event",
    [
        # Not what an admin's revocation the gateway made looks like: what else writes access events
        # (deid, analysis, audit, the operator tools) could send these.
        revocation_event(made(), status=422),
        revocation_event(made(), roles=["auditor"]),
        # An instant after audit recorded the event: it would refuse the subject's future tokens,
        # past the retention (found by the review of the twenty-fourth session's change).
        revocation_event(made(REVOKED_AT + timedelta(days=3650))),
        revocation_event(made(REVOKED_AT + timedelta(seconds=31))),
    ],
)
def test_a_revocation_no_admin_made_at_that_instant_is_not_honoured(event: dict[str, Any]) -> None:
    assert revocation_recorded(stored(event), skew=SKEW) is None


def test_an_event_of_another_type_is_no_revocation() -> None:
    event = revocation_event(made())
    event["type"] = "enclave.security.alert"
    assert revocation_recorded({"envelope": event, "recorded_at": REVOKED_AT}, skew=SKEW) is None


class Recorded:
    """The ``since`` of a TokenRevocationStore, over the revocations read from stored records."""

    def __init__(self, records: Sequence[dict[str, Any]]) -> None:
        self.records = records

    async def since(self, cutoff: datetime) -> Sequence[TokenRevocation]:
        found = [revocation_recorded(r, skew=SKEW) for r in self.records]
        return [r for r in found if r is not None and r.revoked_before > cutoff]


async def test_the_auditor_api_refuses_a_revoked_token_and_answers_a_later_one() -> None:
    issuer = DevIssuer.generate(["ES256"])
    trail = Trail([])
    now = datetime.now(UTC)
    revoked_at = now - timedelta(minutes=5)
    record = stored(revocation_event(made(revoked_at)), received_at=revoked_at)
    revoked = RevokedTokens(Recorded([record]), skew=SKEW)
    await revoked.refresh(now)

    rules = TokenRules(issuer=DEV_ISSUER, audience=DEV_AUDIENCE)
    verifier = TokenVerifier(rules, StaticKeySource.from_jwks(issuer.jwks(), algorithms=rules.algorithms))
    guard = AccessGuard(verifier, revoked_tokens=revoked, on_decision=access_hook(trail))  # type: ignore[arg-type]
    app = ServiceRuntime(BaseServiceSettings(service_name="audit-test")).http_app(
        title="audit", routers=[build_router(context_over(trail), guard)], start_runtime=False
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://audit") as http:

        def token(issued: datetime, subject: str = "aud-1") -> dict[str, str]:
            minted = issuer.mint(subject=subject, tenant=OPERATOR, roles=["auditor"], now=issued)
            return {"Authorization": f"Bearer {minted}"}

        stolen = await http.get("/audit/events", headers=token(now - timedelta(minutes=10)))
        assert stolen.status_code == 401, stolen.text
        assert stolen.json()["detail"]["code"] == "revoked"
        assert trail.recorded[-1]["outcome"] == "unauthenticated" and trail.recorded[-1]["actor"] == "aud-1"
        assert "query" not in trail.log  # nothing was read for it

        other = await http.get("/audit/events", headers=token(now - timedelta(minutes=10), "aud-2"))
        assert other.status_code == 200, other.text
        fresh = await http.get("/audit/events", headers=token(now))
        assert fresh.status_code == 200, fresh.text


class ChainStore:
    """The AuditStore's append: one record per audit key, chained (a redelivery answers the stored one)."""

    def __init__(self) -> None:
        self.chain = HashChain()
        self.by_key: dict[str, AuditRecord] = {}

    async def append(self, draft: Any, key: str) -> AppendOutcome:
        if key in self.by_key:
            return AppendOutcome(self.by_key[key], stored=False)
        self.by_key[key] = self.chain.append(draft)
        return AppendOutcome(self.by_key[key], stored=True)


async def test_the_consumer_stores_what_it_honours_once_a_redelivery_included() -> None:
    revocations = InMemoryTokenRevocationStore()
    consumer = AuditConsumer(
        ChainStore(),  # type: ignore[arg-type]
        Trail([]),  # type: ignore[arg-type] - publishes nothing here: no rule fires
        AnomalyDetector(AnomalyThresholds(), InMemoryAuditHistory()),
        AuditMetrics(CollectorRegistry()),
        RetryPolicy(),
        revocations=revocations,
        skew=SKEW,
    )
    now = datetime.now(UTC)
    honoured = revocation_event(made(now - timedelta(seconds=1)))
    refused = revocation_event(made(now - timedelta(seconds=1), subject="aud-2"), roles=["auditor"])
    refused["id"] = "00000000-0000-0000-0000-0000000000f2"
    for event in (honoured, refused, honoured):  # the last one redelivered
        await consumer.audit(json.dumps(event).encode(), "enclave.access.recorded.v1", {})
    found = await revocations.since(now - timedelta(hours=1))
    assert [(r.tenant, r.subject, r.revoked_by) for r in found] == [(OPERATOR, "aud-1", "it-admin")]
