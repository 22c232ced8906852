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

The watchdogs that restart a stalled consumer or replace a stalled producer, and report them to
``/healthz``, are in :mod:`enclave_common.kafka_liveness`.
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
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import CommitFailedError
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

    # ProducerSlot (kafka_liveness.SenderWatchdog): the producer in use, and a new one in its place.
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
