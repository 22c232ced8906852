"""Routes for patient-scoped grants (admins, for caregivers) and break-glass sessions (clinicians).

The patient is named by ``patient_id`` in the request and kept only as its tenant-scoped keyed-HMAC
pseudonym; no response, event or log carries the patient id. Every decision goes through the
access guard (the routes with a body authenticate and check the role before the body is parsed,
:mod:`enclave_gateway.auth_first`). Each request is one ``access.recorded`` event with the answer
it got: a refused decision is recorded by the guard; an allowed change is recorded by its route,
naming the grant when one was created or revoked (201, 200), or why it was refused (422, 409), or
the failure that ended it (503), and a body or grant id that does not match the API (422) is
recorded without its content. Opening a break-glass session also raises a ``security.alert``.
Validation is :class:`AccessPolicy`'s.

A grant or session is stored before its access event (and a session's alert) is published, so that
the event can name it; if Kafka does not take them, the new grant is withdrawn at once (revoked by
:data:`WITHDRAWN_BY`) and the request answered 503: an access that cannot be audited does not take
effect. A revocation whose event Kafka refuses is not undone (a grant back in effect would be
worse): the grant keeps ``revocation_recorded`` False and its next DELETE records the revocation
(:func:`build_grants_router`'s ``revoke``), or else the gateway's own sweep
(:mod:`enclave_gateway.revocations`).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Final

import structlog
from enclave_common.auth import (
    Action,
    Grant,
    GrantKind,
    GrantQuery,
    InvalidGrantError,
    Principal,
    Resource,
)
from enclave_common.auth.fastapi import AccessGuard, Authorized
from enclave_common.auth.grants import GrantStore
from enclave_common.crypto import Pseudonymizer
from enclave_common.errors import EnclaveError
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from enclave_gateway.access import AccessRecorder, Unaudited, page_of
from enclave_gateway.auth_first import AuthenticatedBodyRoute, AuthenticatedFirst
from enclave_gateway.revocations import late_revocation_detail

log = structlog.get_logger("enclave.gateway")

#: ``revoked_by`` of a grant or session withdrawn because its access event or alert was not published.
WITHDRAWN_BY: Final = "enclave-gateway:unaudited"

#: A PatientID in a request body, as uploads key it: without the spaces DICOM pads values with (until
#: the twenty-second session a grant on " PID-1 " was keyed apart from PID-1's uploads).
PatientId = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=64),
    Field(description="PatientID (0010,0020), at most 64 characters; stored only as its pseudonym"),
]

#: A token subject named in a request body (a grant's grantee, a token revocation's subject): 1 to 255
#: printable ASCII characters without spaces, as OIDC subjects are. It is written into the audit
#: trail's detail, so a newline or a space could forge what follows it there.
SUBJECT_PATTERN: Final = r"^[\x21-\x7e]{1,255}$"
#: A patient key: the 32-character lowercase base32 pseudonym the gateway answers with.
PATIENT_KEY_PATTERN: Final = r"^[a-z2-7]{32}$"
#: A page of the grants listing holds at most this many (and this many by default).
GRANTS_PAGE_MAX: Final = 1000


class GrantState(StrEnum):
    ALL = "all"
    ACTIVE = "active"


GRANT_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


class GrantRequest(BaseModel):
    """An admin's grant for a caregiver on one patient of the admin's tenant."""

    model_config = ConfigDict(extra="forbid")

    grantee: str = Field(
        pattern=SUBJECT_PATTERN,
        description="the caregiver's token subject (sub): 1 to 255 printable ASCII characters, no spaces",
    )
    patient_id: PatientId
    actions: list[Action] = Field(
        min_length=1, description="subset of read_status, read_results_phi, query_patient"
    )
    not_before: datetime | None = Field(default=None, description="default: now (timezone required)")
    expires_at: datetime = Field(description="end of the window, timezone required, at most 366 days long")
    justification: str = Field(description="10 to 500 characters: the reason, never the patient")


class BreakGlassRequest(BaseModel):
    """A clinician's emergency access to one patient of its own tenant."""

    model_config = ConfigDict(extra="forbid")

    patient_id: PatientId
    justification: str = Field(description="10 to 500 characters: the reason, never the patient")
    duration_minutes: int | None = Field(default=None, ge=1, le=240, description="default 60, at most 240")


