"""The stack is real: Kafka through a consumer group across a consumer restart, S3 with versioning
and object lock, MongoDB wire with a unique index."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from aiokafka.errors import KafkaError
from botocore.exceptions import ClientError
from enclave_common.envelope import Envelope
from enclave_common.events import KeyEvent
from enclave_common.idempotency import MongoProcessedEvents
from enclave_common.kafka import (
    BrokerProducerSlot,
    ConsumerMetrics,
    DirectPublisher,
    RetryPolicy,
    create_broker,
    reliable_consumer,
)
from enclave_common.service import ServiceRuntime
from enclave_common.settings import BaseServiceSettings
from prometheus_client import CollectorRegistry
from pymongo.errors import DuplicateKeyError

from .conftest import KAFKA, MONGO_URL
from .support import read_all


async def test_mongo_wire_insert_find_and_unique_index(mongo, unique):
    coll = mongo[f"it_{unique}"]["things"]
    await coll.create_index("business_key", unique=True)
    await coll.insert_one({"business_key": "a", "n": 1})
    with pytest.raises(DuplicateKeyError):
        await coll.insert_one({"business_key": "a", "n": 2})
    found = [d async for d in coll.find({"business_key": "a"})]
    assert [d["n"] for d in found] == [1]
    await mongo.drop_database(f"it_{unique}")


async def test_an_id_lookup_with_further_conditions_uses_the_id_index_and_keeps_their_meaning(mongo, unique):
    """The services' conditional writes filter on ``_id`` and a condition (analysis's member outcome
    by event time, the gateway's read model by ``recorded_at``). FerretDB v1's SQLite backend used the
    ``_id`` index only for a filter of ``_id`` alone and scanned the whole table otherwise (800 ms per
    settle with 4,000 members); the install patch ``ferretdb-*-sqlite-id-pushdown.patch`` pushes the
    ``_id`` down whatever else the filter holds. The query plan says which; the other conditions must
    still apply (the handler filters what the backend returns)."""
    db = mongo[f"it_{unique}"]
    coll = db["members"]
    await coll.insert_many([{"_id": f"m{i}", "state": "settled", "n": i} for i in range(50)])
    plan = await db.command({"explain": {"find": "members", "filter": {"_id": "m7", "state": "settled"}}})
    assert any("USING INDEX" in step and "_id_" in step for step in plan["queryPlanner"]["Plan"]), plan
    plan = await db.command({"explain": {"find": "members", "filter": {"state": "settled"}}})
    assert not any("USING INDEX" in step for step in plan["queryPlanner"]["Plan"]), plan  # a scan still
    assert (await coll.find_one({"_id": "m7", "state": "settled"}))["n"] == 7
    assert await coll.find_one({"_id": "m7", "state": "other"}) is None
    assert await coll.find_one({"_id": "m7", "$or": [{"n": {"$gt": 7}}, {"state": "other"}]}) is None
    changed = await coll.update_one({"_id": "m7", "n": {"$lt": 7}}, {"$set": {"state": "moved"}})
    assert changed.matched_count == 0
    with pytest.raises(DuplicateKeyError):  # the existing member did not match: the upsert inserts
        await coll.update_one({"_id": "m7", "n": {"$lt": 7}}, {"$set": {"state": "moved"}}, upsert=True)
    assert (await coll.delete_many({"_id": "m8", "state": "other"})).deleted_count == 0
    assert await coll.count_documents({"_id": "m8", "state": "settled"}) == 1
    assert (await coll.find_one({"_id": "m7"}))["state"] == "settled"
    await mongo.drop_database(f"it_{unique}")


def test_s3_put_get_and_versioning(s3, unique):
    bucket = f"it-versioned-{unique}"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    v1 = s3.put_object(Bucket=bucket, Key="obj", Body=b"first")["VersionId"]
    v2 = s3.put_object(Bucket=bucket, Key="obj", Body=b"second")["VersionId"]
    assert v1 != v2
    assert s3.get_object(Bucket=bucket, Key="obj")["Body"].read() == b"second"
    assert s3.get_object(Bucket=bucket, Key="obj", VersionId=v1)["Body"].read() == b"first"
    versions = s3.list_object_versions(Bucket=bucket, Prefix="obj")["Versions"]
    assert {v["VersionId"] for v in versions} == {v1, v2}


def test_s3_object_lock_compliance_refuses_deletion(s3, unique):
    bucket = f"it-worm-{unique}"
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    until = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    version = s3.put_object(
        Bucket=bucket,
        Key="checkpoint",
        Body=b"root",
        ObjectLockMode="COMPLIANCE",
        ObjectLockRetainUntilDate=until,
    )["VersionId"]
    with pytest.raises(ClientError) as refused:
        s3.delete_object(Bucket=bucket, Key="checkpoint", VersionId=version)
    # S3 answers AccessDenied, MinIO InvalidRequest ("Object is WORM protected"): either way, refused.
    assert refused.value.response["Error"]["Code"] in {"AccessDenied", "InvalidRequest"}
    retention = s3.get_object_retention(Bucket=bucket, Key="checkpoint", VersionId=version)["Retention"]
    assert retention["Mode"] == "COMPLIANCE"
    with pytest.raises(ClientError):
        s3.put_object_retention(
            Bucket=bucket,
            Key="checkpoint",
            VersionId=version,
            Retention={"Mode": "COMPLIANCE", "RetainUntilDate": until - dt.timedelta(hours=12)},
        )
    assert s3.get_object(Bucket=bucket, Key="checkpoint", VersionId=version)["Body"].read() == b"root"


async def test_kafka_consumer_group_survives_a_consumer_restart(mongo, unique):
    """Ten events and two redeliveries of the same ids; the first consumer dies after doing the
    sixth event's work but before committing. The second consumer (same group) picks up from the
    last commit: every event's effect exists exactly once, and no id passes the guard twice."""
    topic = f"enclave.ittest{unique}.happened.v1"
    group = f"enclave-it-{unique}"
    settings = BaseServiceSettings(
        service_name=f"it{unique}", kafka_bootstrap_servers=KAFKA, mongo_url=MONGO_URL, retry_attempts=1
    )
    db = mongo[f"it_{unique}"]
    effects = db["effects"]
    await effects.create_index("event_id", unique=True)
    handled: list[str] = []
    events = _key_events(topic, 10)
    crash_on = events[5].id
    crashed = asyncio.Event()
    done = asyncio.Event()

    def make_handler(crash: bool):
        async def handler(env: Envelope) -> None:
            handled.append(env.id)
            try:
                await effects.insert_one({"event_id": env.id})
            except DuplicateKeyError:
                pass  # idempotent on the business key: the effect already exists
            if crash and env.id == crash_on:
                crashed.set()
                await asyncio.sleep(3600)  # "killed" here: effect done, offset not committed
            if await effects.count_documents({}) == 10:
                done.set()

        return handler

    async def run_consumer(crash: bool):
        broker = create_broker(settings, metadata_max_age_ms=1000, graceful_timeout=0.5)
        reliable_consumer(
            broker,
            {topic: make_handler(crash)},
            group_id=group,
            processed=MongoProcessedEvents(db),
            retry=RetryPolicy.from_settings(settings),
            metrics=ConsumerMetrics(CollectorRegistry()),
        )
        return broker

    producer = create_broker(settings)
    await producer.start()
    for env in events[:8]:
        await producer.publish(env.to_bytes(), topic=topic, key=b"one-partition")
    await producer.publish(events[1].to_bytes(), topic=topic, key=b"one-partition")  # a redelivery

    first = await run_consumer(crash=True)
    await first.start()
    await asyncio.wait_for(crashed.wait(), 60)
    await first.stop()

    for env in events[8:]:
        await producer.publish(env.to_bytes(), topic=topic, key=b"one-partition")
    await producer.publish(events[2].to_bytes(), topic=topic, key=b"one-partition")  # another redelivery

    second = await run_consumer(crash=False)
    await second.start()
    await asyncio.wait_for(done.wait(), 60)
    await asyncio.sleep(2)  # let the late duplicate arrive and be skipped
    await second.stop()
    await producer.stop()

    stored = sorted([d["event_id"] async for d in effects.find({})])
    assert stored == sorted(e.id for e in events)
    # Only the event in flight at the crash was handled twice; the redelivered ids were skipped.
    assert sorted(handled) == sorted([e.id for e in events] + [crash_on])
    await mongo.drop_database(f"it_{unique}")


