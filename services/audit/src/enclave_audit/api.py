"""The auditor API (role ``auditor``): records, verification, signed export, FHIR AuditEvent.

Every call, allowed or refused, is itself audited by one ``access.recorded`` event that claims the
answer the caller got. A refusal (401, 403, 404, 422, 429, 503) is recorded at the guard's decision.
An allowed call is recorded by its route (:class:`AnsweredRoute`) once its answer is built, before
any of it is sent: a 400 ``bad_cursor`` or ``bad_range``, a FHIR read's 404, a database that did not
answer (503) with that answer, an export once its bundle is built. If Kafka does not take the
record, the call answers 503 and sends nothing of its answer. Until the twentieth session an
allowed call was recorded at its decision, ``success`` 200, whatever it was then answered.
Tenant isolation: an auditor sees its own tenant's records (its ``tenant`` filter narrows within
them, so naming another tenant finds nothing); auditors of the operator tenant see all, and only
they may export, because a bundle is a contiguous slice of the one chain that all tenants share
(the export is authorized as a resource of the operator tenant, so anyone else gets the policy's
404).
"""

import asyncio
import re
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import IO, Annotated, Any, Final, Literal

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from enclave_common import topics
from enclave_common.auth import Action, KeySourceUnavailable, Principal, Resource
from enclave_common.auth.fastapi import AccessGuard, AccessResult, Authorized
from enclave_common.cancellation import finish_despite_cancel
from enclave_common.envelope import Envelope, canonical_request_id, new_event_id
from enclave_common.events import AccessOutcome, AccessRecorded, answered_outcome
from enclave_common.kafka import EventPublisher
from enclave_common.service import failure_answer
from enclave_common.storage import ObjectStore
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from jwt import PyJWK

from enclave_audit.codes import EventAction, EventOutcome
from enclave_audit.export import covering_range, overlapping_checkpoints, write_bundle
from enclave_audit.fhir import FHIR_ID_PATTERN, FHIR_JSON, fhir_id, to_fhir_audit_event, to_fhir_bundle
from enclave_audit.fhir_errors import OUTCOME_RESPONSES
from enclave_audit.fhir_search import SearchError, check_values, search_filters
from enclave_audit.handlers import AuditMetrics
from enclave_audit.records import AuditRecord
from enclave_audit.signing import Ed25519Signer, ed25519_key_id
from enclave_audit.store import (
    MAX_SEQUENCE,
    AuditStore,
    CursorError,
    EventQuery,
    Order,
    QueryTimeout,
    SyncRecordReader,
    decode_cursor,
    encode_cursor,
)
from enclave_audit.time_bounds import TIME_FORMS, SinceTime, TimeBoundError, UntilTime, utc_range
from enclave_audit.verification import (
    RangeBeyondChain,
    TrailReport,
    index_copies,
    read_stored_checkpoints,
    verify_trail,
)

_OUTCOME_WORDS: Final[dict[str, AccessOutcome]] = {
    "allow": "success",
    "forbidden": "denied",
    "not_found": "not_found",
    "unauthenticated": "unauthenticated",
    "rate_limited": "rejected",
    "unavailable": "error",
    "invalid_request": "rejected",
}
log = structlog.get_logger("enclave.audit")
EXPORT_CHUNK: Final = 1 << 20
SPOOL_BYTES: Final = 32 * 1024 * 1024
_SEQ_ID: Final = re.compile(r"seq-([1-9][0-9]{0,18})")
#: Where an allowed call keeps the recording of its answer until its route answers (AnsweredRoute).
_ANSWER_TO_RECORD: Final = "audit_access_answer_to_record"
#: With Kafka down nothing can be audited: the call is refused with 503 and this hint.
RETRY_LATER: Final = {"Retry-After": "10"}
#: A code value the code filters take: a DCM code is six digits; other schemes' codes are short tokens.
CODE_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$"

