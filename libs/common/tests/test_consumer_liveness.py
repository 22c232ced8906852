"""``/healthz`` fails when a Kafka consumer stays stuck despite its watchdog while Kafka answers, or
when the watchdog itself stops: Kubernetes then restarts the pod. A consumer that breaks again after
every restart is stuck too: only a fetch returned by a running consumer ends the count. A restart
that holds, a consumer that consumes between occasional restarts, and a Kafka outage keep it alive
(restarting pods during an outage mends nothing; ``/readyz`` reports that)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from aiokafka import TopicPartition
from enclave_common.kafka_liveness import FetcherWatchdog
from enclave_common.service import ServiceRuntime
from enclave_common.settings import BaseServiceSettings
from pydantic import ValidationError

PLANTED = "PHI-MRN-51077-QX"
GROUP = "enclave-liveness"
BOUND_S = 0.3


class FakeConsumer:
    """An aiokafka consumer as the watchdog reads it: its fetch task, the partitions it holds, and
    whether a fetch response has recorded their high watermark (a fetch returned)."""

    def __init__(
        self, fetch_task: asyncio.Future[Any], *, fetched: bool = True, holds: int = 1, leader: int | None = 1
    ) -> None:
        self._closed = False
        self._fetcher = SimpleNamespace(_fetch_task=fetch_task)
        self.fetched = fetched
        self.partitions = {TopicPartition("enclave.instance.stored.v1", p) for p in range(holds)}
        # aiokafka's cluster metadata: the leader of each partition (-1: none, None: unknown).
        self._client = SimpleNamespace(cluster=SimpleNamespace(leader_for_partition=lambda tp: leader))

    def assignment(self) -> set[TopicPartition]:
        return set(self.partitions)

    def highwater(self, partition: TopicPartition) -> int | None:
        assert partition in self.partitions, "aiokafka asserts the partition is assigned"
        return 7 if self.fetched else None


class StuckSubscriber:
    """A FastStream subscriber whose aiokafka fetch task has ended, whose ``start`` is ``starts``, and
    whose restarted consumer is ``restarted()`` (by default one that fetches)."""

    group_id = GROUP
    pattern = None
    topic_names_for_subscribe = ("enclave.instance.stored.v1",)

    def __init__(
        self, starts: Callable[[], Any], restarted: Callable[[], FakeConsumer] | None = None
    ) -> None:
        self.running = True
        self.consumer: Any = _consumer(_ended())
        self.starts = starts
        self.restarted = restarted or (lambda: _consumer(asyncio.get_running_loop().create_future()))
        self.start_attempts = 0

    async def stop(self) -> None:
        self.running = False

    async def start(self) -> None:
        self.start_attempts += 1
        await self.starts()
        self.running = True
        self.consumer = self.restarted()


def _consumer(fetch_task: asyncio.Future[Any], **kwargs: Any) -> FakeConsumer:
    return FakeConsumer(fetch_task, **kwargs)


def _ended() -> asyncio.Future[Any]:
    future = asyncio.get_running_loop().create_future()
    future.set_exception(RuntimeError(f"Unexpected error in fetcher routine {PLANTED}"))
    return future


class FakeBroker:
    def __init__(self, *subscribers: StuckSubscriber) -> None:
        self.subscribers = list(subscribers)
        self.answers = True

    async def ping(self, timeout: float) -> bool:
        return self.answers


async def _refused() -> None:
    raise ConnectionError(f"start refused {PLANTED}")


@contextlib.asynccontextmanager
async def _service(
    broker: FakeBroker, **watchdog: Any
) -> AsyncIterator[tuple[ServiceRuntime, httpx.AsyncClient]]:
    """The service's HTTP app, on this loop, with a fast consumer watchdog over ``broker``."""
    runtime = ServiceRuntime(BaseServiceSettings(service_name="liveness-test"))
    app = runtime.http_app(title="liveness", start_runtime=False)
    options = {"interval_s": 0.01, "stuck_after_s": BOUND_S, **watchdog}
    runtime.watch_consumers(FetcherWatchdog(broker, runtime.consumer_metrics, **options))  # type: ignore[arg-type]
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            yield runtime, client
    finally:
        await runtime.stop()


