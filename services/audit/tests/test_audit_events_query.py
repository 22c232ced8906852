"""``GET /audit/events`` through real HTTP requests and the real guard, over a store kept in a list:
cursors, the tenant filter and the time range (found by a review, each answered wrongly before)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from enclave_audit.api import AuditApiContext, build_router
from enclave_audit.chain import HashChain
from enclave_audit.fhir import FHIR_JSON
from enclave_audit.records import AuditRecord, record_from_event
from enclave_audit.store import MAX_SEQUENCE, CursorError, EventQuery, decode_cursor, encode_cursor
from enclave_common.auth import StaticKeySource, TokenRules, TokenVerifier
from enclave_common.auth.dev_issuer import DEV_AUDIENCE, DEV_ISSUER, DevIssuer
from enclave_common.auth.fastapi import AccessGuard
from fastapi import FastAPI

from .conftest import access, envelope

OPERATOR = "enclave-operator"
PLANTED = "PHIMARKER JANE DOE"
#: Two records a day apart per hospital: 2026-11-22T10:00Z and 2026-11-23T10:00Z.
DAY = datetime(2026, 11, 23, tzinfo=UTC)


class ListStore:
    """``AuditStore.query`` over a list, with the filters these tests use (tenant, outcome, actor,
    action, times, cursor, and those :meth:`EventQuery.matches` checks)."""

    def __init__(self, records: list[AuditRecord]) -> None:
        self.records = records
        self.queries: list[EventQuery] = []

    async def query(
        self, query: EventQuery, limit: int, *, timeout_s: float | None = None
    ) -> list[AuditRecord]:
        self.queries.append(query)

        def keep(r: AuditRecord) -> bool:
            after = query.after_sequence
            return (
                query.tenant in (None, r.tenant)
                and query.outcome in (None, int(r.outcome))
                and query.actor in (None, r.actor)
                and query.action in (None, r.action.value)
                and (query.since is None or r.event_time >= query.since)
                and (query.until is None or r.event_time < query.until)
                and (after is None or (r.sequence > after if query.order == "asc" else r.sequence < after))
            )

        found = sorted(
            (r for r in self.records if keep(r) and query.matches(r)),
            key=lambda r: r.sequence,
            reverse=query.order == "desc",
        )
        return found[:limit]


def _records() -> list[AuditRecord]:
    chain = HashChain()
    return [
        chain.append(
            record_from_event(
                envelope(n=n, tenant=tenant, time=DAY + timedelta(days=day - 1, hours=10)),
                "enclave.instance.stored.v1",
            )
        )
        for n, (tenant, day) in enumerate(
            [("hospital-a", 0), ("hospital-b", 0), ("hospital-a", 1), ("hospital-b", 1)]
        )
    ]


def _context(store: ListStore) -> AuditApiContext:
    """What the routes need, over ``store``; nothing else is reached by these tests."""
    return AuditApiContext(
        store=store,  # type: ignore[arg-type]
        reader=SimpleNamespace(),  # type: ignore[arg-type]
        objects=SimpleNamespace(),  # type: ignore[arg-type]
        bucket="worm",
        metrics=SimpleNamespace(),  # type: ignore[arg-type]
        operator_tenant=OPERATOR,
        default_page_size=10,
        max_page_size=10,
    )


@pytest.fixture(scope="module")
def issuer() -> DevIssuer:
    return DevIssuer.generate(["ES256"])


@pytest.fixture
def store() -> ListStore:
    return ListStore(_records())


@pytest.fixture
async def client(issuer: DevIssuer, store: ListStore):
    rules = TokenRules(issuer=DEV_ISSUER, audience=DEV_AUDIENCE)
    verifier = TokenVerifier(rules, StaticKeySource.from_jwks(issuer.jwks(), algorithms=rules.algorithms))

    async def on_decision(*_: Any) -> None:
        return None

    ctx = _context(store)
    app = FastAPI()
    app.include_router(build_router(ctx, AccessGuard(verifier, on_decision=on_decision)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://audit") as http:
        yield http


def auditor(issuer: DevIssuer, tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {issuer.mint(subject='aud-1', tenant=tenant, roles=['auditor'])}"}


def crafted(value: Any) -> str:
    """A cursor as a client could make one: the base64url (unpadded) JSON this API issues."""
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


# ---- cursors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cursor",
    [
        crafted({"s": 99999999999999999999, "o": "asc"}),  # a 500 (OverflowError in pymongo) before
        crafted({"s": MAX_SEQUENCE + 1, "o": "asc"}),
        crafted({"s": True, "o": "asc"}),  # JSON true is a Python int
        crafted({"s": 0, "o": "asc"}),
        crafted({"s": 1.0, "o": "asc"}),
        crafted({"s": 1, "o": PLANTED}),
        crafted({"s": 1, "o": "asc", "x": PLANTED}),
        crafted([1, "asc"]),
        crafted(PLANTED),
        base64.b64encode(json.dumps({"s": 1, "o": "asc"}).encode()).decode(),  # padded: not issued
        "eyJzIjoxLCJvIjoiYXNjIn0/",  # outside the base64url alphabet
        "A" * 65,
        "nonsense",
    ],
)
def test_a_cursor_this_api_did_not_issue_is_refused_saying_what_a_cursor_is(cursor: str) -> None:
    with pytest.raises(CursorError) as refused:
        decode_cursor(cursor, "asc")
    message = str(refused.value)
    assert "next_cursor of the previous page" in message and "base64url" in message
    assert PLANTED not in message and "PHIMARKER" not in message


def test_an_issued_cursor_decodes_at_both_ends_of_the_sequence_range() -> None:
    for sequence in (1, 42, MAX_SEQUENCE):
        for order in ("asc", "desc"):
            assert decode_cursor(encode_cursor(sequence, order), order) == sequence  # type: ignore[arg-type]
    assert len(encode_cursor(MAX_SEQUENCE, "desc")) <= 64


async def test_a_crafted_cursor_is_a_400_that_echoes_nothing(client, issuer) -> None:
    for cursor in (crafted({"s": 10**20, "o": "asc"}), crafted({"s": 1, "o": PLANTED})):
        response = await client.get(
            "/audit/events", params={"cursor": cursor}, headers=auditor(issuer, OPERATOR)
        )
        assert response.status_code == 400, response.text
        assert response.json()["detail"]["code"] == "bad_cursor"
        assert "PHIMARKER" not in response.text
    other_order = await client.get(
        "/audit/events",
        params={"cursor": encode_cursor(3, "asc"), "order": "desc"},
        headers=auditor(issuer, OPERATOR),
    )
    assert other_order.status_code == 400
    assert "repeat the query with order=asc" in other_order.json()["detail"]["message"]


# ---- the tenant filter ----------------------------------------------------------------------


@pytest.mark.parametrize("accept", ["application/json", FHIR_JSON])
async def test_a_hospital_auditor_naming_another_tenant_gets_an_empty_page_not_its_own(
    client, issuer, store, accept
) -> None:
    headers = auditor(issuer, "hospital-a") | {"Accept": accept}
    other = await client.get("/audit/events", params={"tenant": "hospital-b"}, headers=headers)
    absent = await client.get("/audit/events", params={"tenant": "no-such-hospital"}, headers=headers)
    assert other.status_code == absent.status_code == 200
    body = other.json()
    assert (body.get("records"), body.get("entry")) in ((None, []), ([], None)), body
    assert _without_links(body) == _without_links(absent.json()), "as if the tenant had no records"
    assert all(q.tenant == "hospital-a" for q in store.queries)  # nothing of hospital-b was read

    own = await client.get("/audit/events", params={"tenant": "hospital-a"}, headers=headers)
    unfiltered = await client.get("/audit/events", headers=headers)
    assert _without_links(own.json()) == _without_links(unfiltered.json())
    assert len(own.json().get("records") or own.json().get("entry")) == 2


async def test_an_operator_auditor_narrows_to_the_tenant_named(client, issuer) -> None:
    response = await client.get(
        "/audit/events", params={"tenant": "hospital-b"}, headers=auditor(issuer, OPERATOR)
    )
    assert {r["tenant"] for r in response.json()["records"]} == {"hospital-b"}
    everything = await client.get("/audit/events", headers=auditor(issuer, OPERATOR))
    assert everything.json()["count"] == 4


def _without_links(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "link"}


# ---- the time range -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"since": "2026-11-24T00:00:00Z", "until": "2026-11-23T00:00:00Z"},
        {"since": "2026-11-23T10:00:00Z", "until": "2026-11-23T10:00:00Z"},  # empty: until is exclusive
        {"since": "2026-11-24", "until": "2026-11-23"},
        {"since": "2026-11-23T12:00:00+02:00", "until": "2026-11-23T10:00:00Z"},  # compared in UTC
    ],
)
async def test_an_inverted_time_range_is_a_bad_range_not_an_empty_page(client, issuer, params) -> None:
    response = await client.get("/audit/events", params=params, headers=auditor(issuer, OPERATOR))
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert detail["code"] == "bad_range" and "since must be before until" in detail["message"]


async def test_until_a_date_includes_that_whole_day_and_since_a_date_starts_it(client, issuer) -> None:
    headers = auditor(issuer, OPERATOR)

    async def days(**params: str) -> list[str]:
        response = await client.get("/audit/events", params=params, headers=headers)
        assert response.status_code == 200, response.text
        return [r["event_time"][:10] for r in response.json()["records"]]

    assert await days(until="2026-11-23") == ["2026-11-22", "2026-11-22", "2026-11-23", "2026-11-23"]
    assert await days(until="2026-11-22") == ["2026-11-22", "2026-11-22"]
    assert await days(since="2026-11-23", until="2026-11-23") == ["2026-11-23", "2026-11-23"]
    assert await days(since="2026-11-23") == ["2026-11-23", "2026-11-23"]
    assert await days(until="2026-11-23T00:00:00Z") == ["2026-11-22", "2026-11-22"]  # a time: exclusive
    assert await days(until="2026-11-23T10:00:00") == ["2026-11-22", "2026-11-22"]  # no offset: UTC
    assert await days(until="9999-12-31") == ["2026-11-22", "2026-11-22", "2026-11-23", "2026-11-23"]


@pytest.mark.parametrize("value", ["20261123", "1700000000", "-5", "1.5"])
async def test_a_number_is_not_read_as_unix_seconds(client, issuer, value) -> None:
    """pydantic reads "20261123" (a DICOM-style date) as 1970-08-23T12:05:23Z."""
    for name in ("since", "until"):
        response = await client.get("/audit/events", params={name: value}, headers=auditor(issuer, OPERATOR))
        assert response.status_code == 422, response.text
        assert "not a number" in response.text


# ---- request ids ------------------------------------------------------------------------------


class Published:
    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    async def publish(self, topic: str, envelope: Any, *, key: str) -> None:
        self.envelopes.append(envelope)


@pytest.mark.parametrize(
    ("sent", "recorded"),
    [
        ("0190A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B", "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"),
        ("0190a1b2c3d47e5f8a9b0c1d2e3f4a5b", "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"),  # nginx
        (PLANTED, None),  # free text: replaced, never written to the trail
    ],
)
async def test_an_auditor_calls_own_record_carries_its_request_id_in_canonical_form_never_free_text(
    issuer: DevIssuer, store: ListStore, sent: str, recorded: str | None
) -> None:
    """The audit API recorded any ``X-Correlation-ID`` text a client sent as the correlation id of its
    own access record (written once, to WORM storage); it now takes ``X-Request-ID`` as the gateway
    does."""
    from enclave_audit.api import access_hook

    rules = TokenRules(issuer=DEV_ISSUER, audience=DEV_AUDIENCE)
    verifier = TokenVerifier(rules, StaticKeySource.from_jwks(issuer.jwks(), algorithms=rules.algorithms))
    published = Published()
    ctx = _context(store)
    app = FastAPI()
    app.include_router(
        build_router(ctx, AccessGuard(verifier, on_decision=access_hook(published)))  # type: ignore[arg-type]
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://audit") as http:
        headers = auditor(issuer, OPERATOR) | {"X-Request-ID": sent, "X-Correlation-ID": sent}
        assert (await http.get("/audit/events", headers=headers)).status_code == 200
    [envelope] = published.envelopes
    if recorded is None:
        assert PLANTED not in envelope.model_dump_json() and len(envelope.correlation_id) == 36
    else:
        assert envelope.correlation_id == recorded


async def test_a_request_id_as_the_client_sent_it_finds_its_canonical_record(
    client: httpx.AsyncClient, issuer: DevIssuer, store: ListStore
) -> None:
    upper = "0190A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B"
    await client.get("/audit/events", params={"correlation_id": upper}, headers=auditor(issuer, OPERATOR))
    await client.get("/audit/events", params={"correlation_id": "c-42"}, headers=auditor(issuer, OPERATOR))
    assert [q.mongo_filter()["correlation_id"] for q in store.queries] == [
        {"$in": [upper, upper.lower()]},  # the canonical record, and one stored as sent before
        "c-42",
    ]


# ---- the code filters ----------------------------------------------------------------------------


async def test_the_code_filters_find_every_change_of_access_and_every_break_glass(
    client: httpx.AsyncClient, issuer: DevIssuer, store: ListStore
) -> None:
    """``event_type_code=110137`` finds every grant, revocation and restriction change, whatever its
    outcome; ``event_code`` the records of one EventID. Before the twenty-third session an auditor had
    to read every access record to find them."""
    chain = HashChain()
    actions = ["manage_restrictions", "manage_grants", "break_glass", "retrieve", "read_restrictions"]
    changes = [
        chain.append(
            record_from_event(
                access(100 + n, action=action, outcome="denied" if n == 1 else "success"),
                "enclave.access.recorded.v1",
            )
        )
        for n, action in enumerate(actions)
    ]
    store.records = changes
    headers = auditor(issuer, OPERATOR)

    async def found(**params: str) -> list[str]:
        answer = await client.get("/audit/events", params=params, headers=headers)
        assert answer.status_code == 200, answer.text
        return [r["envelope"]["data"]["action"] for r in answer.json()["records"]]

    assert await found(event_type_code="110137") == ["manage_restrictions", "manage_grants"]
    assert await found(event_type_code="110127") == ["break_glass"]
    assert await found(event_code="110113") == ["manage_restrictions", "manage_grants", "break_glass"]
    assert await found(event_code="110113", event_type_code="110137", outcome="4") == ["manage_grants"]
    assert await found(event_code="110100") == ["read_restrictions"]
    assert await found(event_type_code="110122") == []
    assert store.queries[0].mongo_filter() == {"event_type_codes.code": "110137"}
    assert store.queries[2].mongo_filter() == {"event_code.code": "110113"}


@pytest.mark.parametrize("param", ["event_code", "event_type_code"])
@pytest.mark.parametrize("value", ["", "110137 OR 1", '{"$ne": 1}', "x" * 33])
async def test_a_code_filter_that_is_not_a_code_is_the_common_422(
    client: httpx.AsyncClient, issuer: DevIssuer, param: str, value: str
) -> None:
    answer = await client.get("/audit/events", params={param: value}, headers=auditor(issuer, OPERATOR))
    assert answer.status_code == 422, answer.text
    # (This app has no shared error handler; the service's answers the common 422 without the value.)
    assert param in answer.text
