"""Grant and break-glass creation rules, time bounds, revocation, and the stores."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from enclave_common.auth import (
    BREAK_GLASS_ACTIONS,
    DEFAULT_POLICY,
    Action,
    GrantKind,
    InMemoryGrantStore,
    InvalidGrantError,
    Outcome,
    Principal,
    Resource,
    Role,
)
from enclave_common.auth.grants_mongo import active_grants_filter, grant_from_document, grant_to_document

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ADMIN = Principal("root", "hospital-a", frozenset({Role.ADMIN}))
CAREGIVER = Principal("carol", "hospital-a", frozenset({Role.CAREGIVER}))
CLINICIAN = Principal("dr-who", "hospital-a", frozenset({Role.CLINICIAN}))
PATIENT = "pt-91ab"


def new_grant(**overrides: object):  # type: ignore[no-untyped-def]
    values: dict[str, object] = {
        "grantee": "carol",
        "patient_key": PATIENT,
        "actions": [Action.READ_RESULTS_PHI, Action.READ_STATUS],
        "not_before": NOW,
        "expires_at": NOW + timedelta(days=30),
        "justification": "legal guardian, consent form on file",
        "now": NOW,
    }
    admin = overrides.pop("admin", ADMIN)
    values.update(overrides)
    return DEFAULT_POLICY.new_patient_grant(admin, **values)  # type: ignore[arg-type]


def test_admin_creates_a_grant_in_its_own_tenant() -> None:
    grant = new_grant()
    assert grant.kind is GrantKind.PATIENT
    assert (grant.tenant, grant.grantee, grant.created_by) == ("hospital-a", "carol", "root")
    assert grant.actions == {Action.READ_RESULTS_PHI, Action.READ_STATUS}
    assert grant.grant_id != new_grant().grant_id


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"admin": CLINICIAN}, "manage_grants"),
        ({"admin": CAREGIVER}, "manage_grants"),
        ({"grantee": " "}, "grantee"),
        ({"grantee": "root"}, "own creator"),
        ({"patient_key": ""}, "patient_key"),
        ({"actions": []}, "grantable"),
        ({"actions": [Action.READ_RESULTS_DEID]}, "grantable"),
        ({"actions": [Action.READ_LINKAGE]}, "grantable"),
        ({"actions": [Action.MANAGE_KEYS]}, "grantable"),
        ({"expires_at": NOW}, "after not_before"),
        ({"not_before": NOW - timedelta(days=9), "expires_at": NOW - timedelta(days=1)}, "future"),
        ({"expires_at": NOW + timedelta(days=367)}, "at most 366 days; asked for 367 days"),
        ({"not_before": datetime(2026, 3, 1), "expires_at": datetime(2026, 4, 1)}, "timezone"),
        ({"justification": "because"}, "justification"),
        ({"justification": "x" * 501}, "justification"),
        # Found by an API hunt (thirteenth session): each was a 500 when the store wrote it.
        ({"justification": "daughter \ud800 consent form on file"}, "printable"),
        ({"justification": "\x01" * 11}, "printable"),
        (
            {
                "not_before": datetime(9999, 12, 31, tzinfo=timezone(timedelta(hours=-14))),
                "expires_at": datetime(9999, 12, 31, 23, 59, tzinfo=timezone(timedelta(hours=-14))),
            },
            "valid times in UTC",
        ),
        (
            {"not_before": NOW + timedelta(days=400), "expires_at": NOW + timedelta(days=401)},
            "not_before may be at most 366 days from now",
        ),
    ],
)
def test_invalid_grants_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidGrantError, match=message):
        new_grant(**overrides)


def test_grantable_actions_are_the_tables_grant_cells() -> None:
    assert DEFAULT_POLICY.grantable_actions == {
        Action.READ_STATUS,
        Action.READ_RESULTS_PHI,
        Action.QUERY_PATIENT,
    }
    new_grant(actions=list(DEFAULT_POLICY.grantable_actions))


def test_grant_window_bounds() -> None:
    grant = new_grant(not_before=NOW + timedelta(hours=1), expires_at=NOW + timedelta(hours=5))
    assert not grant.is_active(NOW + timedelta(minutes=59, seconds=59))
    assert grant.is_active(NOW + timedelta(hours=1))
    assert grant.is_active(NOW + timedelta(hours=4, minutes=59, seconds=59))
    assert not grant.is_active(NOW + timedelta(hours=5))


async def test_grant_enforced_through_the_store_only_while_active() -> None:
    store = InMemoryGrantStore()
    grant = new_grant(not_before=NOW + timedelta(hours=1), expires_at=NOW + timedelta(hours=5))
    await store.create(grant)
    resource = Resource("hospital-a", PATIENT)

    async def outcome(at: datetime, action: Action = Action.READ_RESULTS_PHI) -> Outcome:
        return (await DEFAULT_POLICY.authorize(CAREGIVER, action, resource, store, at)).outcome

    assert await outcome(NOW) is Outcome.NOT_FOUND
    assert await outcome(NOW + timedelta(hours=2)) is Outcome.ALLOW
    assert await outcome(NOW + timedelta(hours=2), Action.QUERY_PATIENT) is Outcome.NOT_FOUND
    assert await outcome(NOW + timedelta(hours=5)) is Outcome.NOT_FOUND

    assert not await store.revoke(grant.grant_id, tenant="hospital-b", revoked_by="x", now=NOW)
    assert await store.revoke(
        grant.grant_id, tenant="hospital-a", revoked_by="root", now=NOW + timedelta(hours=3)
    )
    assert not await store.revoke(
        grant.grant_id, tenant="hospital-a", revoked_by="root", now=NOW + timedelta(hours=3)
    )
    assert await outcome(NOW + timedelta(hours=2)) is Outcome.ALLOW, "revocation is not retroactive"
    assert await outcome(NOW + timedelta(hours=3)) is Outcome.NOT_FOUND
    revoked = await store.get(grant.grant_id, tenant="hospital-a")
    assert revoked is not None
    assert revoked.revoked_by == "root"
    assert await store.get(grant.grant_id, tenant="hospital-b") is None


async def test_store_refuses_duplicate_ids_and_scopes_lookups() -> None:
    store = InMemoryGrantStore()
    grant = new_grant()
    await store.create(grant)
    with pytest.raises(ValueError, match="unique"):
        await store.create(grant)
    assert await store.active_for("carol", "hospital-a", PATIENT, NOW) == [grant]
    assert await store.active_for("carol", "hospital-b", PATIENT, NOW) == []
    assert await store.active_for("carol", "hospital-a", "pt-other", NOW) == []
    assert await store.active_for("mallory", "hospital-a", PATIENT, NOW) == []


def test_break_glass_session_rules() -> None:
    session = DEFAULT_POLICY.open_break_glass(
        CLINICIAN, patient_key=PATIENT, justification="unconscious patient in the emergency room", now=NOW
    )
    assert session.kind is GrantKind.BREAK_GLASS
    assert (session.grantee, session.created_by, session.tenant) == ("dr-who", "dr-who", "hospital-a")
    assert session.actions == BREAK_GLASS_ACTIONS
    assert session.expires_at - session.not_before == timedelta(hours=1)
    assert session.is_active(NOW + timedelta(minutes=59))
    assert not session.is_active(NOW + timedelta(hours=1))

    for who in (ADMIN, CAREGIVER, Principal("r", "hospital-a", frozenset({Role.RESEARCHER}))):
        with pytest.raises(InvalidGrantError, match="break-glass"):
            DEFAULT_POLICY.open_break_glass(
                who, patient_key=PATIENT, justification="emergency access", now=NOW
            )
    with pytest.raises(InvalidGrantError, match="at most"):
        DEFAULT_POLICY.open_break_glass(
            CLINICIAN,
            patient_key=PATIENT,
            justification="emergency access",
            now=NOW,
            duration=timedelta(hours=5),
        )
    with pytest.raises(InvalidGrantError, match="after"):
        DEFAULT_POLICY.open_break_glass(
            CLINICIAN, patient_key=PATIENT, justification="emergency access", now=NOW, duration=timedelta(0)
        )
    with pytest.raises(InvalidGrantError, match="justification"):
        DEFAULT_POLICY.open_break_glass(CLINICIAN, patient_key=PATIENT, justification="  urgent ", now=NOW)


def test_mongo_document_round_trip_restores_timezones() -> None:
    grant = new_grant()
    doc = grant_to_document(grant)
    assert doc["_id"] == grant.grant_id
    assert all("." not in key and not key.startswith("$") for key in doc)
    naive = {k: (v.replace(tzinfo=None) if isinstance(v, datetime) else v) for k, v in doc.items()}
    assert grant_from_document(naive) == grant
    assert grant_from_document(doc) == grant
    # A grant revoked before revocation_recorded existed: its revocation is taken as recorded.
    older = {k: v for k, v in doc.items() if k != "revocation_recorded"} | {
        "revoked_at": NOW,
        "revoked_by": "root",
    }
    assert grant_from_document(older).revocation_recorded is True


def test_mongo_active_filter_scopes_by_tenant_subject_patient_and_time() -> None:
    query = active_grants_filter("carol", "hospital-a", PATIENT, NOW)
    assert query == {
        "tenant": "hospital-a",
        "grantee": "carol",
        "patient_key": PATIENT,
        "not_before": {"$lte": NOW},
        "expires_at": {"$gt": NOW},
    }


class FakeCollection:
    """Just enough of pymongo's async collection for MongoGrantStore: equality (None matches a
    missing or null field, as in MongoDB), $lte and $gt. The real server is the integration suite's."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, object]] = {}
        self.indexes: list[object] = []

    @staticmethod
    def _matches(doc: dict[str, object], query: dict[str, object]) -> bool:
        for key, want in query.items():
            have = doc.get(key)
            if isinstance(want, dict):
                if "$lte" in want and not (have is not None and have <= want["$lte"]):  # type: ignore[operator]
                    return False
                if "$gt" in want and not (have is not None and have > want["$gt"]):  # type: ignore[operator]
                    return False
            elif have != want:
                return False
        return True

    async def create_index(self, keys: object, name: str) -> str:
        self.indexes.append(keys)
        return name

    async def insert_one(self, doc: dict[str, object]) -> None:
        from pymongo.errors import DuplicateKeyError

        if doc["_id"] in self.docs:
            raise DuplicateKeyError("E11000")
        self.docs[str(doc["_id"])] = {
            k: (v.replace(tzinfo=None) if isinstance(v, datetime) else v) for k, v in doc.items()
        }

    async def find_one(self, query: dict[str, object]) -> dict[str, object] | None:
        return next((d for d in self.docs.values() if self._matches(d, query)), None)

    async def update_one(self, query: dict[str, object], update: dict[str, dict[str, object]]):  # type: ignore[no-untyped-def]
        class Result:
            modified_count = 0

        doc = await self.find_one(query)
        if doc is not None:
            doc.update(
                {
                    k: (v.replace(tzinfo=None) if isinstance(v, datetime) else v)
                    for k, v in update["$set"].items()
                }
            )
            Result.modified_count = 1
        return Result()

    def find(self, query: dict[str, object]):  # type: ignore[no-untyped-def]
        # Stored dates are naive UTC like pymongo's default codec; compare them naive too.
        naive = {
            k: ({op: x.replace(tzinfo=None) for op, x in v.items()} if isinstance(v, dict) else v)
            for k, v in query.items()
        }
        matching = [d for d in self.docs.values() if self._matches(d, naive)]

        async def cursor():  # type: ignore[no-untyped-def]
            for d in matching:
                yield d

        return cursor()


