"""Access events: every read, query, rejected upload, failed authentication and forbidden request
becomes an ``access.recorded`` event for the audit trail (break-glass also a ``security.alert``).

Publishing is awaited: if the access cannot be recorded, the request fails (503) rather than happen
unaudited. One refinement for allowed uploads: their event is queued at the decision and its
acknowledgement awaited (:meth:`AccessRecorder.settle`) after the body was read, before anything is
handed off and before the answer: the Kafka round trip overlaps the body instead of preceding it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NotRequired, TypedDict, Unpack

import structlog
from enclave_common import topics
from enclave_common.auth import Action, Principal
from enclave_common.auth.fastapi import AccessResult
from enclave_common.envelope import Envelope, canonical_request_id, new_event_id
from enclave_common.events import AccessOutcome, AccessRecorded, SecurityAlert
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from enclave_gateway.handoff import Acknowledgements, Handoff, KafkaUnavailable
from enclave_gateway.stow import error_body

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
    that id is what an operator needs to find the request."""

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
                failed = JSONResponse(
                    error_body(
                        500,
                        "internal_error",
                        "the gateway failed on this request (it is logged); retry, an instance sent "
                        "again is stored once. If it fails again, report this answer's X-Request-ID",
                    ),
                    status_code=500,
                )
                await failed(scope, receive, send_with_id)
            raise


_OPAQUE_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def opaque_id_or_none(value: str | None) -> str | None:
    """A path value is recorded only if it has the shape of an imaging id (a UUID): a client may put
    anything in the URL, e.g. a patient id by mistake, and that must not reach the audit trail."""
    return value if value is not None and _OPAQUE_ID.match(value) else None


def access_target(patient_key: str | None, study_key: str | None = None) -> str | None:
    """How an access event names its object: ``patient:<key>`` and ``study:<key>`` (pseudonymous keys),
    so the audit trail files the record under that patient and study (auditor queries, the
    many-studies rule)."""
    parts = [f"patient:{patient_key}"] if patient_key else []
    if study_key:
        parts.append(f"study:{study_key}")
    return "/".join(parts) or None


#: Where an allowed upload's queued access event waits for :meth:`AccessRecorder.settle`.
_PENDING = "pending_access"


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


class AccessRecorder:
    def __init__(self, handoff: Handoff) -> None:
        self.handoff = handoff

    async def record(self, request: Request, **fields: Unpack[AccessFields]) -> None:
        """Publish one access event and wait for Kafka's acknowledgement (503 if it fails)."""
        acks = await self.queue(request, **fields)
        with _unaudited():
            await acks.settle()

    async def queue(self, request: Request, **fields: Unpack[AccessFields]) -> Acknowledgements:
        """Hand one access event to the producer; its acknowledgement is to be settled."""
        principal = fields["principal"]
        tenant = principal.tenant if principal is not None else "unknown"
        event = Envelope.for_topic(
            topics.ACCESS_RECORDED,
            AccessRecorded(
                actor=principal.subject if principal is not None else "anonymous",
                roles=sorted(str(r) for r in principal.roles) if principal is not None else [],
                action=fields["action"],
                target=fields.get("target"),
                outcome=fields["outcome"],
                status_code=fields["status"],
                source_address=request.client.host if request.client else None,
                detail=fields.get("detail"),
            ),
            source="gateway",
            tenant=tenant,
            actor=principal.subject if principal is not None else "anonymous",
            correlation_id=fields.get("correlation_id") or request_correlation_id(request),
        )
        acks = self.handoff.acknowledgements()
        with _unaudited():
            await acks.send(topics.ACCESS_RECORDED, event, tenant)
        return acks

    async def on_decision(
        self,
        principal: Principal | None,
        action: Action,
        outcome: AccessResult,
        status: int,
        request: Request,
    ) -> None:
        """The AccessGuard hook: one event per decision.

        An allowed upload's event is handed to the producer but its acknowledgement not awaited: the
        route reads the body meanwhile and must :meth:`settle` it before it hands anything off or
        answers. An allowed break-glass decision records nothing: the route records what it did (the
        session opened, 201, or the request refused, 422), so one opening is one event, and the audit
        service's break-glass rule fires once for it, not once per decision on the way."""
        if action == Action.BREAK_GLASS and outcome.kind == "allow":
            return
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
        target = (
            access_target(resource.patient_key, resource.study_key)
            if resource is not None
            else opaque_id_or_none(request.path_params.get("imaging_id"))
        )
        acks = await self.queue(
            request,
            principal=principal,
            action=str(action),
            outcome=_OUTCOMES.get(outcome.kind, "error"),
            status=status,
            target=target,
            detail=reason,
        )
        if action == Action.UPLOAD and outcome.kind == "allow":
            setattr(request.state, _PENDING, acks)
            return
        with _unaudited():
            await acks.settle()
        if outcome.kind == "allow" and outcome.break_glass and principal is not None:
            await self.alert(
                request,
                principal,
                rule="break_glass",
                detail=f"break-glass access ({action}) to patient {resource.patient_key if resource else None}",
            )

    @staticmethod
    async def settle(request: Request) -> None:
        """Wait until the access event queued for this request (an allowed upload) is acknowledged;
        HTTPException 503 if it could not be recorded. A no-op when nothing is pending."""
        pending: Acknowledgements | None = getattr(request.state, _PENDING, None)
        if pending is not None:
            setattr(request.state, _PENDING, None)
            with _unaudited():
                await pending.settle()

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


@contextmanager
def _unaudited(what: str = "the access could not be audited") -> Iterator[None]:
    """Kafka did not take an access event (or an alert): the request is refused (503), it does not
    happen unaudited."""
    try:
        yield
    except KafkaUnavailable as exc:
        raise HTTPException(
            503, detail={"code": exc.code, "message": f"{what}; retry later"}, headers=RETRY_LATER
        ) from None
