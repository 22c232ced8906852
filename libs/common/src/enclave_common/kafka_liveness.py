"""Liveness of the Kafka clients: the watchdogs that restart a consumer whose fetcher or group
coordinator stopped and replace a producer whose sender stopped, and what they keep for ``/healthz``
(how long each client has been unable to work while Kafka answered).

``ServiceRuntime`` starts them; their metrics are :class:`~enclave_common.kafka.ConsumerMetrics`'
``enclave_kafka_consumer_*`` and ``enclave_kafka_producer_*`` series.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError
from faststream.kafka import KafkaBroker

from enclave_common.kafka import ConsumerMetrics

log = structlog.get_logger("enclave.kafka")


class ProducerSlot(Protocol):
    """Where a service keeps one Kafka producer: the one in use, and how to put a new one there."""

    name: str

    def producer(self) -> AIOKafkaProducer | None: ...

    async def replace(self) -> None: ...


@dataclass(kw_only=True)
class _Stuck:
    """A Kafka client a watchdog found unable to work, kept from the round that found it until a later
    round finds it working: how long that has lasted while the broker answered."""

    since: datetime
    #: The loop time up to which ``stuck_for_s`` is counted.
    counted_at: float
    #: Time unable to work while the broker answered (an outage is not counted).
    stuck_for_s: float = 0.0
    #: Set by the round that found it waiting on Kafka itself although a broker answers the ping (a
    #: consumer whose partitions have no leader): that round is not counted either.
    waiting_on_kafka: bool = False

    def count(self, now: float, broker_answers: bool) -> None:
        """Add the time since the last count, if the broker answered and the client was not waiting on
        Kafka itself."""
        if broker_answers and not self.waiting_on_kafka:
            self.stuck_for_s += now - self.counted_at
        self.counted_at = now

    def report(self) -> dict[str, Any]:
        """What ``/healthz`` says about it: names, error types, times and counts; never a message."""
        raise NotImplementedError

    def _since(self) -> str:
        return self.since.isoformat(timespec="seconds")


_StuckT = TypeVar("_StuckT", bound=_Stuck)


class _Liveness(Generic[_StuckT]):
    """What a Kafka watchdog keeps for ``/healthz``: each client it found unable to work, from that
    round until a later round finds it working (a restart or replacement alone does not end it), and
    how long that has lasted while the broker answered its ping. Past ``stuck_after_s`` the process is
    not alive and Kubernetes restarts the pod. The clock stands still while the broker does not answer,
    since a new pod could not do better, and a round that has not finished after ``stuck_after_s`` (a
    step that ignored its bound) is reported too."""

    #: ``check`` of the problem a round that does not finish (or a watchdog that ended) is reported as.
    watchdog_check: str
    #: Logged once, with the client's report, when its stuck time crosses ``stuck_after_s``.
    still_stuck: str

    def __init__(self, broker: KafkaBroker, stuck_after_s: float) -> None:
        self.broker = broker
        self.stuck_after_s = stuck_after_s
        self._stuck: dict[int, _StuckT] = {}
        self._round_started_at: float | None = None  # loop time; None between rounds

    async def check(self) -> int:
        """One round of the watchdog (:meth:`_check`); how many clients it mended."""
        now = asyncio.get_running_loop().time()
        self._round_started_at = now
        try:
            return await self._check(now)
        finally:
            self._round_started_at = None
            self._publish_stuck()

    async def _check(self, now: float) -> int:
        raise NotImplementedError

    def _publish_stuck(self) -> None:
        raise NotImplementedError

    async def _broker_answers(self) -> bool:
        try:
            return bool(await self.broker.ping(timeout=3.0))
        except Exception:
            return False

    def _count_stuck(self, now: float, broker_answers: bool) -> None:
        """Add the time since the last round to each stuck client's count if the broker answers; an
        outage is not counted. Crossing ``stuck_after_s`` is logged once: /healthz fails from then."""
        for stuck in self._stuck.values():
            before = stuck.stuck_for_s
            stuck.count(now, broker_answers)
            if before < self.stuck_after_s <= stuck.stuck_for_s:
                log.error(self.still_stuck, **stuck.report())

    def liveness_problems(self) -> list[dict[str, Any]]:
        """What ``/healthz`` fails on: each client unable to work for ``stuck_after_s`` while the broker
        answered, and a round that has run for ``stuck_after_s`` (the watchdog itself stuck)."""
        problems = [
            stuck.report() for stuck in self._stuck.values() if stuck.stuck_for_s >= self.stuck_after_s
        ]
        started = self._round_started_at
        if started is not None:
            running_for = asyncio.get_running_loop().time() - started
            if running_for >= self.stuck_after_s:
                problems.append(
                    {
                        "check": self.watchdog_check,
                        "problem": "round_not_finishing",
                        "running_for_s": round(running_for),
                    }
                )
        return problems


@dataclass(kw_only=True)
class StuckProducer(_Stuck):
    """A producer slot whose producer's sender the watchdog found ended, until a later round finds a
    replacement's sender still running."""

    producer: str
    #: The type of the error that ended the sender last found ended, under aiokafka's ``KafkaError``
    #: ("Unexpected error during batch delivery") that wraps it; None: it returned, or was cancelled.
    sender_error: str | None
    #: Replacements put in place meanwhile: each but the latest had its sender end again before the
    #: next round (a producer that is replaced over and over cannot publish either).
    replacements: int = 0
    failed_replacements: int = 0
    #: The type of the last failed replacement's error (``TimeoutError``: not started in its bound).
    last_replacement_error: str | None = None

    def report(self) -> dict[str, Any]:
        return {
            "check": "kafka_producer",
            "producer": self.producer,
            "cause": "sender_ended",
            "sender_error": self.sender_error,
            "since": self._since(),
            "stuck_while_kafka_answered_s": round(self.stuck_for_s),
            "replacements": self.replacements,
            "failed_replacements": self.failed_replacements,
            "last_replacement_error": self.last_replacement_error,
        }