def _stuck_seconds(runtime: ServiceRuntime) -> float | None:
    return runtime.registry.get_sample_value("enclave_kafka_consumer_stuck_seconds", {"group": GROUP})


async def _statuses_for(client: httpx.AsyncClient, seconds: float) -> set[int]:
    seen: set[int] = set()
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        seen.add((await client.get("/healthz")).status_code)
        await asyncio.sleep(0.02)
    return seen


async def test_healthz_fails_naming_the_consumer_whose_restarts_keep_failing_past_the_bound() -> None:
    stuck = StuckSubscriber(_refused)
    async with _service(FakeBroker(stuck)) as (runtime, client):
        assert (await client.get("/healthz")).status_code == 200
        for _ in range(200):
            answer = await client.get("/healthz")
            if answer.status_code == 503:
                break
            await asyncio.sleep(0.01)
        assert answer.status_code == 503
        body = answer.json()
        assert body["status"] == "stuck" and body["service"] == "liveness-test"
        [problem] = body["problems"]
        assert problem["check"] == "kafka_consumer" and problem["group"] == GROUP
        assert problem["topics"] == ["enclave.instance.stored.v1"] and problem["cause"] == "fetch_task_ended"
        assert problem["failed_restarts"] >= 2 and problem["last_restart_error"] == "ConnectionError"
        assert problem["restarts"] == 0
        assert problem["since"] and problem["stuck_while_kafka_answered_s"] >= 0
        assert PLANTED not in answer.text  # neither error's text is echoed
        assert (_stuck_seconds(runtime) or 0) >= BOUND_S


async def test_a_restart_that_succeeds_keeps_healthz_alive() -> None:
    """A first start refused, the second taking partitions: under the bound, alive throughout; the
    gauge shows the stuck time while it lasts and 0 once the consumer consumes again."""
    attempts = 0

    async def refused_once() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("not yet")
        await asyncio.sleep(0.05)  # joining the group

    stuck = StuckSubscriber(refused_once)
    async with _service(FakeBroker(stuck), stuck_after_s=1.0) as (runtime, client):
        assert await _statuses_for(client, 1.5) == {200}
        assert stuck.running and stuck.start_attempts == 2
        assert _stuck_seconds(runtime) == 0.0
        assert runtime.consumer_watchdog is not None and runtime.consumer_watchdog.liveness_problems() == []


async def test_a_kafka_outage_keeps_healthz_alive_and_its_time_is_not_counted() -> None:
    """Restarts fail while the broker does not answer, for several bounds: alive (a new pod could not
    consume either). Once it answers and the restarts still fail, the bound runs from there."""
    broker = FakeBroker(StuckSubscriber(_refused))
    broker.answers = False
    async with _service(broker) as (runtime, client):
        assert await _statuses_for(client, 4 * BOUND_S) == {200}
        assert _stuck_seconds(runtime) == 0.0
        broker.answers = True
        assert 503 in await _statuses_for(client, 4 * BOUND_S)


async def _joins() -> None:
    await asyncio.sleep(0.005)  # joining the group: the start returns with partitions


async def _until_503(client: httpx.AsyncClient, seconds: float = 4.0) -> httpx.Response:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        answer = await client.get("/healthz")
        if answer.status_code == 503 or asyncio.get_running_loop().time() > deadline:
            return answer
        await asyncio.sleep(0.01)


