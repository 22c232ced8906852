"""``/healthz`` fails when a Kafka producer stays unable to publish despite its watchdog while Kafka
answers: its sender ended and every replacement fails, or each replacement's sender ends again before
the next round. So it does when the producers' watchdog stops. A replacement that holds, an idle
producer (nothing to send is healthy) and a Kafka outage keep the pod alive."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from aiokafka.errors import KafkaConnectionError, KafkaError
from enclave_common.kafka_liveness import SenderWatchdog
from enclave_common.service import ServiceRuntime
from enclave_common.settings import BaseServiceSettings
from pydantic import ValidationError

PLANTED = "PHI-MRN-51077-QX"
BOUND_S = 0.3


class FakeAccumulator:
    def fail_all(self, exc: BaseException) -> None:
        pass


class FakeProducer:
    """An aiokafka producer as the watchdog reads it: its sender task, and what it fails on replacement."""

    def __init__(self, sender_task: asyncio.Future[Any]) -> None:
        self._closed = False
        self._sender = type("Sender", (), {"sender_task": sender_task})()
        self._message_accumulator = FakeAccumulator()

    async def stop(self) -> None:
        self._closed = True


def _running() -> FakeProducer:
    return FakeProducer(asyncio.get_running_loop().create_future())


def _broken() -> FakeProducer:
    """A producer whose sender ended as aiokafka's does: a KafkaError raised from what broke it."""
    task = asyncio.get_running_loop().create_future()
    error = KafkaError(f"Unexpected error during batch delivery {PLANTED}")
    error.__cause__ = RuntimeError(f"Set changed size during iteration {PLANTED}")
    task.set_exception(error)
    return FakeProducer(task)


class Slot:
    """A producer slot whose producer is ``current`` and whose ``replace`` runs ``replaces`` and puts
    ``replacement()`` in place."""

    def __init__(
        self,
        current: FakeProducer,
        replaces: Callable[[], Any],
        replacement: Callable[[], FakeProducer] = _running,
        name: str = "direct",
    ) -> None:
        self.name = name
        self.current = current
        self.replaces = replaces
        self.replacement = replacement
        self.attempts = 0

    def producer(self) -> Any:
        return self.current

    async def replace(self) -> None:
        self.attempts += 1
        await self.replaces()
        self.current = self.replacement()


class FakeBroker:
    def __init__(self) -> None:
        self.answers = True

    async def ping(self, timeout: float) -> bool:
        return self.answers


async def _refused() -> None:
    raise KafkaConnectionError(f"Unable to bootstrap from {PLANTED}")


async def _accepted() -> None:
    await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def _service(
    broker: FakeBroker, *slots: Slot, **watchdog: Any
) -> AsyncIterator[tuple[ServiceRuntime, httpx.AsyncClient]]:
    """The service's HTTP app, on this loop, with a fast producer watchdog over ``slots``."""
    runtime = ServiceRuntime(BaseServiceSettings(service_name="liveness-test"))
    app = runtime.http_app(title="liveness", start_runtime=False)
    options = {"interval_s": 0.01, "stuck_after_s": BOUND_S, **watchdog}
    fake: Any = broker
    runtime.watch_producers(SenderWatchdog(list(slots), runtime.consumer_metrics, broker=fake, **options))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            yield runtime, client
    finally:
        await runtime.stop()


def _stuck_seconds(runtime: ServiceRuntime, producer: str = "direct") -> float | None:
    return runtime.registry.get_sample_value("enclave_kafka_producer_stuck_seconds", {"producer": producer})


async def _statuses_for(client: httpx.AsyncClient, seconds: float) -> set[int]:
    seen: set[int] = set()
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        seen.add((await client.get("/healthz")).status_code)
        await asyncio.sleep(0.02)
    return seen


async def _until_503(client: httpx.AsyncClient, seconds: float = 4.0) -> httpx.Response:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        answer = await client.get("/healthz")
        if answer.status_code == 503 or asyncio.get_running_loop().time() > deadline:
            return answer
        await asyncio.sleep(0.01)


async def test_healthz_fails_naming_the_producer_whose_replacements_keep_failing_past_the_bound() -> None:
    """The gateway's direct producer: its sender ended and no replacement starts while Kafka answers
    (every upload would be 503 for good). The body names the slot, the cause, the sender's error
    type, since when and the failed replacements; no error text."""
    slot = Slot(_broken(), _refused)
    async with _service(FakeBroker(), slot, Slot(_running(), _accepted, name="broker")) as (runtime, client):
        answer = await _until_503(client)
        assert answer.status_code == 503, answer.text
        body = answer.json()
        assert body["status"] == "stuck" and body["service"] == "liveness-test"
        [problem] = body["problems"]
        assert problem["check"] == "kafka_producer" and problem["producer"] == "direct"
        assert problem["cause"] == "sender_ended" and problem["sender_error"] == "RuntimeError"
        assert problem["failed_replacements"] >= 2 and problem["replacements"] == 0
        assert problem["last_replacement_error"] == "KafkaConnectionError"
        assert problem["since"] and problem["stuck_while_kafka_answered_s"] >= 0
        assert PLANTED not in answer.text
        assert (_stuck_seconds(runtime) or 0) >= BOUND_S
        assert _stuck_seconds(runtime, "broker") == 0.0


async def test_a_producer_whose_every_replacement_breaks_again_fails_healthz() -> None:
    """Each replacement starts, and its sender has ended again by the next round: a replacement
    alone does not end the count."""
    slot = Slot(_broken(), _accepted, replacement=_broken)
    async with _service(FakeBroker(), slot) as (_, client):
        answer = await _until_503(client)
        assert answer.status_code == 503, answer.text
        [problem] = answer.json()["problems"]
        assert problem["replacements"] >= 2 and problem["failed_replacements"] == 0
        assert problem["last_replacement_error"] is None