async def test_mongo_store_against_a_fake_collection() -> None:
    from enclave_common.auth.grants_mongo import MongoGrantStore

    collection = FakeCollection()
    store = MongoGrantStore({"grants": collection})  # type: ignore[arg-type]
    await store.ensure_indexes()
    assert collection.indexes == [
        [("tenant", 1), ("grantee", 1), ("patient_key", 1)],
        [("tenant", 1), ("_id", 1)],
        [("tenant", 1), ("patient_key", 1)],
        [("revocation_recorded", 1), ("revoked_at", 1)],
    ]
    grant = new_grant(not_before=NOW + timedelta(hours=1), expires_at=NOW + timedelta(hours=5))
    await store.create(grant)
    with pytest.raises(ValueError, match="unique"):
        await store.create(grant)
    assert await store.active_for("carol", "hospital-a", PATIENT, NOW) == []
    assert await store.active_for("carol", "hospital-a", PATIENT, NOW + timedelta(hours=1)) == [grant]
    assert await store.active_for("carol", "hospital-b", PATIENT, NOW + timedelta(hours=2)) == []
    assert await store.active_for("carol", "hospital-a", PATIENT, NOW + timedelta(hours=5)) == []
    assert await store.get(grant.grant_id, tenant="hospital-b") is None
    assert not await store.revoke(grant.grant_id, tenant="hospital-b", revoked_by="x", now=NOW)
    assert await store.revoke(
        grant.grant_id, tenant="hospital-a", revoked_by="root", now=NOW + timedelta(hours=2)
    )
    assert not await store.revoke(
        grant.grant_id, tenant="hospital-a", revoked_by="root", now=NOW + timedelta(hours=2)
    )
    assert await store.active_for("carol", "hospital-a", PATIENT, NOW + timedelta(hours=3)) == []
    assert len(await store.active_for("carol", "hospital-a", PATIENT, NOW + timedelta(hours=1))) == 1, (
        "revocation is not retroactive, as in the in-memory store"
    )
    stored = await store.get(grant.grant_id, tenant="hospital-a")
    assert stored is not None
    assert stored.revoked_at == NOW + timedelta(hours=2)
    assert stored.revoked_at.tzinfo is not None
    assert stored.revocation_recorded is False  # until its access event is acknowledged
    await store.mark_revocation_recorded(grant.grant_id, tenant="hospital-b")  # another tenant's: no-op
    assert (await store.get(grant.grant_id, tenant="hospital-a")).revocation_recorded is False  # type: ignore[union-attr]
    await store.mark_revocation_recorded(grant.grant_id, tenant="hospital-a")
    assert (await store.get(grant.grant_id, tenant="hospital-a")).revocation_recorded is True  # type: ignore[union-attr]


