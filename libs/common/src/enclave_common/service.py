"""What every Enclave service has: settings, logging, metrics, tracing, a Kafka broker, its own
MongoDB database, reliable consumers, and an HTTP app with ``/healthz``, ``/readyz`` and ``/metrics``.

``ServiceRuntime`` only *constructs* clients (no I/O); the HTTP app's lifespan starts and stops
them, so a test can build a second app with other settings, or wrap the broker in TestKafkaBroker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import structlog
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry import propagate
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Tracer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from enclave_common.body_limit import BodyLimit
from enclave_common.errors import (
    EnclaveError,
    TransientError,
    dependency_failure_types,
    exhausted_resource,
    startup_failure,
    unavailable_dependency,
)
from enclave_common.events import envelope_schema
from enclave_common.header_limit import ErrorBody, HeaderSizeLimit
from enclave_common.header_timeout import header_timeout_protocol
from enclave_common.idempotency import MongoProcessedEvents, ProcessedEvents
from enclave_common.kafka import (
    TLS_RELOADER,
    BrokerProducerSlot,
    ConsumerMetrics,
    EventPublisher,
    Handler,
    RetryPolicy,
    TlsMetrics,
    create_broker,
    reliable_consumer,
)
from enclave_common.kafka_liveness import FetcherWatchdog, ProducerSlot, SenderWatchdog
from enclave_common.logging import code_location, configure_logging
from enclave_common.mongo import mongo_client
from enclave_common.settings import BaseServiceSettings
from enclave_common.telemetry import build_tracer_provider

log = structlog.get_logger("enclave.service")

ReadinessCheck = Callable[[], Awaitable[object]]


#: Below this much free space a service's local disk (the gateway's and ingest's spools, deid's work
#: directory) is reported not ready: one MRI instance alone can need tens of MiB there.
MIN_FREE_DISK_BYTES = 64 * 1024 * 1024


class LocalDiskFull(Exception):
    """A local directory a service writes to has less than ``MIN_FREE_DISK_BYTES`` free."""


class LocalDirectoryUnusable(Exception):
    """A local directory a service writes to is missing or not writable."""


def failure_answer(exc: Exception) -> tuple[int, str]:
    """The status and machine code the exception handlers of :meth:`ServiceRuntime.http_app` answer
    for ``exc`` when it ends a route, so that an access event of such a request claims the answer it
    got: a request that does not match the API 422 ``invalid_request``; what a route or the access
    guard raised, its status and ``detail.code`` (an unparseable JSON body 400, or 499 if the client
    left while it was read); a machine out of disk or file handles 503 ``resource_exhausted``; a
    dependency that did not answer 503 (its error's code, else ``dependency_unavailable``); anything
    else 500 ``internal_error``."""
    if isinstance(exc, RequestValidationError):
        return 422, "invalid_request"
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 400 and isinstance(exc.__cause__, ClientDisconnect):
            return 499, "client_closed_request"
        code = exc.detail.get("code") if isinstance(exc.detail, dict) else None
        if isinstance(code, str):
            return exc.status_code, code
        return exc.status_code, "unparseable_body" if exc.status_code == 400 else f"http_{exc.status_code}"
    if exhausted_resource(exc) is not None:
        return 503, "resource_exhausted"
    if unavailable_dependency(exc) is not None:
        return 503, exc.code if isinstance(exc, TransientError) else "dependency_unavailable"
    return 500, "internal_error"


def local_disk_check(directory: Path | None, min_free_bytes: int = MIN_FREE_DISK_BYTES) -> ReadinessCheck:
    """A readiness check for a directory the service writes to (the system's temporary directory when
    ``None``): present, writable, and at least ``min_free_bytes`` free. A replica whose disk filled up
    then leaves the load balancer's rotation instead of refusing upload after upload, and an SRE sees
    ``unavailable (LocalDiskFull)`` on ``/readyz``."""

    async def check() -> None:
        path = directory or Path(tempfile.gettempdir())
        if not (path.is_dir() and os.access(path, os.W_OK | os.X_OK)):
            raise LocalDirectoryUnusable("the directory is missing or not writable")
        stats = os.statvfs(path)
        if stats.f_bavail * stats.f_frsize < min_free_bytes:
            raise LocalDiskFull("less free space than the minimum")

    return check


class ServiceRuntime:
    """The wired dependencies of one service instance."""

    def __init__(
        self,
        settings: BaseServiceSettings,
        *,
        processed: ProcessedEvents | None = None,
        broker_overrides: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        self.tracer_provider, self._span_file = build_tracer_provider(settings)
        self.broker = create_broker(
            settings, registry=self.registry, tracer_provider=self.tracer_provider, **(broker_overrides or {})
        )
        self.publisher = EventPublisher(self.broker)
        self.mongo = mongo_client(settings, connect=False, appname=f"enclave-{settings.service_name}")
        self.db = self.mongo[settings.mongo_database]
        self.processed: ProcessedEvents = processed or MongoProcessedEvents(self.db)
        self.consumer_metrics = ConsumerMetrics(self.registry)
        #: The Kafka TLS reloader's state, on /metrics when the clients use TLS (set in start()).
        self.tls_metrics: TlsMetrics | None = None
        self.retry = RetryPolicy.from_settings(settings)
        self.readiness: dict[str, ReadinessCheck] = {
            "kafka": self._kafka_ready,
            "mongodb": lambda: self.db.command("ping"),
        }
        self._preflight: list[Callable[[], None]] = []
        self._configuration_checked = False
        self._startup: list[Callable[[], Awaitable[None]]] = []
        self._shutdown: list[Callable[[], Awaitable[None]]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handlers: dict[str, Handler] = {}
        self._subscribed = False
        #: Producers of the service's own besides the broker's (e.g. a DirectPublisher), watched too.
        self.producer_slots: list[ProducerSlot] = []
        #: The consumers' and the producers' watchdogs and their tasks, which /healthz reads (set in
        #: start()).
        self.consumer_watchdog: FetcherWatchdog | None = None
        self._consumer_watchdog_task: asyncio.Task[Any] | None = None
        self.producer_watchdog: SenderWatchdog | None = None
        self._producer_watchdog_task: asyncio.Task[Any] | None = None
        self._stopping = False

    async def _kafka_ready(self) -> None:
        if not await self.broker.ping(timeout=3.0):
            raise ConnectionError("Kafka did not answer")

    def consume(self, topic: str, handler: Handler) -> None:
        """Handle ``topic`` in this service's consumer group (subscribed when the app is built)."""
        if self._subscribed:
            raise RuntimeError(f"consume({topic!r}) after the service's consumer was subscribed")
        if topic in self._handlers:
            raise ValueError(f"{topic} already has a handler")
        self._handlers[topic] = handler

    def publishes(self, *topic_names: str) -> None:
        """Declare the topics this service publishes, with their message schema, in its AsyncAPI
        document (``docs/api``); publishing itself goes through :attr:`publisher`."""
        for topic in topic_names:
            self.broker.publisher(
                topic,
                title=f"{topic}:publish",
                description=f"{self.settings.service_name} publishes {topic} (acks=all)",
                schema=envelope_schema(topic),
            )

    def _subscribe(self) -> None:
        """One consumer for every topic registered with :meth:`consume` (idempotent)."""
        if self._subscribed:
            return
        self._subscribed = True
        if self._handlers:
            reliable_consumer(
                self.broker,
                dict(self._handlers),
                group_id=f"enclave-{self.settings.service_name}",
                processed=self.processed,
                retry=self.retry,
                metrics=self.consumer_metrics,
            )

    def count_crypto(self, operation: str) -> None:
        """Count one seal, unseal, encrypt or decrypt (``enclave_crypto_operations_total``)."""
        self.consumer_metrics.crypto_operations.labels(self.settings.service_name, operation).inc()

    def preflight(self, fn: Callable[[], None]) -> None:
        """A configuration check without network I/O (keys configured and readable, key files parse):
        run first at startup, and alone by ``--check-config``, so a misconfigured deployment fails
        at once with the setting to fix instead of when its first message arrives."""
        self._preflight.append(fn)

    def check_configuration(self) -> None:
        """Run the preflight checks (once: ``run_service`` runs them before serving, ``start`` then
        does not run them again)."""
        if self._configuration_checked:
            return
        for fn in self._preflight:
            fn()
        self._configuration_checked = True

    def on_startup(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._startup.append(fn)

    def on_shutdown(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._shutdown.append(fn)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run a background task that is kept, logged if it dies, and cancelled on shutdown."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)

        def _done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task died", task=name, exc_info=t.exception())

        task.add_done_callback(_done)
        return task

    async def start(self) -> None:
        self.check_configuration()
        self._subscribe()
        for fn in self._startup:
            try:
                await fn()
            except Exception as exc:  # one line that says what to fix, before the traceback
                log.error("cannot start", reason=startup_failure(exc))
                raise
        await self.broker.start()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on every platform / loop
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump_tasks)
        if self.broker.subscribers:  # a consumer whose fetcher ended is restarted (FetcherWatchdog)
            self.watch_consumers(
                FetcherWatchdog(
                    self.broker, self.consumer_metrics, stuck_after_s=self.settings.kafka_consumer_stuck_s
                )
            )
        # A producer whose sender ended is replaced (SenderWatchdog).
        self.watch_producers(
            SenderWatchdog(
                [BrokerProducerSlot(self.broker), *self.producer_slots],
                self.consumer_metrics,
                broker=self.broker,
                stuck_after_s=self.settings.kafka_producer_stuck_s,
            )
        )
        if TLS_RELOADER.active:  # a renewed client certificate is used without a restart
            self.tls_metrics = TlsMetrics(TLS_RELOADER, self.registry)
            self.spawn(TLS_RELOADER.run_forever(), "kafka-tls-reloader")
        log.info("service started", port=self.settings.http_port)

    def watch_consumers(self, watchdog: FetcherWatchdog) -> None:
        """Run ``watchdog`` over the service's consumers; ``/healthz`` reports what it could not mend,
        and fails if it stops running."""
        self.consumer_watchdog = watchdog
        self._consumer_watchdog_task = self.spawn(watchdog.run_forever(), "kafka-fetcher-watchdog")

    def watch_producers(self, watchdog: SenderWatchdog) -> None:
        """Run ``watchdog`` over the service's producers; ``/healthz`` reports what it could not mend,
        and fails if it stops running."""
        self.producer_watchdog = watchdog
        self._producer_watchdog_task = self.spawn(watchdog.run_forever(), "kafka-sender-watchdog")

    def liveness_problems(self) -> list[dict[str, Any]]:
        """Why this process should be restarted, for ``/healthz``: a consumer or producer its watchdog
        could not bring back while Kafka answered, or a watchdog that no longer runs. A dependency
        outage is not one (a new pod could not reach it either): ``/readyz`` reports that."""
        problems: list[dict[str, Any]] = []
        watched: tuple[tuple[FetcherWatchdog | SenderWatchdog | None, asyncio.Task[Any] | None], ...] = (
            (self.consumer_watchdog, self._consumer_watchdog_task),
            (self.producer_watchdog, self._producer_watchdog_task),
        )
        for watchdog, task in watched:
            if watchdog is None or task is None:
                continue
            problems += watchdog.liveness_problems()
            if task.done() and not self._stopping:
                error = None if task.cancelled() else task.exception()
                problems.append(
                    {
                        "check": watchdog.watchdog_check,
                        "problem": "ended",
                        "error_type": type(error).__name__ if error is not None else None,
                    }
                )
        return problems

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.broker.stop()
        for fn in reversed(self._shutdown):
            await fn()
        await self.mongo.close()
        self.tracer_provider.shutdown()
        if self._span_file is not None:
            self._span_file.close()
        log.info("service stopped")

    async def readiness_report(self) -> dict[str, str]:
        async def check(name: str, fn: ReadinessCheck) -> tuple[str, str]:
            try:
                await asyncio.wait_for(fn(), timeout=5.0)
                return name, "ok"
            except Exception as exc:
                return name, f"unavailable ({type(exc).__name__})"

        results = await asyncio.gather(*(check(n, f) for n, f in self.readiness.items()))
        return dict(results)

    def http_app(
        self,
        *,
        title: str,
        routers: Sequence[APIRouter] = (),
        start_runtime: bool = True,
        middleware: Sequence[tuple[Any, dict[str, Any]]] = (),
        unknown_route_hint: str = "",
        error_body: ErrorBody | None = None,
        streamed_body_routes: Collection[str] = (),
    ) -> FastAPI:
        """The service's HTTP app: health, readiness, metrics, plus the service's own routers.

        ``middleware``: (ASGI middleware class, options), run inside the request metrics and span,
        so what they answer is counted like any other response. ``unknown_route_hint``: a sentence
        added to the answer for a path no route matches (what this service does not offer).
        ``error_body``: the shape of the errors answered here for the service (an oversized head, a
        request that does not match the API); ``{"detail": {"code", "message"}}`` by default.
        ``streamed_body_routes``: path templates of the routes that read their bodies themselves, with
        limits and a pace rule of their own (the gateway's uploads); every other route's body is held
        to ``max_body_bytes`` and ``body_timeout_s`` (413, 408) before routing and authentication.

        Every GET route also answers HEAD (RFC 9110 requires it of a general-purpose server), and a
        path with a trailing slash is not redirected: it answers 404 saying paths do not end in '/'.
        """
        body = error_body or detail_error_body
        self._subscribe()

        @asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            if start_runtime:
                await self.start()
            try:
                yield
            finally:
                if start_runtime:
                    await self.stop()

        app = FastAPI(title=title, version="0.1.0", lifespan=lifespan, redirect_slashes=False)
        app.state.runtime = self
        app.state.error_body = body
        app.add_exception_handler(StarletteHTTPException, _routing_errors(unknown_route_hint, body))
        app.add_exception_handler(RequestValidationError, _validation_errors(body))
        for failure in (*dependency_failure_types(), OSError):
            app.add_exception_handler(failure, _dependency_unavailable(body))
        for cls, options in middleware:
            app.add_middleware(cls, **options)
        prefix = self.settings.model_config.get("env_prefix", "ENCLAVE_")
        app.add_middleware(
            BodyLimit,
            max_bytes=self.settings.max_body_bytes,
            timeout_s=self.settings.body_timeout_s,
            size_setting=f"{prefix}MAX_BODY_BYTES",
            timeout_setting=f"{prefix}BODY_TIMEOUT_S",
            error_body=body,
            exempt=tuple(streamed_body_routes),
        )
        app.add_middleware(
            HeaderSizeLimit,
            max_bytes=self.settings.max_header_bytes,
            setting=f"{prefix}MAX_HEADER_BYTES",
            error_body=body,
        )
        app.add_middleware(HeadAsGet)
        instrument_http(app, self.registry, self.tracer_provider)
        kafka_setting = f"{self.settings.model_config.get('env_prefix', 'ENCLAVE_')}KAFKA"

        @app.get(
            "/healthz",
            tags=["operations"],
            summary="Liveness: the process answers and its Kafka consumers and producers are not stuck "
            "for good",
            responses={
                503: {
                    "description": f"A Kafka consumer has been unable to consume for {kafka_setting}"
                    f"_CONSUMER_STUCK_S seconds, or a producer unable to publish for {kafka_setting}"
                    "_PRODUCER_STUCK_S seconds, while Kafka answered; or the watchdog of either stopped: "
                    "each is named in problems"
                }
            },
        )
        async def healthz() -> JSONResponse:
            body: dict[str, Any] = {"status": "alive", "service": self.settings.service_name}
            problems = self.liveness_problems()
            if problems:
                return JSONResponse(body | {"status": "stuck", "problems": problems}, status_code=503)
            return JSONResponse(body)

        @app.get("/readyz", tags=["operations"], summary="Readiness: every dependency is reachable")
        async def readyz() -> JSONResponse:
            report = await self.readiness_report()
            ready = all(v == "ok" for v in report.values())
            return JSONResponse({"ready": ready, "checks": report}, status_code=200 if ready else 503)

        @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", include_in_schema=False)
        async def metrics() -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        for router in routers:
            app.include_router(router)
        unknown = set(streamed_body_routes) - _route_paths(app.routes)
        if unknown:  # a typo would hold an upload route to the small body limit
            raise ValueError(f"streamed_body_routes names no route: {', '.join(sorted(unknown))}")
        return app


#: How long a client should wait before retrying a request a dependency outage refused.
RETRY_AFTER_S = 10


def error_content(error_body: ErrorBody, status: int, detail: dict[str, Any]) -> dict[str, Any]:
    """An error raised as ``{"detail": {"code", "message", ...}}`` in the service's shape. A service
    with its own shape (the gateway's ``{"status", "error", "message"}``) answers that shape and keeps
    ``detail`` beside it, so a client reading either finds the same code and message."""
    if error_body is detail_error_body:
        return {"detail": detail}
    extra = {k: v for k, v in detail.items() if k not in ("code", "message")}
    return {**error_body(status, str(detail["code"]), str(detail["message"]), **extra), "detail": detail}


def _dependency_unavailable(error_body: ErrorBody) -> Callable[[Request, Any], Awaitable[Response]]:
    return functools.partial(_answer_unavailable, error_body=error_body)


async def _answer_unavailable(request: Request, exc: Exception, *, error_body: ErrorBody) -> Response:
    """A route failed because a dependency did not answer (the database, the object store, Kafka):
    503 with ``Retry-After`` in the services' error shape, naming what did not answer, instead of a
    bare 500. So is a service whose machine ran out of disk space or open files (``resource_exhausted``:
    another replica, or the same one later, can take the request). The exception's text is never sent
    or logged (it may quote data or paths); any other exception of these types is re-raised and
    answered 500 as before."""
    where = {"method": request.method, "route": getattr(request.scope.get("route"), "path", None)}
    if (resource := exhausted_resource(exc)) is not None:
        log.error(
            "request refused: the service ran out of a resource", resource=resource, exc_info=exc, **where
        )
        code, message = "resource_exhausted", f"the service ran out of {resource}"
    elif (what := unavailable_dependency(exc)) is not None:
        log.warning("request refused: a dependency is unavailable", dependency=what, exc_info=exc, **where)
        code = exc.code if isinstance(exc, TransientError) else "dependency_unavailable"
        message = f"{what} did not answer"
    else:
        raise exc
    return JSONResponse(
        error_content(
            error_body,
            503,
            {"code": code, "message": f"{message}, so the request could not be completed; retry later"},
        ),
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def detail_error_body(status: int, code: str, message: str, **fields: Any) -> dict[str, Any]:
    """The services' error shape (the gateway has its own, ``{"status", "error", "message"}``)."""
    return {"detail": {"code": code, "message": message, **fields}}


#: Problems a 422 lists at most; the rest are counted (``problems_not_listed``). A list of a million
#: invalid items answered a 256 MiB body and blocked the event loop for 11 s.
MAX_LISTED_PROBLEMS = 20


def _validation_problems(exc: RequestValidationError) -> tuple[list[dict[str, str]], int]:
    """The first wrong fields and what is allowed there, without the value sent (it may be PHI), and
    how many more problems there are."""
    errors = exc.errors()
    listed = [
        {"field": ".".join(str(p) for p in error.get("loc", ())), "problem": error.get("msg", "invalid")}
        for error in errors[:MAX_LISTED_PROBLEMS]
    ]
    return listed, len(errors) - len(listed)


def _validation_errors(error_body: ErrorBody) -> Callable[[Request, Any], Awaitable[Response]]:
    """422 naming each wrong field (the first :data:`MAX_LISTED_PROBLEMS`, and how many more), instead
    of FastAPI's shape, which echoes the input to its sender (and to anything that logs responses)."""

    async def handle(request: Request, exc: Any) -> Response:  # registered for RequestValidationError
        message = "the request does not match the API"
        problems, more = _validation_problems(exc)
        if more:
            message += f"; the first {len(problems)} problems are listed, {more} more are not"
            body = error_body(422, "invalid_request", message, problems=problems, problems_not_listed=more)
        else:
            body = error_body(422, "invalid_request", message, problems=problems)
        return JSONResponse(body, status_code=422)

    return handle


class HeadAsGet:
    """HEAD is answered as GET without the body: the same status and headers (Content-Length of the
    body it would send). FastAPI's routes take only the methods they declare, so without this every
    HEAD was a 405."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headless(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        # A copy: the server reads the same scope, and for a GET it would wait for the body (uvicorn
        # raised "Response content shorter than Content-Length" and dropped the connection). The
        # route found is carried back, so the request metrics around this count it under its route.
        inner = {**scope, "method": "GET", "enclave.head": True}
        try:
            await self.app(inner, receive, headless)
        finally:
            if "route" in inner:
                scope["route"] = inner["route"]


#: What FastAPI raises (400) when a JSON body cannot be parsed at all (invalid UTF-8, nesting past the
#: parser's limit), before validation; a body that parses but is not JSON is a 422 of its own.
_FASTAPI_BODY_ERROR = "There was an error parsing the body"
_CLOSED = "the client closed the connection before the request body ended; nothing of it was kept"


def _routing_errors(hint: str, error_body: ErrorBody) -> Callable[[Request, Any], Awaitable[Response]]:
    """404 and 405 raised by routing itself (a path no route takes; a path taken, but not with this
    method) answer in the services' error shape, ``{"detail": {"code", "message"}}``, saying what is
    allowed instead of Starlette's bare "Not Found" / "Method Not Allowed". The path is never echoed:
    a client may put an identifier there. Whatever a route raises itself is answered as before."""

    async def handle(request: Request, exc: Any) -> Response:  # registered for StarletteHTTPException
        headers = dict(exc.headers or {})
        if exc.status_code == 405 and "Allow" in headers:  # raised by a route matching the path only
            methods = _methods_taking(request.app.routes, request.scope) or set(headers["Allow"].split(", "))
            if "GET" in methods:
                methods.add("HEAD")
            headers["Allow"] = ", ".join(sorted(methods))
            code = "method_not_allowed"
            method = "HEAD" if request.scope.get("enclave.head") else request.method
            message = f"this path does not take {method[:16]}; it takes {headers['Allow']}"
        elif exc.status_code == 404 and request.scope.get("route") is None:  # no route matched
            code = "no_such_route"
            message = "no route takes this path; the routes are listed in /openapi.json"
            if request.url.path.endswith("/") and request.url.path != "/":
                message += " (paths do not end in '/')"
        elif exc.status_code == 400 and isinstance(exc.__cause__, ClientDisconnect):
            # FastAPI answers a body the client stopped sending as unparseable (400): it is nginx's 499,
            # the client's choice, counted apart from the client's errors; the answer goes nowhere.
            return JSONResponse(
                error_content(error_body, 499, {"code": "client_closed_request", "message": _CLOSED}),
                status_code=499,
            )
        elif exc.status_code == 400 and exc.detail == _FASTAPI_BODY_ERROR:  # invalid UTF-8, deep nesting
            code = "unparseable_body"
            message = (
                "the body could not be read as JSON: send UTF-8 JSON (Content-Type: application/json) "
                "as the route's schema in /openapi.json describes"
            )
        elif isinstance(exc.detail, dict) and {"code", "message"} <= exc.detail.keys():
            # What a route or the access guard raised: answered in the service's error shape.
            content = error_content(error_body, exc.status_code, exc.detail)
            return JSONResponse(content, status_code=exc.status_code, headers=exc.headers)
        else:
            return await http_exception_handler(request, exc)
        if hint and code != "unparseable_body":
            message = f"{message}. {hint}"
        content = error_content(error_body, exc.status_code, {"code": code, "message": message})
        return JSONResponse(content, status_code=exc.status_code, headers=headers)

    return handle


def route_templates(routes: Iterable[Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path template, route) of every route, those of included routers too, with the prefix each
    was included under (FastAPI's ``include_router``)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            context_prefix = getattr(getattr(route, "include_context", None), "prefix", "") or ""
            yield from route_templates(included.routes, prefix + context_prefix)
        elif isinstance(path := getattr(route, "path", None), str):
            yield prefix + path, route


def _route_paths(routes: Iterable[Any]) -> set[str]:
    """The path templates of the routes, those of included routers too."""
    return {path for path, _ in route_templates(routes)}


def _methods_taking(routes: Iterable[Any], scope: Scope) -> set[str]:
    """Every method of every route whose path matches (Starlette's own 405 names the first only)."""
    methods: set[str] = set()
    for route in routes:
        included = getattr(getattr(route, "original_router", None), "routes", None)  # FastAPI's include
        if included is not None:
            methods |= _methods_taking(included, scope)
            continue
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return methods


def instrument_http(app: FastAPI, registry: CollectorRegistry, tracer_provider: TracerProvider) -> None:
    """Request count, latency and a server span per request, by route *template* (never the raw path,
    which may hold an id). The span is the parent of every Kafka publish the request makes, so one
    upload is one trace across the services (W3C trace context travels in Kafka headers)."""
    requests = Counter(
        "enclave_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "enclave_http_request_seconds", "HTTP latency", ["method", "route"], registry=registry
    )
    app.add_middleware(
        _HttpTelemetry,
        requests=requests,
        latency=latency,
        access=structlog.get_logger("enclave.http"),
        tracer=tracer_provider.get_tracer("enclave.http"),
    )


class _HttpTelemetry:
    """The ASGI middleware of :func:`instrument_http` (plain ASGI: Starlette's ``BaseHTTPMiddleware``
    runs every request through a task group and memory streams, a measurable share of a request)."""

    QUIET = ("/healthz", "/readyz", "/metrics")

    def __init__(
        self, app: ASGIApp, *, requests: Counter, latency: Histogram, access: Any, tracer: Tracer
    ) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency
        self.access = access
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = scope["method"]
        status = 500
        parent = propagate.extract({k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]})

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with self.tracer.start_as_current_span(
            f"HTTP {method}", context=parent, kind=SpanKind.SERVER
        ) as span:
            try:
                await self.app(scope, receive, send_with_status)
            finally:
                template = getattr(scope.get("route"), "path", "unmatched")
                elapsed = time.perf_counter() - started
                span.update_name(f"{method} {template}")
                span.set_attribute("http.route", template)
                span.set_attribute("http.response.status_code", status)
                self.requests.labels(method, template, str(status)).inc()
                self.latency.labels(method, template).observe(elapsed)
                if template not in self.QUIET:
                    self.access.info(
                        "http request",
                        method=method,
                        route=template,
                        status=status,
                        ms=round(elapsed * 1000, 1),
                    )


def configure_gc(threshold0: int | None) -> None:
    """With a threshold: exempt what startup allocated from future collections (``gc.freeze``) and
    collect the youngest generation every ``threshold0`` allocations instead of Python's 700."""
    if threshold0 is None:
        return
    gc.freeze()
    gc.set_threshold(threshold0, *gc.get_threshold()[1:])


def dump_tasks() -> None:
    """Log every asyncio task of the process with where it waits (``kill -USR1 <pid>``): the chain of
    awaits from the task's coroutine down, as code locations only (file:line function), never
    values, so a hung consumer or handler can be found on a running service without a debugger."""
    for task in asyncio.all_tasks():
        log.warning("task", task=task.get_name(), waits_at=" > ".join(_await_chain(task.get_coro())))


def _await_chain(coro: Any, limit: int = 24) -> list[str]:
    chain: list[str] = []
    while coro is not None and len(chain) < limit:
        frame = (
            getattr(coro, "cr_frame", None)
            or getattr(coro, "gi_frame", None)
            or getattr(coro, "ag_frame", None)
        )
        if frame is None:
            if not hasattr(coro, "cr_await") and not hasattr(coro, "gi_yieldfrom"):
                chain.append(type(coro).__name__)  # a future, a task or a C-implemented awaitable
            break
        chain.append(code_location(frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        coro = (
            getattr(coro, "cr_await", None)
            or getattr(coro, "gi_yieldfrom", None)
            or getattr(coro, "ag_await", None)
        )
    return chain


def run_service(
    app_factory: Callable[[], FastAPI], settings: BaseServiceSettings, **uvicorn_options: Any
) -> None:
    """Entry point body: configure logging, then serve the app with uvicorn (no raw-path access log).

    With a certificate (``ssl_certfile``/``ssl_keyfile``), Python's server context refuses
    anything older than TLS 1.2. With ``http_reuse_port`` the listening socket is bound with
    SO_REUSEPORT, so replicas on one host share the port. At a stop, requests still open get
    ``http_drain_s`` seconds to finish before they are cancelled."""
    import uvicorn

    configure_logging(settings.service_name, settings.log_level)
    # The configuration is checked before anything listens: a misconfigured service exits 2 with the
    # verdict line in its log, the same as ``--check-config`` prints.
    app = checked_app(app_factory, settings)
    if "--check-config" in sys.argv[1:]:
        _verdict(settings.service_name, None)
        raise SystemExit(0)
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=settings.http_drain_s,
        loop="uvloop",
        http=http_protocol(app, settings),
        **uvicorn_options,
    )
    configure_gc(settings.gc_threshold0)
    server = uvicorn.Server(config)
    sockets = (
        [reuse_port_socket(settings.http_host, settings.http_port)] if settings.http_reuse_port else None
    )
    server.run(sockets=sockets)
    if not server.started:
        raise SystemExit(3)  # uvicorn's STARTUP_FAILURE, as uvicorn.run exits


def http_protocol(app: FastAPI, settings: BaseServiceSettings) -> type[asyncio.Protocol]:
    """Uvicorn's httptools protocol with ``http_header_timeout_s`` on each request's head, answering
    in the app's error shape; each timeout is counted (``enclave_http_header_timeouts_total``) and
    logged at debug level, without the client's address or anything it sent."""
    prefix = settings.model_config.get("env_prefix", "ENCLAVE_")
    runtime = getattr(app.state, "runtime", None)
    registry = getattr(runtime, "registry", None)
    counter = Counter(
        "enclave_http_header_timeouts",
        "Connections closed because a request's line and headers did not arrive in time "
        "(answered: 408 sent to a request that had begun; false: a connection that sent none)",
        ["answered"],
        # An app without the runtime's registry (a test's) counts into one of its own, not the global.
        registry=registry if isinstance(registry, CollectorRegistry) else CollectorRegistry(),
    )
    log = structlog.get_logger("enclave.http")

    def timed_out(answered: bool) -> None:
        counter.labels(answered=str(answered).lower()).inc()
        # Debug: a flood of such connections must not flood the log too; the counter shows the rate.
        log.debug("http.header_timeout", answered=answered, timeout_s=settings.http_header_timeout_s)

    return header_timeout_protocol(
        settings.http_header_timeout_s,
        f"{prefix}HTTP_HEADER_TIMEOUT_S",
        getattr(app.state, "error_body", detail_error_body),
        timed_out,
    )


SettingsT = TypeVar("SettingsT", bound=BaseServiceSettings)


def load_settings(cls: type[SettingsT]) -> SettingsT:
    """The service's settings from its environment. Settings that do not parse end the process
    (exit 2) with one JSON line naming each variable and what is wrong with it, never its value
    (pydantic's own message quotes the input): the same verdict as ``--check-config``."""
    try:
        return cls()
    except ValidationError as exc:
        # A field's error names its variable; a check across fields (loc ()) names them in its message.
        problems = [f"{_variable(cls, e['loc'])}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors()]
        _verdict(cls.model_fields["service_name"].default, "; ".join(problems))
        raise SystemExit(2) from None


def _variable(cls: type[BaseServiceSettings], loc: tuple[int | str, ...]) -> str:
    """The environment variable a setting came from: the service's prefix wins over the shared
    ``ENCLAVE_`` one (``settings_customise_sources``), so name whichever of the two is set."""
    name = "__".join(str(part) for part in loc).upper()
    prefixed = f"{cls.model_config.get('env_prefix') or ''}{name}"
    shared = f"{BaseServiceSettings.model_config.get('env_prefix') or ''}{name}"
    if prefixed not in os.environ and shared in os.environ:
        return shared
    return prefixed


def _verdict(service: str, reason: str | None) -> None:
    """The one JSON line of a configuration check: ``ok``, or ``invalid`` with the reason."""
    verdict = {"service": service, "configuration": "ok" if reason is None else "invalid"}
    if reason is not None:
        verdict["reason"] = reason
    print(json.dumps(verdict), flush=True)


def checked_app(app_factory: Callable[[], FastAPI], settings: BaseServiceSettings) -> FastAPI:
    """Build the app and run its configuration checks, with no network I/O. If either fails, print
    the verdict as one JSON line and exit 2: ``enclave-<service> --check-config`` (an init container,
    or a check before a rollout) and every start alike. Messages name settings, never their values."""
    try:
        app = app_factory()
        app.state.runtime.check_configuration()
    except Exception as exc:
        _verdict(
            settings.service_name,
            exc.reason if isinstance(exc, EnclaveError) else f"{type(exc).__name__}: {exc}",
        )
        raise SystemExit(2) from None
    return app


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket bound with SO_REUSEPORT (and SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock
