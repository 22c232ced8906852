"""``MongoGrantStore`` on the stack's FerretDB, against ``InMemoryGrantStore`` as the reference.

The same grants, in every state (in effect, beginning later, expired, revoked before, at and after
the instants asked about; patient grants and break-glass sessions; two tenants), go into both stores;
every lookup the gateway makes is then asked of both at instants on and around each window's edges,
and the answers must be the same. Until the twenty-third session the MongoDB store ran only against
a fake collection in unit tests (docs/access.md, "Not covered yet"): FerretDB's own reading of
``{"revoked_at": None}``, of range operators on dates and of ``$gt`` on ``_id`` was never checked.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from enclave_common.auth import (
    DEFAULT_POLICY,
    Action,
    Grant,
    GrantKind,
    GrantQuery,
    InMemoryGrantStore,
    Principal,
    Role,
)
from enclave_common.auth.grants_mongo import MongoGrantStore

HOUR = timedelta(hours=1)
#: A millisecond instant: the database keeps dates to the millisecond.
NOW = datetime.now(UTC).replace(microsecond=0) + timedelta(milliseconds=250)
PATIENTS = ("pk-a", "pk-b")
REASON = "legal guardian, consent form on file"


def _principal(subject: str, tenant: str, role: Role) -> Principal:
    return Principal(subject=subject, tenant=tenant, roles=frozenset({role}))


def _grants() -> list[Grant]:
    """Grants and sessions in every state the lookups tell apart, in two tenants."""
    made = NOW - 10 * HOUR
    windows = [
        (NOW - HOUR, NOW + HOUR),  # in effect
        (NOW + HOUR, NOW + 2 * HOUR),  # begins later
        (NOW - 2 * HOUR, NOW),  # its window ends at NOW
        (NOW, NOW + timedelta(milliseconds=1)),  # one millisecond long, beginning at NOW
    ]
    revocations = [None, NOW - HOUR, NOW, NOW + HOUR]
    grants: list[Grant] = []
    for tenant in ("hospital-a", "hospital-b"):
        admin = _principal("root", tenant, Role.ADMIN)
        clinician = _principal("dr-b", tenant, Role.CLINICIAN)
        for n, ((begins, ends), revoked, patient, grantee) in enumerate(
            (w, r, p, g) for w in windows for r in revocations for p in PATIENTS for g in ("carol", "dave")
        ):
            if n % 3 == 0:
                grant = DEFAULT_POLICY.open_break_glass(
                    clinician,
                    patient_key=patient,
                    justification="unconscious patient in the emergency room",
                    now=begins,
                    duration=ends - begins,
                )
            else:
                grant = DEFAULT_POLICY.new_patient_grant(
                    admin,
                    grantee=grantee,
                    patient_key=patient,
                    actions=[Action.READ_RESULTS_PHI],
                    not_before=begins,
                    expires_at=ends,
                    justification=REASON,
                    now=min(made, begins),
                )
            if revoked is not None:
                grant = replace(grant, revoked_at=revoked, revoked_by="root", revocation_recorded=n % 2 == 0)
            grants.append(grant)
    return grants


def _ids(grants: Sequence[Grant]) -> list[str]:
    return [g.grant_id for g in grants]


async def test_the_mongo_grant_store_answers_as_the_reference_store_on_ferretdb(mongo) -> None:
    database = mongo[f"it_grants_{uuid.uuid4().hex[:8]}"]
    stored = MongoGrantStore(database, read_timeout_s=10)
    reference = InMemoryGrantStore()
    grants = _grants()
    try:
        await stored.ensure_indexes()
        for grant in grants:
            for store in (stored, reference):
                await store.create(grant)

        # Every grant reads back whole, tz-aware, and only in its own tenant.
        for grant in grants:
            assert await stored.get(grant.grant_id, tenant=grant.tenant) == grant
            other = "hospital-b" if grant.tenant == "hospital-a" else "hospital-a"
            assert await stored.get(grant.grant_id, tenant=other) is None

        instants = [NOW + d for d in (-2 * HOUR, -HOUR, -timedelta(milliseconds=1), timedelta(0))] + [
            NOW + d for d in (timedelta(milliseconds=1), HOUR, 2 * HOUR)
        ]
        subjects = ("carol", "dave", "dr-b", "nobody")
        looked_up = 0
        for at in instants:
            for tenant in ("hospital-a", "hospital-b"):
                for subject in subjects:
                    for patient in (*PATIENTS, "pk-none"):
                        mine = await stored.active_for(subject, tenant, patient, at)
                        expected = await reference.active_for(subject, tenant, patient, at)
                        assert sorted(_ids(mine)) == sorted(_ids(expected)), (
                            at - NOW,
                            tenant,
                            subject,
                            patient,
                        )
                        looked_up += len(expected)
                queries = [
                    GrantQuery(),
                    GrantQuery(active_at=at),
                    GrantQuery(unexpired_at=at),
                    GrantQuery(kind=GrantKind.BREAK_GLASS, active_at=at),
                    GrantQuery(kind=GrantKind.PATIENT, grantee="carol", unexpired_at=at),
                    GrantQuery(patient_key="pk-b", active_at=at, unexpired_at=at),
                ]
                for query in queries:
                    everything = await reference.list(tenant, query, limit=10_000)
                    assert _ids(await stored.list(tenant, query, limit=10_000)) == _ids(everything), query
                    # Paged by grant id, three at a time, the same pages.
                    pages: list[str] = []
                    after: str | None = None
                    while page := await stored.list(tenant, query, limit=3, after=after):
                        pages += _ids(page)
                        after = page[-1].grant_id
                        assert len(pages) <= len(everything), ("pages repeat", query)
                    assert pages == _ids(everything), query
        assert looked_up > 0, "some lookups must find grants, or the comparison says nothing"

        # The revocation sweep: unrecorded revocations before an instant, across tenants, oldest first
        # (revocations at the same instant in any order).
        for before in (NOW - HOUR, NOW, NOW + timedelta(milliseconds=1), NOW + 2 * HOUR):
            swept = await stored.unrecorded_revocations(before=before, limit=1000)
            expected = await reference.unrecorded_revocations(before=before, limit=1000)
            assert sorted(_ids(swept)) == sorted(_ids(expected)), before - NOW
            times = [g.revoked_at for g in swept]
            assert times == sorted(times)  # type: ignore[type-var]
        assert await stored.unrecorded_revocations(before=NOW + 2 * HOUR, limit=1000), "it must find some"

        # A revocation: once, in its tenant only, effective from its instant (not retroactive).
        live = next(
            g for g in grants if g.revoked_at is None and g.tenant == "hospital-a" and g.is_active(NOW)
        )
        for store in (stored, reference):
            assert not await store.revoke(live.grant_id, tenant="hospital-b", revoked_by="x", now=NOW)
            assert await store.revoke(live.grant_id, tenant="hospital-a", revoked_by="root", now=NOW)
            assert not await store.revoke(live.grant_id, tenant="hospital-a", revoked_by="root", now=NOW)
        revoked = await stored.get(live.grant_id, tenant="hospital-a")
        assert revoked == await reference.get(live.grant_id, tenant="hospital-a")
        assert revoked is not None and (revoked.revoked_at, revoked.revocation_recorded) == (NOW, False)
        before = NOW - timedelta(milliseconds=1)
        assert live.grant_id in _ids(
            await stored.active_for(live.grantee, "hospital-a", live.patient_key, before)
        )
        assert live.grant_id not in _ids(
            await stored.active_for(live.grantee, "hospital-a", live.patient_key, NOW)
        )
        await stored.mark_revocation_recorded(live.grant_id, tenant="hospital-b")  # another tenant's: no-op
        assert (await stored.get(live.grant_id, tenant="hospital-a")).revocation_recorded is False  # type: ignore[union-attr]
        await stored.mark_revocation_recorded(live.grant_id, tenant="hospital-a")
        assert (await stored.get(live.grant_id, tenant="hospital-a")).revocation_recorded is True  # type: ignore[union-attr]
    finally:
        await mongo.drop_database(database.name)