RecordAnswer = Callable[[int, str | None], Awaitable[None]]
#: Answers below 500 that tell of a fault in the trail, not in what the caller asked: recorded as an
#: ``error``, not ``rejected`` (a 409 ``broken_chain``: the record before an export's range is missing).
TRAIL_FAULTS: Final = frozenset({"broken_chain"})


class LazyFileKeySource:
    """The JWKS file is read on first use (no I/O when the app is built); a missing or unreadable
    file answers 503 (the keys are unavailable), never 401."""

    def __init__(self, path: str | None, *, algorithms: tuple[str, ...]) -> None:
        self._path = path
        self._algorithms = algorithms
        self._keys: dict[str, PyJWK] | None = None

    async def key_for(self, kid: str) -> PyJWK | None:
        if self._keys is None:
            if self._path is None:
                raise KeySourceUnavailable("no token keys are configured (ENCLAVE_OIDC_JWKS_FILE or _URL)")
            from enclave_common.auth import StaticKeySource
            from enclave_common.errors import ConfigurationError

            try:
                source = StaticKeySource.from_file(self._path, algorithms=self._algorithms)
            except ConfigurationError as exc:
                raise KeySourceUnavailable(str(exc)) from None
            self._keys = {k: v for k in source.kids if (v := await source.key_for(k)) is not None}
        return self._keys.get(kid)


def access_hook(publisher: EventPublisher) -> Any:
    """The guard's decision hook: one ``access.recorded`` event per call (no query string, no token).

    A refusal is recorded at its decision, with its answer. An allowed decision on a route of
    :class:`AnsweredRoute` records nothing yet: it leaves the recording on the request, and the route
    records the answer it gives. On any other route an allowed decision is recorded at once, as
    ``success`` 200 (the only record that route would get)."""

    async def record(
        principal: Principal | None,
        action: Action,
        outcome: AccessOutcome,
        status: int,
        detail: str | None,
        request: Request,
    ) -> None:
        actor = principal.subject if principal else "anonymous"
        data = AccessRecorded(
            actor=actor,
            roles=sorted(r.value for r in principal.roles) if principal else [],
            action=action.value,
            # The route's template, not the path: a path parameter is client text (an id where a
            # name was typed), and the record is written once, to WORM storage.
            target=getattr(request.scope.get("route"), "path", None) or request.url.path,
            outcome=outcome,
            status_code=status,
            source_address=request.client.host if request.client else None,
            detail=detail,
        )
        envelope = Envelope.for_topic(
            topics.ACCESS_RECORDED,
            data,
            source="audit",
            tenant=principal.tenant if principal else "unknown",
            actor=actor,
            # The client's request id (X-Request-ID, as at the gateway) in canonical form, never
            # free text: the record is written once, to WORM storage, and text could carry PHI.
            correlation_id=canonical_request_id(request.headers.get("x-request-id")) or new_event_id(),
        )
        try:
            await publisher.publish(topics.ACCESS_RECORDED, envelope, key=envelope.id)
        except Exception as exc:
            log.error(
                "an auditor's call could not be recorded; it is refused",
                action=action.value,
                status=status,
                error_type=type(exc).__name__,
            )
            raise HTTPException(
                503,
                detail={
                    "code": "kafka_unavailable",
                    "message": "the access could not be audited; retry later",
                },
                headers=RETRY_LATER,
            ) from None

    async def on_decision(
        principal: Principal | None, action: Action, outcome: AccessResult, status: int, request: Request
    ) -> None:
        if outcome.kind == "allow" and isinstance(request.scope.get("route"), AnsweredRoute):

            async def record_answer(answered: int, code: str | None) -> None:
                said = "error" if code in TRAIL_FAULTS else answered_outcome(answered)
                await record(principal, action, said, answered, code or outcome.reason, request)

            setattr(request.state, _ANSWER_TO_RECORD, record_answer)
            return
        await record(
            principal, action, _OUTCOME_WORDS.get(outcome.kind, "error"), status, outcome.reason, request
        )

    return on_decision