class SenderWatchdog(_Liveness[StuckProducer]):
    """Replaces a Kafka producer whose sender stopped.

    aiokafka (0.14) sends each producer's batches from one background task. If that task ends on an
    unexpected error ("Unexpected error in sender routine"), the producer fails what was queued and
    from then on refuses every ``send()`` with the same error, for good: nothing restarts the task.
    Every consumer's outcome publish would then fail (its event rewound and redelivered, over and
    over) and the gateway would answer every upload 503, while both look ready. Every ``interval_s``
    this looks at each producer slot; one whose sender has ended gets a new producer, and publishing
    works again. Until then a publish fails with aiokafka's bare ``KafkaError``, which is transient
    (``errors._retriable_kafka_error``): retried, not dead-lettered. Anything still waiting on the old
    producer (aiokafka fails nothing when the task was cancelled instead) fails as a retriable error.
    A replacement that fails or takes longer than ``replace_timeout_s`` is tried again on the next
    check; each slot is checked on its own.

    Replacing may not help (every replacement fails, or each new sender ends again), so the watchdog
    also keeps, for ``/healthz``, each slot from the round that finds its sender ended until a later
    round finds a replacement's sender still running (:class:`_Liveness`; ``stuck_after_s`` is
    ``BaseServiceSettings.kafka_producer_stuck_s``). A running sender is all it asks, since a producer
    sends only when asked: one with nothing to send is healthy.

    The sender is aiokafka's private ``_sender.sender_task`` and the waiting batches its
    ``_message_accumulator``: there is no public way to ask. aiokafka is pinned, and a unit test fails
    if those attributes go away.
    """

    watchdog_check = "kafka_producer_watchdog"
    still_stuck = "kafka producer still unable to publish; /healthz fails"

    def __init__(
        self,
        slots: list[ProducerSlot],
        metrics: ConsumerMetrics,
        *,
        broker: KafkaBroker,
        interval_s: float = 5.0,
        replace_timeout_s: float = 60.0,
        stuck_after_s: float = 300.0,
    ) -> None:
        super().__init__(broker, stuck_after_s)
        self.slots = slots
        self.metrics = metrics
        self.interval_s = interval_s
        self.replace_timeout_s = replace_timeout_s
        for slot in slots:
            # At 0 before any replacement: a series that appears at its first one starts at 1, where
            # increase() sees no rise, and EnclaveKafkaProducerReplaced missed it.
            metrics.producer_restarts.labels(slot.name)
            metrics.producer_stuck_seconds.labels(slot.name).set(0)

    @staticmethod
    def sender_ended(producer: Any) -> bool:
        """True when ``producer`` is started, not closed, and its sender task has ended."""
        if producer is None or getattr(producer, "_closed", True):
            return False
        task = getattr(getattr(producer, "_sender", None), "sender_task", None)
        return task is not None and task.done()

    async def _check(self, now: float) -> int:
        """Replace every producer whose sender ended; how many were replaced. A replacement that fails
        (Kafka unreachable) is logged and tried again on the next check; the old producer stays until
        then. One slot's failure does not keep the others from being checked."""
        replaced = 0
        for slot in self.slots:
            old: Any = slot.producer()
            if not self.sender_ended(old):
                self._can_publish(slot)
                continue
            stuck = self._unable_to_publish(slot, old, now)
            try:
                await self._replace(slot, old)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                stuck.failed_replacements += 1
                stuck.last_replacement_error = type(exc).__name__
                log.error("kafka producer replacement failed; will retry", producer=slot.name, exc_info=exc)
                continue
            stuck.replacements += 1
            replaced += 1
        if self._stuck:
            self._count_stuck(now, await self._broker_answers())
        return replaced

    def _unable_to_publish(self, slot: ProducerSlot, old: Any, now: float) -> StuckProducer:
        """Note that ``slot``'s producer cannot publish (kept from the first time until it can)."""
        task = old._sender.sender_task
        failure = None if task.cancelled() else task.exception()
        stuck = self._stuck.get(id(slot))
        if stuck is None:
            stuck = StuckProducer(
                producer=slot.name, since=datetime.now(UTC), counted_at=now, sender_error=None
            )
            self._stuck[id(slot)] = stuck
        while failure is not None and failure.__cause__ is not None:  # aiokafka raises KafkaError from it
            failure = failure.__cause__
        stuck.sender_error = type(failure).__name__ if failure is not None else None
        return stuck

    def _can_publish(self, slot: ProducerSlot) -> None:
        """``slot``'s sender runs (or it has no producer: not started, or stopping): not stuck."""
        stuck = self._stuck.pop(id(slot), None)
        if stuck is not None and stuck.replacements:
            log.info(
                "kafka producer sending again",
                producer=slot.name,
                replacements=stuck.replacements,
                stuck_while_kafka_answered_s=round(stuck.stuck_for_s),
            )

    def _publish_stuck(self) -> None:
        """``enclave_kafka_producer_stuck_seconds``: each slot's stuck time, 0 if none."""
        longest = {slot.name: 0.0 for slot in self.slots}
        for stuck in self._stuck.values():
            longest[stuck.producer] = max(longest.get(stuck.producer, 0.0), stuck.stuck_for_s)
        for name, seconds in longest.items():
            self.metrics.producer_stuck_seconds.labels(name).set(round(seconds, 1))

    async def _replace(self, slot: ProducerSlot, old: Any) -> None:
        task = old._sender.sender_task
        failure = None if task.cancelled() else task.exception()
        log.error("kafka producer stopped sending; replacing it", producer=slot.name, exc_info=failure)
        try:
            async with asyncio.timeout(self.replace_timeout_s):
                await slot.replace()
        finally:
            # Whatever still waits on the old producer would wait forever: it fails, so it is retried.
            old._message_accumulator.fail_all(
                KafkaConnectionError("the Kafka producer stopped sending; publish again")
            )
        self.metrics.producer_restarts.labels(slot.name).inc()
        log.info("kafka producer replaced", producer=slot.name)
        try:
            await old.stop()
        except Exception as exc:  # its connections are closed either way
            log.warning("the stopped kafka producer did not close cleanly", exc_info=exc)

    async def run_forever(self) -> None:
        await _every(self.interval_s, self.check, "kafka producer replacement failed; will retry")


