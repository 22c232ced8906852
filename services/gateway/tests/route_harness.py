"""The gateway's routes on fakes, for unit tests that go through HTTP (this module holds no tests).

The real routers (uploads and reads, grants, restrictions), access guard, access recorder, upload processor and
metrics in the service's HTTP app (its
middleware, request metrics and error answers, as ``create_app`` builds it), with a publisher that
acknowledges every event at once and keeps it, a read model in memory, and tokens of a throwaway dev
issuer; nothing is started and nothing connects. Requests are driven as raw ASGI calls, so a test can do what a client on a
socket does (stop half-way through a body, send a path byte by byte) and see every message the app
sends.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from enclave_common.auth import (
    InMemoryGrantStore,
    InMemoryRestrictionStore,
    InMemoryTokenRevocationStore,
    RateLimit,
    RateLimiter,
    RevokedTokens,
    StaticKeySource,
    TokenRules,
    TokenVerifier,
)
from enclave_common.auth.dev_issuer import DEV_AUDIENCE, DEV_ISSUER, DevIssuer
from enclave_common.auth.fastapi import AccessGuard
from enclave_common.crypto import Pseudonymizer
from enclave_common.envelope import Envelope
from enclave_common.service import ServiceRuntime
from enclave_gateway.access import AccessRecorder, RequestIdHeader
from enclave_gateway.admission import DEFAULT_MAX_CONCURRENT_UPLOADS
from enclave_gateway.api import build_router
from enclave_gateway.config import GatewaySettings
from enclave_gateway.grants_api import build_grants_router
from enclave_gateway.handoff import Handoff
from enclave_gateway.main import UNKNOWN_ROUTE_HINT, UPLOAD_ROUTES
from enclave_gateway.metrics import GatewayMetrics
from enclave_gateway.multipart import BodyLimits
from enclave_gateway.restrictions_api import build_restrictions_router
from enclave_gateway.stow import error_body
from enclave_gateway.token_revocations_api import build_token_revocations_router
from enclave_gateway.uploads import BodyPace, UploadProcessor
from enclave_gateway.validation import ValidationPolicy
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

PSEUDONYMIZER = Pseudonymizer(bytes(32))


class AckingPublisher:
    """DirectPublisher.send: every event is acknowledged at once and kept, with its topic."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Envelope]] = []

    async def send(self, topic: str, envelope: Envelope, *, key: str) -> asyncio.Future[Any]:
        self.sent.append((topic, envelope))
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        return ack

    def topics(self) -> list[str]:
        return [topic for topic, _ in self.sent]

    def access_events(self) -> list[dict[str, Any]]:
        return [
            {**e.data, "correlation_id": e.correlation_id}
            for t, e in self.sent
            if t.startswith("enclave.access")
        ]