async def test_a_consumer_that_breaks_again_after_every_restart_fails_healthz() -> None:
    """Every restart returns with partitions and the new consumer's fetcher ends at once (before the
    next round): it never consumes. Until the eighteenth session each restart that returned ended
    the count, and /healthz stayed 200 through 100 restarts in 6 bounds."""
    flapping = StuckSubscriber(_joins, restarted=lambda: _consumer(_ended()))
    async with _service(FakeBroker(flapping)) as (runtime, client):
        answer = await _until_503(client)
        assert answer.status_code == 503, answer.text
        [problem] = answer.json()["problems"]
        assert problem["check"] == "kafka_consumer" and problem["group"] == GROUP
        assert problem["cause"] == "fetch_task_ended"
        assert problem["restarts"] >= 2 and problem["failed_restarts"] == 0
        assert problem["last_restart_error"] is None
        assert problem["stuck_while_kafka_answered_s"] >= 0 and problem["since"]
        assert PLANTED not in answer.text
        assert (_stuck_seconds(runtime) or 0) >= BOUND_S


async def test_a_restarted_consumer_that_runs_but_never_fetches_fails_healthz() -> None:
    """The restart returns with partitions and the new consumer's tasks run, but no fetch for its
    partitions ever returns: it consumes nothing, and the cause says so."""
    silent = StuckSubscriber(
        _joins, restarted=lambda: _consumer(asyncio.get_running_loop().create_future(), fetched=False)
    )
    async with _service(FakeBroker(silent)) as (_, client):
        answer = await _until_503(client)
        assert answer.status_code == 503, answer.text
        [problem] = answer.json()["problems"]
        assert problem["cause"] == "no_fetch_returned"
        assert problem["restarts"] == 1 and silent.start_attempts == 1  # running: not restarted again


@pytest.mark.parametrize("leader", [-1, None])
async def test_a_restarted_consumer_whose_partitions_have_no_leader_is_not_counted(leader) -> None:
    """A partial outage: some broker answers the ping, but the leader of every partition the restarted
    consumer holds is gone, so no fetch can return and a new pod would do no better. The round is not
    counted (the cause says why); once a leader is back and nothing fetches, it counts again."""
    leaders = {"now": leader}

    def leaderless() -> FakeConsumer:
        consumer = _consumer(asyncio.get_running_loop().create_future(), fetched=False)
        consumer._client.cluster.leader_for_partition = lambda tp: leaders["now"]
        return consumer

    silent = StuckSubscriber(_joins, restarted=leaderless)
    async with _service(FakeBroker(silent)) as (runtime, client):
        assert await _statuses_for(client, 3 * BOUND_S) == {200}
        assert silent.start_attempts == 1
        answer = await client.get("/healthz")
        assert answer.status_code == 200 and (_stuck_seconds(runtime) or 0) < BOUND_S
        leaders["now"] = 2
        answer = await _until_503(client)
        assert answer.status_code == 503, answer.text
        assert answer.json()["problems"][0]["cause"] == "no_fetch_returned"


async def _refusing_address() -> tuple[str, int]:
    """An address on this host where nothing listens: a connection is refused at once."""
    server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    server.close()
    await server.wait_closed()
    return host, port


async def test_a_restarted_consumer_whose_partition_leaders_refuse_connections_is_not_counted() -> None:
    """A partial outage: some broker answers the ping and the cluster metadata (which aiokafka
    refreshes after every failed connection) names a leader for each partition, but no leader accepts
    a connection from this process, so a restarted container would fetch no better. The rounds are not
    counted; once the leader accepts connections and still nothing fetches, they count again. Until
    the nineteenth session such a consumer failed /healthz and its pod was restarted to no effect."""
    accepting = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
    address = {"now": await _refusing_address()}

    def unreachable_leader() -> FakeConsumer:
        consumer = _consumer(asyncio.get_running_loop().create_future(), fetched=False)
        consumer._client.cluster.broker_metadata = lambda node: SimpleNamespace(
            nodeId=node, host=address["now"][0], port=address["now"][1]
        )
        return consumer

    silent = StuckSubscriber(_joins, restarted=unreachable_leader)
    async with accepting, _service(FakeBroker(silent)) as (runtime, client):
        assert await _statuses_for(client, 3 * BOUND_S) == {200}
        assert silent.start_attempts == 1 and (_stuck_seconds(runtime) or 0) < BOUND_S
        address["now"] = accepting.sockets[0].getsockname()[:2]
        answer = await _until_503(client)
        assert answer.status_code == 503, answer.text
        assert answer.json()["problems"][0]["cause"] == "no_fetch_returned"


