"""An upload whose hand-off or access event fails part-way is still recorded where Kafka takes the
event, with what may have happened downstream (docs/gateway.md, "Status codes common to every
route").

Found by the review of the nineteenth session: an upload answered 503 ``kafka_unavailable`` was never
recorded, although that error also covers one chunk's acknowledgement timing out while the access
topic works and earlier instances were handed off (ingest stores them); an upload fully handed off
whose access event failed got the same ``kafka_unavailable`` "nothing was accepted" answer; a spool
that failed while reading back a later instance was recorded as ``rejected`` although earlier ones
were queued; and an upload the server cancelled (its graceful-shutdown timeout) during its hand-off
or its access event was not recorded at all.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from corpus import builders
from enclave_common import topics
from enclave_common.envelope import Envelope
from enclave_gateway.handoff import SpoolUnavailable
from route_harness import AckingPublisher, Exchange, Harness, gateway_routes, stow_request
from test_access_answers import PLANTED, upload
from test_unaudited_grants import events_of, refuse


class FlakyChunks:
    """Kafka takes the first instance's chunk, then does not acknowledge a later one; the other
    topics work."""

    def __init__(self, publisher: AckingPublisher) -> None:
        self.inner = publisher
        self.chunks = 0

    async def send(self, topic: str, envelope: Envelope, *, key: str) -> Any:
        if topic == topics.UPLOAD_CHUNK:
            self.chunks += 1
            if self.chunks >= 2:
                raise TimeoutError("no acknowledgement for this chunk")
        return await self.inner.send(topic, envelope, key=key)


class Stalling:
    """The producer, never acknowledging the first event of ``topic`` (kept apart from what was
    acknowledged); ``queued`` is set when it was sent."""

    def __init__(self, publisher: AckingPublisher, topic: str) -> None:
        self.inner = publisher
        self.topic = topic
        self.queued = asyncio.Event()

    async def send(self, topic: str, envelope: Envelope, *, key: str) -> Any:
        if topic == self.topic and not self.queued.is_set():
            self.queued.set()
            return asyncio.get_running_loop().create_future()
        return await self.inner.send(topic, envelope, key=key)


def two_instances() -> builders.Body:
    return builders.multipart_body([builders.make_instance(), builders.make_instance(patient_id=PLANTED)])


async def test_an_upload_refused_for_a_chunk_kafka_did_not_take_is_recorded_as_an_error(
    tmp_path: Path,
) -> None:
    harness = gateway_routes(tmp_path)
    harness.uploads.handoff._publisher = FlakyChunks(harness.publisher)  # type: ignore[assignment]
    answer = await upload(harness, "/dicomweb/studies", two_instances())
    assert answer.status == 503, answer.body
    assert json.loads(answer.body)["error"] == "kafka_unavailable"
    assert topics.UPLOAD_RECEIVED in harness.publisher.topics()  # instance 1 was handed off
    await harness.recorder.settle_background()
    [event] = events_of(harness, answer)
    assert (event["outcome"], event["status_code"], event["detail"]) == ("error", 503, "kafka_unavailable")
    assert event["target"].startswith("upload:")
    assert topics.UPLOAD_COMPLETED not in harness.publisher.topics()


async def test_a_503_for_a_chunk_does_not_wait_for_its_access_event(tmp_path: Path) -> None:
    """With Kafka down the access event of a refused hand-off cannot be taken either: the answer goes
    out without waiting for it (until the twentieth session it waited a second publish timeout), and
    the event is still recorded if Kafka takes it later."""
    harness = gateway_routes(tmp_path)
    stalling = Stalling(harness.publisher, topics.ACCESS_RECORDED)
    harness.uploads.handoff._publisher = FlakyChunks(stalling)  # type: ignore[assignment, arg-type]
    # The harness's publish timeout is 5 s: an answer that waited for the access event comes later.
    answer = await asyncio.wait_for(upload(harness, "/dicomweb/studies", two_instances()), 3)
    assert answer.status == 503, answer.body
    assert json.loads(answer.body)["error"] == "kafka_unavailable"
    assert stalling.queued.is_set(), "the access event was handed to the producer"
    assert harness.recorder._unfinished, "and is still waiting for Kafka"


async def test_an_upload_refused_with_kafka_down_is_still_answered_503(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)

    class Down:
        async def send(self, *_: object, **__: object) -> Any:
            raise ConnectionError("no broker answered")

    harness.uploads.handoff._publisher = Down()  # type: ignore[assignment]
    answer = await upload(harness, "/dicomweb/studies", two_instances())
    assert answer.status == 503, answer.body
    assert json.loads(answer.body)["error"] == "kafka_unavailable"
    assert answer.header("retry-after") == "10"


async def test_a_handed_off_upload_whose_access_event_failed_has_its_own_code(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    refuse(harness, topics.ACCESS_RECORDED)
    answer = await upload(harness, "/dicomweb/studies", two_instances())
    assert answer.status == 503, answer.body
    assert topics.UPLOAD_COMPLETED in harness.publisher.topics()
    body = json.loads(answer.body)
    assert body["error"] == "access_unrecorded"
    assert "handed off" in body["message"] and "stored once" in body["message"]
    assert answer.header("retry-after") == "10"


async def test_a_wholly_refused_upload_whose_access_event_failed_is_kafka_unavailable(tmp_path: Path) -> None:
    """Nothing of it was handed off: the common answer, "nothing was accepted", holds."""
    harness = gateway_routes(tmp_path)
    refuse(harness, topics.ACCESS_RECORDED)
    answer = await upload(harness, "/dicomweb/studies", builders.multipart_body([b"not dicom at all" * 20]))
    assert answer.status == 503, answer.body
    assert json.loads(answer.body)["error"] == "kafka_unavailable"


@pytest.mark.parametrize(("failing", "outcome"), [(1, "rejected"), (2, "error")])
async def test_a_spool_failing_part_way_through_the_hand_off_is_an_error_once_an_instance_was_queued(
    tmp_path: Path, failing: int, outcome: str
) -> None:
    harness = gateway_routes(tmp_path)
    handoff = harness.uploads.handoff
    publish_instance = handoff.publish_instance
    calls = 0

    async def spool_fails(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == failing:
            raise SpoolUnavailable("The gateway's spool could not be used")
        await publish_instance(*args, **kwargs)

    handoff.publish_instance = spool_fails  # type: ignore[method-assign]
    answer = await upload(harness, "/dicomweb/studies", two_instances())
    assert answer.status == 503, answer.body
    [event] = events_of(harness, answer)
    assert (event["outcome"], event["status_code"], event["detail"]) == (outcome, 503, "spool_unavailable")


async def cancelled_upload(harness: Harness, stalled: asyncio.Event, body: builders.Body) -> Exchange:
    """The upload, cancelled (as uvicorn's graceful-shutdown timeout does) once ``stalled`` is set."""
    exchange = Exchange()
    request = asyncio.ensure_future(
        stow_request(
            harness,
            [body.data],
            content_type=body.content_type,
            headers=[("x-request-id", "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b")],
            exchange=exchange,
        )
    )
    await asyncio.wait_for(stalled.wait(), 5)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    return exchange


def cancelled_events(harness: Harness) -> list[dict[str, Any]]:
    return [
        e
        for e in harness.publisher.access_events()
        if e["correlation_id"] == "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
    ]


@pytest.mark.parametrize("stalled_topic", [topics.UPLOAD_COMPLETED, topics.ACCESS_RECORDED])
async def test_an_upload_cancelled_during_its_hand_off_or_its_record_is_recorded(
    tmp_path: Path, stalled_topic: str
) -> None:
    harness = gateway_routes(tmp_path)
    stalling = Stalling(harness.publisher, stalled_topic)
    harness.uploads.handoff._publisher = stalling  # type: ignore[assignment]
    await cancelled_upload(harness, stalling.queued, two_instances())
    assert topics.UPLOAD_RECEIVED in harness.publisher.topics()
    [event] = cancelled_events(harness)
    assert (event["outcome"], event["status_code"], event["detail"]) == ("error", 500, "request_cancelled")
    assert event["target"].startswith("upload:")


async def test_an_upload_cancelled_while_its_body_arrives_is_recorded(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    body = two_instances()
    exchange = Exchange()
    hold = asyncio.Event()  # never set: the body's last piece never comes
    request = asyncio.ensure_future(
        stow_request(
            harness,
            [body.data[:100], body.data[100:]],
            content_type=body.content_type,
            headers=[("x-request-id", "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b")],
            hold=hold,
            exchange=exchange,
        )
    )
    while exchange.body_messages_read < 1:
        await asyncio.sleep(0.01)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    [event] = cancelled_events(harness)
    assert (event["outcome"], event["status_code"], event["detail"], event["target"]) == (
        "error",
        500,
        "request_cancelled",
        None,
    )
    assert not {topics.UPLOAD_CHUNK, topics.UPLOAD_RECEIVED} & set(harness.publisher.topics())
