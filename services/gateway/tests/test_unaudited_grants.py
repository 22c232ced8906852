"""A grant or break-glass session that cannot be audited does not take effect, and every grant request
is recorded, a bad grant id and a grant store that did not answer the lookup included
(docs/gateway.md, "Grants and break-glass").

Until the review of the nineteenth session a break-glass session was stored, then its
``security.alert`` published, then its access event: with the alert refused by Kafka the clinician got
503 while the session stayed open, with neither an alert nor an access event. A grant whose event
Kafka refused stayed in the store too. And ``GET``/``DELETE /api/v1/grants/{id}`` answered a bad id
422, or a grant store that did not answer the lookup 503, with no event at all.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from enclave_common import topics
from enclave_common.envelope import Envelope
from enclave_gateway.grants_api import WITHDRAWN_BY
from pymongo.errors import ServerSelectionTimeoutError
from route_harness import AckingPublisher, Exchange, Harness, asgi_request, gateway_routes
from test_access_answers import PLANTED, grant_body, post_json

BREAK_GLASS_BODY = json.dumps({"patient_id": PLANTED, "justification": "x" * 12}).encode()


class Refusing:
    """The producer, refusing the first ``times`` events of ``topic`` (a leader that does not answer)."""

    def __init__(self, publisher: AckingPublisher, topic: str, times: int = 1_000) -> None:
        self.inner = publisher
        self.topic = topic
        self.times = times

    async def send(self, topic: str, envelope: Envelope, *, key: str) -> Any:
        if topic == self.topic and self.times > 0:
            self.times -= 1
            raise TimeoutError(f"{topic} leader unavailable")
        return await self.inner.send(topic, envelope, key=key)


def refuse(harness: Harness, topic: str, times: int = 1_000) -> None:
    harness.uploads.handoff._publisher = Refusing(harness.publisher, topic, times)  # type: ignore[assignment]


def events_of(harness: Harness, answer: Exchange) -> list[dict[str, Any]]:
    rid = answer.header("x-request-id")
    return [e for e in harness.publisher.access_events() if e["correlation_id"] == rid]


def the_only_grant(harness: Harness) -> Any:
    [grant] = harness.grants._grants.values()
    return grant


async def test_a_session_whose_alert_kafka_refused_is_withdrawn_and_both_answers_are_recorded(
    tmp_path: Path,
) -> None:
    harness = gateway_routes(tmp_path)
    refuse(harness, topics.SECURITY_ALERT)
    answer = await post_json(harness, "/api/v1/break-glass", BREAK_GLASS_BODY, "clinician")
    assert answer.status == 503, answer.body
    session = the_only_grant(harness)
    assert session.revoked_by == WITHDRAWN_BY and session.revoked_at is not None
    assert session.revocation_recorded is True  # the withdrawal's own event was taken
    opened, withdrawn = events_of(harness, answer)
    assert (opened["status_code"], opened["detail"].split(" ")[0]) == (
        201,
        f"break_glass_opened:{session.grant_id}",
    )
    assert (withdrawn["outcome"], withdrawn["status_code"], withdrawn["detail"]) == (
        "error",
        503,
        f"break_glass_withdrawn:{session.grant_id} cause=alert_unraised",
    )
    assert withdrawn["target"] == opened["target"] and withdrawn["target"].startswith("patient:")
    assert PLANTED not in json.dumps(harness.publisher.access_events())


async def test_a_session_whose_access_event_kafka_refused_is_withdrawn_before_any_alert(
    tmp_path: Path,
) -> None:
    harness = gateway_routes(tmp_path)
    refuse(harness, topics.ACCESS_RECORDED, times=1)  # the 201 refused, the 503 taken
    answer = await post_json(harness, "/api/v1/break-glass", BREAK_GLASS_BODY, "clinician")
    assert answer.status == 503, answer.body
    assert json.loads(answer.body)["error"] == "kafka_unavailable"
    session = the_only_grant(harness)
    assert session.revoked_by == WITHDRAWN_BY
    [event] = events_of(harness, answer)
    assert (event["outcome"], event["status_code"], event["detail"]) == (
        "error",
        503,
        f"break_glass_withdrawn:{session.grant_id} cause=access_unrecorded",
    )
    assert topics.SECURITY_ALERT not in harness.publisher.topics()


async def test_a_grant_whose_access_event_kafka_refused_is_withdrawn(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    refuse(harness, topics.ACCESS_RECORDED)  # Kafka takes no access event at all
    answer = await post_json(harness, "/api/v1/grants", grant_body(), "admin")
    assert answer.status == 503, answer.body
    grant = the_only_grant(harness)
    assert (grant.revoked_by, grant.is_active(datetime.now(UTC))) == (WITHDRAWN_BY, False)
    assert harness.publisher.access_events() == []
    # Neither the grant nor its withdrawal is in the trail: the gateway's sweep records the withdrawal
    # (no admin has the grant's id: its creation was answered 503).
    assert grant.revocation_recorded is False


async def test_a_grant_the_store_could_not_withdraw_is_recorded_as_not_withdrawn(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    refuse(harness, topics.ACCESS_RECORDED, times=1)

    async def silent(*_: object, **__: object) -> bool:
        raise ServerSelectionTimeoutError("no server answered")

    harness.grants.revoke = silent  # type: ignore[method-assign]
    answer = await post_json(harness, "/api/v1/grants", grant_body(), "admin")
    assert answer.status == 503, answer.body
    grant = the_only_grant(harness)
    [event] = events_of(harness, answer)
    assert (event["outcome"], event["detail"]) == (
        "error",
        f"grant_not_withdrawn:{grant.grant_id} cause=access_unrecorded",
    )


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_a_grant_id_that_does_not_match_the_api_is_recorded_422(tmp_path: Path, method: str) -> None:
    harness = gateway_routes(tmp_path)
    admin = [("authorization", f"Bearer {harness.token('hospital-a', 'admin')}")]
    answer = await asgi_request(harness.app, method, f"/api/v1/grants/{PLANTED}".encode(), admin)
    assert answer.status == 422, answer.body
    [event] = events_of(harness, answer)
    action = "read_grants" if method == "GET" else "manage_grants"
    assert (event["action"], event["outcome"], event["status_code"], event["detail"]) == (
        action,
        "rejected",
        422,
        "invalid_request",
    )
    assert event["target"] is None
    assert PLANTED not in json.dumps(event)


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_a_grant_lookup_the_store_did_not_answer_is_recorded_503(tmp_path: Path, method: str) -> None:
    harness = gateway_routes(tmp_path)

    async def silent(*_: object, **__: object) -> None:
        raise ServerSelectionTimeoutError("no server answered")

    harness.grants.get = silent  # type: ignore[method-assign]
    admin = [("authorization", f"Bearer {harness.token('hospital-a', 'admin')}")]
    path = b"/api/v1/grants/01234567-89ab-cdef-0123-456789abcdef"
    answer = await asgi_request(harness.app, method, path, admin)
    assert answer.status == 503, answer.body
    [event] = events_of(harness, answer)
    assert (event["outcome"], event["status_code"], event["detail"]) == (
        "error",
        503,
        "dependency_unavailable",
    )


async def _created_grant(harness: Harness) -> str:
    created = await post_json(harness, "/api/v1/grants", grant_body(), "admin")
    assert created.status == 201, created.body
    return str(json.loads(created.body)["grant_id"])


async def _delete(harness: Harness, grant_id: str, tenant: str = "hospital-a") -> Exchange:
    admin = [("authorization", f"Bearer {harness.token(tenant, 'admin')}")]
    return await asgi_request(harness.app, "DELETE", f"/api/v1/grants/{grant_id}".encode(), admin)


async def test_a_revocation_whose_event_kafka_refused_stays_in_effect_and_the_next_delete_records_it(
    tmp_path: Path,
) -> None:
    """The revocation is not undone (a grant back in effect would be worse than a revocation recorded
    late); the 503 says so, and the retry records who revoked it and when, answered 200. Until the
    twenty-first session the retry answered 409 and the trail never named the revocation."""
    harness = gateway_routes(tmp_path)
    grant_id = await _created_grant(harness)
    refuse(harness, topics.ACCESS_RECORDED, times=1)
    refused = await _delete(harness, grant_id)
    assert refused.status == 503, refused.body
    error = json.loads(refused.body)
    assert error["error"] == "kafka_unavailable"
    assert "revoked and no longer in effect" in error["message"] and "repeat this DELETE" in error["message"]
    grant = the_only_grant(harness)
    assert not grant.is_active(datetime.now(UTC)) and grant.revocation_recorded is False
    assert events_of(harness, refused) == []

    retried = await _delete(harness, grant_id)
    assert retried.status == 200, retried.body
    view = json.loads(retried.body)
    assert (view["revoked_at"], view["revocation_recorded"]) == (grant.revoked_at.isoformat(), True)
    [event] = events_of(harness, retried)
    assert (event["outcome"], event["status_code"], event["detail"]) == (
        "success",
        200,
        f"grant_revoked:{grant_id} revoked_by={grant.revoked_by} revoked_at={grant.revoked_at.isoformat()}"
        " recorded_late",
    )
    assert the_only_grant(harness).revocation_recorded is True

    again = await _delete(harness, grant_id)
    assert again.status == 409, again.body
    [event] = events_of(harness, again)
    assert event["detail"] == f"grant_already_revoked:{grant_id}"


async def test_a_recorded_revocation_is_noted_and_a_second_delete_is_409(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    grant_id = await _created_grant(harness)
    answer = await _delete(harness, grant_id)
    assert answer.status == 200, answer.body
    assert json.loads(answer.body)["revocation_recorded"] is True
    assert the_only_grant(harness).revocation_recorded is True
    [event] = events_of(harness, answer)
    assert event["detail"] == f"grant_revoked:{grant_id}"
    assert (await _delete(harness, grant_id)).status == 409


async def test_a_revocation_the_store_could_not_note_as_recorded_is_answered_and_recorded_again(
    tmp_path: Path,
) -> None:
    """The event is in the trail, so the answer stands; the flag stayed False, so the next DELETE
    records the revocation a second time (a duplicate, never a gap)."""
    harness = gateway_routes(tmp_path)
    grant_id = await _created_grant(harness)
    noted = harness.grants.mark_revocation_recorded

    async def silent(*_: object, **__: object) -> None:
        raise ServerSelectionTimeoutError("no server answered")

    harness.grants.mark_revocation_recorded = silent  # type: ignore[method-assign]
    answer = await _delete(harness, grant_id)
    assert answer.status == 200, answer.body
    assert the_only_grant(harness).revocation_recorded is False
    harness.grants.mark_revocation_recorded = noted  # type: ignore[method-assign]
    again = await _delete(harness, grant_id)
    assert again.status == 200, again.body
    [event] = events_of(harness, again)
    assert event["detail"].endswith(" recorded_late")


async def test_a_grant_never_revoked_shows_no_revocation_state(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    grant_id = await _created_grant(harness)
    admin = [("authorization", f"Bearer {harness.token('hospital-a', 'admin')}")]
    answer = await asgi_request(harness.app, "GET", f"/api/v1/grants/{grant_id}".encode(), admin)
    assert answer.status == 200, answer.body
    assert "revocation_recorded" not in json.loads(answer.body)


async def test_a_withdrawal_an_admin_beat_does_not_mark_that_revocation_recorded(tmp_path: Path) -> None:
    """The grant store says it was revoked already: that revocation is an admin's, recorded (or not) by
    its own DELETE, and must not be marked recorded by the withdrawal's event."""
    harness = gateway_routes(tmp_path)
    refuse(harness, topics.ACCESS_RECORDED, times=1)  # the 201 refused, the withdrawal's 503 taken
    marked: list[str] = []

    async def beaten(*_: object, **__: object) -> bool:
        return False

    async def mark(grant_id: str, *, tenant: str) -> None:
        marked.append(grant_id)

    harness.grants.revoke = beaten  # type: ignore[method-assign]
    harness.grants.mark_revocation_recorded = mark  # type: ignore[method-assign]
    answer = await post_json(harness, "/api/v1/grants", grant_body(), "admin")
    assert answer.status == 503, answer.body
    assert [e["detail"].split(":")[0] for e in events_of(harness, answer)] == ["grant_withdrawn"]
    assert marked == []