@pytest.mark.parametrize("ending", ["raised", "returned", "coordinator"])
async def test_a_consumer_whose_fetcher_ended_is_restarted_by_the_service_and_misses_nothing(
    mongo, unique, ending
):
    """aiokafka's fetch task can end: "raised" is an unexpected error inside it (what Kafka killed
    mid-fetch caused here: aiokafka logs "Unexpected error in fetcher routine"), "returned" is the
    routine swallowing a cancellation (aio-libs/aiokafka#983). Its consumer then waits forever while
    the service looks healthy. "coordinator" is the group coordinator's routine ending on uvloop's
    RuntimeError for a write to a closed connection (seen in the eighth session's chaos run after
    Kafka's kill): every getone() then raises its error again, forever. The service's watchdog
    notices, restarts the subscriber, and the event published meanwhile is handled, once."""
    topic = f"enclave.ittest{unique}.watched.v1"
    settings = BaseServiceSettings(
        service_name=f"it{unique}", kafka_bootstrap_servers=KAFKA, mongo_url=MONGO_URL
    )
    runtime = ServiceRuntime(settings)
    handled: list[str] = []
    runtime.consume(topic, lambda env: _note(handled, env))
    events = _key_events(topic, 2)
    await runtime.start()
    try:
        await runtime.publisher.publish(topic, events[0], key="k")
        await _until(lambda: events[0].id in handled)
        (subscriber,) = runtime.broker.subscribers
        fetcher = subscriber.consumer._fetcher
        coordinator = subscriber.consumer._coordinator
        ended = fetcher._fetch_task
        if ending == "raised":  # the routine's next round raises inside, as it did when Kafka died
            fetcher._get_actions_per_node = _raise_runtime_error
        elif ending == "returned":
            fetcher._fetch_task.cancel()  # the routine swallows the cancellation and returns
        else:  # the coordinator looks for a new coordinator and meets uvloop's RuntimeError
            ended = coordinator._coordination_task
            coordinator.ensure_coordinator_known = _closed_transport
            coordinator.coordinator_dead()
        await _until(ended.done)  # (the watchdog may already be restarting the subscriber)
        await runtime.publisher.publish(topic, events[1], key="k")
        await _until(lambda: events[1].id in handled, timeout=60)
        restarts = runtime.registry.get_sample_value(
            "enclave_kafka_consumer_restarts_total", {"group": f"enclave-it{unique}"}
        )
        assert restarts == 1 and handled.count(events[1].id) == 1
    finally:
        await runtime.stop()
        await mongo.drop_database(f"it{unique}")