async def test_a_leader_missing_from_the_cluster_metadata_counts_as_unreachable() -> None:
    """The metadata names a leader whose broker it does not list (aiokafka: ``StaleMetadata``): no
    connection can be made to it, so the rounds are not counted either."""

    def unlisted_leader() -> FakeConsumer:
        consumer = _consumer(asyncio.get_running_loop().create_future(), fetched=False)
        consumer._client.cluster.broker_metadata = lambda node: None
        return consumer

    silent = StuckSubscriber(_joins, restarted=unlisted_leader)
    async with _service(FakeBroker(silent)) as (runtime, client):
        assert await _statuses_for(client, 3 * BOUND_S) == {200}
        assert silent.start_attempts == 1 and (_stuck_seconds(runtime) or 0) < BOUND_S


async def test_a_leader_that_does_not_complete_the_tls_handshake_in_time_is_unreachable() -> None:
    """The consumer connects with TLS: a leader that accepts the TCP connection but never answers the
    handshake is probed the same way, and given up after the probe's bound."""
    held: list[asyncio.StreamWriter] = []

    async def silent_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never answers the ClientHello

    silent_leader = await asyncio.start_server(silent_peer, "127.0.0.1", 0)
    host, port = silent_leader.sockets[0].getsockname()[:2]

    def tls_consumer() -> FakeConsumer:
        consumer = _consumer(asyncio.get_running_loop().create_future(), fetched=False)
        consumer._client._security_protocol = "SSL"
        consumer._client._ssl_context = ssl.create_default_context()
        consumer._client.cluster.broker_metadata = lambda node: SimpleNamespace(host=host, port=port)
        return consumer

    silent = StuckSubscriber(_joins, restarted=tls_consumer)
    async with silent_leader, _service(FakeBroker(silent)) as (runtime, client):
        assert runtime.consumer_watchdog is not None
        runtime.consumer_watchdog.leader_probe_timeout_s = 0.05
        assert await _statuses_for(client, 3 * BOUND_S) == {200}
        assert held and (_stuck_seconds(runtime) or 0) < BOUND_S
        for writer in held:
            writer.close()


async def test_a_consumer_that_consumes_between_occasional_restarts_stays_alive() -> None:
    """Its fetcher ends again some rounds after each restart, but it fetches in between: each
    restart ends its stuck time, and /healthz stays 200 over many bounds."""
    loop = asyncio.get_running_loop()

    def fetches_then_breaks() -> FakeConsumer:
        fetch_task = loop.create_future()
        loop.call_later(BOUND_S / 3, fetch_task.set_exception, RuntimeError("Unexpected error in fetcher"))
        return _consumer(fetch_task)

    occasional = StuckSubscriber(_joins, restarted=fetches_then_breaks)
    async with _service(FakeBroker(occasional)) as (runtime, client):
        assert await _statuses_for(client, 8 * BOUND_S) == {200}
        assert occasional.start_attempts >= 5
        assert (_stuck_seconds(runtime) or 0) < BOUND_S


async def test_a_restarted_consumer_holding_no_partition_has_nothing_to_fetch_and_is_alive() -> None:
    """More members than partitions: the restart returns with none, so no fetch is owed."""
    spare = StuckSubscriber(
        _joins,
        restarted=lambda: _consumer(asyncio.get_running_loop().create_future(), fetched=False, holds=0),
    )
    async with _service(FakeBroker(spare)) as (runtime, client):
        assert await _statuses_for(client, 4 * BOUND_S) == {200}
        assert spare.start_attempts == 1 and _stuck_seconds(runtime) == 0.0


class WatchdogEnding(BaseException):
    """Not an Exception: nothing in the watchdog's loop catches it."""


