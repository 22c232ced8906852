"""The fetcher watchdog: a subscriber whose aiokafka fetch task ended is stopped and started again;
running, stopping and never-started subscribers are left alone."""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.consumer.fetcher import Fetcher
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.consumer.subscription_state import TopicPartitionState
from aiokafka.errors import KafkaError
from enclave_common.kafka import ConsumerMetrics
from enclave_common.kafka_liveness import FetcherWatchdog
from prometheus_client import CollectorRegistry


class FakeConsumer:
    """An aiokafka consumer as the watchdog reads it: its fetch task, the partitions it holds, and the
    high watermark a fetch response recorded for them (one has returned)."""

    def __init__(self, fetch_task: asyncio.Future[Any] | None) -> None:
        self._closed = False
        self._fetcher = SimpleNamespace(_fetch_task=fetch_task)

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("enclave.instance.stored.v1", 0)}

    def highwater(self, partition: TopicPartition) -> int | None:
        return 7


class FakeSubscriber:
    def __init__(self, fetch_task: asyncio.Future[Any] | None, *, running: bool = True) -> None:
        self.group_id = "enclave-test"
        self.running = running
        self.consumer: Any = FakeConsumer(fetch_task)
        self.calls: list[str] = []

    async def stop(self) -> None:
        self.calls.append("stop")
        self.running = False

    async def start(self) -> None:
        self.calls.append("start")
        self.running = True
        self.consumer = FakeConsumer(_pending())


def _pending() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


def _ended(exc: BaseException | None = None) -> asyncio.Future[Any]:
    future = _pending()
    if exc is None:
        future.set_result(None)  # aiokafka's routine returns quietly when a CancelledError reaches it
    else:
        future.set_exception(exc)
    return future


def _watchdog(*subscribers: FakeSubscriber) -> tuple[FetcherWatchdog, CollectorRegistry]:
    registry = CollectorRegistry()
    broker: Any = SimpleNamespace(subscribers=list(subscribers))
    return FetcherWatchdog(broker, ConsumerMetrics(registry), interval_s=0.01), registry


async def test_a_subscriber_whose_fetcher_died_is_restarted_and_counted():
    dead = FakeSubscriber(_ended(RuntimeError("boom")))
    quiet = FakeSubscriber(_ended())
    alive = FakeSubscriber(_pending())
    watchdog, registry = _watchdog(dead, quiet, alive)
    assert await watchdog.check() == 2
    assert dead.calls == ["stop", "start"] and quiet.calls == ["stop", "start"] and alive.calls == []
    assert registry.get_sample_value("enclave_kafka_consumer_restarts_total", {"group": "enclave-test"}) == 2
    assert await watchdog.check() == 0  # the new consumers fetch: nothing more to do


async def test_each_group_is_counted_from_0_before_any_restart():
    """A series created at its first restart starts at 1, where increase() sees no rise:
    EnclaveKafkaConsumerRestarted missed the first restart of each pod."""
    watchdog, registry = _watchdog(FakeSubscriber(_pending()))
    assert await watchdog.check() == 0
    assert registry.get_sample_value("enclave_kafka_consumer_restarts_total", {"group": "enclave-test"}) == 0


async def test_stopping_closed_and_unstarted_subscribers_are_left_alone():
    stopping = FakeSubscriber(_ended(), running=False)
    closed = FakeSubscriber(_ended())
    closed.consumer._closed = True
    unstarted = FakeSubscriber(None)
    unstarted.consumer = None
    watchdog, _ = _watchdog(stopping, closed, unstarted)
    assert await watchdog.check() == 0
    assert stopping.calls == closed.calls == unstarted.calls == []


async def test_a_restart_that_fails_is_tried_again_until_it_succeeds():
    dead = FakeSubscriber(_ended(RuntimeError("boom")))
    attempts = 0

    async def start_once_kafka_answers() -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ConnectionError("broker away")
        await FakeSubscriber.start(dead)

    dead.start = start_once_kafka_answers  # type: ignore[method-assign]
    watchdog, registry = _watchdog(dead)
    task = asyncio.create_task(watchdog.run_forever())
    try:
        for _ in range(300):
            await asyncio.sleep(0.01)
            if attempts >= 3 and dead.running:
                break
    finally:
        task.cancel()
    assert attempts == 3 and dead.running and not FetcherWatchdog.fetcher_ended(dead)
    assert dead.calls == ["stop", "start"]  # stopped once, started once it could be
    assert registry.get_sample_value("enclave_kafka_consumer_restarts_total", {"group": "enclave-test"}) == 1


