"""Wiring of the gateway: the only place that builds clients.

The gateway holds the ingest *public* key (sealing), the pseudonym HMAC key and the OIDC verification
keys; no key that can decrypt stored data and no object-store credentials.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from enclave_common import topics
from enclave_common.auth import RateLimit, RateLimiter, RevokedTokens
from enclave_common.auth.fastapi import AccessGuard
from enclave_common.auth.file_keys import build_verifier
from enclave_common.auth.grants_mongo import MongoGrantStore
from enclave_common.auth.restrictions_mongo import MongoRestrictionStore
from enclave_common.auth.token_revocations_mongo import MongoTokenRevocationStore
from enclave_common.crypto import load_public_key
from enclave_common.errors import ConfigurationError
from enclave_common.idempotency import IdempotentByBusinessKey
from enclave_common.kafka import DirectPublisher
from enclave_common.pseudonyms import pseudonymizer_from_base64
from enclave_common.service import ServiceRuntime, load_settings, local_disk_check, run_service
from fastapi import FastAPI
from prometheus_client import Gauge

from enclave_gateway.access import AccessRecorder, RequestIdHeader
from enclave_gateway.api import build_router
from enclave_gateway.config import GatewaySettings
from enclave_gateway.grants_api import build_grants_router
from enclave_gateway.handoff import Handoff
from enclave_gateway.linger import LingeringAnswer, body_routes
from enclave_gateway.metrics import GatewayMetrics
from enclave_gateway.multipart import BodyLimits
from enclave_gateway.readmodel import READ_MODEL_TOPICS, ReadModel
from enclave_gateway.restrictions_api import build_restrictions_router
from enclave_gateway.revocations import UnrecordedRevocations
from enclave_gateway.stow import error_body
from enclave_gateway.token_revocations_api import build_token_revocations_router
from enclave_gateway.uploads import BodyPace, UploadProcessor
from enclave_gateway.validation import DEFAULT_TRANSFER_SYNTAXES, ValidationPolicy

log = structlog.get_logger("enclave.gateway")

#: The gateway receives; it cannot give back what it sealed (it holds no key that opens stored data).
UNKNOWN_ROUTE_HINT = (
    "This gateway stores and reports: DICOMweb STOW-RS (POST /dicomweb/studies[/{StudyInstanceUID}]), "
    "POST /api/v1/imaging/upload, status, results and patient queries under /api/v1/imaging, grants "
    "under /api/v1/grants and /api/v1/break-glass, restricted patients under /api/v1/restrictions, an "
    "upload's status under /api/v1/uploads, POST /api/v1/patient-keys and POST /api/v1/token-revocations. "
    "DICOMweb retrieval (WADO-RS, the RetrieveURLs of a STOW-RS answer) and search (QIDO-RS) are not "
    "offered: the gateway holds no key that opens stored data"
)

#: The routes that read their own bodies (limits and a pace rule of their own, one upload slot each),
#: by path template: exempt from the common body limit.
UPLOAD_ROUTES = ("/dicomweb/studies", "/dicomweb/studies/{study}", "/api/v1/imaging/upload")


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    # The read model's writes are idempotent by business key (readmodel.py): no event-id guard.
    runtime = ServiceRuntime(settings, processed=IdempotentByBusinessKey())
    runtime.publishes(
        topics.UPLOAD_CHUNK,
        topics.UPLOAD_RECEIVED,
        topics.UPLOAD_COMPLETED,
        topics.ACCESS_RECORDED,
        topics.SECURITY_ALERT,
    )
    read_model = ReadModel(
        runtime.db, read_timeout_s=settings.read_timeout_s, write_timeout_s=settings.write_timeout_s
    )
    # The upload path publishes several events per request: straight to an aiokafka producer of its
    # own rather than through FastStream's per-message middlewares (enclave_common.kafka).
    publisher = DirectPublisher(settings, tracer_provider=runtime.tracer_provider, registry=runtime.registry)
    runtime.on_startup(publisher.start)
    runtime.on_shutdown(publisher.stop)
    runtime.producer_slots.append(publisher)  # replaced if its sender stops (SenderWatchdog)
    handoff = Handoff(publisher, settings.publish_timeout_s)
    recorder = AccessRecorder(handoff)
    # Runs before publisher.stop (hooks run in reverse): access events of 503s still on their way.
    runtime.on_shutdown(recorder.settle_background)
    # Their lookups are part of a request's decision: bounded like the read model's reads.
    grants = MongoGrantStore(runtime.db, read_timeout_s=settings.read_timeout_s)
    restrictions = MongoRestrictionStore(runtime.db, read_timeout_s=settings.read_timeout_s)
    verifier = build_verifier(
        issuer=settings.oidc_issuer,
        audience=settings.oidc_audience,
        jwks_url=settings.oidc_jwks_url,
        jwks_file=settings.oidc_jwks_file,
        environment=settings.environment,
    )
    token_revocations = MongoTokenRevocationStore(runtime.db, read_timeout_s=settings.read_timeout_s)
    revoked_tokens = RevokedTokens(
        token_revocations,
        # An identity provider whose clock is ahead stamps a token issued before a revocation with a
        # later iat: as much as the verifier accepts in the future.
        skew=timedelta(seconds=verifier.rules.leeway_seconds),
        retention=timedelta(seconds=settings.token_revocation_retention_s),
    )
    Gauge(
        "enclave_gateway_token_revocations_age_seconds",
        "Seconds since this replica last read the token revocations (other replicas' revocations it may miss)",
        registry=runtime.registry,
    ).set_function(revoked_tokens.age_now)
    guard = AccessGuard(
        verifier,
        grants=grants,
        restrictions=restrictions,
        revoked_tokens=revoked_tokens,
        limiter=RateLimiter(
            RateLimit(burst=settings.rate_limit_burst, per_second=settings.rate_limit_per_second)
        ),
        auth_failure_limiter=RateLimiter(RateLimit(burst=20, per_second=1.0)),
        on_decision=recorder.on_decision,
    )
    # The pseudonym key comes from the settings (no file to read): a missing or short key stops the
    # service here, before it listens.
    pseudonymizer = pseudonymizer_from_base64(
        settings.pseudonym_key.get_secret_value() if settings.pseudonym_key else None,
        "ENCLAVE_GATEWAY_PSEUDONYM_KEY",
    )
    limits = BodyLimits(
        max_parts=settings.max_parts,
        max_instance_bytes=settings.max_instance_bytes,
        max_request_bytes=settings.max_request_bytes,
    )
    policy = ValidationPolicy(
        allowed_transfer_syntaxes=(
            frozenset(settings.allowed_transfer_syntaxes)
            if settings.allowed_transfer_syntaxes
            else DEFAULT_TRANSFER_SYNTAXES
        ),
        allowed_sop_classes=frozenset(settings.allowed_sop_classes) if settings.allowed_sop_classes else None,
        max_instance_bytes=settings.max_instance_bytes,
        max_elements_per_instance=settings.max_elements_per_instance,
    )
    uploads = UploadProcessor(
        recipient=None,  # type: ignore[arg-type]  # set at startup
        pseudonymizer=pseudonymizer,
        handoff=handoff,
        read_model=read_model,
        limits=limits,
        policy=policy,
        spool_dir=settings.spool_dir,
        spool_memory_bytes=settings.spool_memory_bytes,
        spool_memory_total_bytes=settings.spool_memory_total_bytes,
        spool_disk_bytes=settings.spool_disk_bytes,
        max_concurrent_uploads=settings.max_concurrent_uploads,
        chunk_bytes=settings.chunk_bytes,
        pace=BodyPace(
            idle_timeout_s=settings.body_idle_timeout_s,
            min_rate_bytes_per_s=settings.body_min_rate_bytes_per_s,
            grace_s=settings.body_min_rate_grace_s,
        ),
    )
    for topic in READ_MODEL_TOPICS:
        runtime.consume(topic, read_model.on_event)

    def load_keys() -> None:
        """The ingest public key is a file: read at startup, not when the app object is built."""
        if settings.ingest_public_key_file is None:
            raise ConfigurationError("ENCLAVE_GATEWAY_INGEST_PUBLIC_KEY_FILE is not set")
        uploads.recipient = load_public_key(str(settings.ingest_public_key_file))

    revocations = UnrecordedRevocations(
        grants,
        recorder,
        grace_s=2 * settings.publish_timeout_s + 30,
        interval_s=settings.revocation_sweep_interval_s,
    )

    async def prepare() -> None:
        settings.spool_dir.mkdir(parents=True, exist_ok=True)
        await read_model.ensure_indexes()
        await grants.ensure_indexes()
        await restrictions.ensure_indexes()
        runtime.spawn(revocations.run_forever(), "gateway-unrecorded-revocations")
        # Before the first request: a revoked token is refused from the start.
        await revoked_tokens.refresh(datetime.now(UTC))
        runtime.spawn(
            revoked_tokens.refresh_forever(settings.token_revocation_refresh_s), "gateway-token-revocations"
        )

    runtime.preflight(load_keys)
    runtime.on_startup(prepare)
    runtime.readiness["spool"] = local_disk_check(settings.spool_dir)
    router = build_router(
        guard=guard,
        uploads=uploads,
        read_model=read_model,
        recorder=recorder,
        pseudonymizer=pseudonymizer,
        public_base_url=settings.public_base_url,
        metrics=GatewayMetrics(runtime.registry, uploads),
        patient_key_limiter=RateLimiter(
            RateLimit(
                burst=settings.patient_key_lookups_per_hour,
                per_second=settings.patient_key_lookups_per_hour / 3600,
            )
        ),
    )
    grants_router = build_grants_router(
        guard=guard, grants=grants, recorder=recorder, pseudonymizer=pseudonymizer
    )
    restrictions_router = build_restrictions_router(
        guard=guard, restrictions=restrictions, grants=grants, recorder=recorder, pseudonymizer=pseudonymizer
    )
    token_revocations_router = build_token_revocations_router(
        guard=guard,
        store=token_revocations,
        revoked=revoked_tokens,
        recorder=recorder,
        refresh_s=settings.token_revocation_refresh_s,
    )
    app = runtime.http_app(
        title="Enclave gateway",
        routers=[router, grants_router, restrictions_router, token_revocations_router],
        unknown_route_hint=UNKNOWN_ROUTE_HINT,
        error_body=error_body,
        streamed_body_routes=UPLOAD_ROUTES,
    )
    # A request answered before its body ended drops the rest first, for a bounded time (linger.py).
    # Every route with a body (linger.body_routes): the uploads, and the JSON routes the common body
    # limit may refuse part-way (413, 408).
    app.add_middleware(LingeringAnswer, routes=body_routes(app.routes))
    app.add_middleware(RequestIdHeader)  # outermost: every answer names its correlation id
    app.state.read_model = read_model
    return app


def run() -> None:
    settings = load_settings(GatewaySettings)
    extra: dict[str, Any] = {}
    if settings.tls_cert_file is not None:
        extra = {"ssl_certfile": str(settings.tls_cert_file), "ssl_keyfile": str(settings.tls_key_file)}
    run_service(create_app, settings, **extra)


if __name__ == "__main__":
    run()