def grant_view(grant: Grant) -> dict[str, Any]:
    """A grant as returned to admins: the patient only as its pseudonym; no justification echo."""

    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "grant_id": grant.grant_id,
        "kind": grant.kind.value,
        "grantee": grant.grantee,
        "tenant": grant.tenant,
        "patient_key": grant.patient_key,
        "actions": sorted(a.value for a in grant.actions),
        "not_before": iso(grant.not_before),
        "expires_at": iso(grant.expires_at),
        "created_by": grant.created_by,
        "created_at": iso(grant.created_at),
        "revoked_at": iso(grant.revoked_at),
        "revoked_by": grant.revoked_by,
        # Only of a revoked grant: False while its revocation is not in the audit trail yet.
        **({"revocation_recorded": grant.revocation_recorded} if grant.revoked_at is not None else {}),
    }


#: The 503 of a revocation whose event Kafka refused (then "; retry later"): it is not undone (a
#: revoked grant back in effect would be worse than a revocation recorded late).
REVOCATION_UNRECORDED = (
    "the grant is revoked and no longer in effect, but its revocation could not be recorded in the audit "
    "trail: repeat this DELETE to record it"
)


def as_stored(moment: datetime) -> datetime:
    """``moment`` to the millisecond, as the database keeps it, so an answer and a later one say the
    same time (a restriction's, a lifting's, a token revocation's)."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def invalid_answer(exc: EnclaveError) -> JSONResponse:
    """The 422 of a grant, session or restriction its validation refused: the code and what is allowed."""
    return JSONResponse({"status": 422, "error": exc.code, "message": str(exc)}, status_code=422)


def build_grants_router(
    *, guard: AccessGuard, grants: GrantStore, recorder: AccessRecorder, pseudonymizer: Pseudonymizer
) -> APIRouter:
    router = APIRouter(tags=["access"], route_class=AuthenticatedBodyRoute)
    policy = guard.policy

    record = recorder.record_change

    async def withdraw(
        request: Request, principal: Principal, action: Action, grant: Grant, cause: str
    ) -> None:
        """Revoke ``grant``, just stored, whose access event or alert Kafka did not take (``cause``:
        ``access_unrecorded``, ``alert_unraised``), and record the 503 the request is answered if
        Kafka takes that event: ``<kind>_withdrawn:<id>``, or ``<kind>_not_withdrawn:<id>`` when the
        grant store did not answer the revocation either (the grant stays; logged as critical)."""
        kind = "break_glass" if grant.kind is GrantKind.BREAK_GLASS else "grant"
        try:
            # False only if it is revoked already (an admin was faster): not in effect either way,
            # and that revocation is recorded by its own DELETE, not marked here.
            withdrew = await grants.revoke(
                grant.grant_id, tenant=grant.tenant, revoked_by=WITHDRAWN_BY, now=datetime.now(UTC)
            )
            state = "withdrawn"
        except Exception as exc:
            log.critical(
                "an unaudited grant could not be withdrawn; revoke it (DELETE /api/v1/grants/{grant_id})",
                grant_id=grant.grant_id,
                kind=grant.kind.value,
                tenant=grant.tenant,
                cause=cause,
                error=type(exc).__name__,
            )
            withdrew = False
            state = "not_withdrawn"
        withdrawal_recorded = await recorder.record_change_if_possible(
            request,
            principal,
            action,
            503,
            grant.patient_key,
            f"{kind}_{state}:{grant.grant_id} cause={cause}",
        )
        if withdrawal_recorded and withdrew:
            await mark_recorded(grant)

    @router.post(
        "/api/v1/grants",
        status_code=201,
        summary="Create a patient-scoped, time-bound grant for a caregiver (admin)",
        responses={
            201: {"description": "created"},
            403: {"description": "not an admin"},
            422: {"description": "invalid"},
        },
    )
    async def create_grant(
        body: GrantRequest,
        request: Request,
        principal: Principal = Depends(AuthenticatedFirst(guard, Action.MANAGE_GRANTS)),
    ) -> JSONResponse:
        key = pseudonymizer.pseudonym(principal.tenant, "patient", body.patient_id)
        async with recorder.change_failure_recorded(request, principal, Action.MANAGE_GRANTS, key):
            return await create(request, principal, body, key)

    async def create(request: Request, principal: Principal, body: GrantRequest, key: str) -> JSONResponse:
        await guard.check_resource(request, principal, Action.MANAGE_GRANTS, Resource(principal.tenant, key))
        now = datetime.now(UTC)
        try:
            grant = policy.new_patient_grant(
                principal,
                grantee=body.grantee,
                patient_key=key,
                actions=body.actions,
                not_before=body.not_before or now,
                expires_at=body.expires_at,
                justification=body.justification,
                now=now,
            )
        except InvalidGrantError as exc:
            await record(request, principal, Action.MANAGE_GRANTS, 422, key, f"grant_refused:{exc.code}")
            return invalid_answer(exc)
        await grants.create(grant)
        actions = ",".join(sorted(a.value for a in grant.actions))
        try:
            await record(
                request,
                principal,
                Action.MANAGE_GRANTS,
                201,
                key,
                f"grant_created:{grant.grant_id} grantee={grant.grantee} actions={actions}"
                f" until={grant.expires_at.isoformat()}",
            )
        except Unaudited:
            await withdraw(request, principal, Action.MANAGE_GRANTS, grant, "access_unrecorded")
            raise
        return JSONResponse(grant_view(grant), status_code=201)

    async def own_grant(
        request: Request, principal: Principal, grant_id: str, action: Action
    ) -> tuple[Grant, Authorized]:
        grant = await grants.get(grant_id, tenant=principal.tenant)
        resource = Resource(grant.tenant, grant.patient_key) if grant is not None else None
        authorized = await guard.check_resource(request, principal, action, resource)  # None -> 404
        assert grant is not None
        return grant, authorized

    @router.get(
        "/api/v1/grants",
        summary="The grants and break-glass sessions of the admin's tenant, oldest first (admin)",
        response_model=dict[str, Any],
    )
    async def list_grants(
        request: Request,
        principal: Principal = Depends(AuthenticatedFirst(guard, Action.READ_GRANTS)),
        kind: GrantKind | None = Query(None, description="only grants (patient) or break-glass sessions"),
        grantee: str | None = Query(
            None,
            pattern=SUBJECT_PATTERN,
            description="only those of this sub (1 to 255 printable ASCII characters, no spaces, as a grantee)",
        ),
        patient_key: str | None = Query(
            None, pattern=PATIENT_KEY_PATTERN, description="only those on this patient (its pseudonym)"
        ),
        state: GrantState = Query(GrantState.ALL, description="`active`: only those in effect now"),
        limit: int = Query(
            GRANTS_PAGE_MAX, ge=1, le=GRANTS_PAGE_MAX, description=f"at most {GRANTS_PAGE_MAX} per page"
        ),
        after: str | None = Query(
            None, pattern=GRANT_ID_PATTERN, description="the previous page's `next_after`"
        ),
    ) -> JSONResponse:
        authorized = await guard.check_resource(
            request, principal, Action.READ_GRANTS, Resource(principal.tenant, patient_key)
        )
        query = GrantQuery(
            kind=kind,
            grantee=grantee,
            patient_key=patient_key,
            active_at=datetime.now(UTC) if state is GrantState.ACTIVE else None,
        )

        async def page_of_grants() -> JSONResponse:
            found = await grants.list(principal.tenant, query, limit=limit + 1, after=after)
            page, next_after = page_of(found, limit, lambda g: g.grant_id)
            return JSONResponse({"grants": [grant_view(g) for g in page], "next_after": next_after})

        return await recorder.disclosed(request, authorized, Action.READ_GRANTS, page_of_grants())

    @router.get(
        "/api/v1/grants/{grant_id}", summary="One grant or break-glass session of the admin's tenant (admin)"
    )
    async def get_grant(
        request: Request,
        grant_id: str = Path(pattern=GRANT_ID_PATTERN),
        principal: Principal = Depends(AuthenticatedFirst(guard, Action.READ_GRANTS)),
    ) -> JSONResponse:
        # Its own action (read_grants), so the audit trail files the read as a read, not as the
        # grant change that manage_grants is. Recorded once the answer is built, as every read is.
        grant, authorized = await own_grant(request, principal, grant_id, Action.READ_GRANTS)
        answer = JSONResponse(grant_view(grant))
        await recorder.disclose(request, authorized, Action.READ_GRANTS)
        return answer

    @router.delete(
        "/api/v1/grants/{grant_id}",
        summary="Revoke a grant or break-glass session now (admin)",
        responses={
            404: {"description": "no such grant in your tenant"},
            409: {"description": "already revoked"},
        },
    )
    async def revoke_grant(
        request: Request,
        grant_id: str = Path(pattern=GRANT_ID_PATTERN),
        principal: Principal = Depends(AuthenticatedFirst(guard, Action.MANAGE_GRANTS)),
    ) -> JSONResponse:
        grant, _ = await own_grant(request, principal, grant_id, Action.MANAGE_GRANTS)
        async with recorder.change_failure_recorded(
            request, principal, Action.MANAGE_GRANTS, grant.patient_key
        ):
            return await revoke(request, principal, grant)

    async def mark_recorded(grant: Grant) -> None:
        """Note a revocation as recorded. If the store does not answer, the answer stands (the event is
        in the trail); the grant's next DELETE records the revocation once more."""
        try:
            await grants.mark_revocation_recorded(grant.grant_id, tenant=grant.tenant)
        except Exception as exc:
            log.warning(
                "a recorded revocation could not be noted as recorded; the grant's next DELETE records it "
                "again",
                grant_id=grant.grant_id,
                error=type(exc).__name__,
            )

    async def revoke(request: Request, principal: Principal, grant: Grant) -> JSONResponse:
        grant_id = grant.grant_id
        now = datetime.now(UTC)
        if not await grants.revoke(grant_id, tenant=principal.tenant, revoked_by=principal.subject, now=now):
            if grant.revoked_at is not None and not grant.revocation_recorded:
                # In effect but not in the audit trail (Kafka refused its event, and that DELETE
                # answered 503): recorded now, naming who revoked it and when, and answered as that
                # DELETE would have been (200; a DELETE is idempotent). Until the twenty-first session
                # this answered 409 and the trail never said who revoked the grant.
                return await record_revocation(request, principal, grant, late_revocation_detail(grant))
            await record(
                request,
                principal,
                Action.MANAGE_GRANTS,
                409,
                grant.patient_key,
                f"grant_already_revoked:{grant_id}",
            )
            return JSONResponse(
                {"status": 409, "error": "already_revoked", "message": "this grant was already revoked"},
                status_code=409,
            )
        revoked = await grants.get(grant_id, tenant=principal.tenant)  # before the event: it may fail
        assert revoked is not None
        return await record_revocation(request, principal, revoked, f"grant_revoked:{grant_id}")

    async def record_revocation(
        request: Request, principal: Principal, revoked: Grant, detail: str
    ) -> JSONResponse:
        """Record ``revoked``'s revocation (200), note it recorded, and answer with the grant. If Kafka
        refuses the event, the 503 says the grant stays revoked and how to record it."""
        await record(
            request,
            principal,
            Action.MANAGE_GRANTS,
            200,
            revoked.patient_key,
            detail,
            unaudited=REVOCATION_UNRECORDED,
        )
        await mark_recorded(revoked)
        return JSONResponse(grant_view(replace(revoked, revocation_recorded=True)))

    @router.post(
        "/api/v1/break-glass",
        status_code=201,
        summary="Open a break-glass session on one patient (clinician; raises a security alert)",
        responses={
            201: {"description": "opened"},
            403: {"description": "not a clinician"},
            422: {"description": "invalid"},
        },
    )
    async def open_break_glass(
        body: BreakGlassRequest,
        request: Request,
        principal: Principal = Depends(AuthenticatedFirst(guard, Action.BREAK_GLASS)),
    ) -> JSONResponse:
        key = pseudonymizer.pseudonym(principal.tenant, "patient", body.patient_id)
        async with recorder.change_failure_recorded(request, principal, Action.BREAK_GLASS, key):
            return await open_session(request, principal, body, key)

    async def open_session(
        request: Request, principal: Principal, body: BreakGlassRequest, key: str
    ) -> JSONResponse:
        await guard.check_resource(request, principal, Action.BREAK_GLASS, Resource(principal.tenant, key))
        now = datetime.now(UTC)
        duration = timedelta(minutes=body.duration_minutes) if body.duration_minutes is not None else None
        try:
            session = policy.open_break_glass(
                principal, patient_key=key, justification=body.justification, now=now, duration=duration
            )
        except InvalidGrantError as exc:
            await record(request, principal, Action.BREAK_GLASS, 422, key, f"break_glass_refused:{exc.code}")
            return invalid_answer(exc)
        await grants.create(session)
        # The access event first: a session is never open with an alert and no record of it. Until
        # the review of the nineteenth session the alert came first, and a refused alert left the
        # session open with neither.
        try:
            await record(
                request,
                principal,
                Action.BREAK_GLASS,
                201,
                key,
                f"break_glass_opened:{session.grant_id} until={session.expires_at.isoformat()}",
            )
        except Unaudited:
            await withdraw(request, principal, Action.BREAK_GLASS, session, "access_unrecorded")
            raise
        try:
            await recorder.alert(
                request,
                principal,
                rule="break_glass_opened",
                detail=f"break-glass session {session.grant_id} opened on patient {key}"
                f" until {session.expires_at.isoformat()}",
            )
        except Unaudited:
            await withdraw(request, principal, Action.BREAK_GLASS, session, "alert_unraised")
            raise
        return JSONResponse(grant_view(session), status_code=201)

    return router
