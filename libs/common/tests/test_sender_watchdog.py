"""The sender watchdog: a producer whose aiokafka sender task ended is replaced, and what still waited
on it fails as a retriable Kafka error instead of waiting forever; healthy, closed and absent
producers are left alone; a replacement that fails or hangs is tried again, without holding back the
other producers; a producer that fails to start is closed."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError
from aiokafka.producer.message_accumulator import MessageAccumulator
from aiokafka.producer.sender import Sender
from enclave_common.errors import classify_exception
from enclave_common.kafka import BrokerProducerSlot, ConsumerMetrics, create_broker
from enclave_common.kafka_liveness import SenderWatchdog
from enclave_common.settings import BaseServiceSettings
from faststream.kafka.publisher.producer import AioKafkaFastProducerImpl
from faststream.kafka.publisher.state import RealProducer
from prometheus_client import CollectorRegistry


class FakeAccumulator:
    def __init__(self) -> None:
        self.waiting: list[asyncio.Future[Any]] = []

    def fail_all(self, exc: BaseException) -> None:
        for future in self.waiting:
            if not future.done():
                future.set_exception(exc)


class FakeSender:
    def __init__(self, task: asyncio.Future[Any]) -> None:
        self.sender_task = task


class FakeProducer:
    def __init__(self, sender_task: asyncio.Future[Any], *, closed: bool = False) -> None:
        self._closed = closed
        self._sender = FakeSender(sender_task)
        self._message_accumulator = FakeAccumulator()
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True
        self._closed = True


class FakeSlot:
    def __init__(self, name: str, producer: FakeProducer | None, *, failures: int = 0) -> None:
        self.name = name
        self.current = producer
        self.failures = failures
        self.replacements = 0

    def producer(self) -> Any:
        return self.current

    async def replace(self) -> None:
        if self.failures:
            self.failures -= 1
            raise KafkaConnectionError("Kafka is unreachable")
        self.replacements += 1
        self.current = FakeProducer(_pending())


def _pending() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


def _ended(exc: BaseException) -> asyncio.Future[Any]:
    future = _pending()
    future.set_exception(exc)
    return future


class AnsweringBroker:
    async def ping(self, timeout: float) -> bool:
        return True


def _watchdog(*slots: FakeSlot) -> tuple[SenderWatchdog, CollectorRegistry]:
    registry = CollectorRegistry()
    broker: Any = AnsweringBroker()
    return SenderWatchdog(list(slots), ConsumerMetrics(registry), broker=broker, interval_s=0.01), registry


def _restarts(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value("enclave_kafka_producer_restarts_total", {"producer": name})


async def test_a_producer_whose_sender_ended_is_replaced_and_its_waiting_publishes_fail_retriably():
    dead = FakeProducer(_ended(RuntimeError("inside the sender routine")))
    waiting = _pending()
    # A publish still waiting on the old producer (aiokafka fails nothing when the task was cancelled).
    dead._message_accumulator.waiting.append(waiting)
    slot = FakeSlot("broker", dead)
    watchdog, registry = _watchdog(slot)

    assert await watchdog.check() == 1

    assert slot.replacements == 1 and slot.current is not dead
    assert dead.stopped
    with pytest.raises(KafkaConnectionError):
        waiting.result()
    assert type(classify_exception(waiting.exception())).__name__ == "TransientError"  # retried
    assert _restarts(registry, "broker") == 1
    assert await watchdog.check() == 0  # the new producer is healthy


async def test_healthy_closed_and_absent_producers_are_left_alone():
    healthy = FakeSlot("healthy", FakeProducer(_pending()))
    closed = FakeSlot("closed", FakeProducer(_ended(RuntimeError("stopped")), closed=True))
    absent = FakeSlot("absent", None)
    watchdog, registry = _watchdog(healthy, closed, absent)

    assert await watchdog.check() == 0
    assert healthy.replacements == closed.replacements == absent.replacements == 0
    assert _restarts(registry, "healthy") == 0


def test_each_producer_slot_is_counted_from_0_before_any_replacement() -> None:
    """A series created at its first replacement starts at 1, where increase() sees no rise:
    EnclaveKafkaProducerReplaced missed the first replacement of each pod."""
    _, registry = _watchdog(FakeSlot("broker", None), FakeSlot("direct", None))
    assert _restarts(registry, "broker") == 0 and _restarts(registry, "direct") == 0
    stuck = "enclave_kafka_producer_stuck_seconds"
    assert registry.get_sample_value(stuck, {"producer": "direct"}) == 0  # served from the start


async def test_a_replacement_that_fails_is_tried_again_and_nothing_waits_meanwhile():
    dead = FakeProducer(_ended(RuntimeError("inside the sender routine")))
    slot = FakeSlot("direct", dead, failures=1)
    waiting = _pending()
    dead._message_accumulator.waiting.append(waiting)
    watchdog, registry = _watchdog(slot)

    task = asyncio.create_task(watchdog.run_forever())
    try:
        async with asyncio.timeout(5):
            while slot.replacements == 0:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert waiting.done()  # failed on the first, failed attempt already
    assert slot.current is not dead and dead.stopped
    assert _restarts(registry, "direct") == 1


def test_aiokafka_and_faststream_still_keep_what_the_watchdog_reads():
    """The watchdog reads private attributes of the pinned aiokafka and FastStream: this fails if
    they move."""
    assert "self._sender_task = create_task(self._sender_routine())" in inspect.getsource(Sender.start)
    assert "def sender_task" in inspect.getsource(Sender)
    # /healthz names what ended the sender from under the KafkaError aiokafka wraps it in.
    assert 'raise KafkaError("Unexpected error during batch delivery") from exc' in inspect.getsource(
        Sender._sender_routine
    )
    init = inspect.getsource(AIOKafkaProducer.__init__)
    assert "self._message_accumulator = MessageAccumulator(" in init and "self._sender = Sender(" in init
    assert "self._closed" in inspect.getsource(AIOKafkaProducer.stop)
    assert callable(MessageAccumulator.fail_all)
    broker = create_broker(BaseServiceSettings(service_name="pin"))
    assert isinstance(broker.config.producer, AioKafkaFastProducerImpl)
    assert "self._producer = RealProducer(producer)" in inspect.getsource(AioKafkaFastProducerImpl.connect)
    assert "producer" in RealProducer.__slots__
    assert "bootstrap_servers" in broker._connection_kwargs
    assert BrokerProducerSlot(broker).producer() is None  # not connected yet


class HangingSlot(FakeSlot):
    async def replace(self) -> None:
        if self.failures:
            self.failures -= 1
            await asyncio.sleep(3600)  # e.g. the idempotent producer's id never comes
        await super().replace()


async def test_one_slot_whose_replacement_fails_or_hangs_does_not_hold_back_the_others():
    failing = FakeSlot("failing", FakeProducer(_ended(RuntimeError("x"))), failures=1)
    hanging = HangingSlot("hanging", FakeProducer(_ended(RuntimeError("y"))), failures=1)
    dead = FakeSlot("dead", FakeProducer(_ended(RuntimeError("z"))))
    watchdog, registry = _watchdog(failing, hanging, dead)
    watchdog.replace_timeout_s = 0.05

    assert await watchdog.check() == 1  # only "dead": the others failed this round
    assert dead.replacements == 1 and failing.replacements == hanging.replacements == 0
    assert await watchdog.check() == 2  # tried again
    assert failing.replacements == hanging.replacements == 1
    assert _restarts(registry, "hanging") == 1


class StartFails:
    def __init__(self) -> None:
        self.stopped = False

    async def start(self) -> None:
        raise KafkaConnectionError("Kafka is unreachable")

    async def stop(self) -> None:
        self.stopped = True


async def test_a_producer_that_fails_to_start_is_closed_not_left_behind():
    from enclave_common.kafka import _started

    producer = StartFails()
    with pytest.raises(KafkaConnectionError):
        await _started(producer, producer.start())  # type: ignore[arg-type]
    assert producer.stopped