def test_the_listing_filter_selects_what_grant_query_selects() -> None:
    """The MongoDB filter of ``GrantQuery`` against a fake collection's matcher, for grants in every state
    (equality and range operators only, as FerretDB v1 evaluates them)."""
    from enclave_common.auth import GrantQuery
    from enclave_common.auth.grants_mongo import grant_query_filter

    hour = timedelta(hours=1)
    made = NOW - 3 * hour
    grants = [
        new_grant(not_before=NOW - hour, expires_at=NOW + hour, now=made),  # in effect
        new_grant(not_before=NOW + hour, expires_at=NOW + 2 * hour, now=made),  # later
        new_grant(not_before=NOW - 2 * hour, expires_at=NOW, now=made),  # expired (its window ends at NOW)
        replace(
            new_grant(not_before=NOW - hour, expires_at=NOW + hour, now=made),
            revoked_at=NOW - hour,
            revoked_by="x",
        ),
    ]
    grants = [replace(g, grant_id=f"g{n}") for n, g in enumerate(grants)]
    docs = {g.grant_id: grant_to_document(g) for g in grants}
    naive = {
        k: {f: (v.replace(tzinfo=None) if isinstance(v, datetime) else v) for f, v in d.items()}
        for k, d in docs.items()
    }
    for query in (GrantQuery(), GrantQuery(active_at=NOW), GrantQuery(unexpired_at=NOW)):
        mongo_filter = {
            k: ({op: x.replace(tzinfo=None) for op, x in v.items()} if isinstance(v, dict) else v)
            for k, v in grant_query_filter("hospital-a", query, None).items()
        }
        by_filter = sorted(k for k, d in naive.items() if FakeCollection._matches(d, mongo_filter))
        assert by_filter == sorted(g.grant_id for g in grants if query.selects(g)), query
    assert [g.grant_id for g in grants if GrantQuery(active_at=NOW).selects(g)] == ["g0"]
    assert [g.grant_id for g in grants if GrantQuery(unexpired_at=NOW).selects(g)] == ["g0", "g1"]