async def test_a_consumer_whose_stop_reraises_what_ended_its_fetcher_is_started_again():
    """aiokafka's stop() awaits the ended fetch task and so raises its error: the watchdog goes on."""
    dead = FakeSubscriber(_ended(RuntimeError("boom")))
    closed: list[bool] = []

    async def close() -> None:
        closed.append(True)

    dead.consumer._client = SimpleNamespace(close=close)

    async def stop_raising() -> None:
        await FakeSubscriber.stop(dead)
        raise ConnectionError("Unexpected error during data retrieval")

    dead.stop = stop_raising  # type: ignore[method-assign]
    watchdog, _ = _watchdog(dead)
    assert await watchdog.check() == 1
    assert dead.calls == ["stop", "start"] and dead.running and closed == [True]


def test_aiokafka_still_keeps_its_fetch_task_where_the_watchdog_looks():
    """The watchdog reads private attributes of the pinned aiokafka: this fails if they move."""
    assert "self._fetch_task = create_task(self._fetch_requests_routine())" in inspect.getsource(
        Fetcher.__init__
    )
    assert "self._fetcher = Fetcher(" in inspect.getsource(AIOKafkaConsumer.start)
    assert "self._closed" in inspect.getsource(AIOKafkaConsumer.stop)


async def test_a_subscriber_whose_group_coordinator_ended_is_restarted_too():
    """The coordinator's routine ended (uvloop's RuntimeError on a closed connection): every getone()
    raises its error again. The fetch task itself is still alive."""
    dead = FakeSubscriber(_pending())
    dead.consumer._coordinator = SimpleNamespace(
        _coordination_task=_ended(KafkaError("Unexpected error during coordination RuntimeError()"))
    )
    healthy = FakeSubscriber(_pending())
    healthy.consumer._coordinator = SimpleNamespace(_coordination_task=_pending())
    watchdog, registry = _watchdog(dead, healthy)

    assert await watchdog.check() == 1
    assert dead.calls == ["stop", "start"] and healthy.calls == []
    assert registry.get_sample_value("enclave_kafka_consumer_restarts_total", {"group": "enclave-test"}) == 1


def test_aiokafka_still_keeps_its_coordinator_routine_where_the_watchdog_looks():
    assert "self._coordination_task = create_task(self._coordination_routine())" in inspect.getsource(
        GroupCoordinator.__init__
    )
    assert "self._coordination_task.result()" in inspect.getsource(GroupCoordinator.check_errors)
    assert "self._coordinator = GroupCoordinator(" in inspect.getsource(AIOKafkaConsumer.start)


class FakeBroker:
    def __init__(self, subscribers: list[FakeSubscriber]) -> None:
        self.subscribers = subscribers
        self.answers = True

    async def ping(self, timeout: float) -> bool:
        return self.answers


async def test_a_consumer_whose_group_coordinator_stays_unknown_while_the_broker_answers_is_restarted():
    """Seen in the tenth session's chaos run after a Kafka restart: the coordinator routine waited
    forever for a metadata update; the handler's commit waited behind it; nothing was consumed or
    logged. Unknown for the timeout while the broker answers: restarted. During an outage (the broker
    does not answer) the clock does not run."""
    stuck = FakeSubscriber(_pending())
    stuck.consumer._coordinator = SimpleNamespace(_coordination_task=_pending(), coordinator_id=None)
    healthy = FakeSubscriber(_pending())
    healthy.consumer._coordinator = SimpleNamespace(_coordination_task=_pending(), coordinator_id=1)
    broker = FakeBroker([stuck, healthy])
    registry = CollectorRegistry()
    watchdog = FetcherWatchdog(broker, ConsumerMetrics(registry), interval_s=0.01, coordinator_timeout_s=0.2)  # type: ignore[arg-type]

    broker.answers = False  # an outage: not counted
    assert await watchdog.check() == 0
    await asyncio.sleep(0.3)
    assert await watchdog.check() == 0 and stuck.calls == []
    broker.answers = True
    assert await watchdog.check() == 0  # the clock starts now
    await asyncio.sleep(0.3)
    assert await watchdog.check() == 1
    assert stuck.calls == ["stop", "start"] and healthy.calls == []
    assert registry.get_sample_value("enclave_kafka_consumer_restarts_total", {"group": "enclave-test"}) == 1


