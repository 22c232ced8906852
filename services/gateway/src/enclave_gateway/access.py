"""Access events: every read, query, rejected upload, failed authentication and forbidden request
becomes an ``access.recorded`` event for the audit trail (break-glass also a ``security.alert``).

Publishing is awaited: if the access cannot be recorded, the request fails (503) rather than happen
unaudited.
"""

from __future__ import annotations

from fastapi import HTTPException, Request

from enclave_common import topics
from enclave_common.auth import Action, Principal
from enclave_common.auth.fastapi import AccessResult
from enclave_common.envelope import Envelope, new_event_id
from enclave_common.events import AccessOutcome, AccessRecorded, SecurityAlert
from enclave_gateway.handoff import Handoff, KafkaUnavailable

_OUTCOMES: dict[str, AccessOutcome] = {
    "allow": "success",
    "forbidden": "denied",
    "not_found": "not_found",
    "unauthenticated": "unauthenticated",
    "rate_limited": "denied",
    "unavailable": "error",
}


class AccessRecorder:
    def __init__(self, handoff: Handoff) -> None:
        self.handoff = handoff

    async def record(
        self,
        request: Request,
        *,
        principal: Principal | None,
        action: str,
        outcome: AccessOutcome,
        status: int,
        target: str | None = None,
        detail: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        tenant = principal.tenant if principal is not None else "unknown"
        event = Envelope.for_topic(
            topics.ACCESS_RECORDED,
            AccessRecorded(
                actor=principal.subject if principal is not None else "anonymous",
                roles=sorted(str(r) for r in principal.roles) if principal is not None else [],
                action=action,
                target=target,
                outcome=outcome,
                status_code=status,
                source_address=request.client.host if request.client else None,
                detail=detail,
            ),
            source="gateway",
            tenant=tenant,
            actor=principal.subject if principal is not None else "anonymous",
            correlation_id=correlation_id or new_event_id(),
        )
        try:
            await self.handoff.publish_event(topics.ACCESS_RECORDED, event, tenant)
        except KafkaUnavailable as exc:
            raise HTTPException(503, detail={"code": exc.code, "message": "the access could not be audited; retry later"}) from None

    async def on_decision(
        self, principal: Principal | None, action: Action, outcome: AccessResult, status: int, request: Request
    ) -> None:
        """The AccessGuard hook: one event per decision."""
        target = outcome.resource.patient_key if outcome.resource is not None else request.path_params.get("imaging_id")
        await self.record(
            request,
            principal=principal,
            action=str(action),
            outcome=_OUTCOMES.get(outcome.kind, "error"),
            status=status,
            target=target,
            detail=outcome.reason,
        )
        if outcome.break_glass and principal is not None:
            alert = Envelope.for_topic(
                topics.SECURITY_ALERT,
                SecurityAlert(
                    rule="break_glass",
                    severity="high",
                    subject=principal.subject,
                    detail=f"break-glass access ({action}) to patient {target}",
                ),
                source="gateway",
                tenant=principal.tenant,
                actor=principal.subject,
                correlation_id=new_event_id(),
            )
            await self.handoff.publish_event(topics.SECURITY_ALERT, alert, principal.tenant)
