"""``POST /api/v1/token-revocations`` (admins): end every token one subject of the tenant holds now.

For an incident: a stolen token, a device lost, an employee who left. The identity provider stops new
tokens (disable the account there); tokens already issued stay valid until they expire, and the
gateway remembers verified tokens until then. A revocation refuses, from the next request on, every
token of the subject issued at or before it (401 ``revoked``); a token issued after it works
(:mod:`enclave_common.auth.token_revocations`).

Recorded first, then made, as a restriction is: the revocation is stored only once its access event
(action ``revoke_tokens``) is acknowledged. If Kafka refuses it, nothing is stored (503). If the store
then fails, the answer is 503 and a second event says the revocation may not have been stored:
repeat the request (a repeat moves the instant forward, to the repeat's). The replica that stores it applies it at once; the
other replicas within ``ENCLAVE_GATEWAY_TOKEN_REVOCATION_REFRESH_S``. The auditor API reads the
recorded event from the audit trail (``enclave_audit.token_revocations``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

from enclave_common.auth import (
    Action,
    InvalidTokenRevocationError,
    Principal,
    Resource,
    RevokedTokens,
    TokenRevocation,
    TokenRevocationStore,
)
from enclave_common.auth.fastapi import AccessGuard
from enclave_common.auth.policy import check_justification
from enclave_common.service import failure_answer
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from enclave_gateway.access import AccessRecorder, Unaudited
from enclave_gateway.auth_first import AuthenticatedBodyRoute, AuthenticatedFirst
from enclave_gateway.grants_api import SUBJECT_PATTERN, as_stored, invalid_answer

#: The 503 of a revocation whose event Kafka refused (then "; retry later").
REVOCATION_UNRECORDED: Final = "no token was revoked: the revocation could not be recorded in the audit trail"


class TokenRevocationRequest(BaseModel):
    """An admin's revocation of every token one subject of its tenant holds now."""

    model_config = ConfigDict(extra="forbid")

    subject: str = Field(
        pattern=SUBJECT_PATTERN,
        description="the token subject (`sub`) whose tokens are revoked: 1 to 255 printable ASCII characters "
        "without spaces, as OIDC subjects are",
    )
    justification: str = Field(description="10 to 500 characters: why (an incident number), never a patient")


def build_token_revocations_router(
    *,
    guard: AccessGuard,
    store: TokenRevocationStore,
    revoked: RevokedTokens,
    recorder: AccessRecorder,
    refresh_s: float,
) -> APIRouter:
    router = APIRouter(tags=["access"], route_class=AuthenticatedBodyRoute)
    action = Action.REVOKE_TOKENS

    async def record(request: Request, principal: Principal, status: int, detail: str) -> None:
        # A change of access with no patient: no target.
        await recorder.record_change(request, principal, action, status, None, detail, REVOCATION_UNRECORDED)

    async def second_event(request: Request, principal: Principal, status: int, detail: str) -> None:
        await recorder.record_change_if_possible(request, principal, action, status, None, detail)

    @router.post(
        "/api/v1/token-revocations",
        status_code=201,
        summary="Revoke every token one subject of your tenant holds now (admin)",
        responses={
            201: {
                "description": "revoked: tokens of the subject issued at or before `revoked_before` are refused"
            },
            403: {"description": "not an admin"},
            422: {"description": "invalid"},
        },
    )
    async def revoke(
        body: TokenRevocationRequest,
        request: Request,
        principal: Principal = Depends(AuthenticatedFirst(guard, action)),
    ) -> JSONResponse:
        await guard.check_resource(request, principal, action, Resource(principal.tenant))
        try:
            justification = check_justification(body.justification, InvalidTokenRevocationError)
        except InvalidTokenRevocationError as exc:
            await record(request, principal, 422, f"revocation_refused:{exc.code} subject={body.subject}")
            return invalid_answer(exc)
        revocation = TokenRevocation(
            tenant=principal.tenant,
            subject=body.subject,
            revoked_before=as_stored(datetime.now(UTC)),
            revoked_by=principal.subject,
            justification=justification,
        )
        made = f"subject={body.subject} revoked_before={revocation.revoked_before.isoformat()}"
        try:
            await record(request, principal, 201, f"tokens_revoked {made}")
        except Unaudited:
            # Refused, yet Kafka may still deliver it: a second event says nothing was stored.
            await second_event(request, principal, 503, f"tokens_not_revoked {made} cause=access_unrecorded")
            raise
        try:
            await store.revoke(revocation)
        except Exception as exc:
            status, code = failure_answer(exc)
            await second_event(request, principal, status, f"token_revocation_unknown {made} cause={code}")
            raise
        revoked.note(revocation)
        return JSONResponse(
            {
                "tenant": revocation.tenant,
                "subject": revocation.subject,
                "revoked_before": revocation.revoked_before.isoformat(),
                "revoked_by": revocation.revoked_by,
                # Every replica refuses the tokens within this many seconds (this one at once).
                "effective_within_s": refresh_s,
            },
            status_code=201,
        )

    return router