async def test_a_stray_cancelled_error_in_a_round_does_not_end_the_watchdog() -> None:
    """aiokafka can raise CancelledError from a future of its own (a connection closed under it)
    without the watchdog's task being cancelled: that round failed, and the next one runs (until the
    seventeenth session it ended the watchdog for good)."""
    rounds = 0

    class StrayCancelWatchdog(FetcherWatchdog):
        async def check(self) -> int:
            nonlocal rounds
            rounds += 1
            raise asyncio.CancelledError

    runtime = ServiceRuntime(BaseServiceSettings(service_name="liveness-test"))
    app = runtime.http_app(title="liveness", start_runtime=False)
    broker: Any = FakeBroker()
    runtime.watch_consumers(StrayCancelWatchdog(broker, runtime.consumer_metrics, interval_s=0.01))
    await asyncio.sleep(0.1)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        answer = await client.get("/healthz")
    assert answer.status_code == 200, answer.text
    assert rounds > 2
    await runtime.stop()
    assert runtime.liveness_problems() == []


async def test_healthz_fails_when_the_consumer_watchdog_has_ended() -> None:
    """Whatever ends the watchdog's loop while the service is not stopping fails liveness."""

    class EndingWatchdog(FetcherWatchdog):
        async def check(self) -> int:
            raise WatchdogEnding

    runtime = ServiceRuntime(BaseServiceSettings(service_name="liveness-test"))
    app = runtime.http_app(title="liveness", start_runtime=False)
    broker: Any = FakeBroker()
    runtime.watch_consumers(EndingWatchdog(broker, runtime.consumer_metrics, interval_s=0.01))
    await asyncio.sleep(0.1)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        answer = await client.get("/healthz")
    assert answer.status_code == 503
    assert answer.json()["problems"] == [
        {"check": "kafka_consumer_watchdog", "problem": "ended", "error_type": "WatchdogEnding"}
    ]
    await runtime.stop()
    assert runtime.liveness_problems() == []  # a watchdog cancelled by the stop has not failed


async def test_healthz_fails_when_a_watchdog_round_does_not_finish() -> None:
    """A start that swallows its timeout's cancellation holds the round, and the watchdog with it."""
    released = asyncio.Event()

    async def swallowing_its_timeout() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        await released.wait()

    async with _service(FakeBroker(StuckSubscriber(swallowing_its_timeout)), start_timeout_s=0.05) as (
        _,
        client,
    ):
        await asyncio.sleep(BOUND_S + 0.1)
        answer = await client.get("/healthz")
        released.set()
    assert answer.status_code == 503
    assert {"check": "kafka_consumer_watchdog", "problem": "round_not_finishing"}.items() <= answer.json()[
        "problems"
    ][-1].items()


def test_the_bound_is_a_setting_of_every_service_and_covers_a_full_watchdog_cycle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert BaseServiceSettings().kafka_consumer_stuck_s == 300
    monkeypatch.setenv("ENCLAVE_KAFKA_CONSUMER_STUCK_S", "600")
    assert BaseServiceSettings().kafka_consumer_stuck_s == 600
    watchdog = FetcherWatchdog(SimpleNamespace(subscribers=[]), None)  # type: ignore[arg-type]
    cycle = watchdog.interval_s + watchdog.coordinator_timeout_s + 2 * (30 + 10) + watchdog.start_timeout_s
    floor = BaseServiceSettings.model_fields["kafka_consumer_stuck_s"].metadata[0].ge
    assert floor >= cycle
    # A restart that succeeds on that path is stuck until the next round sees it fetch (and pings).
    succeeds = watchdog.interval_s + watchdog.coordinator_timeout_s + (30 + 10) + watchdog.start_timeout_s
    assert floor >= succeeds + watchdog.interval_s + 3
    monkeypatch.setenv("ENCLAVE_KAFKA_CONSUMER_STUCK_S", "120")
    with pytest.raises(ValidationError, match="kafka_consumer_stuck_s"):
        BaseServiceSettings()
