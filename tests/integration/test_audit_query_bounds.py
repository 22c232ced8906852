"""The auditor query's bounds on the real stack (FerretDB behind pymongo): a crafted cursor, a tenant
filter naming another tenant, and the event-time range with whole days. Found by a review: a 500
(pymongo's OverflowError), a cursor error quoting the client's text, a hospital auditor's ``tenant``
ignored, an inverted range answered as an empty page, ``until=<date>`` leaving out that day.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import timedelta
from typing import Any

import httpx
import pytest
from enclave_audit.fhir import FHIR_JSON
from enclave_audit.store import AuditStore, EventQuery, QueryTimeout
from enclave_common import topics
from enclave_common.auth.dev_issuer import DevIssuer
from pymongo import AsyncMongoClient
from pymongo.errors import ServerSelectionTimeoutError

from .conftest import SERVICE_PORTS
from .support import STATE, access_event, publish

AUDIT_URL = f"http://127.0.0.1:{SERVICE_PORTS['audit']}"
OPERATOR_TENANT = "enclave-operator"
PLANTED = "PHIMARKER-JANE-DOE-19700101"


def auditor(subject: str, tenant: str) -> dict[str, str]:
    minted = DevIssuer.load(STATE / "keys").mint(subject=subject, tenant=tenant, roles=["auditor"])
    return {"Authorization": f"Bearer {minted}"}


def crafted_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.fixture
async def client():
    async with httpx.AsyncClient(base_url=AUDIT_URL, timeout=60.0) as http:
        yield http


async def _stored(mongo: Any, ids: list[str], timeout: float = 90.0) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = {d["_id"]: d async for d in mongo["audit"]["records"].find({"_id": {"$in": ids}})}
        if len(found) == len(ids):
            return found
        assert time.monotonic() < deadline, f"{len(ids) - len(found)} of {len(ids)} events were not audited"
        await asyncio.sleep(0.5)


async def test_a_crafted_cursor_is_a_400_naming_what_a_cursor_is_and_quoting_nothing(client, unique):
    headers = auditor(f"it-cur-{unique}", OPERATOR_TENANT)
    for cursor in (
        crafted_cursor({"s": 99999999999999999999, "o": "asc"}),  # was a 500: pymongo's OverflowError
        crafted_cursor({"s": 2**63, "o": "desc"}),
        crafted_cursor({"s": 1, "o": PLANTED}),  # was quoted back in the message
        crafted_cursor({"s": True, "o": "asc"}),  # was taken as sequence 1
    ):
        response = await client.get("/audit/events", params={"cursor": cursor}, headers=headers)
        assert response.status_code == 400, response.text
        detail = response.json()["detail"]
        assert detail["code"] == "bad_cursor" and "next_cursor of the previous page" in detail["message"]
        assert "PHIMARKER" not in response.text
    for order in ("asc", "desc"):  # the largest sequence a cursor may name reaches the database fine
        edge = crafted_cursor({"s": 2**63 - 1, "o": order})
        response = await client.get("/audit/events", params={"cursor": edge, "order": order}, headers=headers)
        assert response.status_code == 200, response.text


async def test_a_hospital_auditor_naming_another_tenant_sees_nothing_of_either(mongo, unique, client):
    mine, theirs, actor = f"it-a-{unique}", f"it-b-{unique}", f"it-tq-{unique}"
    events = [access_event(actor=actor, tenant=mine), access_event(actor=actor, tenant=theirs)]
    await publish(topics.ACCESS_RECORDED, events, key=f"tq-{unique}")
    await _stored(mongo, [e.id for e in events])

    headers = auditor(f"it-aud-{unique}", mine)
    for accept in ("application/json", FHIR_JSON):
        asked = headers | {"Accept": accept}
        other = (
            await client.get("/audit/events", params={"actor": actor, "tenant": theirs}, headers=asked)
        ).json()
        assert other.get("records", other.get("entry")) == [], "another tenant: an empty page, not our own"
        own = (
            await client.get("/audit/events", params={"actor": actor, "tenant": mine}, headers=asked)
        ).json()
        assert len(own.get("records") or own.get("entry")) == 1
    operator = auditor(f"it-op-{unique}", OPERATOR_TENANT)
    narrowed = await client.get("/audit/events", params={"actor": actor, "tenant": theirs}, headers=operator)
    assert [r["event_id"] for r in narrowed.json()["records"]] == [events[1].id]


async def test_until_a_date_includes_that_day_and_an_inverted_range_is_refused(mongo, unique, client):
    actor = f"it-day-{unique}"
    event = access_event(actor=actor, tenant=f"it-{unique}")
    await publish(topics.ACCESS_RECORDED, [event], key=f"day-{unique}")
    await _stored(mongo, [event.id])
    day = event.time.date()  # the event's own UTC day, so the test holds across midnight
    headers = auditor(f"it-op-{unique}", OPERATOR_TENANT)

    async def found(**params: str) -> list[str]:
        response = await client.get("/audit/events", params={"actor": actor, **params}, headers=headers)
        assert response.status_code == 200, response.text
        return [r["event_id"] for r in response.json()["records"]]

    assert await found(until=day.isoformat()) == [event.id]  # was read as that day's 00:00: nothing
    assert await found(since=day.isoformat(), until=day.isoformat()) == [event.id]
    assert await found(until=(day - timedelta(days=1)).isoformat()) == []
    assert await found(since=(day + timedelta(days=1)).isoformat()) == []

    later = (event.time + timedelta(hours=1)).isoformat()
    for params in ({"since": later, "until": event.time.isoformat()}, {"since": later, "until": later}):
        response = await client.get("/audit/events", params={"actor": actor, **params}, headers=headers)
        assert response.status_code == 400, response.text
        detail = response.json()["detail"]
        assert detail["code"] == "bad_range" and "since must be before until" in detail["message"]


async def test_a_query_past_its_time_limit_is_stopped_and_said_so(mongo, unique):
    """The auditor query's time limit on FerretDB behind pymongo (``ENCLAVE_AUDIT_QUERY_TIMEOUT_S``):
    a query that cannot finish in time raises :class:`QueryTimeout` (503 ``query_timeout`` at the API,
    services/audit/tests/test_audit_access_answers.py), one with time to spare answers as before, and a
    database that cannot be reached stays ``dependency_unavailable`` (so does a silent one:
    tests/integration/test_dependency_outage.py). Until the twentieth session a
    query had no limit: on a trail of millions of records a scan held the call for as long as it ran."""
    actor = f"it-qt-{unique}"
    event = access_event(actor=actor, tenant=f"it-qt-{unique}")
    await publish(topics.ACCESS_RECORDED, [event], key=f"qt-{unique}")
    await _stored(mongo, [event.id])
    store = AuditStore(mongo["audit"])
    query = EventQuery(actor=actor)

    assert [r.event_id for r in await store.query(query, 10, timeout_s=30)] == [event.id]
    with pytest.raises(QueryTimeout) as stopped:
        await store.query(query, 10, timeout_s=1e-6)
    assert stopped.value.code == "query_timeout"

    unreachable: AsyncMongoClient = AsyncMongoClient(
        "mongodb://127.0.0.1:9/", serverSelectionTimeoutMS=200, tz_aware=True
    )
    try:
        with pytest.raises(ServerSelectionTimeoutError):
            await AuditStore(unreachable["audit"]).query(query, 10, timeout_s=0.5)
    finally:
        await unreachable.close()
