"""Routes for restricted patients (admins): the hospital's confidentiality flag on one patient.

A restricted patient's PHI (``GET /api/v1/imaging/{id}/analysis``, the patient query) needs an open
break-glass session even for the tenant's clinicians, and every read under it raises a
``security.alert`` (:mod:`enclave_common.auth.restrictions`). The patient is named by ``patient_id``
in the request body and kept only as its tenant-scoped pseudonym; no response, event or log carries
the patient id. Every request is one ``access.recorded`` event (action ``manage_restrictions``, or
``read_restrictions`` for the listing) with the answer it got, as for grants.

Restricting is protective, so it is never undone: if Kafka refuses its event the restriction stays in
effect, the answer is 503 and says so, and the repeated request (answered 200: the patient is
restricted already) records who restricted the patient and when. Lifting widens access, so it takes
effect only with its record: if Kafka refuses the event, the restriction is put back and the answer
is 503.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import structlog
from enclave_common.auth import Action, InvalidRestrictionError, Principal, Resource, Restriction
from enclave_common.auth.fastapi import AccessGuard
from enclave_common.auth.policy import NOT_FOUND_MESSAGE, check_justification
from enclave_common.auth.restrictions import RestrictionStore
from enclave_common.crypto import Pseudonymizer
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from enclave_gateway.access import AccessRecorder, Unaudited, access_target
from enclave_gateway.auth_first import AuthenticatedBodyRoute, AuthenticatedFirst
from enclave_gateway.grants_api import PATIENT_KEY_PATTERN, PatientId

log = structlog.get_logger("enclave.gateway")

#: A page of the listing holds at most this many restrictions (and this many by default).
RESTRICTIONS_PAGE_MAX: Final = 1000

#: The 503 of a restriction whose event Kafka refused (then "; retry later").
RESTRICTION_UNRECORDED: Final = (
    "the patient is restricted (in effect now), but the restriction could not be recorded in the audit "
    "trail: repeat this request to record it"
)
#: The 503 of a lifting whose event Kafka refused (then "; retry later").
LIFT_UNRECORDED: Final = (
    "the restriction stays in effect: its lifting could not be recorded in the audit trail"
)


class RestrictionRequest(BaseModel):
    """An admin's restriction of one patient of the admin's tenant."""

    model_config = ConfigDict(extra="forbid")

    patient_id: PatientId
    justification: str = Field(description="10 to 500 characters: the reason, never the patient")


def restriction_view(restriction: Restriction) -> dict[str, Any]:
    """A restriction as returned to admins: the patient only as its pseudonym; no justification echo
    (it is stored, and its request recorded)."""
    return {
        "patient_key": restriction.patient_key,
        "tenant": restriction.tenant,
        "restricted": True,
        "restricted_by": restriction.restricted_by,
        "restricted_at": restriction.restricted_at.isoformat(),
    }


def _in_effect(restriction: Restriction) -> str:
    return f"restricted_by={restriction.restricted_by} restricted_at={restriction.restricted_at.isoformat()}"


def build_restrictions_router(
    *,
    guard: AccessGuard,
    restrictions: RestrictionStore,
    recorder: AccessRecorder,
    pseudonymizer: Pseudonymizer,
) -> APIRouter:
    router = APIRouter(tags=["access"], route_class=AuthenticatedBodyRoute)
    manage = Action.MANAGE_RESTRICTIONS
    record = recorder.record_change

    @router.post(
        "/api/v1/restrictions",
        status_code=201,
        summary="Restrict a patient: its PHI then needs break-glass, even for clinicians (admin)",
        responses={
            200: {"description": "the patient was restricted already (this request is recorded too)"},
            201: {"description": "restricted"},
            403: {"description": "not an admin"},
            422: {"description": "invalid"},
        },
    )
    async def restrict(
        body: RestrictionRequest,
        request: Request,
        principal: Principal = Depends(AuthenticatedFirst(guard, manage)),
    ) -> JSONResponse:
        key = pseudonymizer.pseudonym(principal.tenant, "patient", body.patient_id)
        try:
            return await set_restriction(request, principal, body, key)
        except Exception as exc:
            await recorder.record_change_failure(request, principal, manage, key, exc)
            raise

    async def set_restriction(
        request: Request, principal: Principal, body: RestrictionRequest, key: str
    ) -> JSONResponse:
        await guard.check_resource(request, principal, manage, Resource(principal.tenant, key))
        try:
            justification = check_justification(body.justification, InvalidRestrictionError)
        except InvalidRestrictionError as exc:
            await record(request, principal, manage, 422, key, f"restriction_refused:{exc.code}")
            return JSONResponse({"status": 422, "error": exc.code, "message": str(exc)}, status_code=422)
        now = datetime.now(UTC)
        new = Restriction(
            tenant=principal.tenant,
            patient_key=key,
            justification=justification,
            restricted_by=principal.subject,
            # In milliseconds, as the database keeps it: the 201 and every later answer say the same.
            restricted_at=now.replace(microsecond=now.microsecond // 1000 * 1000),
        )
        existing = await restrictions.restrict(new)
        if existing is None:
            await record(request, principal, manage, 201, key, "patient_restricted", RESTRICTION_UNRECORDED)
            return JSONResponse(restriction_view(new), status_code=201)
        # Restricted already: recorded with who restricted the patient and when, so a restriction whose
        # own record Kafka refused (answered 503) is in the trail once its request is repeated.
        await record(
            request,
            principal,
            manage,
            200,
            key,
            f"patient_restricted_already {_in_effect(existing)}",
            RESTRICTION_UNRECORDED,
        )
        return JSONResponse(restriction_view(existing))

    @router.delete(
        "/api/v1/restrictions/{patient_key}",
        summary="Lift a patient's restriction (admin)",
        responses={404: {"description": "no restriction on this patient_key in your tenant"}},
    )
    async def lift(
        request: Request,
        patient_key: str = Path(pattern=PATIENT_KEY_PATTERN, description="the restriction's patient_key"),
        principal: Principal = Depends(AuthenticatedFirst(guard, manage)),
    ) -> JSONResponse:
        try:
            return await lift_restriction(request, principal, patient_key)
        except Exception as exc:
            await recorder.record_change_failure(request, principal, manage, patient_key, exc)
            raise

    async def lift_restriction(request: Request, principal: Principal, key: str) -> JSONResponse:
        await guard.check_resource(request, principal, manage, Resource(principal.tenant, key))
        lifted = await restrictions.lift(principal.tenant, key)
        if lifted is None:
            # The app's one 404 (no such resource), also for a patient key of another tenant: it names
            # nothing here. The record says why.
            await record(request, principal, manage, 404, key, "not_restricted")
            raise HTTPException(404, detail={"code": "not_found", "message": NOT_FOUND_MESSAGE})
        try:
            await record(
                request,
                principal,
                manage,
                200,
                key,
                f"restriction_lifted {_in_effect(lifted)}",
                LIFT_UNRECORDED,
            )
        except Unaudited:
            await put_back(request, principal, lifted)
            raise
        return JSONResponse(
            {
                **restriction_view(lifted),
                "restricted": False,
                "lifted_by": principal.subject,
                "lifted_at": datetime.now(UTC).isoformat(),
            }
        )

    async def put_back(request: Request, principal: Principal, lifted: Restriction) -> None:
        """Restore ``lifted``, whose lifting Kafka did not record, and record the 503 the request is
        answered if Kafka takes that event: ``restriction_restored``, or ``restriction_not_restored``
        when the store did not answer either (the patient stays unrestricted; logged as critical)."""
        try:
            await restrictions.restrict(lifted)  # a restriction made in between is kept as it is
            state = "restored"
        except Exception as exc:
            log.critical(
                "a restriction whose lifting was not recorded could not be restored; restrict the patient "
                "again (POST /api/v1/restrictions)",
                patient_key=lifted.patient_key,
                tenant=lifted.tenant,
                error=type(exc).__name__,
            )
            state = "not_restored"
        await recorder.record_if_possible(
            request,
            principal=principal,
            action=str(manage),
            outcome="error",
            status=503,
            target=access_target(lifted.patient_key),
            detail=f"restriction_{state} cause=access_unrecorded",
        )

    @router.get(
        "/api/v1/restrictions",
        summary="The restricted patients of your tenant (admin)",
        response_model=dict[str, Any],
    )
    async def list_restrictions(
        request: Request,
        principal: Principal = Depends(AuthenticatedFirst(guard, Action.READ_RESTRICTIONS)),
        limit: int = Query(
            RESTRICTIONS_PAGE_MAX,
            ge=1,
            le=RESTRICTIONS_PAGE_MAX,
            description=f"restrictions per page (at most {RESTRICTIONS_PAGE_MAX})",
        ),
        after: str | None = Query(
            None,
            pattern=PATIENT_KEY_PATTERN,
            description="the previous page's `next_after`: the page starts after this patient_key",
        ),
    ) -> JSONResponse:
        authorized = await guard.check_resource(
            request, principal, Action.READ_RESTRICTIONS, Resource(principal.tenant)
        )
        try:
            found = await restrictions.list(principal.tenant, limit=limit + 1, after=after)
            page = found[:limit]
            answer = JSONResponse(
                jsonable_encoder(
                    {
                        "restrictions": [restriction_view(r) for r in page],
                        "next_after": page[-1].patient_key if len(found) > limit else None,
                    }
                )
            )
        except Exception as exc:
            await recorder.record_unanswered(request, authorized, Action.READ_RESTRICTIONS, exc)
            raise
        await recorder.disclose(request, authorized, Action.READ_RESTRICTIONS)
        return answer

    return router
