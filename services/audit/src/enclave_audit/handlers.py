"""Thin glue between Kafka, the domain and the store: audit every message, raise alerts, sign checkpoints.

The audit consumer is not :func:`enclave_common.kafka.reliable_consumer`: it needs the topic and
headers of each message (a dead-lettered copy's value is the original envelope, its reason is in
``x-dlq-code``/``x-dlq-reason``), it must audit what is not an envelope rather than dead-letter it
(a DLQ of the audit consumer would feed itself), and its idempotency is the record's own unique
audit key rather than a separate "processed" collection. Retries follow the same policy: bounded
backoff, then redelivery; nothing is ever skipped.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from enclave_common import topics
from enclave_common.auth.token_revocations import TokenRevocationStore
from enclave_common.envelope import Envelope, derived_event_id
from enclave_common.events import SecurityAlert
from enclave_common.kafka import CONSUMER_GROUP_TIMING, EventPublisher, RetryPolicy
from enclave_common.storage import ObjectStore
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from prometheus_client import CollectorRegistry, Counter, Gauge

from enclave_audit.anomaly import AlertDraft, AnomalyDetector
from enclave_audit.chain import GENESIS, ChainHead, VerifyResult, verify_chain
from enclave_audit.checkpoints import (
    CHECKPOINT_PREFIX,
    Checkpoint,
    build_checkpoint,
    checkpoint_key_bound,
    checkpoint_range,
    overlap_search_start,
    stored_checkpoint,
    verify_checkpoint,
)
from enclave_audit.records import AuditRecord, AuditRecordDraft, record_from_event
from enclave_audit.signing import Ed25519Signer
from enclave_audit.store import AuditStore, CheckpointEntry, json_form
from enclave_audit.token_revocations import honoured_revocation

log = structlog.get_logger("enclave.audit")

DLQ_CODE_HEADER: Final = "x-dlq-code"
DLQ_REASON_HEADER: Final = "x-dlq-reason"
MAX_DLQ_REASON: Final = 500
_ALERT_TYPE: Final = topics.event_type(topics.SECURITY_ALERT)


class AuditMetrics:
    """The metric names the deploy alerts and dashboard use."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.chain_length = Gauge(
            "enclave_audit_chain_length", "Records in the hash chain", registry=registry
        )
        self.last_verify_success = Gauge(
            "enclave_audit_last_verify_success_timestamp_seconds",
            "Unix time of the last whole-chain verification that succeeded",
            registry=registry,
        )
        self.verify_failures = Counter(
            "enclave_audit_verify_failures",
            "Chain or checkpoint verifications that failed",
            registry=registry,
        )
        self.records = Counter(
            "enclave_audit_records", "Messages audited", ["outcome"], registry=registry
        )  # outcome: stored | duplicate
        self.checkpoints = Counter(
            "enclave_audit_checkpoints", "Checkpoints signed and stored", registry=registry
        )
        self.last_checkpoint_sequence = Gauge(
            "enclave_audit_last_checkpoint_sequence",
            "Last sequence under a signed checkpoint",
            registry=registry,
        )
        self.alerts = Counter("enclave_audit_alerts", "Security alerts raised", ["rule"], registry=registry)
        self.failures = Counter(
            "enclave_audit_ingest_failures",
            "Attempts to audit a message that failed (retried)",
            registry=registry,
        )


# --- mapping a Kafka message to a record -------------------------------------------------------


