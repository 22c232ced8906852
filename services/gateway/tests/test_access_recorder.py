"""Access events: an allowed upload's event is queued at the decision and settled before the hand-off
and the answer (its Kafka round trip overlaps the body); every other decision is recorded before the
route runs. An event that cannot be recorded is a 503 either way."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from enclave_common import topics
from enclave_common.auth import Action, Principal, Role
from enclave_common.auth.fastapi import AccessResult
from enclave_common.envelope import Envelope
from enclave_gateway.access import AccessRecorder
from enclave_gateway.handoff import KafkaUnavailable
from fastapi import HTTPException, Request


class GatedHandoff:
    """Handoff.acknowledgements: events are handed over at once (``queued``) and acknowledged when
    the test opens the gate, or refused."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.refuse = False
        self.queued: list[str] = []
        self.recorded: list[tuple[str, str]] = []

    def acknowledgements(self) -> GatedAcks:
        return GatedAcks(self)


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


async def test_an_allowed_upload_is_not_held_up_by_its_access_event_but_settles_it() -> None:
    handoff = GatedHandoff()
    recorder = AccessRecorder(handoff)  # type: ignore[arg-type]
    req = request()
    await asyncio.wait_for(
        recorder.on_decision(PRINCIPAL, Action.UPLOAD, AccessResult("allow", "allowed"), 200, req), 1
    )
    assert handoff.queued == ["upload"], "the event is with the producer before the body is read"
    assert handoff.recorded == [], "the decision returned before the event was acknowledged"
    settling = asyncio.create_task(recorder.settle(req))
    await asyncio.sleep(0.02)
    assert not settling.done(), "settle waits for the acknowledgement"
    handoff.gate.set()
    await asyncio.wait_for(settling, 1)
    assert handoff.recorded == [(topics.ACCESS_RECORDED, "upload")]
    await recorder.settle(req)  # settled once: a second call is a no-op
    assert len(handoff.recorded) == 1


async def test_an_allowed_upload_whose_access_event_fails_settles_as_503() -> None:
    handoff = GatedHandoff()
    handoff.refuse = True
    recorder = AccessRecorder(handoff)  # type: ignore[arg-type]
    req = request()
    await recorder.on_decision(PRINCIPAL, Action.UPLOAD, AccessResult("allow", "allowed"), 200, req)
    handoff.gate.set()
    with pytest.raises(HTTPException) as refused:
        await recorder.settle(req)
    assert refused.value.status_code == 503
    assert refused.value.headers == {"Retry-After": "10"}


@pytest.mark.parametrize(
    ("action", "result"),
    [
        (Action.READ_STATUS, AccessResult("allow", "allowed")),
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
