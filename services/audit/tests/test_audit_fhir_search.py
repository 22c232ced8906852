"""``GET /audit/fhir/AuditEvent``: the FHIR R4 search of the trail (IHE RESTful ATNA, ITI-81), through
real HTTP requests and the real guard over a store kept in a list (test_audit_events_query.py).

Until the twenty-third session a FHIR client could read one AuditEvent by id but not search: the
searchset was served only at ``/audit/events`` with ``Accept: application/fhir+json``, under this
API's own parameter names.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from enclave_audit.chain import HashChain
from enclave_audit.fhir import DCM_SYSTEM, FHIR_JSON, validate_fhir
from enclave_audit.records import record_from_event

from .conftest import access
from .test_audit_events_query import DAY, OPERATOR, PLANTED, ListStore, auditor, client, issuer, store

__all__ = ["client", "issuer", "store"]  # fixtures

KEY = "p" * 32


async def search(
    client: httpx.AsyncClient, issuer: Any, params: Any, tenant: str = OPERATOR
) -> httpx.Response:
    return await client.get("/audit/fhir/AuditEvent", params=params, headers=auditor(issuer, tenant))


def ids(answer: httpx.Response) -> list[str]:
    assert answer.status_code == 200, answer.text
    bundle = answer.json()
    assert (bundle["resourceType"], bundle["type"]) == ("Bundle", "searchset")
    assert answer.headers["content-type"].startswith(FHIR_JSON)
    for entry in bundle["entry"]:
        validate_fhir(entry["resource"])
        assert entry["fullUrl"].endswith(f"/audit/fhir/AuditEvent/{entry['resource']['id']}")
    return [e["resource"]["id"] for e in bundle["entry"]]


async def test_date_takes_fhir_prefixes_and_precision(client, issuer, store: ListStore) -> None:
    """Records at 10:00 UTC on 2026-11-22 (two) and 2026-11-23 (two): FHIR's ranges, not instants."""
    day1 = sorted(r.event_id for r in store.records if r.event_time < DAY)
    day2 = sorted(r.event_id for r in store.records if r.event_time >= DAY)

    async def found(*dates: str) -> list[str]:
        return sorted(ids(await search(client, issuer, [("date", d) for d in dates])))

    assert await found("2026-11-23") == day2
    assert await found("eq2026-11-23") == day2
    assert await found("ge2026-11-23") == day2
    assert await found("gt2026-11-22") == day2  # after the whole of that day
    assert await found("lt2026-11-23") == day1
    assert await found("le2026-11-22") == day1
    assert await found("2026-11") == await found("2026") == sorted(day1 + day2)
    assert await found("2026-11-23T10:00:00Z") == day2  # that second
    assert await found("2026-11-23T10:00Z") == day2  # that minute
    assert await found("2026-11-23T11:00:00+01:00") == day2  # 10:00 UTC
    assert await found("2026-11-23T10:00:01Z") == []
    assert await found("ge2026-11-22T10:00:00Z", "lt2026-11-22T10:00:01Z") == day1


@pytest.mark.parametrize(
    "params",
    [
        [("date", "ge2026-11-23"), ("date", "lt2026-11-23")],  # nothing between them
        [("date", "2026-13-01")],
        [("date", "2026-11-23T10:00:00")],  # a time without a zone
        [("date", "yesterday")],
        [("date", "ne2026-11-23")],
        [("type", "http://example.org|110113")],
        [("subtype", "|")],
        [("action", "X")],
        [("outcome", "3")],
        [("agent:identifier", "dr-who")],  # no system
        [("patient:identifier", "urn:enclave:study|s1")],
        [("entity:identifier", "urn:enclave:report|r1")],
        [
            ("patient:identifier", f"urn:enclave:patient|{KEY}"),
            ("entity:identifier", "urn:enclave:patient|q"),
        ],
        [("type", "110112"), ("type", "110113")],  # FHIR's AND of two values: not read as the last one
        [("type", "110113,110112")],  # FHIR's OR
        [("agent:identifier", "urn:enclave:principal|a"), ("agent:identifier", "urn:enclave:principal|b")],
        [("_count", "1"), ("_count", "2")],
        # A comma a backslash does not escape is FHIR's OR (the backslash here is escaped itself).
        [("agent:identifier", "urn:enclave:principal|a\\\\,b")],
        [("agent:identifier", "urn:enclave:principal|a|b")],  # a second, unescaped bar
        [("agent:identifier", "urn:enclave:principal|a\\")],  # a lone backslash at the end
    ],
)
async def test_a_search_it_cannot_apply_is_a_400_saying_what_it_takes(client, issuer, params) -> None:
    answer = await search(client, issuer, params)
    assert answer.status_code == 400, answer.text
    assert answer.json()["detail"]["code"] == "bad_search"


