"""Kafka plumbing on FastStream: durable producers, reliable consumers, DLQ, trace context.

- Producers use ``acks=all`` and idempotence: ``publish`` returns only after the broker has the
  record on every in-sync replica.
- Each service is one consumer group (``group_id`` = service name); offsets are committed by hand,
  only after the handler's effects are durable and its events are published.
- :func:`reliable_consumer` wraps a handler: it parses the envelope, skips ids the idempotency guard
  has seen, retries transient errors with bounded exponential backoff (then redelivers), and sends
  permanent errors to ``<topic>.dlq`` with the reason in headers.
- W3C trace context travels in Kafka headers through FastStream's OpenTelemetry middleware (and
  :class:`DirectPublisher`'s own create spans).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import ssl
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import CommitFailedError, KafkaConnectionError
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from faststream.security import BaseSecurity
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, TracerProvider
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import ValidationError

from enclave_common import topics
from enclave_common.envelope import Envelope
from enclave_common.errors import ContractError, PermanentError, TransientError, classify_exception
from enclave_common.idempotency import ProcessedEvents
from enclave_common.settings import BaseServiceSettings

log = structlog.get_logger("enclave.kafka")

Handler = Callable[[Envelope], Awaitable[None]]


def create_broker(
    settings: BaseServiceSettings,
    *,
    registry: CollectorRegistry | None = None,
    tracer_provider: TracerProvider | None = None,
    **overrides: Any,
) -> KafkaBroker:
    """A broker whose producer waits for all in-sync replicas and never duplicates on retry.

    ``overrides`` are passed to ``KafkaBroker`` (e.g. ``metadata_max_age_ms`` for a pattern subscriber).
    """
    middlewares: list[Any] = [KafkaTelemetryMiddleware(tracer_provider=tracer_provider)]
    if registry is not None:
        middlewares.append(KafkaPrometheusMiddleware(registry=registry, app_name=settings.service_name))
    context = _ssl_context(settings)
    options: dict[str, Any] = {
        **_PRODUCER_OPTIONS,
        "client_id": f"enclave-{settings.service_name}",
        "max_request_size": settings.kafka_max_message_bytes,
        "security": BaseSecurity(ssl_context=context, use_ssl=True) if context is not None else None,
        "middlewares": middlewares,
        "graceful_timeout": 30.0,
        # FastStream's own log lines go through the root logger, i.e. our JSON and redaction pipeline.
        "logger": logging.getLogger("enclave.faststream"),
    }
    return KafkaBroker(settings.kafka_bootstrap_servers, **(options | overrides))


#: Every Enclave producer: the broker acknowledges only what every in-sync replica has, and a retried
#: send is never written twice.
_PRODUCER_OPTIONS: dict[str, Any] = {"acks": "all", "enable_idempotence": True, "request_timeout_ms": 15_000}


def connection_options(settings: BaseServiceSettings) -> dict[str, Any]:
    """How an aiokafka client reaches the cluster: bootstrap servers and, unless PLAINTEXT, TLS with
    the configured CA and client certificate (the services' and the operator tools' clients alike)."""
    context = _ssl_context(settings)
    return {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": "SSL" if context is not None else "PLAINTEXT",
        "ssl_context": context,
    }


def _ssl_context(settings: BaseServiceSettings) -> ssl.SSLContext | None:
    if settings.kafka_security_protocol == "PLAINTEXT":
        return None
    read = TLS_RELOADER.digest(settings)  # before loading: a change while loading is seen later
    context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    if settings.kafka_ssl_certfile:
        context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    TLS_RELOADER.watch(context, settings, read)
    return context


_Files = tuple[str | None, str | None, str | None]


@dataclass(frozen=True)
class _Material:
    """What a set of TLS files held when it was last loaded into the contexts built from it."""

    #: The client certificate's notAfter (epoch seconds); None without a client certificate.
    not_after: float | None
    #: SHA-256 fingerprints of the CA certificates in the CA file.
    cas: frozenset[bytes]

    @classmethod
    def read(cls, files: _Files) -> _Material:
        certfile, _, cafile = files
        not_after = None
        if certfile:
            with open(certfile, "rb") as handle:
                not_after = x509.load_pem_x509_certificates(handle.read())[0].not_valid_after_utc.timestamp()
        cas: frozenset[bytes] = frozenset()
        if cafile:
            with open(cafile, "rb") as handle:
                cas = frozenset(
                    c.fingerprint(hashes.SHA256()) for c in x509.load_pem_x509_certificates(handle.read())
                )
        return cls(not_after, cas)


class TlsMetrics:
    """The reloader's state on a service's /metrics (``ServiceRuntime`` attaches them)."""

    def __init__(self, reloader: TlsMaterialReloader, registry: CollectorRegistry | None) -> None:
        expiry = Gauge(
            "enclave_kafka_tls_certificate_expiry_timestamp_seconds",
            "When the Kafka client certificate in use expires (the earliest, if several)",
            registry=registry,
        )
        expiry.set_function(lambda: reloader.earliest_expiry or float("nan"))
        retired = Gauge(
            "enclave_kafka_tls_retired_ca_trusted",
            "1 when a CA removed from the Kafka CA file is still trusted (an SSL context can only add "
            "CAs): restart the service to stop trusting it",
            registry=registry,
        )
        retired.set_function(lambda: 1.0 if reloader.retired_ca_trusted else 0.0)
        self.reload_failures = Counter(
            "enclave_kafka_tls_reload_failures",
            "Changed Kafka TLS files that could not be loaded (retried every minute)",
            registry=registry,
        )
        reloader.attach(self)


class TlsMaterialReloader:
    """Reloads the Kafka client certificate, key and CA into the SSL contexts built from them when
    the files change (Strimzi renews a KafkaUser's certificate before it expires, and Kubernetes
    updates the mounted Secret in place). New connections then present the new certificate and trust
    the new CA; open ones go on until the broker closes them. Without this a service kept the
    certificate it started with and could not reconnect once that one expired. Written by hand:
    neither aiokafka nor FastStream reloads TLS material.

    An SSL context can add CAs but not remove one: a CA taken out of the CA file stays trusted until
    the process restarts. The reloader says so (``retired_ca_trusted``, a metric and an alert)
    instead of restarting the service itself."""

    def __init__(self) -> None:
        #: Contexts no client holds any more (a replaced producer's) are dropped with it.
        self._watched: weakref.WeakKeyDictionary[ssl.SSLContext, _Files] = weakref.WeakKeyDictionary()
        self._seen: dict[_Files, bytes] = {}
        self._loaded: dict[_Files, _Material] = {}
        #: Every CA each set of files ever loaded: what its contexts trust.
        self._trusted: dict[_Files, frozenset[bytes]] = {}
        self._metrics: list[TlsMetrics] = []

    @staticmethod
    def _files(settings: BaseServiceSettings) -> _Files:
        return (settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile, settings.kafka_ssl_cafile)

    @staticmethod
    def digest(settings: BaseServiceSettings) -> bytes:
        return _digest(TlsMaterialReloader._files(settings))

    def attach(self, metrics: TlsMetrics) -> None:
        self._metrics.append(metrics)

    def watch(
        self, context: ssl.SSLContext, settings: BaseServiceSettings, read: bytes | None = None
    ) -> None:
        """Reload ``context`` when its files change; ``read``: their digest when it was loaded."""
        files = self._files(settings)
        self._watched[context] = files
        if files not in self._seen:
            self._seen[files] = read if read is not None else _digest(files)
            with contextlib.suppress(OSError, ValueError):  # the context loaded them: only if replaced since
                self._record(files, _Material.read(files))

    @property
    def active(self) -> bool:
        return bool(self._watched)

    @property
    def earliest_expiry(self) -> float | None:
        """The earliest notAfter of the client certificates in use (epoch seconds)."""
        return min((m.not_after for m in self._loaded.values() if m.not_after is not None), default=None)

    @property
    def retired_ca_trusted(self) -> bool:
        return any(self._trusted[files] - material.cas for files, material in self._loaded.items())

    def check(self) -> int:
        """Reload every context whose files changed since they were last read; how many were."""
        reloaded = 0
        for files, seen in list(self._seen.items()):
            now = _digest(files)
            if now == seen:
                continue
            certfile, keyfile, cafile = files
            try:
                material = _Material.read(files)
                for context, watched in list(self._watched.items()):
                    if watched == files:
                        if certfile:
                            context.load_cert_chain(certfile, keyfile)
                        if cafile:
                            context.load_verify_locations(cafile=cafile)
                        reloaded += 1
            except (OSError, ValueError, ssl.SSLError) as exc:  # mid-update: key and certificate not a pair
                log.warning(
                    "kafka TLS material changed but could not be loaded yet", error_type=type(exc).__name__
                )
                for metrics in self._metrics:
                    metrics.reload_failures.inc()
                continue
            self._seen[files] = now
            self._record(files, material)
            log.info(
                "kafka TLS material reloaded",
                contexts=reloaded,
                retired_ca_trusted=bool(self._trusted[files] - material.cas),
            )
        return reloaded

    def _record(self, files: _Files, material: _Material) -> None:
        self._loaded[files] = material
        self._trusted[files] = self._trusted.get(files, frozenset()) | material.cas

    async def run_forever(self, interval_s: float = 60.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.check()


def _digest(files: tuple[str | None, ...]) -> bytes:
    digest = hashlib.sha256()
    for path in files:
        if path:
            try:
                with open(path, "rb") as handle:
                    digest.update(handle.read())
            except OSError:
                digest.update(b"<unreadable>")
        digest.update(b"\x00")
    return digest.digest()


#: The process's reloader: every SSL context built for Kafka is watched by it (``ServiceRuntime``
#: runs it; the operator tools, which live minutes, do not).
TLS_RELOADER = TlsMaterialReloader()


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay_s: float = 0.2
    max_delay_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: BaseServiceSettings) -> RetryPolicy:
        return cls(settings.retry_attempts, settings.retry_base_delay_s, settings.retry_max_delay_s)

    def delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter, capped."""
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2**attempt))


