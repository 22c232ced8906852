"""Access events: a decision is recorded before the route runs, except an allowed decision of an
action whose route records the request's answer (upload, grant changes, break-glass). An event
that cannot be recorded is a 503."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from enclave_common import topics
from enclave_common.auth import Action, Principal, Role
from enclave_common.auth.fastapi import AccessResult
from enclave_common.envelope import Envelope
from enclave_gateway.access import AccessRecorder, Unaudited, unrecorded_failure
from enclave_gateway.handoff import KafkaUnavailable
from fastapi import Request


class GatedHandoff:
    """Handoff.publish_event: events are handed over at once (``queued``) and acknowledged when the
    test opens the gate, or refused."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.refuse = False
        self.queued: list[str] = []
        self.recorded: list[tuple[str, str]] = []

    async def publish_event(self, topic: str, envelope: Envelope, key: str) -> None:
        acks = GatedAcks(self)
        await acks.send(topic, envelope, key)
        await acks.settle()


class GatedAcks:
    def __init__(self, handoff: GatedHandoff) -> None:
        self.handoff = handoff
        self.events: list[tuple[str, Envelope]] = []

    async def send(self, topic: str, envelope: Envelope, key: str) -> None:
        self.handoff.queued.append(envelope.data["action"])
        self.events.append((topic, envelope))

    async def settle(self) -> None:
        await self.handoff.gate.wait()
        if self.handoff.refuse:
            raise KafkaUnavailable("Kafka did not acknowledge")
        self.handoff.recorded += [(topic, envelope.data["action"]) for topic, envelope in self.events]


def request() -> Request:
    return Request(
        {
            "type": "http",
            "method": "POST",
            "path": "/",
            "headers": [],
            "client": ("10.0.0.1", 4000),
            "path_params": {},
        }
    )


PRINCIPAL = Principal(subject="pacs", tenant="hospital-a", roles=frozenset({Role.UPLOADER}))


@pytest.mark.parametrize(
    "action",
    [
        Action.UPLOAD,
        Action.MANAGE_GRANTS,
        Action.READ_GRANTS,
        Action.MANAGE_RESTRICTIONS,
        Action.READ_RESTRICTIONS,
        Action.BREAK_GLASS,
        Action.READ_STATUS,
        Action.READ_RESULTS_PHI,
        Action.QUERY_PATIENT,
        Action.READ_RESULTS_DEID,
    ],
)
async def test_an_allowed_decision_the_route_answers_records_nothing(action: Action) -> None:
    """Its route records the request's one event with the answer it gives. Until the nineteenth
    session an allowed upload or grant change was recorded here too, as success with status 200,
    whatever the answer then was (a refused body, 201, 409, 422); until the twentieth an allowed read
    or query, whose database lookup could then fail (503); until the twenty-second a grant read."""
    handoff = GatedHandoff()
    handoff.gate.set()
    recorder = AccessRecorder(handoff)  # type: ignore[arg-type]
    req = request()
    await asyncio.wait_for(
        recorder.on_decision(PRINCIPAL, action, AccessResult("allow", "role"), 200, req), 1
    )
    assert handoff.queued == []
    assert unrecorded_failure(req, RuntimeError("a bug")) == (500, "internal_error")


async def test_an_access_event_that_cannot_be_recorded_is_a_503() -> None:
    handoff = GatedHandoff()
    handoff.refuse = True
    handoff.gate.set()
    recorder = AccessRecorder(handoff)  # type: ignore[arg-type]
    req = request()
    with pytest.raises(Unaudited) as refused:
        await recorder.on_decision(PRINCIPAL, Action.MANAGE_KEYS, AccessResult("allow", "allowed"), 200, req)
    assert refused.value.status_code == 503
    assert refused.value.headers == {"Retry-After": "10"}
    assert unrecorded_failure(req, refused.value) is None, "nothing more of the request can be recorded"


@pytest.mark.parametrize(
    ("action", "result"),
    [
        (Action.MANAGE_KEYS, AccessResult("allow", "allowed")),
        (Action.READ_STATUS, AccessResult("forbidden", "role")),
        (Action.UPLOAD, AccessResult("forbidden", "role")),
    ],
)
async def test_other_decisions_are_recorded_before_the_route_runs(action: Action, result: Any) -> None:
    handoff = GatedHandoff()
    recorder = AccessRecorder(handoff)  # type: ignore[arg-type]
    deciding = asyncio.create_task(recorder.on_decision(PRINCIPAL, action, result, 200, request()))
    await asyncio.sleep(0.02)
    assert not deciding.done(), "the decision waits for its event"
    handoff.gate.set()
    await asyncio.wait_for(deciding, 1)
    assert [a for _, a in handoff.recorded] == [str(action)]


async def test_an_allowed_break_glass_decision_leaves_the_event_to_the_route() -> None:
    """The route records the opening (or its refusal): one event per break-glass request."""
    handoff = GatedHandoff()
    recorder = AccessRecorder(handoff)  # type: ignore[arg-type]
    clinician = Principal(subject="dr", tenant="hospital-a", roles=frozenset({Role.CLINICIAN}))
    await asyncio.wait_for(
        recorder.on_decision(clinician, Action.BREAK_GLASS, AccessResult("allow", "allowed"), 200, request()),
        1,
    )
    assert handoff.queued == []
    handoff.gate.set()
    await recorder.on_decision(
        PRINCIPAL, Action.BREAK_GLASS, AccessResult("forbidden", "role"), 403, request()
    )
    assert handoff.recorded == [(topics.ACCESS_RECORDED, str(Action.BREAK_GLASS))]  # a refusal is recorded