async def test_a_replacement_that_holds_keeps_healthz_alive() -> None:
    """The first replacement refused, the second in place and its sender running at the next rounds:
    alive throughout, and the gauge back at 0."""
    attempts = 0

    async def refused_once() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise KafkaConnectionError("not yet")

    slot = Slot(_broken(), refused_once)
    async with _service(FakeBroker(), slot, stuck_after_s=1.0) as (runtime, client):
        assert await _statuses_for(client, 1.5) == {200}
        assert slot.attempts == 2 and not SenderWatchdog.sender_ended(slot.current)
        assert _stuck_seconds(runtime) == 0.0
        assert runtime.producer_watchdog is not None and runtime.producer_watchdog.liveness_problems() == []


async def test_an_idle_producer_is_alive() -> None:
    """Nothing sent for many bounds: its sender runs, and that is all the watchdog asks."""
    slot = Slot(_running(), _refused)
    async with _service(FakeBroker(), slot) as (runtime, client):
        assert await _statuses_for(client, 4 * BOUND_S) == {200}
        assert slot.attempts == 0 and _stuck_seconds(runtime) == 0.0


async def test_a_kafka_outage_keeps_healthz_alive_and_its_time_is_not_counted() -> None:
    """Replacements fail while the broker does not answer, for several bounds: alive (a new pod could
    not publish either). Once it answers and they still fail, the bound runs from there."""
    broker = FakeBroker()
    broker.answers = False
    async with _service(broker, Slot(_broken(), _refused)) as (runtime, client):
        assert await _statuses_for(client, 4 * BOUND_S) == {200}
        assert _stuck_seconds(runtime) == 0.0
        broker.answers = True
        assert 503 in await _statuses_for(client, 4 * BOUND_S)


class WatchdogEnding(BaseException):
    """Not an Exception: nothing in the watchdog's loop catches it."""


async def test_healthz_fails_when_the_producer_watchdog_has_ended() -> None:
    class EndingWatchdog(SenderWatchdog):
        async def check(self) -> int:
            raise WatchdogEnding

    runtime = ServiceRuntime(BaseServiceSettings(service_name="liveness-test"))
    app = runtime.http_app(title="liveness", start_runtime=False)
    broker: Any = FakeBroker()
    runtime.watch_producers(EndingWatchdog([], runtime.consumer_metrics, broker=broker, interval_s=0.01))
    await asyncio.sleep(0.1)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        answer = await client.get("/healthz")
    assert answer.status_code == 503
    assert answer.json()["problems"] == [
        {"check": "kafka_producer_watchdog", "problem": "ended", "error_type": "WatchdogEnding"}
    ]
    await runtime.stop()
    assert runtime.liveness_problems() == []  # a watchdog cancelled by the stop has not failed


async def test_healthz_fails_when_a_producer_watchdog_round_does_not_finish() -> None:
    """A replacement that swallows its timeout's cancellation holds the round, and the watchdog."""
    released = asyncio.Event()

    async def swallowing_its_timeout() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        await released.wait()

    async with _service(FakeBroker(), Slot(_broken(), swallowing_its_timeout), replace_timeout_s=0.05) as (
        _,
        client,
    ):
        await asyncio.sleep(BOUND_S + 0.1)
        answer = await client.get("/healthz")
        released.set()
    assert answer.status_code == 503
    assert {"check": "kafka_producer_watchdog", "problem": "round_not_finishing"}.items() <= answer.json()[
        "problems"
    ][-1].items()


async def test_the_service_watches_its_producers_with_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """start() puts the broker's producer and the service's own slots under a watchdog that pings
    the service's broker and fails liveness after ``ENCLAVE_KAFKA_PRODUCER_STUCK_S``."""
    monkeypatch.setenv("ENCLAVE_KAFKA_PRODUCER_STUCK_S", "120")
    runtime = ServiceRuntime(BaseServiceSettings(service_name="liveness-test"))
    own = Slot(_running(), _accepted)
    runtime.producer_slots.append(own)

    async def connected() -> None:  # this runtime's broker only: no Kafka in unit tests
        return None

    runtime.broker.start = connected  # type: ignore[method-assign]
    await runtime.start()
    try:
        watchdog = runtime.producer_watchdog
        assert watchdog is not None and watchdog.stuck_after_s == 120
        assert watchdog.broker is runtime.broker
        assert [slot.name for slot in watchdog.slots] == ["broker", "direct"] and watchdog.slots[1] is own
        assert runtime.liveness_problems() == []
    finally:
        await runtime.stop()


def test_the_bound_is_a_setting_of_every_service_and_covers_a_full_watchdog_cycle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its floor covers a replacement that succeeds on its slowest path: the next check, the
    replacement's bound, Kafka's ping, and the round that sees the new sender run, with its ping."""
    assert BaseServiceSettings().kafka_producer_stuck_s == 300
    monkeypatch.setenv("ENCLAVE_KAFKA_PRODUCER_STUCK_S", "600")
    assert BaseServiceSettings().kafka_producer_stuck_s == 600
    broker: Any = FakeBroker()
    watchdog = SenderWatchdog([], None, broker=broker)  # type: ignore[arg-type]
    ping_s = 3
    cycle = watchdog.interval_s + watchdog.replace_timeout_s + ping_s + watchdog.interval_s + ping_s
    assert BaseServiceSettings.model_fields["kafka_producer_stuck_s"].metadata[0].ge >= cycle
    monkeypatch.setenv("ENCLAVE_KAFKA_PRODUCER_STUCK_S", "60")
    with pytest.raises(ValidationError, match="kafka_producer_stuck_s"):
        BaseServiceSettings()