def parse_message(body: bytes) -> dict[str, Any]:
    """The message as a mapping: the envelope if it is a JSON object, else the raw bytes (digested)."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        value = None
    if isinstance(value, dict):
        return value
    return {"type": None, "data": {"unparsed_message": body}}


def audit_key(draft: AuditRecordDraft, headers: Mapping[str, str]) -> str:
    """The record's unique key: the event id; a dead-lettered copy has its own key per DLQ code.

    The same event dead-lettered twice with the same code (a redelivery) is one record; the
    original event and its dead-lettered copy are two.
    """
    if not draft.dead_lettered:
        return draft.event_id
    code = headers.get(DLQ_CODE_HEADER) or "unknown"
    return f"dlq:{draft.topic}:{draft.event_id}:{code}"


def draft_for_message(
    body: bytes, topic: str, headers: Mapping[str, str], *, received_at: datetime | None = None
) -> AuditRecordDraft:
    """Never refuses: a message the record model cannot take is audited as opaque bytes."""
    message = parse_message(body)
    try:
        draft = record_from_event(message, topic, received_at=received_at)
    except ValueError:
        draft = record_from_event({"data": {"unparsed_message": body}}, topic, received_at=received_at)
    if draft.dead_lettered:
        code = headers.get(DLQ_CODE_HEADER) or "unknown"
        reason = (headers.get(DLQ_REASON_HEADER) or "no reason given")[:MAX_DLQ_REASON]
        original = topic.removesuffix(".dlq")
        draft = draft.model_copy(
            update={"outcome_description": f"dead-lettered from {original}: [{code}] {reason}"}
        )
    return draft


def decode_headers(raw: Sequence[tuple[str, bytes | None]] | None) -> dict[str, str]:
    return {k: (v or b"").decode("utf-8", "replace") for k, v in raw or ()}


# --- alerts ----------------------------------------------------------------------------------


def alert_envelope(record: AuditRecordDraft, alert: AlertDraft) -> Envelope:
    """The ``security.alert`` event; its id is derived from the triggering event, rule and subject,
    so re-evaluating a redelivered record re-publishes the same event (audited once)."""
    try:
        cause_id = str(uuid.UUID(record.event_id))
    except ValueError:
        cause_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:enclave:audit-event:{record.event_id}"))
    data = SecurityAlert(**alert.to_event_data())
    return Envelope(
        id=derived_event_id(cause_id, _ALERT_TYPE, f"{alert.rule}|{alert.subject}"),
        type=_ALERT_TYPE,
        source="audit",
        tenant=record.tenant or "enclave",
        actor="audit",
        correlation_id=record.correlation_id or record.event_id,
        causation_id=record.event_id,
        data=data.model_dump(mode="json"),
    )


class AuditConsumer:
    """Audits every message on the topics matching ``pattern``."""

    def __init__(
        self,
        store: AuditStore,
        publisher: EventPublisher,
        detector: AnomalyDetector,
        metrics: AuditMetrics,
        retry: RetryPolicy,
        *,
        revocations: TokenRevocationStore | None = None,
        skew: timedelta = timedelta(seconds=30),
    ) -> None:
        """``revocations``: where a token revocation an admin made at the gateway is stored once its
        record is (``enclave_audit.token_revocations``), for the auditor API's guard; ``skew``: the
        clock skew its verifier tolerates."""
        self.store = store
        self.publisher = publisher
        self.detector = detector
        self.metrics = metrics
        self.retry = retry
        self.revocations = revocations
        self.skew = skew

    def register(self, broker: KafkaBroker, pattern: str, *, group_id: str, metadata_max_age_ms: int) -> None:
        async def consume(_: Any, msg: KafkaMessage) -> None:
            raw = msg.raw_message
            if isinstance(raw, tuple):  # batch delivery is not configured; be explicit if it ever is
                raise TypeError("the audit subscriber expects single messages")
            delivered = await self._with_retries(bytes(msg.body), raw.topic, decode_headers(raw.headers))
            if delivered:
                await msg.ack()
            else:
                await asyncio.sleep(self.retry.max_delay_s)
                await msg.nack()

        subscriber = broker.subscriber(
            pattern=pattern,
            group_id=group_id,
            ack_policy=AckPolicy.MANUAL,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            title=f"{group_id}:audited",
            **CONSUMER_GROUP_TIMING,
        )
        subscriber(consume)
        # FastStream has no per-subscriber metadata age; a new matching topic is found on refresh.
        connection_args = getattr(subscriber, "_connection_args", None)
        if isinstance(connection_args, dict):
            connection_args["metadata_max_age_ms"] = metadata_max_age_ms

    async def _with_retries(self, body: bytes, topic: str, headers: Mapping[str, str]) -> bool:
        for attempt in range(self.retry.attempts):
            try:
                await self.audit(body, topic, headers)
                return True
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # nothing may be skipped: every failure is retried, then redelivered
                self.metrics.failures.inc()
                log.warning(
                    "audit attempt failed", topic=topic, attempt=attempt + 1, error_type=type(exc).__name__
                )
                await asyncio.sleep(self.retry.delay(attempt))
        log.error("audit keeps failing; the message will be redelivered", topic=topic)
        return False

    async def audit(self, body: bytes, topic: str, headers: Mapping[str, str]) -> AuditRecord:
        """Store one record for the message (once), then what it revokes and the anomaly rules on it
        (again for a redelivery: both are idempotent)."""
        draft = draft_for_message(body, topic, headers)
        outcome = await self.store.append(draft, audit_key(draft, headers))
        record = outcome.record
        if outcome.stored:
            self.metrics.records.labels("stored").inc()
            self.metrics.chain_length.set(record.sequence)
        else:
            self.metrics.records.labels("duplicate").inc()
        if not record.dead_lettered:
            if self.revocations is not None and (made := honoured_revocation(record, skew=self.skew)):
                await self.revocations.revoke(made)
            observe = getattr(self.detector.history, "observe", None)
            if observe is not None:
                await asyncio.to_thread(observe, record, record.event_id)
            await self.raise_alerts(record)
        return record

    async def raise_alerts(self, record: AuditRecord) -> None:
        """Publish then remember each alert: a crash in between re-publishes the same event id."""
        alerts = await asyncio.to_thread(self.detector.evaluate, record)
        for alert in alerts:
            envelope = alert_envelope(record, alert)
            await self.publisher.publish(topics.SECURITY_ALERT, envelope, key=envelope.id)
            await self.store.record_alert(envelope.id, alert)
            self.metrics.alerts.labels(alert.rule).inc()
            log.warning(
                "security alert raised", rule=alert.rule, severity=alert.severity, event_id=envelope.id
            )


# --- checkpoints -----------------------------------------------------------------------------


class Checkpointer:
    """Signs a checkpoint over the records since the last one, after verifying them, and stores it
    in the object-lock bucket (COMPLIANCE mode) and the checkpoint index, in that order.

    The object-lock bucket, not the index, decides what may be signed (docs/audit.md): the last
    index entry must be a genuine checkpoint under its own name; a checkpoint already stored at the
    next start (a replica died between storing and indexing it, or its index entry was removed) is
    **adopted** if it links and the records match it; every other stored checkpoint covering the
    records to sign must match them. Otherwise nothing is signed (``verify_failures`` counts, the
    log says why) until an interval later. Signing anew over a stored range would let whoever can
    write the database change the records, remove or redirect index entries, and have the forgery
    signed."""

    def __init__(
        self,
        store: AuditStore,
        objects: ObjectStore,
        signer: Ed25519Signer,
        *,
        bucket: str,
        retention_days: int,
        every_records: int,
        interval_s: float,
        metrics: AuditMetrics,
        trusted: Mapping[str, Ed25519PublicKey] | None = None,
    ) -> None:
        self.store = store
        self.objects = objects
        self.signer = signer
        #: Keys whose checkpoints are genuine (the signing key's and those of a rotation), by key id.
        self.trusted = {signer.key_id: signer.public_key, **(trusted or {})}
        self.bucket = bucket
        self.retention_days = retention_days
        self.every_records = every_records
        self.interval_s = interval_s
        self.metrics = metrics
        self._last_made = time.monotonic()
        self._refused_at: float | None = None

    async def run_forever(self, poll_s: float = 2.0) -> None:
        while True:
            await asyncio.sleep(min(poll_s, self.interval_s))
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next tick tries again
                log.warning(
                    "checkpoint failed; will retry", error_type=type(exc).__name__, error=str(exc)[:300]
                )

    async def tick(self, *, force: bool = False) -> list[CheckpointEntry]:
        """Make the checkpoints that are due (all pending records with ``force``)."""
        made: list[CheckpointEntry] = []
        while True:
            previous = await self.store.last_checkpoint()
            start = previous.checkpoint.last_sequence + 1 if previous else 1
            head = self.store.head or await self.store.read_head()
            if head.sequence < start:
                head = await self.store.read_head()  # another replica may be ahead of this one
            pending = head.sequence - start + 1
            due = pending >= self.every_records or (
                pending > 0 and (force or time.monotonic() - self._last_made >= self.interval_s)
            )
            refused_lately = (
                self._refused_at is not None and time.monotonic() - self._refused_at < self.interval_s
            )
            if not due or (refused_lately and not force):
                return made
            if previous is not None and (problem := _not_genuine(previous, self.trusted)) is not None:
                self._refuse(problem)
                return made
            last = min(head.sequence, start + self.every_records - 1)
            stored = await self._stored(start, last)
            if at_start := [(k, v) for k, v, span in stored if span[0] == start]:
                entry = await self.adopt(previous, at_start)
            elif (problem := await self._stored_disagree(previous, start, last, stored)) is not None:
                entry = self._refuse(problem)
            else:
                entry = await self.make(previous, start, last)
            if entry is None:
                return made
            made.append(entry)

    async def _stored(self, start: int, last: int) -> list[tuple[str, str, tuple[int, int]]]:
        """Every stored version of the checkpoints that may cover ``start..last`` (key, version id,
        the range its name says): those starting at most ``MAX_CHECKPOINT_RECORDS`` before it (what a
        writer that lost an indexing race stored included), up to ``last``. Objects under the prefix
        that are no checkpoint by name are left to verification, which reports them."""
        listed = await self.objects.list_versions(
            self.bucket,
            CHECKPOINT_PREFIX,
            after=overlap_search_start(start),
            until=checkpoint_key_bound(last),
        )
        return [(key, version, span) for key, version in listed if (span := checkpoint_range(key))]

    async def _read(self, key: str, version_id: str) -> Checkpoint | None:
        """The stored checkpoint, or None if the object is no checkpoint under its own name."""
        body = await self.objects.open(self.bucket, key, version_id)
        checkpoint = stored_checkpoint(key, await asyncio.to_thread(body.read))
        return checkpoint if isinstance(checkpoint, Checkpoint) else None

    async def adopt(
        self, previous: CheckpointEntry | None, stored: list[tuple[str, str]]
    ) -> CheckpointEntry | None:
        """Index the first of the ``stored`` checkpoints (those starting right after ``previous``)
        that follows ``previous`` and that the records match; refuse (None, the reasons logged and
        counted) if none does."""
        problems = []
        for key, version_id in stored:
            checkpoint = await self._read(key, version_id)
            if checkpoint is None:
                problems.append(f"{key} ({version_id}) is not the checkpoint its name says")
                continue
            if (problem := await self._mismatch(previous, checkpoint)) is not None:
                problems.append(f"{key} ({version_id}): {problem}")
                continue
            entry = CheckpointEntry(checkpoint, key, version_id, checkpoint.to_bytes())
            if not await self.store.add_checkpoint(entry):
                return None  # another replica indexed this range first
            self.metrics.last_checkpoint_sequence.set(checkpoint.last_sequence)
            log.warning(
                "checkpoint adopted from the object-lock bucket: its index entry was missing",
                first=checkpoint.first_sequence,
                last=checkpoint.last_sequence,
            )
            return entry
        return self._refuse("; ".join(problems))

    async def _stored_disagree(
        self,
        previous: CheckpointEntry | None,
        start: int,
        last: int,
        stored: list[tuple[str, str, tuple[int, int]]],
    ) -> str | None:
        """Why records ``start..last`` may not be signed: a stored checkpoint other than ``previous``
        covers some of them and does not match them (or is no checkpoint). Checkpoints that a writer
        which lost an indexing race stored match the records, and block nothing."""
        for key, version_id, (first, end) in stored:
            if end < start or first > last:
                continue
            if previous is not None and (key, version_id) == (previous.object_key, previous.version_id):
                continue
            checkpoint = await self._read(key, version_id)
            if checkpoint is None:
                return f"{key} ({version_id}) is not the checkpoint its name says"
            hashes = [
                d["record_hash"]
                async for d in self.store.iter_range(first, end, projection={"record_hash": 1})
            ]
            check = verify_checkpoint(checkpoint, self.trusted, record_hashes=hashes)
            if not check.ok:
                return f"{key} ({version_id}) covers records {start}..{last} and {check.reason}"
        return None

    def _refuse(self, problem: str) -> None:
        """Sign nothing: counted as a verification failure, logged, tried again an interval later."""
        self.metrics.verify_failures.inc()
        self._refused_at = time.monotonic()
        log.error(
            "refusing to sign a checkpoint: the stored checkpoints and the index or records disagree "
            "(was the audit database changed?)",
            problem=problem,
        )
        return None

    async def _mismatch(self, previous: CheckpointEntry | None, checkpoint: Checkpoint) -> str | None:
        """Why ``checkpoint`` is not the signed checkpoint of the stored records after ``previous``."""
        records, chain = await self._records(previous, checkpoint.first_sequence, checkpoint.last_sequence)
        if not chain.ok:
            return f"the records it covers do not verify ({chain.reason} at {chain.broken_sequence})"
        check = verify_checkpoint(
            checkpoint,
            self.trusted,
            record_hashes=[r.record_hash for r in records],
            previous=previous.checkpoint if previous else None,
        )
        return None if check.ok else check.reason

    async def _records(
        self, previous: CheckpointEntry | None, first: int, last: int
    ) -> tuple[list[AuditRecord], VerifyResult]:
        """The stored records ``first..last``, and whether they chain on from ``previous``."""
        anchor = (
            ChainHead(previous.checkpoint.last_sequence, previous.checkpoint.last_record_hash)
            if previous
            else GENESIS
        )
        documents = [json_form(d) async for d in self.store.iter_range(first, last)]
        records: list[AuditRecord] = []
        result = verify_chain(documents, anchor=anchor, expected_last_sequence=last, on_record=records.append)
        return records, result

    async def make(self, previous: CheckpointEntry | None, first: int, last: int) -> CheckpointEntry | None:
        records, result = await self._records(previous, first, last)
        if not result.ok:
            return self._refuse(
                f"the chain is broken at {result.broken_sequence} ({result.reason}): it is not signed"
            )
        now = datetime.now(UTC)
        checkpoint = build_checkpoint(
            records, signer=self.signer, created_at=now, previous=previous.checkpoint if previous else None
        )
        raw = checkpoint.to_bytes()
        stored = await self.objects.put_locked(
            self.bucket,
            checkpoint.object_key,
            raw,
            retain_until=now + timedelta(days=self.retention_days),
        )
        entry = CheckpointEntry(checkpoint, checkpoint.object_key, stored.version_id, raw)
        if not await self.store.add_checkpoint(entry):
            log.info("another replica indexed this checkpoint range first", first=first)
            return None
        self._last_made = time.monotonic()
        self.metrics.checkpoints.inc()
        self.metrics.last_checkpoint_sequence.set(checkpoint.last_sequence)
        log.info("checkpoint signed", first=first, last=last, key_id=checkpoint.key_id)
        return entry


def _not_genuine(entry: CheckpointEntry, trusted: Mapping[str, Ed25519PublicKey]) -> str | None:
    """Why the index entry ``entry`` is not a checkpoint this service signed, under its own name."""
    cp = entry.checkpoint
    if entry.object_key != cp.object_key:
        return (
            f"the index entry of checkpoint {cp.first_sequence}..{cp.last_sequence} names {entry.object_key}"
        )
    check = verify_checkpoint(cp, trusted)
    return None if check.ok else f"indexed checkpoint {cp.first_sequence}..{cp.last_sequence}: {check.reason}"