@dataclass(kw_only=True)
class StuckConsumer(_Stuck):
    """A consumer the watchdog found unable to consume, until a later round finds it running with a
    fetch returned for its partitions (or none assigned to it)."""

    group: str
    topics: tuple[str, ...]
    #: ``fetch_task_ended``, ``coordinator_routine_ended``, ``coordinator_unknown`` or, once restarted
    #: and running, ``no_fetch_returned`` (``no_partition_leader`` while none of its partitions has a
    #: leader, ``partition_leader_unreachable`` while none has a leader this process can connect to:
    #: not counted, a partial outage): as last seen.
    cause: str
    #: Restarts that returned with partitions meanwhile: each but the latest broke again before it
    #: fetched (a consumer restarted over and over consumes nothing either).
    restarts: int = 0
    failed_restarts: int = 0
    #: The type of the last failed restart's error (``TimeoutError``: no partitions in time).
    last_restart_error: str | None = None

    def report(self) -> dict[str, Any]:
        return {
            "check": "kafka_consumer",
            "group": self.group,
            "topics": list(self.topics),
            "cause": self.cause,
            "since": self._since(),
            "stuck_while_kafka_answered_s": round(self.stuck_for_s),
            "restarts": self.restarts,
            "failed_restarts": self.failed_restarts,
            "last_restart_error": self.last_restart_error,
        }


