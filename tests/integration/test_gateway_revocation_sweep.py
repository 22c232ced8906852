"""A grant revoked while Kafka refused its event (its DELETE answered 503) and never deleted again is
recorded by the gateway itself: a test gateway with a 1 s sweep, its grant store on FerretDB, the
record on Kafka. The revoked, unrecorded grant is written to the store directly, as the 503 left it
(stopping Kafka under the stack is test_dependency_outage's business)."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

from enclave_common import topics
from enclave_common.auth import Action, Grant, GrantKind
from enclave_common.auth.grants_mongo import COLLECTION, grant_to_document
from enclave_gateway.access import GATEWAY_ACTOR
from pymongo import AsyncMongoClient

from .conftest import MONGO_URL
from .test_gateway_support import TopicWatch, gateway_process, new_tenant


async def test_a_revocation_nobody_repeated_is_recorded_by_the_gateway(tmp_path) -> None:
    tenant = new_tenant("it-sweep")
    now = datetime.now(UTC).replace(microsecond=0)
    revoked_at = now - timedelta(minutes=10)
    grant = Grant(
        grant_id=str(uuid.uuid4()),
        kind=GrantKind.PATIENT,
        grantee="it-caregiver",
        tenant=tenant,
        patient_key="it-sweep-patient-key",
        actions=frozenset({Action.READ_STATUS}),
        not_before=now - timedelta(days=1),
        expires_at=now + timedelta(days=1),
        justification="daughter, consent form on file",
        created_by="it-admin",
        created_at=now - timedelta(days=1),
        revoked_at=revoked_at,
        revoked_by="it-admin",
        revocation_recorded=False,
    )
    # A document that is no grant (an action this version does not know), older and so first in the
    # sweep's order: logged and left out, it must not hold back the grant after it.
    unreadable = grant_to_document(grant) | {
        "_id": str(uuid.uuid4()),
        "actions": ["not_an_action"],
        "revoked_at": revoked_at - timedelta(minutes=1),
    }
    client: AsyncMongoClient = AsyncMongoClient(MONGO_URL, tz_aware=True, serverSelectionTimeoutMS=5000)
    grants = client["gateway_it"][COLLECTION]
    async with TopicWatch(topics.ACCESS_RECORDED) as watch:
        pass
    try:
        with gateway_process(tmp_path, {"ENCLAVE_GATEWAY_REVOCATION_SWEEP_INTERVAL_S": "1"}):
            await grants.insert_many([unreadable, grant_to_document(grant)])
            deadline = time.monotonic() + 60
            while True:
                stored = await grants.find_one({"_id": grant.grant_id})
                if stored is not None and stored.get("revocation_recorded") is True:
                    break
                assert time.monotonic() < deadline, "the sweep did not record the revocation"
                await asyncio.sleep(0.5)
    finally:
        await grants.delete_one({"_id": unreadable["_id"]})
        await client.close()
    [event] = await watch.read(lambda e: e.tenant == tenant)
    assert (event.actor, event.data["actor"], event.data["action"]) == (
        GATEWAY_ACTOR,
        GATEWAY_ACTOR,
        "manage_grants",
    )
    assert (event.data["outcome"], event.data["status_code"], event.data["target"]) == (
        "success",
        200,
        "patient:it-sweep-patient-key",
    )
    assert event.data["detail"] == (
        f"grant_revoked:{grant.grant_id} revoked_by=it-admin revoked_at={revoked_at.isoformat()} recorded_late"
    )
