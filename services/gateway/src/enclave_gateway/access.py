"""Access events: every read, query, upload, grant change, failed authentication and forbidden
request becomes an ``access.recorded`` event for the audit trail (break-glass also a
``security.alert``).

One event per request, and it claims only the answer the request got: an auditor reads its outcome
and status as the gateway's answer. A refusal is recorded at its decision. The actions of
:data:`ANSWERED_BY_ROUTE` are recorded by their routes once the answer is known: an upload, a grant
change and a break-glass opening after their work (the body may still be refused, the grant answered
201 or 422), and a read or query once its answer was read from the database, before it is sent
(:meth:`AccessRecorder.disclose`), so a lookup that fails after the decision is recorded as the 503
it gets, and no data leaves the gateway before its record.

Publishing is awaited: if the access cannot be recorded, the request fails (503) rather than happen
unaudited. A request already answered 503 (or cancelled) is still recorded where Kafka takes it
(:meth:`AccessRecorder.record_if_possible`, :meth:`AccessRecorder.record_despite_cancel`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Final, NotRequired, TypedDict, TypeVar, Unpack

import structlog
from enclave_common import topics
from enclave_common.auth import Action, Principal
from enclave_common.auth.fastapi import AccessResult, Authorized
from enclave_common.body_limit import body_refusal
from enclave_common.cancellation import RECORD_ON_CANCEL_S, finish_despite_cancel
from enclave_common.envelope import Envelope, canonical_request_id, new_event_id
from enclave_common.events import AccessOutcome, AccessRecorded, SecurityAlert, answered_outcome
from enclave_common.service import failure_answer
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from enclave_gateway.handoff import Handoff, KafkaUnavailable
from enclave_gateway.stow import error_body

T = TypeVar("T")
log = structlog.get_logger("enclave.gateway")

_OUTCOMES: dict[str, AccessOutcome] = {
    "allow": "success",
    "forbidden": "denied",
    "not_found": "not_found",
    "unauthenticated": "unauthenticated",
    "rate_limited": "denied",
    "unavailable": "error",
    "invalid_request": "rejected",
}


#: A client may name its request (``X-Request-ID``): a UUID in any case, or 32 hex digits (nginx's
#: ``$request_id``). The gateway records it in one form, a lowercase UUID with dashes, as the access
#: event's correlation id, and answers every request with the id it used in the same header, so the
#: caller can find the audit record of its own request.
REQUEST_ID_HEADER = "x-request-id"
#: With Kafka down nothing can be audited: the request is refused with 503 and this hint.
RETRY_LATER = {"Retry-After": "10"}


def request_correlation_id(request: Request) -> str:
    """The request's correlation id: its ``X-Request-ID`` in canonical form, else a fresh id
    (:class:`RequestIdHeader` fixes it when the request arrives and names it in the answer)."""
    known = getattr(request.state, "correlation_id", None)
    if isinstance(known, str):
        return known
    chosen = canonical_request_id(request.headers.get(REQUEST_ID_HEADER)) or new_event_id()
    request.state.correlation_id = chosen
    return chosen


class RequestIdHeader:
    """ASGI middleware: every answer names the correlation id its request is recorded under
    (``X-Request-ID``), whether the client's, normalised, or a fresh one that replaced what it sent.

    Outermost of the gateway's middleware, so the head-size refusal and the request metrics' answers
    carry it too. A request that fails with an unexpected exception (a bug) is answered here, 500 in
    the gateway's error shape with the header, before the exception goes on to the server's log:
    that id is what an operator needs to find the request. So is a request the server cancels at
    the end of its graceful-shutdown timeout (500 ``request_cancelled``; until the twentieth session
    uvicorn's plain 500 without the header)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chosen = canonical_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER)) or new_event_id()
        scope.setdefault("state", {})["correlation_id"] = chosen
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(raw=list(message.get("headers", [])))
                headers[REQUEST_ID_HEADER] = chosen
                message = {**message, "headers": headers.raw}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if not started:
                await _answer_500(
                    scope,
                    receive,
                    send_with_id,
                    "internal_error",
                    "the gateway failed on this request (it is logged); retry, an instance sent "
                    "again is stored once. If it fails again, report this answer's X-Request-ID",
                )
            raise
        except asyncio.CancelledError:
            # The server cancels what is still running when its graceful-shutdown timeout ends, then
            # answers 500 itself, without this header: answered here instead, as the access event of
            # such a request records it (500, request_cancelled), and the cancellation goes on.
            if not started:
                await _answer_500(
                    scope,
                    receive,
                    send_with_id,
                    "request_cancelled",
                    "the gateway stopped before it answered (it was shutting down); retry, an "
                    "instance sent again is stored once",
                )
            raise


async def _answer_500(scope: Scope, receive: Receive, send: Send, code: str, message: str) -> None:
    await JSONResponse(error_body(500, code, message), status_code=500)(scope, receive, send)


_OPAQUE_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def opaque_id_or_none(value: str | None) -> str | None:
    """A path value is recorded only if it has the shape of an imaging id (a UUID): a client may put
    anything in the URL, e.g. a patient id by mistake, and that must not reach the audit trail."""
    return value if value is not None and _OPAQUE_ID.match(value) else None


def _path_target(request: Request) -> str | None:
    """The target of a request whose resource was not found: the id in its path, if it has the shape
    of one (an imaging id bare, an upload id as ``upload:<id>``), never other client text."""
    if (upload_id := opaque_id_or_none(request.path_params.get("upload_id"))) is not None:
        return f"upload:{upload_id}"
    return opaque_id_or_none(request.path_params.get("imaging_id"))


def access_target(
    patient_key: str | None, study_key: str | None = None, upload_id: str | None = None
) -> str | None:
    """How an access event names its object: ``patient:<key>`` and ``study:<key>`` (pseudonymous keys),
    so the audit trail files the record under that patient and study (auditor queries, the
    many-studies rule), and ``upload:<id>`` for a read of one upload's instances."""
    parts = [f"patient:{patient_key}"] if patient_key else []
    if study_key:
        parts.append(f"study:{study_key}")
    if upload_id:
        parts.append(f"upload:{upload_id}")
    return "/".join(parts) or None


#: The actions whose routes record the request's one access event with the answer they give. An
#: allowed decision of one of them records nothing: an allowed upload may still be refused for its
#: body (400, 413, 499, 503, 409 when no instance is accepted) or answered 202, a grant change be
#: answered 201, 409 or 422 (a restriction 201, 200, 404 or 422), a break-glass opening 201 or 422,
#: and a read or query still needs its data from the database, which may not answer (503). Until the nineteenth session the allowed
#: upload and grant decisions were recorded too, as ``success`` with status 200, followed by the
#: route's own event: the first record of a refused upload read as an answer it never got. Until the
#: twentieth session an allowed read or query was recorded at its decision, so one whose lookup then
#: failed kept ``success``, 200, while it was answered 503; a grant read (``read_grants``) so until the
#: twenty-second.
ANSWERED_BY_ROUTE: Final = frozenset(
    {
        Action.UPLOAD,
        Action.MANAGE_GRANTS,
        Action.READ_GRANTS,
        Action.MANAGE_RESTRICTIONS,
        Action.READ_RESTRICTIONS,
        Action.QUERY_PATIENT_KEY,
        Action.REVOKE_TOKENS,
        Action.BREAK_GLASS,
        Action.READ_STATUS,
        Action.READ_RESULTS_PHI,
        Action.QUERY_PATIENT,
        Action.READ_RESULTS_DEID,
    }
)

#: Set on a request once an access event of it was handed to the producer (see :func:`access_recorded`).
_RECORDED = "access_recorded"
#: Access events of 503 answers that may wait for Kafka in the background at once
#: (:meth:`AccessRecorder.record_in_background`); past it such a 503 is logged and not recorded.
MAX_BACKGROUND_RECORDS: Final = 1024


def access_recorded(request: Request) -> bool:
    """Whether an access event of ``request`` was handed to the producer (acknowledged or not)."""
    return bool(getattr(request.state, _RECORDED, False))


class Unaudited(HTTPException):
    """503: Kafka did not take an access event or an alert of the request. Nothing more of it is
    recorded on the way out (:func:`unrecorded_failure`); a route that knows what may have taken
    effect tries one more event itself (:meth:`AccessRecorder.record_if_possible`)."""


def unrecorded_failure(request: Request, exc: Exception) -> tuple[int, str] | None:
    """The answer (status, code) ``exc`` gets when it ends a request none of whose access events was
    handed to the producer yet, so that the request is recorded with it; None when one was (the
    route or the guard recorded the answer) or when Kafka refused an event of it (nothing more can
    be recorded; the answer is 503). A body the body limit refused (413, 408) is recorded with that
    refusal, the answer the client got, not as the client leaving (499) which the route then saw."""
    if access_recorded(request) or isinstance(exc, Unaudited):
        return None
    return body_refusal(request.scope) or failure_answer(exc)


class AccessFields(TypedDict):
    """What an access event says besides the request's source address and correlation id."""

    principal: Principal | None
    action: str
    outcome: AccessOutcome
    status: int
    target: NotRequired[str | None]
    detail: NotRequired[str | None]
    #: Defaults to the request's (its ``X-Request-ID``, or a fresh id).
    correlation_id: NotRequired[str | None]


#: The actor of an access event the gateway records on its own, for no request (as ``service:ingest``).
GATEWAY_ACTOR = "service:gateway"
#: What a 503 says when Kafka did not take a request's access event (then "; retry later").
UNAUDITED = "the access could not be audited"


def _access_event(
    *,
    actor: str,
    roles: list[str],
    tenant: str,
    source_address: str | None,
    correlation_id: str,
    fields: AccessFields,
) -> Envelope:
    """The ``access.recorded`` envelope of one access, as the gateway publishes it."""
    return Envelope.for_topic(
        topics.ACCESS_RECORDED,
        AccessRecorded(
            actor=actor,
            roles=roles,
            action=fields["action"],
            target=fields.get("target"),
            outcome=fields["outcome"],
            status_code=fields["status"],
            source_address=source_address,
            detail=fields.get("detail"),
        ),
        source="gateway",
        tenant=tenant,
        actor=actor,
        correlation_id=correlation_id,
    )


class AccessRecorder:
    def __init__(self, handoff: Handoff) -> None:
        self.handoff = handoff
        #: Records of cancelled requests still running after a further cancellation (see
        #: :meth:`record_despite_cancel`).
        self._unfinished: set[asyncio.Future[bool]] = set()

    async def record(
        self, request: Request, *, unaudited: str = UNAUDITED, **fields: Unpack[AccessFields]
    ) -> None:
        """Publish one access event and wait for Kafka's acknowledgement (503 if it fails, its message
        ``unaudited``, then "retry later")."""
        setattr(request.state, _RECORDED, True)
        principal = fields["principal"]
        tenant = principal.tenant if principal is not None else "unknown"
        event = _access_event(
            actor=principal.subject if principal is not None else "anonymous",
            roles=sorted(str(r) for r in principal.roles) if principal is not None else [],
            tenant=tenant,
            source_address=request.client.host if request.client else None,
            correlation_id=fields.get("correlation_id") or request_correlation_id(request),
            fields=fields,
        )
        with _unaudited(unaudited):
            await self.handoff.publish_event(topics.ACCESS_RECORDED, event, tenant)

    async def record_change(
        self,
        request: Request,
        principal: Principal,
        action: Action,
        status: int,
        patient_key: str | None,
        detail: str,
        unaudited: str = UNAUDITED,
    ) -> None:
        """:meth:`record` an answered change of access (a grant, a break-glass session, a restriction
        on one patient, its target; a token revocation, none): its outcome from ``status``."""
        await self.record(
            request, unaudited=unaudited, **_change_fields(principal, action, status, patient_key, detail)
        )

    async def record_change_if_possible(
        self,
        request: Request,
        principal: Principal,
        action: Action,
        status: int,
        patient_key: str | None,
        detail: str,
    ) -> bool:
        """:meth:`record_if_possible` of a change, as :meth:`record_change` builds it (a request already
        answered, or about to be, whose change was undone or not made)."""
        return await self.record_if_possible(
            request, **_change_fields(principal, action, status, patient_key, detail)
        )

    @asynccontextmanager
    async def change_failure_recorded(
        self, request: Request, principal: Principal, action: Action, patient_key: str
    ) -> AsyncIterator[None]:
        """A change the block ends with an exception (its store did not answer) before its event was
        recorded: recorded with the answer it gets (:func:`unrecorded_failure`), then raised on."""
        try:
            yield
        except Exception as exc:
            if (answer := unrecorded_failure(request, exc)) is not None:
                status, code = answer
                await self.record_change(request, principal, action, status, patient_key, code)
            raise

    async def record_own(self, tenant: str, **fields: Unpack[AccessFields]) -> None:
        """Publish an access event the gateway makes on its own account, for no request (actor
        :data:`GATEWAY_ACTOR`, no roles, no source address, a fresh correlation id; ``principal`` is
        ignored), and wait for Kafka's acknowledgement: ``KafkaUnavailable`` if it fails."""
        event = _access_event(
            actor=GATEWAY_ACTOR,
            roles=[],
            tenant=tenant,
            source_address=None,
            correlation_id=fields.get("correlation_id") or new_event_id(),
            fields=fields,
        )
        await self.handoff.publish_event(topics.ACCESS_RECORDED, event, tenant)

    async def record_if_possible(self, request: Request, **fields: Unpack[AccessFields]) -> bool:
        """:meth:`record` for a request already answered 503 (an event of it or its hand-off was
        refused): Kafka may take this one (a timed-out chunk, a refused record); if it does not, the
        failure is logged and the answer stands. False when it was not recorded."""
        try:
            await self.record(request, **fields)
        except Unaudited:
            log.error(
                "an access answered 503 could not be recorded either",
                action=fields["action"],
                status=fields["status"],
                detail=fields.get("detail"),
                correlation_id=request_correlation_id(request),
            )
            return False
        return True

    def record_in_background(self, request: Request, **fields: Unpack[AccessFields]) -> None:
        """:meth:`record_if_possible` for a request answered 503 because Kafka did not acknowledge
        its hand-off, without waiting for it: the event is handed to the producer and the answer goes
        out at once. With Kafka down the answer would otherwise wait a second publish timeout for an
        event that cannot be taken either (until the twentieth session it did: up to twice
        ``ENCLAVE_GATEWAY_PUBLISH_TIMEOUT_S``). Kafka takes the event if it answers within the
        publish timeout; if not, the failure is logged as by :meth:`record_if_possible`. The task is
        kept in :attr:`_unfinished` until it ends."""
        setattr(request.state, _RECORDED, True)
        if len(self._unfinished) >= MAX_BACKGROUND_RECORDS:
            log.error(
                "an access answered 503 was not recorded: too many records already wait for Kafka",
                action=fields["action"],
                status=fields["status"],
                detail=fields.get("detail"),
                correlation_id=request_correlation_id(request),
            )
            return
        recording = asyncio.ensure_future(self.record_if_possible(request, **fields))
        self._unfinished.add(recording)
        recording.add_done_callback(self._unfinished.discard)
        recording.add_done_callback(_log_failure)

    async def settle_background(self, timeout_s: float = RECORD_ON_CANCEL_S) -> None:
        """Wait, at most ``timeout_s``, for the records still running in the background (at
        shutdown, before the producer stops; in tests)."""
        with suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._unfinished:
                    await asyncio.gather(*self._unfinished, return_exceptions=True)

    async def record_despite_cancel(self, request: Request, **fields: Unpack[AccessFields]) -> None:
        """:meth:`record_if_possible` for a request being cancelled (the server's graceful-shutdown
        timeout), called before the cancellation goes on: shielded from a further cancellation and
        bounded by :data:`RECORD_ON_CANCEL_S`. What the shield keeps running past a further
        cancellation is kept in :attr:`_unfinished` until the hand-off's own timeout ends it."""
        try:
            await finish_despite_cancel(self.record_if_possible(request, **fields), self._unfinished)
        except TimeoutError:
            log.error(
                "a cancelled request's access event was not acknowledged in time",
                action=fields["action"],
                correlation_id=request_correlation_id(request),
            )

    async def on_decision(
        self,
        principal: Principal | None,
        action: Action,
        outcome: AccessResult,
        status: int,
        request: Request,
    ) -> None:
        """The AccessGuard hook: one event per decision, recorded before the route goes on.

        An allowed decision of an action in :data:`ANSWERED_BY_ROUTE` records nothing: its route
        records the request's one event with the answer it gives (so one break-glass opening is also
        one event, and the audit service's break-glass rule fires once for it)."""
        if outcome.kind == "allow" and action in ANSWERED_BY_ROUTE:
            return
        await self._record_decision(principal, action, outcome, status, request)

    async def disclose(self, request: Request, authorized: Authorized, action: Action) -> None:
        """Record an allowed read or query (``success``, 200) whose answer was read and built, before
        the route sends it; a read under break-glass also raises its ``security.alert``. If Kafka
        does not take either, :class:`Unaudited` (503): nothing read is sent."""
        decision = authorized.decision
        result = AccessResult("allow", decision.reason, decision, authorized.resource)
        await self._record_decision(authorized.principal, action, result, 200, request)

    async def disclosed(
        self, request: Request, authorized: Authorized, action: Action, answer: Awaitable[JSONResponse]
    ) -> JSONResponse:
        """``answer``, read from the database for an allowed ``action``, once its access event was
        recorded (:meth:`disclose`); a read that fails is recorded with the answer it gets
        (:meth:`record_unanswered`)."""
        try:
            body = await answer
        except Exception as exc:
            await self.record_unanswered(request, authorized, action, exc)
            raise
        await self.disclose(request, authorized, action)
        return body

    async def record_unanswered(
        self, request: Request, authorized: Authorized, action: Action, exc: Exception
    ) -> None:
        """Record an allowed read or query that ``exc`` ended before its answer was sent (the
        database did not answer: 503), under its target, with the answer it gets."""
        if (answer := unrecorded_failure(request, exc)) is None:
            return
        status, code = answer
        resource = authorized.resource
        await self.record(
            request,
            principal=authorized.principal,
            action=str(action),
            outcome=answered_outcome(status),
            status=status,
            target=access_target(resource.patient_key, resource.study_key, resource.upload_id)
            if resource
            else None,
            detail=code,
        )

    async def _record_decision(
        self,
        principal: Principal | None,
        action: Action,
        outcome: AccessResult,
        status: int,
        request: Request,
    ) -> None:
        resource = outcome.resource
        reason = outcome.reason
        if reason == "other_tenant":
            # Recorded exactly as an absent resource is: the record is filed under the actor's tenant,
            # whose own auditors read it, and the other tenant's pseudonyms or the word other_tenant
            # would tell them the id exists elsewhere (found by an API hunt). The log, which only
            # operators read, keeps the distinction.
            log.warning(
                "a resource of another tenant was asked for; answered and recorded as not found",
                action=str(action),
                subject=principal.subject if principal is not None else None,
                tenant=principal.tenant if principal is not None else None,
            )
            resource, reason = None, "not_found"
        if resource is not None and resource.restricted and outcome.kind == "forbidden":
            # A refused attempt on a restricted patient's PHI, told apart from other refusals for the
            # privacy office (until the review of the twenty-second session it read as any 403).
            reason = f"{reason} restricted_patient"
        target = (
            access_target(resource.patient_key, resource.study_key, resource.upload_id)
            if resource is not None
            else _path_target(request)
        )
        if outcome.kind == "allow" and outcome.break_glass and principal is not None:
            # Raised first: if Kafka refuses it the request answers 503 (Unaudited) with no event
            # claiming a 200 it did not get; if it takes the alert and then refuses the access event,
            # the alert tells of an access that was refused, which is the safer error.
            await self.alert(
                request,
                principal,
                rule="break_glass",
                detail=f"break-glass access ({action}) to patient {resource.patient_key if resource else None}",
            )
        await self.record(
            request,
            principal=principal,
            action=str(action),
            outcome=_OUTCOMES.get(outcome.kind, "error"),
            status=status,
            target=target,
            detail=reason,
        )

    async def alert(self, request: Request, principal: Principal, *, rule: str, detail: str) -> None:
        """A ``security.alert`` (high): break-glass opened or used. ``detail`` holds pseudonyms only."""
        alert = Envelope.for_topic(
            topics.SECURITY_ALERT,
            SecurityAlert(rule=rule, severity="high", subject=principal.subject, detail=detail),
            source="gateway",
            tenant=principal.tenant,
            actor=principal.subject,
            correlation_id=request_correlation_id(request),
        )
        with _unaudited("the alert could not be raised"):
            await self.handoff.publish_event(topics.SECURITY_ALERT, alert, principal.tenant)


def _log_failure(recording: asyncio.Future[bool]) -> None:
    """A background record that failed other than by Kafka's refusal (which it logs itself): logged,
    and its exception retrieved."""
    if not recording.cancelled() and (exc := recording.exception()) is not None:
        log.error("a background access record failed", error_type=type(exc).__name__)


@contextmanager
def _unaudited(what: str = UNAUDITED) -> Iterator[None]:
    """Kafka did not take an access event (or an alert): the request is refused (503), it does not
    happen unaudited."""
    try:
        yield
    except KafkaUnavailable as exc:
        raise Unaudited(
            503, detail={"code": exc.code, "message": f"{what}; retry later"}, headers=RETRY_LATER
        ) from None


def _change_fields(
    principal: Principal, action: Action, status: int, patient_key: str | None, detail: str
) -> AccessFields:
    return {
        "principal": principal,
        "action": str(action),
        "outcome": answered_outcome(status),
        "status": status,
        "target": access_target(patient_key),
        "detail": detail,
    }


def page_of(found: Sequence[T], limit: int, key: Callable[[T], str]) -> tuple[Sequence[T], str | None]:
    """A listing's page from ``found`` (read with ``limit + 1``), and its ``next_after``: the key of its
    last item when more follow, else None."""
    page = found[:limit]
    return page, key(page[-1]) if len(found) > limit else None