class AnsweredRoute(APIRoute):
    """A route whose allowed calls are recorded with the answer they get, once it is built and before
    any of it is sent (a streamed export: once its bundle is built, before its first byte). A call
    the route or FastAPI ends with an exception is recorded with the answer the service's exception
    handlers give it (:func:`failure_answer`). If Kafka does not take the record the call answers
    503 (``kafka_unavailable``) instead, and nothing of its answer is sent. A call the server cancels
    (its graceful-shutdown timeout) is recorded as the 500 it gets, ``request_cancelled``, if Kafka
    takes the record within :data:`RECORD_ON_CANCEL_S`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        answer = super().get_route_handler()

        async def recorded_answer(request: Request) -> Response:
            try:
                response = await answer(request)
            except Exception as exc:
                if (record := _answer_to_record(request)) is not None:
                    await record(*failure_answer(exc))
                raise
            except asyncio.CancelledError:
                # The server cancels what still runs when its graceful-shutdown timeout ends (an export
                # being built) and answers 500 itself: recorded so, shielded and bounded, and the
                # cancellation goes on.
                if (record := _answer_to_record(request)) is not None:
                    try:
                        # Until the twenty-second session a record past the bound ran on, shielded.
                        await finish_despite_cancel(record(500, "request_cancelled"))
                    except TimeoutError:
                        log.error("a cancelled call's access record was not acknowledged in time")
                    except HTTPException:
                        pass  # Kafka did not take it: logged where it was refused
                raise
            if (record := _answer_to_record(request)) is not None:
                try:
                    await record(response.status_code, None)
                except BaseException:
                    if isinstance(response, SpooledBundle):  # never sent: its spool is closed now
                        response.close_unsent()
                    raise
            return response

        return recorded_answer


class SpooledBundle(StreamingResponse):
    """An export's bundle, streamed from its spool (memory, then a file on /tmp), which is closed once
    sent, or by :meth:`close_unsent` when it will not be (Kafka refused the call's record). Until the
    twenty-first session an unsent spool waited for the garbage collector."""

    def __init__(self, spool: IO[bytes], **options: Any) -> None:
        super().__init__(_chunks(spool), **options)
        self.spool = spool

    def close_unsent(self) -> None:
        self.spool.close()


def _answer_to_record(request: Request) -> RecordAnswer | None:
    """The recording an allowed decision left on ``request``, taken once (one record per call)."""
    record: RecordAnswer | None = getattr(request.state, _ANSWER_TO_RECORD, None)
    setattr(request.state, _ANSWER_TO_RECORD, None)
    return record


@dataclass
class AuditApiContext:
    """What the routes need; ``signer`` is set at startup (the key file is read then)."""

    store: AuditStore
    reader: SyncRecordReader
    objects: ObjectStore
    bucket: str
    metrics: AuditMetrics
    operator_tenant: str
    default_page_size: int
    max_page_size: int
    #: Seconds an auditor's query may take in the database (``ENCLAVE_AUDIT_QUERY_TIMEOUT_S``).
    query_timeout_s: float = 20.0
    #: Records one bundle may hold (it is built on the pod's /tmp before the first byte is sent).
    max_export_records: int = 200_000
    signer: Ed25519Signer | None = None
    #: Public keys of the other signing keys whose checkpoints are genuine (a rotation), by key id.
    other_keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)

    @property
    def public_key(self) -> Ed25519PublicKey:
        if self.signer is None:
            raise HTTPException(
                503, detail={"code": "not_ready", "message": "the signing key is not loaded yet"}
            )
        return self.signer.public_key

    @property
    def trusted_keys(self) -> dict[str, Ed25519PublicKey]:
        """Every key whose checkpoints verify: the signing key's and ``other_keys``."""
        own = self.public_key
        return {ed25519_key_id(own): own, **self.other_keys}

    def scope_tenant(self, principal: Principal) -> str | None:
        """The tenant filter forced on a caller (None: the operator's auditors see all tenants)."""
        return None if principal.tenant == self.operator_tenant else principal.tenant

    def visible_tenant(self, principal: Principal, requested: str | None) -> tuple[bool, str | None]:
        """The caller's ``tenant`` filter intersected with what it may see: (anything visible, the
        tenant filter). Another tenant's name finds nothing, as a tenant without records would: the
        caller learns nothing of it, and is not answered its own records as if they were that
        tenant's."""
        scope = self.scope_tenant(principal)
        if scope is None or requested is None:
            return True, scope or requested
        return requested == scope, scope


class FhirResponse(JSONResponse):
    """What the FHIR routes answer (their OpenAPI documents it)."""

    media_type = FHIR_JSON


def wants_fhir(request: Request) -> bool:
    return FHIR_JSON in request.headers.get("accept", "")


def build_router(ctx: AuditApiContext, guard: AccessGuard) -> APIRouter:
    router = APIRouter(prefix="/audit", tags=["audit"], route_class=AnsweredRoute)

    async def operator_resource(_: Request) -> Resource:
        # A bundle is a slice of the one chain all tenants share: a resource of the operator tenant.
        return Resource(tenant=ctx.operator_tenant)

    @router.get("/events", summary="Audit records, filtered, with cursor pagination (JSON or FHIR)")
    async def events(
        request: Request,
        auth: Annotated[Authorized, Depends(guard.require(Action.AUDIT_QUERY))],
        tenant: Annotated[
            str | None,
            Query(
                description=(
                    "only this tenant's records. An auditor outside the operator tenant sees only its "
                    "own tenant's, so naming another tenant answers an empty page"
                )
            ),
        ] = None,
        actor: str | None = None,
        patient: Annotated[str | None, Query(description="patient pseudonym (patient_key)")] = None,
        study: Annotated[str | None, Query(description="study key")] = None,
        action: EventAction | None = None,
        outcome: EventOutcome | None = None,
        event_type: str | None = None,
        event_code: Annotated[
            str | None,
            Query(
                pattern=CODE_PATTERN,
                description="the record's EventID code (DCM), e.g. 110113 Security Alert, 110101 Audit Log Used",
            ),
        ] = None,
        event_type_code: Annotated[
            str | None,
            Query(
                pattern=CODE_PATTERN,
                description=(
                    "one of the record's EventTypeCodes (DCM): 110137 User Security Attributes Changed finds "
                    "every grant, revocation, patient restriction and its lifting, token revocation; 110127 Emergency Override "
                    "Started every break-glass; 110129 Security Configuration every key created or rotated"
                ),
            ),
        ] = None,
        correlation_id: str | None = None,
        event_id: str | None = None,
        since: Annotated[
            SinceTime | None,
            Query(description=f"event time at or after this: {TIME_FORMS}; a date is its 00:00 UTC"),
        ] = None,
        until: Annotated[
            UntilTime | None,
            Query(
                description=(
                    f"event time before this: {TIME_FORMS}; a date includes that whole UTC day "
                    "(until=2026-11-23 is before 2026-11-24T00:00:00Z). Must be after since, else 400 "
                    "bad_range"
                )
            ),
        ] = None,
        order: Order = "asc",
        cursor: Annotated[
            str | None,
            Query(description="the previous page's next_cursor, unchanged, with the same order"),
        ] = None,
        limit: Annotated[int | None, Query(ge=1)] = None,
    ) -> Any:
        try:
            first, end = utc_range(since, until)
        except TimeBoundError as exc:
            raise HTTPException(400, detail={"code": exc.code, "message": str(exc)}) from None
        query = EventQuery(
            actor=actor,
            patient=patient,
            study=study,
            action=action.value if action else None,
            outcome=int(outcome) if outcome is not None else None,
            event_type=event_type,
            event_code=event_code,
            event_type_code=event_type_code,
            correlation_id=correlation_id,
            event_id=event_id,
            since=first,
            until=end,
            order=order,
        )
        page, next_cursor = await page_of_records(auth, tenant, limit, cursor, query)
        if wants_fhir(request):
            return fhir_searchset(request, page, next_cursor)
        return {
            "records": [r.model_dump(mode="json") for r in page],
            "count": len(page),
            "next_cursor": next_cursor,
        }

    async def page_of_records(
        auth: Authorized, tenant: str | None, limit: int | None, cursor: str | None, query: EventQuery
    ) -> tuple[list[AuditRecord], str | None]:
        """One page of the records ``query`` selects that the caller may see (its ``tenant`` filter
        narrowed to them), from ``cursor`` on, and the next page's cursor (None on the last)."""
        order = query.order
        size = min(limit or ctx.default_page_size, ctx.max_page_size)
        try:
            after = decode_cursor(cursor, order) if cursor else None
        except CursorError as exc:
            raise HTTPException(400, detail={"code": "bad_cursor", "message": str(exc)}) from None
        visible, tenant_filter = ctx.visible_tenant(auth.principal, tenant)
        query = replace(query, tenant=tenant_filter, after_sequence=after)
        try:
            found = await ctx.store.query(query, size + 1, timeout_s=ctx.query_timeout_s) if visible else []
        except QueryTimeout as exc:
            raise HTTPException(
                503, detail={"code": exc.code, "message": str(exc)}, headers=RETRY_LATER
            ) from None
        page, more = found[:size], len(found) > size
        return page, encode_cursor(page[-1].sequence, order) if more and page else None

    def fhir_searchset(request: Request, page: list[AuditRecord], next_cursor: str | None) -> JSONResponse:
        next_url = str(request.url.include_query_params(cursor=next_cursor)) if next_cursor else None
        bundle = to_fhir_bundle(
            page, base_url=fhir_base(request), self_url=str(request.url), next_url=next_url
        )
        return JSONResponse(bundle, media_type=FHIR_JSON)

    @router.get(
        "/fhir/AuditEvent",
        summary="FHIR R4 search of AuditEvents (IHE RESTful ATNA, ITI-81): a searchset Bundle",
        response_class=FhirResponse,
        responses=OUTCOME_RESPONSES,
    )
    async def fhir_search(
        request: Request,
        auth: Annotated[Authorized, Depends(guard.require(Action.AUDIT_QUERY))],
        date: Annotated[
            list[str] | None,
            Query(
                description="event time: a FHIR date or dateTime (2026-11-23 is that whole day), after "
                "a prefix eq (default), ge, gt, le or lt; repeat it for a range (date=ge2026-11-01&date=lt2026-12-01)"
            ),
        ] = None,
        type_: Annotated[
            str | None,
            Query(alias="type", description="the EventID code, e.g. 110113 (or <DCM system>|110113)"),
        ] = None,
        subtype: Annotated[
            str | None,
            Query(description="an EventTypeCode, e.g. 110137 changes of access, 110127 break-glass"),
        ] = None,
        action: Annotated[str | None, Query(description="C, R, U, D or E")] = None,
        outcome: Annotated[str | None, Query(description="0, 4, 8 or 12")] = None,
        agent_identifier: Annotated[
            str | None,
            Query(alias="agent:identifier", description="urn:enclave:principal|<the actor's sub>"),
        ] = None,
        patient_identifier: Annotated[
            str | None,
            Query(alias="patient:identifier", description="urn:enclave:patient|<patient_key>"),
        ] = None,
        entity_identifier: Annotated[
            str | None,
            Query(
                alias="entity:identifier",
                description="urn:enclave:patient|<patient_key> or urn:enclave:study|<study_key>",
            ),
        ] = None,
        count: Annotated[int | None, Query(alias="_count", ge=1, description="records per page")] = None,
        sort: Annotated[
            Literal["date", "-date"] | None,
            Query(alias="_sort", description="date: oldest first (the default); -date: newest first"),
        ] = None,
        cursor: Annotated[
            str | None, Query(description="from the previous page's next link, unchanged")
        ] = None,
    ) -> JSONResponse:
        try:
            check_values(request.query_params.multi_items())
            query = search_filters(
                date=date,
                type_=type_,
                subtype=subtype,
                action=action,
                outcome=outcome,
                agent_identifier=agent_identifier,
                patient_identifier=patient_identifier,
                entity_identifier=entity_identifier,
                order="desc" if sort == "-date" else "asc",
            )
        except SearchError as exc:
            raise HTTPException(400, detail={"code": exc.code, "message": str(exc)}) from None
        page, next_cursor = await page_of_records(auth, None, count, cursor, query)
        return fhir_searchset(request, page, next_cursor)

    @router.get(
        "/fhir/AuditEvent/{resource_id}",
        summary="One audit record as a FHIR R4 AuditEvent (the read a searchset entry's fullUrl names)",
        response_class=FhirResponse,
        responses=OUTCOME_RESPONSES,
    )
    async def fhir_audit_event(
        resource_id: Annotated[str, Path(max_length=64, pattern=FHIR_ID_PATTERN)],
        auth: Annotated[Authorized, Depends(guard.require(Action.AUDIT_QUERY))],
    ) -> JSONResponse:
        record = await read_fhir_id(ctx, resource_id, ctx.scope_tenant(auth.principal))
        if record is None:  # absent, or another tenant's: the same answer
            raise HTTPException(
                404, detail={"code": "not_found", "message": "no audit record with this id is visible to you"}
            )
        return JSONResponse(to_fhir_audit_event(record), media_type=FHIR_JSON)

    @router.get("/verify", summary="Verify the hash chain and checkpoints (whole chain or a range)")
    async def verify(
        auth: Annotated[Authorized, Depends(guard.require(Action.AUDIT_VERIFY))],
        from_sequence: Annotated[int, Query(ge=1, le=MAX_SEQUENCE)] = 1,
        to_sequence: Annotated[int | None, Query(ge=1, le=MAX_SEQUENCE)] = None,
    ) -> TrailReport:
        if to_sequence is not None and to_sequence < from_sequence:
            raise HTTPException(
                400, detail={"code": "bad_range", "message": "to_sequence must be >= from_sequence"}
            )
        try:
            report = await verify_stored(ctx, from_sequence, to_sequence)
        except RangeBeyondChain as exc:
            raise HTTPException(400, detail={"code": "bad_range", "message": str(exc)}) from None
        if not report.ok:
            ctx.metrics.verify_failures.inc()
        elif from_sequence == 1 and to_sequence is None:
            ctx.metrics.last_verify_success.set(time.time())
        return report

    @router.get("/export", summary="Signed evidence bundle (tar) of a range, verifiable offline")
    async def export(
        request: Request,
        _: Annotated[Authorized, Depends(guard.require(Action.AUDIT_EXPORT, operator_resource))],
        from_sequence: Annotated[int, Query(ge=1, le=MAX_SEQUENCE)] = 1,
        to_sequence: Annotated[int | None, Query(ge=1, le=MAX_SEQUENCE)] = None,
    ) -> Response:
        signer = ctx.signer
        if signer is None:
            raise HTTPException(
                503, detail={"code": "not_ready", "message": "the signing key is not loaded yet"}
            )
        if request.scope.get("enclave.head"):  # the headers only: not a whole bundle built and dropped
            return Response(media_type="application/x-tar")
        if to_sequence is not None and to_sequence < from_sequence:
            raise HTTPException(
                400,
                detail={
                    "code": "bad_range",
                    "message": "to_sequence must be greater than or equal to from_sequence",
                },
            )
        head = await asyncio.to_thread(ctx.reader.head)
        last = min(to_sequence or head.sequence, head.sequence)
        if head.sequence == 0 or last < from_sequence:
            raise HTTPException(
                400, detail={"code": "bad_range", "message": f"the chain holds records 1..{head.sequence}"}
            )
        entries = await ctx.store.checkpoints_between(from_sequence, last)
        first, last = covering_range(from_sequence, last, [e.checkpoint for e in entries])
        last = min(last, head.sequence)
        if last - first + 1 > ctx.max_export_records:
            raise HTTPException(
                413,
                detail={
                    "code": "export_too_large",
                    "message": (
                        f"records {first}..{last} are {last - first + 1} records (widened to checkpoint "
                        f"boundaries); one bundle holds at most {ctx.max_export_records}: export the range "
                        "in parts with from_sequence and to_sequence (each part verifies on its own, "
                        "anchored on the record before it)"
                    ),
                },
            )
        checkpoints = overlapping_checkpoints(first, last, [e.checkpoint for e in entries])
        spool = await asyncio.to_thread(_write_bundle_file, ctx.reader, signer, first, last, checkpoints)
        name = f"enclave-audit-{first}-{last}.tar"
        return SpooledBundle(
            spool,
            media_type="application/x-tar",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @router.get("/public-key", summary="The Ed25519 public key that signs checkpoints and bundles (PEM)")
    async def public_key(
        _: Annotated[Authorized, Depends(guard.require(Action.AUDIT_VERIFY))],
    ) -> PlainTextResponse:
        signer = ctx.signer
        if signer is None:
            raise HTTPException(
                503, detail={"code": "not_ready", "message": "the signing key is not loaded yet"}
            )
        return PlainTextResponse(signer.public_key_pem().decode(), media_type="application/x-pem-file")

    return router


def fhir_base(request: Request) -> str:
    """The FHIR base of this service's AuditEvent reads (``<base>/AuditEvent/<id>``)."""
    return str(request.base_url) + "audit/fhir"


async def read_fhir_id(ctx: AuditApiContext, resource_id: str, tenant: str | None) -> AuditRecord | None:
    """The record a FHIR id names (:func:`fhir_id`: the event id, or ``seq-<sequence>`` for an event
    id FHIR does not allow), within ``tenant`` (None: any)."""
    found = await ctx.store.query(EventQuery(tenant=tenant, event_id=resource_id), 1)
    sequence = _SEQ_ID.fullmatch(resource_id)
    if not found and sequence is not None and int(sequence.group(1)) <= MAX_SEQUENCE:
        found = await ctx.store.query(EventQuery(tenant=tenant, after_sequence=int(sequence.group(1)) - 1), 1)
    return next((r for r in found if fhir_id(r) == resource_id), None)


async def verify_stored(ctx: AuditApiContext, first: int, last: int | None) -> TrailReport:
    """Read the overlapping checkpoints and their WORM copies, then verify in a worker thread."""
    entries = await ctx.store.checkpoints_between(first, last)
    stored = await read_stored_checkpoints(ctx.objects, ctx.bucket, first, last, _unreadable, entries)
    return await asyncio.to_thread(
        verify_trail,
        ctx.reader,
        first=first,
        last=last,
        checkpoints=entries,
        public_key=ctx.trusted_keys,
        worm_copies=index_copies(entries, stored),
        stored=stored,
    )


def _unreadable(object_key: str, exc: Exception) -> None:
    log.warning("checkpoint WORM copy unreadable", object_key=object_key, error_type=type(exc).__name__)


def _write_bundle_file(
    reader: SyncRecordReader, signer: Ed25519Signer, first: int, last: int, checkpoints: Any
) -> IO[bytes]:
    anchor = reader.anchor_before(first)
    if anchor is None:
        raise HTTPException(409, detail={"code": "broken_chain", "message": f"record {first - 1} is missing"})
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 (closed by _chunks)
    write_bundle(
        spool,
        reader.iter_records(first, last),
        signer=signer,
        created_at=datetime.now(UTC),
        anchor=anchor,
        checkpoints=checkpoints,
    )
    spool.seek(0)
    return spool


def _chunks(spool: IO[bytes]) -> Iterator[bytes]:
    with spool:
        while block := spool.read(EXPORT_CHUNK):
            yield block