class MemoryReadModel:
    """The read model's upload record and patient query, in memory."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.patient_queries: list[str] = []
        #: The imaging ids :meth:`get` was asked for, in order.
        self.gets: list[str] = []
        #: Analyses by id (:meth:`analysis`) and in the research listing (:meth:`analyses_of`).
        self.analyses: dict[str, dict[str, Any]] = {}
        #: The upload ids an upload's instances were read for, in order.
        self.upload_reads: list[str] = []
        #: Raised by :meth:`get` and the upload reads when set: a bug met while answering.
        self.broken: Exception | None = None

    async def record_uploads(self, tenant: str, upload_id: str, instances: list[Any]) -> None:
        for instance_upload_id, keys, _ in instances:
            self.docs[instance_upload_id] = {
                "_id": instance_upload_id,
                "tenant": tenant,
                "upload_id": upload_id,
                "patient_key": keys.patient_key,
            }

    async def get(self, instance_upload_id: str) -> dict[str, Any] | None:
        self.gets.append(instance_upload_id)
        if self.broken is not None:
            raise self.broken
        return self.docs.get(instance_upload_id)

    async def analysis(self, analysis_id: str) -> dict[str, Any] | None:
        return self.analyses.get(analysis_id)

    async def analyses_of(self, tenant: str, limit: int, after: str | None = None) -> list[dict[str, Any]]:
        return [d for d in self.analyses.values() if d.get("tenant") == tenant][:limit]

    def _of_upload(self, tenant: str, upload_id: str) -> list[dict[str, Any]]:
        if self.broken is not None:
            raise self.broken
        self.upload_reads.append(upload_id)
        found = [d for d in self.docs.values() if d["tenant"] == tenant and d.get("upload_id") == upload_id]
        return sorted(found, key=lambda d: d["_id"])

    async def upload_statuses(self, tenant: str, upload_id: str) -> list[dict[str, Any]]:
        fields = ("_id", "rank", "terminal", "status")
        return [{k: d[k] for k in fields if k in d} for d in self._of_upload(tenant, upload_id)]

    async def upload_page(
        self, tenant: str, upload_id: str, limit: int, after: str | None = None
    ) -> list[dict[str, Any]]:
        found = [d for d in self._of_upload(tenant, upload_id) if after is None or d["_id"] > after]
        return [
            {k: v for k, v in d.items() if k not in ("patient_key", "instance_key")} for d in found[:limit]
        ]

    async def for_patient(
        self, tenant: str, patient_key: str, limit: int, after: str | None = None
    ) -> list[dict[str, Any]]:
        self.patient_queries.append(patient_key)
        return [d for d in self.docs.values() if d["tenant"] == tenant and d["patient_key"] == patient_key]


@dataclass
class Harness:
    app: FastAPI
    publisher: AckingPublisher
    read_model: MemoryReadModel
    registry: CollectorRegistry
    issuer: DevIssuer
    uploads: UploadProcessor
    grants: InMemoryGrantStore
    recorder: AccessRecorder
    restrictions: InMemoryRestrictionStore
    token_revocations: InMemoryTokenRevocationStore
    revoked_tokens: RevokedTokens

    def token(self, tenant: str, *roles: str, subject: str = "it-unit", **claims: Any) -> str:
        return self.issuer.mint(subject=subject, tenant=tenant, roles=list(roles), ttl_seconds=600, **claims)

    def requests_counted(self, route: str, status: int) -> float:
        value = self.registry.get_sample_value(
            "enclave_http_requests_total", {"method": "POST", "route": route, "status": str(status)}
        )
        return value or 0.0


def gateway_routes(
    tmp_path: Path,
    *,
    max_concurrent_uploads: int = DEFAULT_MAX_CONCURRENT_UPLOADS,
    rate_limit: RateLimit | None = None,
    patient_keys_per_hour: int | None = None,
) -> Harness:
    """The harness; ``rate_limit``: the per-principal limit (none by default)."""
    issuer = DevIssuer.generate(["ES256"])
    rules = TokenRules(issuer=DEV_ISSUER, audience=DEV_AUDIENCE)
    verifier = TokenVerifier(rules, StaticKeySource.from_jwks(issuer.jwks(), algorithms=rules.algorithms))
    publisher = AckingPublisher()
    handoff = Handoff(publisher, timeout_s=5)  # type: ignore[arg-type]
    recorder = AccessRecorder(handoff)
    read_model = MemoryReadModel()
    grants = InMemoryGrantStore()
    restrictions = InMemoryRestrictionStore()
    token_revocations = InMemoryTokenRevocationStore()
    revoked_tokens = RevokedTokens(token_revocations)
    guard = AccessGuard(
        verifier,
        grants=grants,
        restrictions=restrictions,
        revoked_tokens=revoked_tokens,
        limiter=RateLimiter(rate_limit) if rate_limit is not None else None,
        on_decision=recorder.on_decision,
    )
    uploads = UploadProcessor(
        recipient=X25519PrivateKey.generate().public_key(),
        pseudonymizer=PSEUDONYMIZER,
        handoff=handoff,
        read_model=read_model,  # type: ignore[arg-type]
        limits=BodyLimits(max_parts=10, max_instance_bytes=1 << 24, max_request_bytes=1 << 26),
        policy=ValidationPolicy(),
        spool_dir=tmp_path,
        chunk_bytes=1 << 20,
        pace=BodyPace(idle_timeout_s=5),
        spool_memory_bytes=1 << 26,
        max_concurrent_uploads=max_concurrent_uploads,
    )
    runtime = ServiceRuntime(GatewaySettings(pseudonym_key=SecretStr(base64.b64encode(bytes(32)).decode())))
    router = build_router(
        guard=guard,
        uploads=uploads,
        read_model=read_model,  # type: ignore[arg-type]
        recorder=recorder,
        pseudonymizer=PSEUDONYMIZER,
        public_base_url="http://gateway.test",
        metrics=GatewayMetrics(runtime.registry, uploads),
        patient_key_limiter=RateLimiter(RateLimit(patient_keys_per_hour, patient_keys_per_hour / 3600))
        if patient_keys_per_hour is not None
        else None,
    )
    grants_router = build_grants_router(
        guard=guard, grants=grants, recorder=recorder, pseudonymizer=PSEUDONYMIZER
    )
    restrictions_router = build_restrictions_router(
        guard=guard, restrictions=restrictions, grants=grants, recorder=recorder, pseudonymizer=PSEUDONYMIZER
    )
    token_revocations_router = build_token_revocations_router(
        guard=guard, store=token_revocations, revoked=revoked_tokens, recorder=recorder, refresh_s=5.0
    )
    app = runtime.http_app(
        title="gateway under test",
        routers=[router, grants_router, restrictions_router, token_revocations_router],
        start_runtime=False,
        unknown_route_hint=UNKNOWN_ROUTE_HINT,
        error_body=error_body,
        streamed_body_routes=UPLOAD_ROUTES,
    )
    app.add_middleware(RequestIdHeader)  # as create_app does
    registry = runtime.registry
    return Harness(
        app,
        publisher,
        read_model,
        registry,
        issuer,
        uploads,
        grants,
        recorder,
        restrictions,
        token_revocations,
        revoked_tokens,
    )


@dataclass
class Exchange:
    """What the app sent for one request."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    #: Messages of the request body the app asked for (``receive`` calls answered with a piece).
    body_messages_read: int = 0

    @property
    def status(self) -> int | None:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        return starts[0]["status"] if starts else None

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")

    def header(self, name: str) -> str | None:
        for m in self.messages:
            if m["type"] == "http.response.start":
                for key, value in m.get("headers", []):
                    if key.decode("latin-1").lower() == name:
                        return str(value.decode("latin-1"))
        return None