def test_aiokafka_still_keeps_the_coordinator_id_where_the_watchdog_looks():
    source = inspect.getsource(GroupCoordinator.ensure_coordinator_known)
    assert "while self.coordinator_id is None" in source and "self.coordinator_id = coordinator_id" in source


async def test_a_restarted_consumer_that_gets_no_partitions_is_stopped_and_started_again():
    """Seen after a Kafka restart: the new consumer's start() waited for its assignment for good, the
    watchdog with it, and the service consumed nothing while /readyz said ready. A start is bounded;
    one that times out is stopped and started afresh at the next check."""
    dead = FakeSubscriber(_ended(RuntimeError("boom")))
    starts = 0

    async def start_waiting_the_first_time() -> None:
        nonlocal starts
        starts += 1
        if starts == 1:
            await asyncio.Event().wait()  # aiokafka's wait_for_assignment() that never ends
        await FakeSubscriber.start(dead)

    dead.start = start_waiting_the_first_time  # type: ignore[method-assign]
    registry = CollectorRegistry()
    broker: Any = SimpleNamespace(subscribers=[dead])
    watchdog = FetcherWatchdog(broker, ConsumerMetrics(registry), interval_s=0.01, start_timeout_s=0.05)
    task = asyncio.create_task(watchdog.run_forever())
    try:
        for _ in range(300):
            await asyncio.sleep(0.01)
            if dead.running and starts == 2:
                break
    finally:
        task.cancel()
    assert starts == 2 and dead.running and not FetcherWatchdog.fetcher_ended(dead)
    assert dead.calls == ["stop", "stop", "start"]  # stopped, the stuck start stopped, started


def test_aiokafka_still_records_a_high_watermark_from_every_fetch_response():
    """A restarted consumer counts as consuming again once a fetch for its partitions has returned:
    aiokafka records each partition's high watermark from every fetch response, before looking at
    its records (an empty fetch counts too), behind the public ``highwater()``; a new consumer's
    partitions have none. This fails if that moves."""
    proc = inspect.getsource(Fetcher._proc_fetch_request)
    assert proc.index("tp_state.highwater = highwater") < proc.index("records.has_next()")
    assert "self.highwater = None" in inspect.getsource(TopicPartitionState.__init__)
    assert "return assignment.state_value(partition).highwater" in inspect.getsource(
        AIOKafkaConsumer.highwater
    )
    assert "assigned_partitions()" in inspect.getsource(AIOKafkaConsumer.assignment)


def test_aiokafka_still_refreshes_its_metadata_after_a_failed_connection_and_connects_as_probed():
    """A consumer whose partition leaders refuse connections is not counted as stuck because aiokafka
    asks for new cluster metadata after every failed connection (so the leaders it names are the
    cluster's own), and the watchdog probes them at the address and with the TLS settings aiokafka
    connects with. This fails if that moves."""
    get_conn = inspect.getsource(AIOKafkaClient._get_conn)
    assert "broker = self.cluster.broker_metadata(node_id)" in get_conn
    assert "broker.host" in get_conn and "broker.port" in get_conn
    assert "ssl_context=self._ssl_context" in get_conn
    assert "security_protocol=self._security_protocol" in get_conn
    failed = get_conn[get_conn.index("except (OSError, asyncio.TimeoutError, KafkaError)") :]
    assert "self.force_metadata_update()" in failed
    assert "self._client = AIOKafkaClient(" in inspect.getsource(AIOKafkaConsumer.__init__)
