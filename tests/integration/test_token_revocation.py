"""Token revocation on the running stack (docs/access.md, "Token revocation"): an admin ends the tokens
a subject holds; the gateway refuses them from the next request, and a revocation another replica
stored (written straight to the gateway's database here) within its refresh interval; the auditor API
once the audit trail holds the revocation.

Until the twenty-third session a token could not be ended before its expiry.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
from enclave_common import topics

from .conftest import SERVICE_PORTS
from .test_gateway_support import GATEWAY, TopicWatch, bearer, form_upload, new_tenant

AUDIT_URL = f"http://127.0.0.1:{SERVICE_PORTS['audit']}"

REASON = "incident 2026-114: laptop reported stolen"


async def _upload(client: httpx.AsyncClient, headers: dict[str, str]) -> httpx.Response:
    return await form_upload(client, headers, f"PID-TR-{uuid.uuid4().hex[:8]}")


async def test_a_revoked_subjects_tokens_are_refused_and_a_new_one_works(mongo) -> None:
    tenant = new_tenant("it-tr")
    earlier = datetime.now(UTC) - timedelta(minutes=2)
    stolen = bearer("it-tr-pacs", tenant, "uploader", now=earlier)
    admin = bearer("it-tr-admin", tenant, "admin")
    async with TopicWatch(topics.ACCESS_RECORDED) as watch:
        async with httpx.AsyncClient(base_url=GATEWAY, timeout=30) as client:
            assert (await _upload(client, stolen)).status_code == 200
            revoked = await client.post(
                "/api/v1/token-revocations",
                json={"subject": "it-tr-pacs", "justification": REASON},
                headers=admin,
            )
            assert revoked.status_code == 201, revoked.text
            refused = await _upload(client, stolen)
            assert refused.status_code == 401, refused.text
            assert refused.json()["detail"]["code"] == "revoked"
            before = datetime.fromisoformat(revoked.json()["revoked_before"])
            # Issued within the 30 s of clock skew the gateway tolerates: refused too. Past it: works
            # (an iat up to 30 s ahead is accepted, so the clock need not be waited for 31 s).
            skewed = bearer("it-tr-pacs", tenant, "uploader", now=before + timedelta(seconds=10))
            assert (await _upload(client, skewed)).status_code == 401
            await asyncio.sleep(2)
            fresh = bearer("it-tr-pacs", tenant, "uploader", now=before + timedelta(seconds=31))
            assert (await _upload(client, fresh)).status_code == 200
        events = await watch.read(lambda e: e.tenant == tenant)
    access = [e.data for e in events]
    assert [a["detail"].split(" ")[0] for a in access if a["action"] == "revoke_tokens"] == ["tokens_revoked"]
    assert [(a["actor"], a["outcome"], a["status_code"]) for a in access if a.get("detail") == "revoked"] == [
        ("it-tr-pacs", "unauthenticated", 401)
    ] * 2
    assert REASON not in str(access)

    # Stored by another replica: this gateway refuses the subject's tokens after its next read.
    other = bearer("it-tr-other", tenant, "uploader", now=earlier)
    await mongo["gateway"]["token_revocations"].update_one(
        {"_id": f"{tenant}|it-tr-other"},
        {
            "$max": {"revoked_before": datetime.now(UTC)},
            "$set": {
                "tenant": tenant,
                "subject": "it-tr-other",
                "revoked_by": "elsewhere",
                "justification": REASON,
            },
        },
        upsert=True,
    )
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(base_url=GATEWAY, timeout=30) as client:
        while (answer := await _upload(client, other)).status_code == 200:
            assert time.monotonic() < deadline, "the revocation was not read within 30 s"
            await asyncio.sleep(1)
    assert answer.status_code == 401 and answer.json()["detail"]["code"] == "revoked", answer.text


async def test_the_auditor_api_refuses_a_revoked_auditors_token_once_the_trail_holds_the_revocation() -> None:
    """The audit service shares no database with the gateway: it reads the revocations from the trail
    it records (the gateway's access events), every ENCLAVE_AUDIT_TOKEN_REVOCATION_REFRESH_S. Until the
    twenty-fourth session a revoked auditor's token still read the trail until it expired. A revocation
    the gateway refused (422: no justification) revokes nothing there either."""
    tenant = new_tenant("it-tra")
    earlier = datetime.now(UTC) - timedelta(minutes=2)
    stolen = bearer("it-tra-auditor", tenant, "auditor", now=earlier)
    bystander = bearer("it-tra-bystander", tenant, "auditor", now=earlier)
    admin = bearer("it-tra-admin", tenant, "admin")
    async with httpx.AsyncClient(timeout=30) as client:

        async def audit_query(headers: dict[str, str]) -> httpx.Response:
            return await client.get(f"{AUDIT_URL}/audit/events", params={"limit": 1}, headers=headers)

        assert (await audit_query(stolen)).status_code == 200
        refused = await client.post(
            f"{GATEWAY}/api/v1/token-revocations",
            json={"subject": "it-tra-bystander", "justification": ""},
            headers=admin,
        )
        assert refused.status_code == 422, refused.text
        revoked = await client.post(
            f"{GATEWAY}/api/v1/token-revocations",
            json={"subject": "it-tra-auditor", "justification": REASON},
            headers=admin,
        )
        assert revoked.status_code == 201, revoked.text
        # Kafka's delivery, audit's consumer (which may have a backlog from the tests before) and the
        # next read, every ENCLAVE_AUDIT_TOKEN_REVOCATION_REFRESH_S (5 s): seconds when idle.
        deadline = time.monotonic() + 150
        while (answer := await audit_query(stolen)).status_code == 200:
            assert time.monotonic() < deadline, "the auditor API did not read the revocation within 150 s"
            await asyncio.sleep(1)
        assert answer.status_code == 401 and answer.json()["detail"]["code"] == "revoked", answer.text
        assert (await audit_query(bystander)).status_code == 200  # its refused revocation revoked nothing
        before = datetime.fromisoformat(revoked.json()["revoked_before"])
        await asyncio.sleep(2)
        fresh = bearer("it-tra-auditor", tenant, "auditor", now=before + timedelta(seconds=31))
        assert (await audit_query(fresh)).status_code == 200