async def asgi_request(
    app: FastAPI,
    method: str,
    raw_path: bytes,
    headers: Iterable[tuple[str, str]],
    body_pieces: Iterable[bytes] = (),
    *,
    disconnect: bool = False,
    hold: asyncio.Event | None = None,
    exchange: Exchange | None = None,
) -> Exchange:
    """One request as uvicorn hands it over: ``raw_path`` as sent, ``path`` percent-decoded. With
    ``disconnect`` the client closes the connection after the pieces, before the body ended; with
    ``hold`` the last piece is sent only once ``hold`` is set (a slow client still sending). What the app
    sends goes into ``exchange`` (a new one by default), which a test can read when the app
    raises."""
    from urllib.parse import unquote_to_bytes

    path_bytes, _, query = raw_path.partition(b"?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote_to_bytes(path_bytes).decode("utf-8"),
        "raw_path": path_bytes,
        "query_string": query,
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("10.1.2.3", 40000),
        "server": ("127.0.0.1", 8080),
    }
    pieces = list(body_pieces)
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": piece, "more_body": disconnect or i < len(pieces) - 1}
        for i, piece in enumerate(pieces)
    ] or [{"type": "http.request", "body": b"", "more_body": disconnect}]
    exchange = exchange if exchange is not None else Exchange()

    async def receive() -> dict[str, Any]:
        if messages:
            if hold is not None and len(messages) == 1:
                await hold.wait()
            exchange.body_messages_read += 1
            return messages.pop(0)
        if disconnect:
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # a client that sends nothing more and waits for the answer
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        exchange.messages.append(message)

    await app(scope, receive, send)
    return exchange


def stow_request(
    harness: Harness,
    body_pieces: Iterable[bytes],
    *,
    content_type: str,
    headers: Iterable[tuple[str, str]] = (),
    **options: Any,
) -> Coroutine[Any, Any, Exchange]:
    """``POST /dicomweb/studies`` as an uploader of hospital-a (:func:`asgi_request` ``options``)."""
    return asgi_request(
        harness.app,
        "POST",
        b"/dicomweb/studies",
        [
            ("authorization", f"Bearer {harness.token('hospital-a', 'uploader')}"),
            ("content-type", content_type),
            *headers,
        ],
        body_pieces,
        **options,
    )