#: Consumer group timing for every Enclave subscriber. When a member joins or leaves, the others
#: rejoin on their next heartbeat: with aiokafka's 3 s default every start, restart or scale step
#: took several seconds per member. 1 s stays well inside the 10 s session timeout (Kafka's
#: guidance: at most a third).
CONSUMER_GROUP_TIMING: dict[str, int] = {"heartbeat_interval_ms": 1000, "session_timeout_ms": 10_000}


def ce_headers(envelope: Envelope) -> dict[str, str]:
    """The CloudEvents attributes every Enclave record carries in its Kafka headers."""
    return {"ce_id": envelope.id, "ce_type": envelope.type, "ce_source": envelope.source}


class EventPublisher:
    """Publishes envelopes: JSON value, the envelope id and type in headers, an opaque key."""

    def __init__(self, broker: KafkaBroker) -> None:
        self._broker = broker

    async def publish(self, topic: str, envelope: Envelope, *, key: str) -> None:
        """Publish and wait for the broker's acknowledgement."""
        await self._broker.publish(
            envelope.to_bytes(),
            topic=topic,
            key=key.encode(),
            headers=ce_headers(envelope),
            correlation_id=envelope.correlation_id,
        )


class DirectPublisher:
    """Publishes envelopes with an aiokafka producer of its own, without FastStream's per-message
    middlewares: for the gateway, which publishes several events on every request.

    The records are what :class:`EventPublisher` writes (JSON envelope, ``ce_*``, ``content-type`` and
    ``correlation_id`` headers, opaque key), from a producer with the same guarantees (acks=all,
    idempotent). Tracing is the same as FastStream's: a ``<topic> create`` PRODUCER span whose
    context travels in the W3C ``traceparent`` header, so each consumer's process span is its child.
    Measured on the gateway's upload path: FastStream's publish middlewares (telemetry, Prometheus,
    publish commands) cost more CPU than the produce itself.
    """

    def __init__(
        self,
        settings: BaseServiceSettings,
        *,
        tracer_provider: TracerProvider,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None  # made in start(): aiokafka needs the running loop
        self._tracer = tracer_provider.get_tracer("enclave.kafka")
        self._published = Counter(
            "enclave_events_published",
            "Events handed to the Kafka producer directly, by topic",
            ["topic"],
            registry=registry,
        )

    async def start(self) -> None:
        settings = self._settings
        producer = AIOKafkaProducer(
            **connection_options(settings),
            client_id=f"enclave-{settings.service_name}-direct",
            max_request_size=settings.kafka_max_message_bytes,
            **_PRODUCER_OPTIONS,
        )
        await _started(producer, producer.start())
        self._producer = producer

    # ProducerSlot (SenderWatchdog): the producer in use, and a new one in its place.
    name = "direct"

    def producer(self) -> AIOKafkaProducer | None:
        return self._producer

    async def replace(self) -> None:
        await self.start()

    async def stop(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def send(self, topic: str, envelope: Envelope, *, key: str) -> asyncio.Future[Any]:
        """Queue ``envelope`` for publishing and return its acknowledgement, to be awaited.

        A caller with several events sends them all, then awaits every acknowledgement: the producer
        batches what is queued together into one produce request, so the events share round trips
        instead of paying one each. Nothing counts as published until its acknowledgement resolved.
        """
        if self._producer is None:
            raise ConnectionError("the Kafka producer is not started")
        # What FastStream adds to EventPublisher's records, written here as the consumers expect it.
        headers = ce_headers(envelope) | {"content-type": "application/json"}
        if envelope.correlation_id:
            headers["correlation_id"] = envelope.correlation_id
        span = self._tracer.start_span(
            f"{topic} create",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": topic,
                "messaging.message.conversation_id": envelope.correlation_id or "",
                "messaging.kafka.message.key": key,
            },
        )
        propagate.inject(headers, context=trace.set_span_in_context(span))
        span.end()
        ack: asyncio.Future[Any] = await self._producer.send(
            topic,
            envelope.to_bytes(),
            key=key.encode(),
            headers=[(name, value.encode()) for name, value in headers.items()],
        )
        self._published.labels(topic).inc()
        return ack


class ConsumerMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        kwargs: dict[str, Any] = {"registry": registry} if registry is not None else {"registry": None}
        self.dlq = Counter("enclave_dlq_messages", "Messages sent to a DLQ", ["topic", "code"], **kwargs)
        self.retries = Counter("enclave_retries", "Transient failures retried", ["topic"], **kwargs)
        self.duplicates = Counter(
            "enclave_duplicate_events", "Redelivered events skipped", ["topic"], **kwargs
        )
        self.handler_seconds = Histogram(
            "enclave_handler_seconds", "Time to handle one event (retries included)", ["topic"], **kwargs
        )
        self.crypto_operations = Counter(
            "enclave_crypto_operations",
            "Seal, unseal, encrypt and decrypt operations",
            ["service", "operation"],
            **kwargs,
        )
        self.consumer_restarts = Counter(
            "enclave_kafka_consumer_restarts",
            "Kafka consumers restarted because their fetcher had stopped",
            ["group"],
            **kwargs,
        )
        self.producer_restarts = Counter(
            "enclave_kafka_producer_restarts",
            "Kafka producers replaced because their sender had stopped",
            ["producer"],
            **kwargs,
        )
        self.consumer_stuck_seconds = Gauge(
            "enclave_kafka_consumer_stuck_seconds",
            "How long a Kafka consumer of the group has been unable to consume, counted while Kafka "
            "answered (0: consuming); /healthz fails past ENCLAVE_<SERVICE>_KAFKA_CONSUMER_STUCK_S",
            ["group"],
            **kwargs,
        )
        self.producer_stuck_seconds = Gauge(
            "enclave_kafka_producer_stuck_seconds",
            "How long the Kafka producer has been unable to publish (its sender ended and no replacement "
            "has held), counted while Kafka answered (0: can publish, idle or not); /healthz fails past "
            "ENCLAVE_<SERVICE>_KAFKA_PRODUCER_STUCK_S",
            ["producer"],
            **kwargs,
        )


class ProducerSlot(Protocol):
    """Where a service keeps one Kafka producer: the one in use, and how to put a new one there."""

    name: str

    def producer(self) -> AIOKafkaProducer | None: ...

    async def replace(self) -> None: ...


class BrokerProducerSlot:
    """FastStream's producer of ``broker`` (what :class:`EventPublisher` publishes with). A new one is
    built from the broker's own connection options, as FastStream builds it when it connects, and
    handed to FastStream's producer wrapper (private: ``config.producer._producer``, pinned by a test)."""

    name = "broker"

    def __init__(self, broker: KafkaBroker) -> None:
        self.broker = broker

    def producer(self) -> AIOKafkaProducer | None:
        state = getattr(self.broker.config.producer, "_producer", None)
        return getattr(state, "producer", None) if state else None

    async def replace(self) -> None:
        wrapper: Any = self.broker.config.producer
        producer = AIOKafkaProducer(**self.broker._connection_kwargs)
        # connect() starts it and only then puts it in place of the old one.
        await _started(
            producer, wrapper.connect(producer, serializer=wrapper.serializer, codec=wrapper.codec)
        )


async def _started(producer: AIOKafkaProducer, start: Awaitable[None]) -> None:
    """Await ``start`` (which starts ``producer``); a producer that fails to start (Kafka unreachable,
    or cancelled) is closed, not left behind with its connections."""
    try:
        await start
    except BaseException:
        with contextlib.suppress(Exception):
            await producer.stop()
        raise


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
    #: leader: not counted, a partial outage): as last seen.
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
    after every restart never failed liveness.
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
                    self._running(subscriber)
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

    def _running(self, subscriber: Any) -> None:
        """``subscriber`` runs with a coordinator: consuming again once a fetch has returned for it."""
        stuck = self._stuck.get(id(subscriber))
        if stuck is None:
            return
        if not self._fetch_returned(subscriber):
            stuck.waiting_on_kafka = self._partitions_leaderless(subscriber)
            stuck.cause = "no_partition_leader" if stuck.waiting_on_kafka else "no_fetch_returned"
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


async def rewind(msg: KafkaMessage, exc: Exception, retry: RetryPolicy, *, topic: str) -> None:
    """Deliver ``msg`` again after handling or settling it raised ``exc``.

    A commit refused because the group rebalanced (Kafka restarted, a member joined) is expected:
    the work is done, the new assignment starts from the last committed offset and the guard skips
    the repetition, so it is a warning and there is nothing to wait for. Anything else is an error,
    and the redelivery waits ``retry.max_delay_s`` so a failing dependency is not hammered."""
    if isinstance(exc, CommitFailedError):
        log.warning("commit refused after a rebalance; the event will be delivered again", topic=topic)
    else:
        log.error("event not settled; it will be delivered again", topic=topic, exc_info=exc)
        await asyncio.sleep(retry.max_delay_s)
    with contextlib.suppress(Exception):  # e.g. the partition was revoked: its new owner rereads it
        await msg.nack()


def reliable_consumer(
    broker: KafkaBroker,
    handlers: Mapping[str, Handler],
    *,
    group_id: str,
    processed: ProcessedEvents,
    retry: RetryPolicy,
    metrics: ConsumerMetrics,
) -> None:
    """Subscribe ``handlers`` (topic -> handler) with at-least-once, idempotent semantics.

    All topics share one Kafka consumer, so a service is one member of its group: a start or restart
    is one rebalance, not one per topic.
    """
    if not handlers:
        raise ValueError("reliable_consumer needs at least one topic")
    topic_list = list(handlers)

    async def consume(_: Any, msg: KafkaMessage) -> None:
        # Settle every message: ack or nack. An exception left to FastStream would settle neither,
        # the consumer would move on, and the next ack (which commits the consumer's positions)
        # would commit past the message: lost. So whatever fails here (the DLQ publish, the guard,
        # the commit) rewinds to the message, which is delivered again.
        try:
            await handle(msg)
        except Exception as exc:
            topic = _topic_of(msg)
            metrics.retries.labels(topic).inc()
            await rewind(msg, exc, retry, topic=topic)

    def _topic_of(msg: KafkaMessage) -> str:
        record = msg.raw_message
        return record.topic if not isinstance(record, tuple) else topic_list[0]

    async def handle(msg: KafkaMessage) -> None:
        # FastStream may already have JSON-decoded the body; the raw bytes are what we parse and forward.
        body = msg.body
        source_topic = _topic_of(msg)
        handler = handlers[source_topic]
        try:
            envelope = Envelope.from_bytes(body)
        except ValidationError:
            await dead_letter(
                broker, source_topic, body, msg, ContractError("message is not an Enclave envelope"), group_id
            )
            metrics.dlq.labels(source_topic, "contract_violation").inc()
            await msg.ack()
            return
        if await processed.seen(envelope.id):
            metrics.duplicates.labels(source_topic).inc()
            await msg.ack()
            return
        structlog.contextvars.bind_contextvars(correlation_id=envelope.correlation_id, event_id=envelope.id)
        try:
            with metrics.handler_seconds.labels(source_topic).time():
                outcome = await _run_with_retries(handler, envelope, retry, metrics, source_topic)
            if isinstance(outcome, PermanentError):
                log.warning(
                    "event dead-lettered", topic=source_topic, code=outcome.code, reason=outcome.reason
                )
                await dead_letter(broker, source_topic, body, msg, outcome, group_id)
                metrics.dlq.labels(source_topic, outcome.code).inc()
                # Not marked processed: a replay from the DLQ (scripts/dlq.py) must be handled again.
                await msg.ack()
                return
            if outcome is not None:
                log.warning(
                    "transient failure persists; message will be redelivered",
                    topic=source_topic,
                    exc_info=outcome,
                )
                await asyncio.sleep(retry.max_delay_s)
                await msg.nack()
                return
            await processed.mark(envelope.id, source_topic)
            await msg.ack()
        finally:
            structlog.contextvars.unbind_contextvars("correlation_id", "event_id")

    subscribe_kwargs: dict[str, Any] = {
        "group_id": group_id,
        "ack_policy": AckPolicy.MANUAL,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
        "title": f"{group_id}:{','.join(topic_list)}",
        **CONSUMER_GROUP_TIMING,
    }
    broker.subscriber(*topic_list, **subscribe_kwargs)(consume)


async def _run_with_retries(
    handler: Handler, envelope: Envelope, retry: RetryPolicy, metrics: ConsumerMetrics, topic: str
) -> PermanentError | TransientError | None:
    """Run the handler; return None on success, the PermanentError to dead-letter, or the last TransientError."""
    last: TransientError | None = None
    for attempt in range(retry.attempts):
        try:
            await handler(envelope)
            return None
        except Exception as exc:  # classified below; nothing escapes unclassified
            error = classify_exception(exc)
            if isinstance(error, PermanentError):
                return error
            last = error
            metrics.retries.labels(topic).inc()
            log.info(
                "transient failure; retrying", topic=topic, attempt=attempt + 1, error_type=type(exc).__name__
            )
            await asyncio.sleep(retry.delay(attempt))
    return last


async def dead_letter(
    broker: KafkaBroker, topic: str, body: bytes, msg: KafkaMessage, error: PermanentError, group_id: str
) -> None:
    """Copy a message that failed for good to ``<topic>.dlq`` with the headers the runbook's tool
    (``enclave-dlq``) and the alerts read: the group that gave up, the code and reason, where it came
    from and when. Every consumer dead-letters through here."""
    record = msg.raw_message
    headers = {
        "x-dlq-consumer-group": group_id,
        "x-dlq-reason": error.reason[:1000],
        "x-dlq-code": error.code,
        "x-original-topic": topic,
        "x-failed-at": datetime.now(UTC).isoformat(),
    }
    if not isinstance(record, tuple):
        headers["x-original-partition"] = str(record.partition)
        headers["x-original-offset"] = str(record.offset)
        key = record.key
    else:
        key = None
    await broker.publish(body, topic=topics.dlq(topic.removesuffix(".dlq")), key=key, headers=headers)