async def _closed_transport() -> None:
    raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")


@pytest.mark.parametrize("slot", ["broker", "direct"])
async def test_a_producer_whose_sender_ended_is_replaced_by_the_service_and_publishing_goes_on(unique, slot):
    """aiokafka's sender task can end on an unexpected error inside it ("Unexpected error in sender
    routine"). Its producer then refuses every later publish, for good, while the service looks
    healthy. The service's watchdog notices and puts a new producer in its place: publishing works
    again. "broker" is FastStream's producer (what consumers publish their outcomes with), "direct"
    the gateway's own."""
    topic = f"enclave.ittest{unique}.sent.v1"
    settings = BaseServiceSettings(
        service_name=f"it{unique}", kafka_bootstrap_servers=KAFKA, mongo_url=MONGO_URL
    )
    runtime = ServiceRuntime(settings)
    direct = DirectPublisher(settings, tracer_provider=runtime.tracer_provider)
    runtime.on_startup(direct.start)
    runtime.on_shutdown(direct.stop)
    runtime.producer_slots.append(direct)
    events = _key_events(topic, 3)

    def current() -> Any:
        return BrokerProducerSlot(runtime.broker).producer() if slot == "broker" else direct.producer()

    async def publish(env: Envelope) -> None:
        if slot == "broker":
            await runtime.publisher.publish(topic, env, key="k")
        else:
            await (await direct.send(topic, env, key="k"))

    await runtime.start()
    try:
        await publish(events[0])
        broken = current()
        broken._sender._send_produce_req = _raise_runtime_error  # the sender's next round raises inside
        with pytest.raises(KafkaError):  # the batch queued when the sender died fails (aiokafka)
            await publish(events[1])
        assert broken._sender.sender_task.done()  # and every later publish on it would fail too
        await _until(lambda: current() is not broken)  # replaced by the service's watchdog (5 s)
        await publish(events[2])
        published = await read_all(topic, lambda env: True)
        assert [env.id for env in published] == [events[0].id, events[2].id]
        restarts = runtime.registry.get_sample_value(
            "enclave_kafka_producer_restarts_total", {"producer": slot}
        )
        assert restarts == 1
    finally:
        await runtime.stop()


def _raise_runtime_error(*_: object) -> None:
    raise RuntimeError("Set changed size during iteration")


async def _note(handled: list[str], env: Envelope) -> None:
    handled.append(env.id)


async def _until(condition, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.1)


def _key_events(topic: str, count: int) -> list[Envelope]:
    return [
        Envelope.for_topic(
            topic,
            KeyEvent(operation="created", key_id=f"k{i}"),
            source="it",
            tenant="t",
            actor="a",
            correlation_id="c",
        )
        for i in range(count)
    ]