@pytest.mark.parametrize("params", [{"foo": "1"}, {"_sort": "name"}, {"_count": "0"}, {"patient": KEY}])
async def test_a_parameter_it_does_not_take_is_the_common_422(client, issuer, params) -> None:
    answer = await search(client, issuer, params)
    assert answer.status_code == 422, answer.text


def _trail() -> list[Any]:
    chain = HashChain()
    events = [
        access(200, actor="adm-1", action="manage_restrictions", target=f"patient:{KEY}", roles=["admin"]),
        access(201, actor="adm-1", action="manage_grants", target=f"patient:{KEY}", outcome="denied"),
        access(202, actor="dr-1", action="read_results_phi", target=f"patient:{KEY}/study:st-1"),
        access(203, actor="dr-1", action="break_glass", target=f"patient:{KEY}"),
        access(204, actor="dr-2", action="read_results_phi", target="patient:" + "q" * 32 + "/study:st-2"),
        # An OIDC subject may hold a comma, a bar and a backslash (printable ASCII).
        access(205, actor="ops,team|a\\b", action="read_results_phi", target=f"patient:{KEY}/study:st-1"),
    ]
    return [chain.append(record_from_event(e, "enclave.access.recorded.v1")) for e in events]


async def test_codes_actions_outcomes_and_identifiers_filter_as_the_trail_does(client, issuer, store) -> None:
    store.records = _trail()
    by_actor = {r.event_id: (r.actor, r.envelope["data"]["action"]) for r in store.records}

    async def found(params: Any) -> list[tuple[str, str]]:
        return [by_actor[i] for i in ids(await search(client, issuer, params))]

    changes = [("adm-1", "manage_restrictions"), ("adm-1", "manage_grants")]
    assert await found({"subtype": "110137"}) == changes
    assert await found({"subtype": f"{DCM_SYSTEM}|110137"}) == changes
    assert await found({"subtype": "110137", "outcome": "4"}) == [("adm-1", "manage_grants")]
    assert await found({"type": "110113", "action": "E"}) == [("dr-1", "break_glass")]
    assert await found({"agent:identifier": "urn:enclave:principal|dr-1"}) == [
        ("dr-1", "read_results_phi"),
        ("dr-1", "break_glass"),
    ]
    # FHIR's escapes: until the twenty-fourth session an escaped comma was refused as an OR.
    assert await found({"agent:identifier": "urn:enclave:principal|ops\\,team\\|a\\\\b"}) == [
        ("ops,team|a\\b", "read_results_phi")
    ]
    assert len(await found({"patient:identifier": f"urn:enclave:patient|{KEY}"})) == 5
    assert await found({"entity:identifier": "urn:enclave:study|st-2"}) == [("dr-2", "read_results_phi")]
    assert await found({"entity:identifier": f"urn:enclave:patient|{KEY}", "action": "R"}) == [
        ("dr-1", "read_results_phi"),
        ("ops,team|a\\b", "read_results_phi"),
    ]


async def test_pages_follow_the_next_link_and_sort_newest_first(client, issuer, store) -> None:
    store.records = _trail()
    first = await search(client, issuer, {"_count": "2", "_sort": "-date"})
    newest = [r.event_id for r in reversed(store.records)]
    assert ids(first) == newest[:2]
    [next_link] = [link["url"] for link in first.json()["link"] if link["relation"] == "next"]
    second = await client.get(next_link, headers=auditor(issuer, OPERATOR))
    assert ids(second) == newest[2:4]


async def test_a_hospital_auditor_searches_its_own_tenant_only(client, issuer, store) -> None:
    mine = sorted(r.event_id for r in store.records if r.tenant == "hospital-a")
    assert sorted(ids(await search(client, issuer, {}, tenant="hospital-a"))) == mine
    answer = await search(client, issuer, {}, tenant="hospital-a")
    assert PLANTED not in answer.text and "hospital-b" not in answer.text
