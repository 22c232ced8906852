"""Wiring of the audit service: the only place that builds clients."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import structlog
from enclave_common import topics
from enclave_common.auth import RemoteKeySource, RevokedTokens, TokenRules, TokenVerifier
from enclave_common.auth.fastapi import AccessGuard
from enclave_common.auth.token_revocations_mongo import MongoTokenRevocationStore
from enclave_common.errors import ConfigurationError
from enclave_common.service import ServiceRuntime, load_settings, run_service
from enclave_common.storage import S3ObjectStore
from fastapi import FastAPI
from prometheus_client import Gauge
from pymongo import MongoClient

from enclave_audit.anomaly import AnomalyDetector
from enclave_audit.api import AuditApiContext, LazyFileKeySource, access_hook, build_router, verify_stored
from enclave_audit.config import AuditSettings
from enclave_audit.fhir_errors import OperationOutcomeErrors
from enclave_audit.handlers import AuditConsumer, AuditMetrics, Checkpointer
from enclave_audit.signing import Ed25519Signer, trusted_keys
from enclave_audit.store import AuditStore, SyncRecordReader
from enclave_audit.windows import BucketedAuditHistory

log = structlog.get_logger("enclave.audit")


def create_app(settings: AuditSettings | None = None) -> FastAPI:
    settings = settings or AuditSettings()
    runtime = ServiceRuntime(settings)
    runtime.publishes(topics.SECURITY_ALERT, topics.ACCESS_RECORDED)
    metrics = AuditMetrics(runtime.registry)
    store = AuditStore(runtime.db)
    # Blocking client for work done in worker threads (anomaly history, export, verification).
    sync_client: MongoClient[dict[str, Any]] = MongoClient(
        settings.mongo_url.get_secret_value(),
        tz_aware=True,
        serverSelectionTimeoutMS=5000,
        connect=False,
        appname="enclave-audit-sync",
    )
    sync_db = sync_client[settings.mongo_database]
    objects = S3ObjectStore(settings)
    runtime.readiness["object_store"] = partial(objects.ping, settings.worm_bucket)

    history = BucketedAuditHistory(sync_db)
    verifier = _token_verifier(settings)
    # As the gateway's: a provider clock running ahead stamps a token issued before with a later iat.
    skew = timedelta(seconds=verifier.rules.leeway_seconds)
    token_revocations = MongoTokenRevocationStore(
        runtime.db, read_timeout_s=settings.token_revocation_read_timeout_s
    )
    consumer = AuditConsumer(
        store,
        runtime.publisher,
        AnomalyDetector(settings.anomaly, history),
        metrics,
        runtime.retry,
        revocations=token_revocations,
        skew=skew,
    )
    consumer.register(
        runtime.broker,
        topics.AUDITED_PATTERN,
        group_id=f"enclave-{settings.service_name}",
        metadata_max_age_ms=settings.metadata_max_age_ms,
    )

    ctx = AuditApiContext(
        store=store,
        reader=SyncRecordReader(sync_db),
        objects=objects,
        bucket=settings.worm_bucket,
        metrics=metrics,
        operator_tenant=settings.operator_tenant,
        default_page_size=settings.default_page_size,
        max_page_size=settings.max_page_size,
        query_timeout_s=settings.query_timeout_s,
        max_export_records=settings.max_export_records,
    )
    revoked_tokens = RevokedTokens(
        token_revocations,
        skew=skew,
        retention=timedelta(seconds=settings.token_revocation_retention_s),
    )
    Gauge(
        "enclave_audit_token_revocations_age_seconds",
        "Seconds since this replica last read the stored token revocations (not its consumer's lag)",
        registry=runtime.registry,
    ).set_function(revoked_tokens.age_now)
    guard = AccessGuard(verifier, revoked_tokens=revoked_tokens, on_decision=access_hook(runtime.publisher))

    def load_keys() -> None:
        if settings.signing_key_file is None:
            raise ConfigurationError(
                "ENCLAVE_AUDIT_SIGNING_KEY_FILE is not set (an Ed25519 private key, PEM)"
            )
        ctx.signer = Ed25519Signer.from_pem(settings.signing_key_file.read_bytes())
        ctx.other_keys = trusted_keys(None, settings.trusted_public_keys_dir)

    async def prepare() -> None:
        signer = ctx.signer
        assert signer is not None
        await objects.ensure_bucket(settings.worm_bucket, object_lock=True)
        await prepare_indexes(store, create=settings.create_indexes)
        head = await store.read_head()
        metrics.chain_length.set(head.sequence)
        if settings.checkpoint_writer:
            checkpointer = Checkpointer(
                store,
                objects,
                signer,
                bucket=settings.worm_bucket,
                retention_days=settings.retention_days,
                every_records=settings.checkpoint_every_records,
                interval_s=settings.checkpoint_interval_s,
                metrics=metrics,
                trusted=ctx.other_keys,
            )
            runtime.spawn(checkpointer.run_forever(), "audit-checkpoints")
        runtime.spawn(_verify_periodically(ctx, settings.verify_interval_s), "audit-verify")
        # Before the first request: a revoked token is refused from the start.
        await revoked_tokens.refresh(datetime.now(UTC))
        runtime.spawn(
            revoked_tokens.refresh_forever(settings.token_revocation_refresh_s), "audit-token-revocations"
        )

    async def close_sync_client() -> None:
        sync_client.close()

    runtime.preflight(load_keys)
    runtime.on_startup(prepare)
    runtime.on_shutdown(close_sync_client)
    app = runtime.http_app(title="Enclave audit", routers=[build_router(ctx, guard)])
    app.add_middleware(OperationOutcomeErrors)  # the FHIR routes' errors as OperationOutcome
    app.state.audit = ctx
    return app


async def prepare_indexes(store: AuditStore, *, create: bool) -> None:
    """Create the indexes, or (under the append-only role) refuse to start without them."""
    if create:
        await store.ensure_indexes()
        return
    missing = await store.missing_indexes()
    if missing:
        raise ConfigurationError(
            f"the audit database lacks the indexes {', '.join(missing)}: run enclave-audit-migrate "
            "as the migration user (ENCLAVE_AUDIT_CREATE_INDEXES=false: this service does not create them)"
        )


def _token_verifier(settings: AuditSettings) -> TokenVerifier:
    rules = TokenRules(
        issuer=settings.oidc_issuer, audience=settings.oidc_audience, algorithms=settings.oidc_algorithms
    )
    if settings.oidc_jwks_url:
        return TokenVerifier(
            rules, RemoteKeySource(settings.oidc_jwks_url, algorithms=settings.oidc_algorithms)
        )
    path = str(settings.oidc_jwks_file) if settings.oidc_jwks_file else None
    return TokenVerifier(rules, LazyFileKeySource(path, algorithms=settings.oidc_algorithms))


async def _verify_periodically(ctx: AuditApiContext, interval_s: float) -> None:
    """Whole-chain verification in the background: the metrics the deploy alerts watch."""
    while True:
        try:
            report = await verify_stored(ctx, 1, None)
            if report.ok:
                ctx.metrics.last_verify_success.set(time.time())
            else:
                ctx.metrics.verify_failures.inc()
                log.error(
                    "audit trail does not verify",
                    broken_sequence=report.chain.broken_sequence,
                    reason=report.chain.reason,
                    checkpoint_problems=len(report.checkpoint_problems),
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("background verification could not run", error_type=type(exc).__name__)
        await asyncio.sleep(interval_s)


def run() -> None:
    run_service(create_app, load_settings(AuditSettings))


if __name__ == "__main__":
    run()
