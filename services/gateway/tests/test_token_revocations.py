"""``POST /api/v1/token-revocations`` (docs/access.md, "Token revocation"): an admin ends every token one
subject of its tenant holds now; the next request with such a token is 401 ``revoked``, a token issued
after the revocation works.

Until the twenty-third session nothing could end a token before its expiry: docs/access.md listed it
under "Not covered yet", and the gateway remembers a verified token until it expires.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from enclave_common import topics
from enclave_common.auth import InMemoryTokenRevocationStore, Principal, RevokedTokens, Role, TokenRevocation
from pymongo.errors import ServerSelectionTimeoutError
from route_harness import Exchange, Harness, asgi_request, gateway_routes
from test_access_answers import the_event
from test_unaudited_grants import events_of, refuse

IMAGING_ID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
REASON = "incident 2026-114: laptop reported stolen"


def stored(harness: Harness) -> None:
    harness.read_model.docs[IMAGING_ID] = {"_id": IMAGING_ID, "tenant": "hospital-a", "upload_id": "u"}


async def status_read(harness: Harness, token: str) -> Exchange:
    path = f"/api/v1/imaging/{IMAGING_ID}".encode()
    return await asgi_request(harness.app, "GET", path, [("authorization", f"Bearer {token}")], [])


async def revoke(
    harness: Harness,
    subject: str,
    justification: str = REASON,
    *,
    tenant: str = "hospital-a",
    role: str = "admin",
) -> Exchange:
    data = json.dumps({"subject": subject, "justification": justification}).encode()
    headers = [
        ("authorization", f"Bearer {harness.token(tenant, role, subject=f'it-{role}')}"),
        ("content-type", "application/json"),
        ("content-length", str(len(data))),
    ]
    return await asgi_request(harness.app, "POST", b"/api/v1/token-revocations", headers, [data])


async def test_a_revoked_subjects_tokens_are_refused_and_a_new_one_works(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    stored(harness)
    before = harness.token(
        "hospital-a", "uploader", subject="pacs-7", now=datetime.now(UTC) - timedelta(minutes=5)
    )
    assert (await status_read(harness, before)).status == 200  # verified, and now remembered

    answer = await revoke(harness, "pacs-7")
    assert answer.status == 201, answer.body
    body = json.loads(answer.body)
    assert (body["subject"], body["tenant"], body["revoked_by"]) == ("pacs-7", "hospital-a", "it-admin")
    event = the_event(harness, answer)
    assert (event["action"], event["outcome"]) == ("revoke_tokens", "success")
    assert event["detail"] == f"tokens_revoked subject=pacs-7 revoked_before={body['revoked_before']}"
    assert REASON not in json.dumps(harness.publisher.access_events())

    refused = await status_read(harness, before)
    assert refused.status == 401, refused.body
    assert json.loads(refused.body)["detail"]["code"] == "revoked"
    assert 'error="invalid_token"' in (refused.header("www-authenticate") or "")
    event = the_event(harness, refused)
    assert (event["outcome"], event["detail"], event["actor"]) == ("unauthenticated", "revoked", "pacs-7")

    # A token issued within the verifier's leeway after the revocation is refused too (a provider whose
    # clock runs ahead); one issued past it works (the revocation is moved back here: the verifier
    # refuses an iat more than its leeway ahead); so do other subjects', and the same subject's in
    # another tenant (a subject is revoked in the admin's tenant only).
    revoked_before = datetime.fromisoformat(body["revoked_before"])
    skewed = harness.token(
        "hospital-a", "uploader", subject="pacs-7", now=revoked_before + timedelta(seconds=20)
    )
    assert (await status_read(harness, skewed)).status == 401
    harness.revoked_tokens._before[("hospital-a", "pacs-7")] = revoked_before - timedelta(minutes=1)
    after = harness.token(
        "hospital-a", "uploader", subject="pacs-7", now=revoked_before - timedelta(seconds=20)
    )
    assert (await status_read(harness, after)).status == 200
    other = harness.token(
        "hospital-a", "uploader", subject="pacs-8", now=datetime.now(UTC) - timedelta(minutes=5)
    )
    assert (await status_read(harness, other)).status == 200
    elsewhere = harness.token(
        "hospital-b", "uploader", subject="pacs-7", now=datetime.now(UTC) - timedelta(minutes=5)
    )
    assert (await status_read(harness, elsewhere)).status == 404  # authenticated: the record is hospital-a's


@pytest.mark.parametrize("role", ["uploader", "clinician", "researcher", "auditor", "caregiver"])
async def test_only_an_admin_revokes(tmp_path: Path, role: str) -> None:
    harness = gateway_routes(tmp_path)
    refused = await revoke(harness, "pacs-7", role=role)
    assert refused.status == 403, refused.body
    assert await harness.token_revocations.since(datetime.min.replace(tzinfo=UTC)) == []


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"subject": "pacs-7", "justification": "short"}, "invalid_revocation"),
        ({"subject": "", "justification": REASON}, "invalid_request"),
        ({"subject": "x" * 256, "justification": REASON}, "invalid_request"),
        ({"subject": "pacs-7 ", "justification": REASON}, "invalid_request"),  # would revoke nobody
        ({"subject": "x revoked_before=2099-01-01\nINJECT", "justification": REASON}, "invalid_request"),
        ({"subject": "dr\u00e9", "justification": REASON}, "invalid_request"),
        ({"subject": "pacs-7", "justification": REASON, "tenant": "hospital-b"}, "invalid_request"),
    ],
)
async def test_a_refused_revocation_stores_nothing_and_says_why(
    tmp_path: Path, body: dict[str, Any], error: str
) -> None:
    harness = gateway_routes(tmp_path)
    data = json.dumps(body).encode()
    headers = [
        ("authorization", f"Bearer {harness.token('hospital-a', 'admin', subject='it-admin')}"),
        ("content-type", "application/json"),
        ("content-length", str(len(data))),
    ]
    refused = await asgi_request(harness.app, "POST", b"/api/v1/token-revocations", headers, [data])
    assert refused.status == 422, refused.body
    assert json.loads(refused.body)["error"] == error
    assert await harness.token_revocations.since(datetime.min.replace(tzinfo=UTC)) == []
    assert the_event(harness, refused)["outcome"] == "rejected"


async def test_a_revocation_kafka_does_not_record_is_not_made(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    refuse(harness, topics.ACCESS_RECORDED, times=1)
    answer = await revoke(harness, "pacs-7")
    assert answer.status == 503, answer.body
    assert "no token was revoked" in json.loads(answer.body)["message"]
    assert await harness.token_revocations.since(datetime.min.replace(tzinfo=UTC)) == []
    [second] = events_of(harness, answer)  # the refused first event is not among those sent
    assert second["detail"].startswith("tokens_not_revoked subject=pacs-7 ")
    assert second["detail"].endswith("cause=access_unrecorded")


async def test_a_store_that_does_not_answer_is_a_503_whose_second_event_says_so(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)

    async def silent(*_: Any) -> None:
        raise ServerSelectionTimeoutError("no primary")

    harness.token_revocations.revoke = silent  # type: ignore[method-assign]
    answer = await revoke(harness, "pacs-7")
    assert answer.status == 503, answer.body
    first, second = events_of(harness, answer)
    assert (first["status_code"], second["status_code"]) == (201, 503)
    assert second["detail"].startswith("token_revocation_unknown subject=pacs-7 ")


async def test_another_replicas_revocation_applies_at_the_next_refresh() -> None:
    store = InMemoryTokenRevocationStore()
    held = RevokedTokens(store)
    at = datetime(2026, 11, 24, 12, 0, 0, 500000, tzinfo=UTC)

    def principal(issued: datetime | None, subject: str = "dr-1") -> Principal:
        return Principal(
            subject=subject, tenant="hospital-a", roles=frozenset({Role.CLINICIAN}), issued_at=issued
        )

    await store.revoke(TokenRevocation("hospital-a", "dr-1", at, "root", REASON))
    assert held.revoked_before(principal(at - timedelta(hours=1))) is None  # not read yet
    assert held.age_seconds(at) == float("inf")
    await held.refresh(at)
    assert held.age_seconds(at + timedelta(seconds=7)) == 7
    assert held.revoked_before(principal(at - timedelta(hours=1))) == at
    assert held.revoked_before(principal(at.replace(microsecond=0))) == at  # iat counts whole seconds
    assert held.revoked_before(principal(None)) == at  # no iat: cannot be told apart, refused
    assert held.revoked_before(principal(at + timedelta(seconds=30))) == at  # within the clock skew
    assert held.revoked_before(principal(at + timedelta(seconds=31))) is None
    assert held.revoked_before(principal(at - timedelta(hours=1), subject="dr-2")) is None
    # An older revocation read later does not move the instant back.
    await store.revoke(TokenRevocation("hospital-a", "dr-1", at - timedelta(hours=1), "root", REASON))
    await held.refresh(at)
    assert held.revoked_before(principal(at - timedelta(minutes=1))) == at
    # Past the retention (every token it could refuse has expired) it lapses, here and in the store's read.
    await held.refresh(at + timedelta(hours=24, seconds=1))
    assert held.revoked_before(principal(at - timedelta(minutes=1))) is None


async def test_the_refresh_loop_outlives_a_store_that_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that fails keeps what is held and the loop goes on; the age metric says how stale."""
    import asyncio

    store = InMemoryTokenRevocationStore()
    held = RevokedTokens(store)
    calls = {"n": 0}
    since = store.since

    async def flaky(cutoff: datetime) -> Any:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ServerSelectionTimeoutError("no primary")
        return await since(cutoff)

    monkeypatch.setattr(store, "since", flaky)
    await store.revoke(TokenRevocation("hospital-a", "dr-1", datetime.now(UTC), "root", REASON))
    task = asyncio.create_task(held.refresh_forever(0.01))
    try:
        for _ in range(300):
            if held.refreshed_at is not None:
                break
            await asyncio.sleep(0.01)
        assert not task.done()  # the failures did not end it
    finally:
        task.cancel()
    assert calls["n"] >= 3 and held.refreshed_at is not None


@pytest.mark.parametrize("grantee", ["it-caregiver\ngrant_created:forged", "it caregiver", "x" * 256, ""])
async def test_a_grantee_that_is_no_oidc_subject_is_refused(tmp_path: Path, grantee: str) -> None:
    """The grantee is written into the audit detail (grant_created:<id> grantee=<sub>): until the
    twenty-third session any text up to 256 characters was taken, a newline included."""
    from test_access_answers import grant_body, post_json

    harness = gateway_routes(tmp_path)
    refused = await post_json(harness, "/api/v1/grants", grant_body(grantee=grantee), "admin")
    assert refused.status == 422, refused.body
    assert harness.grants._grants == {}
