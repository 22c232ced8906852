"""The audit service runs under its append-only MongoDB role (docs/audit.md "MongoDB: insert and find
only").

FerretDB has no roles, so the role cannot be enforced here; instead every command the service's code
sends to the real MongoDB-wire server is recorded by the driver's command monitoring and checked
against the role's privileges (``enclave_audit.privileges``). The service's own components are driven
in-process on a fresh database: records appended (and one delivered twice), anomaly windows and an
alert (published to the real Kafka), a checkpoint signed into a real object-lock bucket, the
auditor API's reads, a whole-trail verification and an export's record stream. Without the
migration the service refuses to start, naming the missing indexes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from enclave_audit.anomaly import AnomalyDetector, AnomalyThresholds
from enclave_audit.api import AuditApiContext, verify_stored
from enclave_audit.config import AuditSettings
from enclave_audit.handlers import AuditConsumer, AuditMetrics, Checkpointer
from enclave_audit.main import prepare_indexes
from enclave_audit.privileges import (
    MIGRATION_PRIVILEGES,
    SERVICE_PRIVILEGES,
    UNPRIVILEGED_COMMANDS,
    actions_needed,
    allows,
)
from enclave_audit.signing import Ed25519Signer
from enclave_audit.store import INDEXES, AuditStore, EventQuery, SyncRecordReader
from enclave_audit.windows import BucketedAuditHistory
from enclave_common import topics
from enclave_common.auth.token_revocations_mongo import MongoTokenRevocationStore
from enclave_common.kafka import EventPublisher, RetryPolicy
from enclave_common.storage import S3ObjectStore
from faststream.kafka import KafkaBroker
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient, MongoClient, monitoring

from .conftest import KAFKA, MONGO_URL, S3_ENDPOINT, S3_KEY, S3_SECRET
from .support import ROOT, access_event, dev_env


@dataclass
class CommandRecorder(monitoring.CommandListener):
    """(command, collection) of every command sent to ``database``."""

    database: str
    seen: list[tuple[str, str | None, dict[str, Any]]] = field(default_factory=list)

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.database_name == self.database:
            target = event.command.get(event.command_name)
            self.seen.append((event.command_name, target if isinstance(target, str) else None, event.command))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def refused(privileges: dict[str, tuple[str, ...]] | Any, recorder: CommandRecorder) -> list[str]:
    """Every recorded command the privileges would refuse, as ``command on collection``."""
    out = []
    for name, collection, command in recorder.seen:
        if name in UNPRIVILEGED_COMMANDS:
            continue
        needed = actions_needed(name, command)
        for action in needed:
            if not allows(privileges, action, collection or ""):
                out.append(f"{name} ({action}) on {collection}")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(service_name: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        **dev_env(),
        "ENCLAVE_MONGO_URL": MONGO_URL,
        "ENCLAVE_AUDIT_SERVICE_NAME": service_name,
        **extra,
    }


async def test_without_the_migration_the_service_refuses_to_start_naming_the_indexes(unique):
    name = f"audit_priv_{unique}"
    started = await asyncio.to_thread(
        subprocess.run,
        [str(ROOT / ".venv/bin/enclave-audit")],
        env=_env(name, ENCLAVE_AUDIT_CREATE_INDEXES="false", ENCLAVE_AUDIT_HTTP_PORT=str(_free_port())),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = started.stdout + started.stderr
    assert started.returncode != 0, output[-2000:]
    assert "enclave-audit-migrate" in output, output[-2000:]
    for collection, index, _, _ in INDEXES:
        assert f"{collection}.{index}" in output

    migrate = [str(ROOT / ".venv/bin/enclave-audit-migrate")]
    check = await asyncio.to_thread(
        subprocess.run, [*migrate, "--check"], env=_env(name), capture_output=True, text=True
    )
    assert check.returncode == 1 and check.stdout.count("MISSING") == len(INDEXES), (
        check.stdout + check.stderr
    )
    for _ in range(2):  # idempotent
        done = await asyncio.to_thread(
            subprocess.run, migrate, env=_env(name), capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "MISSING" not in done.stdout and done.stdout.count("ok") == len(INDEXES), done.stdout


async def test_every_command_the_service_sends_is_within_its_append_only_role(unique, s3):
    database = f"audit_priv_{unique}"
    tenant = f"it-priv-{unique}"
    settings = AuditSettings(
        service_name=database,
        s3_endpoint_url=S3_ENDPOINT,
        s3_access_key_id=S3_KEY,
        s3_secret_access_key=S3_SECRET,
        worm_bucket=f"enclave-audit-priv-{unique}",
        retention_days=1,
        anomaly=AnomalyThresholds(distinct_studies_limit=3, auth_failure_limit=2),
    )
    migration = CommandRecorder(database)
    admin: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(MONGO_URL, event_listeners=[migration])
    try:
        await AuditStore(admin[database]).ensure_indexes()
    finally:
        await admin.close()
    # The check bites: the migration's commands are outside the service's role, inside its own.
    assert any(name == "createIndexes" for name, _, _ in migration.seen)
    assert refused(SERVICE_PRIVILEGES, migration)
    assert refused(MIGRATION_PRIVILEGES, migration) == []

    recorder = CommandRecorder(database)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        MONGO_URL, tz_aware=True, event_listeners=[recorder]
    )
    sync_client: MongoClient[dict[str, Any]] = MongoClient(
        MONGO_URL, tz_aware=True, event_listeners=[recorder]
    )
    broker = KafkaBroker(KAFKA)
    await broker.connect()
    objects = S3ObjectStore(settings)
    await objects.ensure_bucket(settings.worm_bucket, object_lock=True)
    try:
        store = AuditStore(client[database])
        await prepare_indexes(store, create=False)  # the migration ran: starts without creating
        metrics = AuditMetrics(CollectorRegistry())
        history = BucketedAuditHistory(sync_client[database])
        revocations = MongoTokenRevocationStore(client[database])
        consumer = AuditConsumer(
            store,
            EventPublisher(broker),
            AnomalyDetector(settings.anomaly, history),
            metrics,
            RetryPolicy(),
            revocations=revocations,
        )
        events = [
            access_event(
                actor=f"dr-{unique}", tenant=tenant, action="read_study", target=f"/studies/p-{unique}-{i}"
            )
            for i in range(4)
        ]
        events += [
            access_event(
                actor=f"who-{unique}", tenant=tenant, action="authenticate", outcome="unauthenticated"
            )
            for _ in range(3)
        ]
        # A token revocation an admin made at the gateway, stored for the auditor API's guard; the same
        # from a principal that is no admin is not (anything that may write access events could send it).
        made = f"revoked_before={datetime.now(UTC).isoformat()}"
        events += [
            access_event(
                actor=f"adm-{unique}",
                tenant=tenant,
                action="revoke_tokens",
                roles=roles,
                status_code=201,
                detail=f"tokens_revoked subject={subject}-{unique} {made}",
            )
            for subject, roles in (("aud", ["admin"]), ("not-by-admin", ["auditor"]))
        ]
        for event in events:
            await consumer.audit(event.to_bytes(), topics.ACCESS_RECORDED, {})
        await consumer.audit(events[0].to_bytes(), topics.ACCESS_RECORDED, {})  # redelivered: no new record
        assert await client[database]["alerts"].count_documents({}) >= 2  # both rules fired
        honoured = await revocations.since(datetime.now(UTC) - timedelta(hours=1))
        assert [(r.tenant, r.subject, r.revoked_by) for r in honoured] == [
            (tenant, f"aud-{unique}", f"adm-{unique}")
        ]

        signer = Ed25519Signer.generate()
        checkpointer = Checkpointer(
            store,
            objects,
            signer,
            bucket=settings.worm_bucket,
            retention_days=1,
            every_records=1,
            interval_s=1,
            metrics=metrics,
        )
        assert await checkpointer.tick(force=True)
        ctx = AuditApiContext(
            store=store,
            reader=SyncRecordReader(sync_client[database]),
            objects=objects,
            bucket=settings.worm_bucket,
            metrics=metrics,
            operator_tenant="enclave-operator",
            default_page_size=10,
            max_page_size=100,
            max_export_records=1000,
        )
        ctx.signer = signer
        page = await store.query(EventQuery(tenant=tenant, since=datetime.now(UTC) - timedelta(hours=1)), 100)
        assert len(page) == len(events)
        assert (await verify_stored(ctx, 1, None)).ok
        assert len(list(ctx.reader.iter_records(1, len(events)))) == len(events)
    finally:
        await broker.stop()
        await client.close()
        sync_client.close()

    used = {(name, collection) for name, collection, _ in recorder.seen}
    for expected in [
        ("insert", "records"),
        ("insert", "alerts"),
        ("insert", "checkpoints"),
        ("update", "anomaly_windows"),
        ("update", "token_revocations"),
        ("listIndexes", "records"),
    ]:
        assert expected in used, sorted(used)  # the paths ran
    assert refused(SERVICE_PRIVILEGES, recorder) == []
    assert not any(name in ("createIndexes", "delete", "drop", "findAndModify") for name, _ in used)