class FetcherWatchdog(_Liveness[StuckConsumer]):
    """Restarts a subscriber whose Kafka consumer stopped fetching.

    aiokafka (0.14) fetches for each consumer in one background task. If that task ends, for
    instance on an unexpected error raised inside it (seen here when the broker was killed in the
    middle of a fetch: aiokafka logs "Unexpected error in fetcher routine"), ``getone()`` waits for
    records forever. Neither aiokafka nor FastStream notices (aio-libs/aiokafka#983): the service
    stays up and ready, and its consumer group's lag only grows. Every ``interval_s`` this looks at
    each started subscriber of ``broker``; one whose fetcher has ended is stopped and started again.
    The new consumer rejoins the group and resumes from the committed offsets, so whatever was
    fetched but not acknowledged is delivered again (at least once; every handler is idempotent).

    The consumer's group coordinator runs the same way, in one routine; when it ends ("Unexpected
    error in coordinator routine"), every ``getone()`` raises its error again (FastStream logs "Kafka
    error occurred" every 5 s) and nothing is consumed. Its cause was identified in the eighth
    session: under uvloop, writing to a connection that Kafka's kill had closed raises RuntimeError
    (``UVHandle._ensure_alive``), which aiokafka does not expect. Such a consumer is restarted too.

    A third way to stop for good was seen in the tenth session's chaos run, after Kafka was killed and
    restarted: the coordinator routine stayed alive but waited forever for a metadata update while
    looking up the group coordinator, and the handler's offset commit waited behind it; nothing was
    consumed and nothing was logged. A consumer whose group coordinator has been unknown for
    ``coordinator_timeout_s`` while the broker answers is restarted as well.

    The fetcher is aiokafka's private ``_fetcher._fetch_task``, the coordinator's
    ``_coordinator._coordination_task`` and ``coordinator_id``: there is no public way to ask.
    aiokafka is pinned, and a unit test fails if those attributes go away.

    Restarting may not help (every start fails or times out, or each restarted consumer breaks again),
    so the watchdog also keeps, for ``/healthz``, each consumer from the round that finds it unable to
    consume until a later round finds it running with a fetch returned (:class:`_Liveness`;
    ``stuck_after_s`` is ``BaseServiceSettings.kafka_consumer_stuck_s``). A consumer fetches whether or
    not there is anything to consume (an empty fetch returns too), so an idle one passes; one that
    holds no partition (more members than partitions) has nothing to fetch and passes as well. Until
    the eighteenth session a restart that returned ended the count, and a consumer that broke again
    after every restart never failed liveness. A restarted consumer that has not fetched because none of
    its partitions has a leader this process can connect to waits on a partial Kafka outage that a new
    pod could not mend: those rounds are not counted (until the nineteenth session they were when the
    cluster named leaders that refused connections, and such pods were restarted to no effect).
    """

    watchdog_check = "kafka_consumer_watchdog"
    still_stuck = "kafka consumer still unable to consume; /healthz fails"

    def __init__(
        self,
        broker: KafkaBroker,
        metrics: ConsumerMetrics,
        *,
        interval_s: float = 5.0,
        coordinator_timeout_s: float = 60.0,
        start_timeout_s: float = 60.0,
        stuck_after_s: float = 300.0,
    ) -> None:
        super().__init__(broker, stuck_after_s)
        self.metrics = metrics
        self.interval_s = interval_s
        self.coordinator_timeout_s = coordinator_timeout_s
        #: How long a restarted consumer may take to join its group and get partitions. aiokafka's
        #: start() waits for the assignment without a bound: seen after a Kafka restart, a new
        #: consumer of a group whose old one had not stopped cleanly waited for good, and the
        #: service consumed nothing while /readyz said ready.
        self.start_timeout_s = start_timeout_s
        self._stopped: list[Any] = []  # stopped by the watchdog, not started again yet
        self._coordinator_unknown_since: dict[int, float] = {}

    @staticmethod
    def fetcher_ended(subscriber: Any) -> bool:
        """True when ``subscriber`` runs a consumer whose fetch task or coordinator routine has ended."""
        return FetcherWatchdog._ended_fetch(subscriber) is not None

    @staticmethod
    def _ended_fetch(subscriber: Any) -> asyncio.Future[Any] | None:
        """The ended fetch task or coordinator routine of ``subscriber``'s running consumer (private:
        see the class docstring)."""
        consumer = getattr(subscriber, "consumer", None)
        if (
            consumer is None
            or not getattr(subscriber, "running", False)
            or getattr(consumer, "_closed", True)
        ):
            return None
        # The fetch task, and the group coordinator's routine: when that one ends (seen here: uvloop's
        # RuntimeError for a write to a connection Kafka's kill had closed, "Unexpected error in
        # coordinator routine"), every getone() raises its error again, forever.
        tasks: tuple[asyncio.Future[Any] | None, ...] = (
            getattr(getattr(consumer, "_fetcher", None), "_fetch_task", None),
            getattr(getattr(consumer, "_coordinator", None), "_coordination_task", None),
        )
        for task in tasks:
            if task is not None and task.done():
                return task
        return None

    @staticmethod
    def _coordinator_unknown(subscriber: Any) -> bool:
        """True when ``subscriber`` runs a consumer that has no known group coordinator (private)."""
        consumer = getattr(subscriber, "consumer", None)
        coordinator = getattr(consumer, "_coordinator", None)
        running = getattr(subscriber, "running", False) and not getattr(consumer, "_closed", True)
        return bool(running and coordinator is not None and getattr(coordinator, "coordinator_id", 0) is None)

    @staticmethod
    def _fetch_returned(subscriber: Any) -> bool:
        """True when a fetch has returned for one of the partitions ``subscriber``'s running consumer
        holds, or it holds none (nothing to fetch). aiokafka records a partition's high watermark from
        every fetch response, empty or not (public: ``assignment()``, ``highwater()``); a restarted
        consumer is a new one, with none recorded."""
        consumer = getattr(subscriber, "consumer", None)
        if (
            consumer is None
            or not getattr(subscriber, "running", False)
            or getattr(consumer, "_closed", True)
        ):
            return True  # stopping or never started: not the watchdog's to judge
        partitions = consumer.assignment()
        return not partitions or any(consumer.highwater(tp) is not None for tp in partitions)

    #: How long a probe of a partition leader may take to open a connection (as long as the ping).
    leader_probe_timeout_s = 3.0

    @staticmethod
    def _partitions_leaderless(subscriber: Any) -> bool:
        """True when no partition ``subscriber``'s consumer holds has a leader in its cluster metadata
        (private: ``_client.cluster``; -1: no leader, None: unknown). A fetch cannot return then, and a
        new pod would fetch no better: a partial Kafka outage, in which some broker still answers the
        watchdog's ping."""
        consumer = getattr(subscriber, "consumer", None)
        cluster = getattr(getattr(consumer, "_client", None), "cluster", None)
        if consumer is None or cluster is None:
            return False
        partitions = consumer.assignment()
        return bool(partitions) and all(cluster.leader_for_partition(tp) in (None, -1) for tp in partitions)

    async def _leaders_unreachable(self, subscriber: Any) -> bool:
        """True when ``subscriber``'s consumer holds partitions and this process can open a connection to
        none of their leaders (a partition without one counts as unreachable too). aiokafka refreshes its
        cluster metadata whenever a connection to a broker fails (``AIOKafkaClient._get_conn``), so these
        are the leaders the cluster names now, and a restarted container (same pod, same network) would
        be sent to them and fetch no better: a partial Kafka outage, like a partition without a leader.
        Each leader is probed with a new connection of its own (TLS as the consumer connects; private:
        ``_client``'s ``cluster``, ``_security_protocol`` and ``_ssl_context``), not the consumer's, so a
        client wedged on a connection that the broker would accept still counts as stuck."""
        consumer = getattr(subscriber, "consumer", None)
        client = getattr(consumer, "_client", None)
        cluster = getattr(client, "cluster", None)
        address_of = getattr(cluster, "broker_metadata", None)
        if consumer is None or cluster is None or address_of is None:
            return False  # nothing to probe with: counted, as a consumer that does not fetch
        leaders = {cluster.leader_for_partition(tp) for tp in consumer.assignment()}
        if not leaders:
            return False
        nodes = [node for node in leaders if node not in (None, -1)]
        tls = getattr(client, "_security_protocol", "PLAINTEXT") in ("SSL", "SASL_SSL")
        context = getattr(client, "_ssl_context", None) if tls else None
        answers = await asyncio.gather(*(self._accepts(address_of(node), context) for node in nodes))
        return not any(answers)

    async def _accepts(self, broker: Any, context: ssl.SSLContext | None) -> bool:
        """True when a connection to ``broker`` (aiokafka's ``BrokerMetadata``; None: not in the
        metadata) opens, TLS handshake included, within ``leader_probe_timeout_s``; it is closed again."""
        if broker is None:
            return False
        try:
            async with asyncio.timeout(self.leader_probe_timeout_s):
                _, writer = await asyncio.open_connection(broker.host, broker.port, ssl=context)
        except (OSError, TimeoutError):  # refused, unreachable, no route, TLS refused (ssl.SSLError)
            return False
        writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.leader_probe_timeout_s):
                await writer.wait_closed()
        return True

    async def _check(self, now: float) -> int:
        """Restart every subscriber whose fetcher ended, or whose group coordinator stayed unknown while
        the broker answers (and any whose restart failed before); how many were started again. A start
        that fails is tried again on the next check."""
        subscriber: Any
        for subscriber in self.broker.subscribers:
            # At 0 before any restart: a series that appears at its first restart starts at 1, where
            # increase() sees no rise, and EnclaveKafkaConsumerRestarted missed that restart.
            self.metrics.consumer_restarts.labels(self._group(subscriber))
        broker_answers: bool | None = None  # asked at most once a check, and only if needed
        for subscriber in list(self.broker.subscribers):
            group = self._group(subscriber)
            task = self._ended_fetch(subscriber)
            if task is not None:
                self._unable_to_consume(subscriber, self._cause(subscriber, task), now)
                failure = None if task.cancelled() else task.exception()
                log.error("kafka consumer stopped fetching; restarting it", group=group, exc_info=failure)
            else:
                unknown = self._coordinator_unknown(subscriber)
                if unknown:
                    self._unable_to_consume(subscriber, "coordinator_unknown", now)
                elif not any(stopped is subscriber for stopped in self._stopped):
                    # Running with a coordinator, or not the watchdog's to restart (stopping, never started).
                    await self._running(subscriber)
                if unknown and broker_answers is None:
                    broker_answers = await self._broker_answers()
                if not (unknown and broker_answers):
                    # It has a coordinator, or the broker does not answer: an outage, not a stuck client.
                    self._coordinator_unknown_since.pop(id(subscriber), None)
                    continue
                lost_for = now - self._coordinator_unknown_since.setdefault(id(subscriber), now)
                if lost_for < self.coordinator_timeout_s:
                    continue
                log.error(
                    "kafka consumer lost its group coordinator; restarting it",
                    group=group,
                    unknown_for_s=round(lost_for),
                )
            self._coordinator_unknown_since.pop(id(subscriber), None)
            self.metrics.consumer_restarts.labels(group).inc()
            self._stopped.append(subscriber)
            await self._stop(subscriber)
        if self._stuck:
            if broker_answers is None:
                broker_answers = await self._broker_answers()
            self._count_stuck(now, broker_answers)
        started = 0
        while self._stopped:
            subscriber = self._stopped[0]
            stuck = self._stuck.get(id(subscriber))
            try:
                async with asyncio.timeout(self.start_timeout_s):
                    await subscriber.start()
            except Exception as exc:
                if stuck is not None:
                    stuck.failed_restarts += 1
                    stuck.last_restart_error = type(exc).__name__
                if isinstance(exc, TimeoutError):
                    # Given up: stopped again, and started afresh at the next check (still in _stopped).
                    log.error(
                        "a restarted kafka consumer got no partitions in time; starting it again",
                        group=self._group(subscriber),
                        waited_s=self.start_timeout_s,
                    )
                    await self._stop(subscriber)
                raise
            self._stopped.pop(0)
            if stuck is not None:  # stuck until a later round finds it running with a fetch returned
                stuck.restarts += 1
            log.info("kafka consumer restarted", group=self._group(subscriber))
            started += 1
        return started

    def _unable_to_consume(self, subscriber: Any, cause: str, now: float) -> None:
        """Note that ``subscriber`` cannot consume (kept from the first time until it consumes again)."""
        stuck = self._stuck.get(id(subscriber))
        if stuck is None:
            stuck = StuckConsumer(
                group=self._group(subscriber),
                topics=self._topics(subscriber),
                cause=cause,
                since=datetime.now(UTC),
                counted_at=now,
            )
            self._stuck[id(subscriber)] = stuck
        stuck.cause = cause
        stuck.waiting_on_kafka = False

    async def _running(self, subscriber: Any) -> None:
        """``subscriber`` runs with a coordinator: consuming again once a fetch has returned for it."""
        stuck = self._stuck.get(id(subscriber))
        if stuck is None:
            return
        if not self._fetch_returned(subscriber):
            if self._partitions_leaderless(subscriber):
                stuck.cause = "no_partition_leader"
            elif await self._leaders_unreachable(subscriber):
                stuck.cause = "partition_leader_unreachable"
            else:
                stuck.cause = "no_fetch_returned"
            stuck.waiting_on_kafka = stuck.cause != "no_fetch_returned"
            return
        del self._stuck[id(subscriber)]
        if stuck.restarts:
            log.info(
                "kafka consumer consuming again",
                group=stuck.group,
                restarts=stuck.restarts,
                stuck_while_kafka_answered_s=round(stuck.stuck_for_s),
            )

    def _publish_stuck(self) -> None:
        """``enclave_kafka_consumer_stuck_seconds``: the longest-stuck consumer of each group, 0 if none."""
        longest = {self._group(subscriber): 0.0 for subscriber in self.broker.subscribers}
        for stuck in self._stuck.values():
            longest[stuck.group] = max(longest.get(stuck.group, 0.0), stuck.stuck_for_s)
        for group, seconds in longest.items():
            self.metrics.consumer_stuck_seconds.labels(group).set(round(seconds, 1))

    @staticmethod
    def _cause(subscriber: Any, ended: asyncio.Future[Any]) -> str:
        fetcher = getattr(getattr(subscriber.consumer, "_fetcher", None), "_fetch_task", None)
        return "fetch_task_ended" if ended is fetcher else "coordinator_routine_ended"

    @staticmethod
    def _topics(subscriber: Any) -> tuple[str, ...]:
        """The topics ``subscriber`` consumes, or its pattern: names only."""
        pattern = getattr(subscriber, "pattern", None)
        if pattern is not None:
            return (str(getattr(pattern, "broker_address", pattern)),)
        return tuple(getattr(subscriber, "topic_names_for_subscribe", ()))

    @staticmethod
    async def _stop(subscriber: Any) -> None:
        """Stop ``subscriber``. aiokafka's ``stop()`` awaits the ended fetch task, so it re-raises what
        ended it, before closing the consumer's connections: those are then closed here."""
        consumer = subscriber.consumer
        try:
            async with asyncio.timeout(30):  # a consumer stuck waiting on its coordinator may not stop
                await subscriber.stop()
        except Exception as exc:  # what ended the fetcher, raised again (or the stop timed out)
            log.warning("the stalled kafka consumer did not stop cleanly", exc_info=exc)
            client = getattr(consumer, "_client", None)
            if client is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(10):
                        await client.close()

    @staticmethod
    def _group(subscriber: Any) -> str:
        return str(getattr(subscriber, "group_id", None) or "none")

    async def run_forever(self) -> None:
        await _every(self.interval_s, self.check, "kafka consumer restart failed; will retry")


async def _every(interval_s: float, check: Callable[[], Awaitable[object]], failed: str) -> None:
    """A watchdog's loop: ``check()`` every ``interval_s``; a round that fails is logged as ``failed``
    and the next round tries again. A CancelledError that does not cancel this task (raised by the
    Kafka client from a future of its own, e.g. a connection closed under it) is such a failure too:
    it used to end the watchdog for good."""
    task = asyncio.current_task()
    while True:
        await asyncio.sleep(interval_s)
        try:
            await check()
        except asyncio.CancelledError as exc:
            if task is None or task.cancelling():
                raise
            log.error(failed, exc_info=exc)
        except Exception as exc:
            log.error(failed, exc_info=exc)
