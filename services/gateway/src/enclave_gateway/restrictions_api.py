"""Routes for restricted patients (admins): the hospital's confidentiality flag on one patient.

A restricted patient's PHI (``GET /api/v1/imaging/{id}/analysis``, the patient query) needs an open
break-glass session even for the tenant's clinicians, and every read under it raises a
``security.alert`` (:mod:`enclave_common.auth.restrictions`). The patient is named by ``patient_id``
in the request body and kept only as its tenant-scoped pseudonym; no response, event or log carries
the patient id. Every request is one ``access.recorded`` event (action ``manage_restrictions``, or
``read_restrictions`` for the listing) with the answer it got, as for grants.

A change takes effect only once its access event is acknowledged: the restriction is stored, or
removed, after its record, so the audit trail never lacks a change that is in effect, and a read is
never allowed on a lifting that is still being recorded (until the review of the twenty-second
session a restriction was stored first and a lifting applied first). If Kafka refuses the event,
nothing changed and the answer (503) says so. If the store then fails, the answer is 503 and a second
event of the request says the change was not made (``restriction_not_stored``,
``restriction_not_lifted``): the patient keeps the state it had. Restricting a patient names, in its
answer, the grants and break-glass sessions in effect on that patient: they still allow what they
name, and the admin may revoke them. A restriction is lifted only by an admin whose own reads it does
not hold back (separation of duties: an admin who is also a clinician would lift its own limit).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from enclave_common.auth import (
    Action,
    GrantQuery,
    InvalidRestrictionError,
    Principal,
    Resource,
    Restriction,
)
from enclave_common.auth.fastapi import AccessGuard
from enclave_common.auth.grants import GrantStore
from enclave_common.auth.policy import check_justification
from enclave_common.auth.restrictions import RestrictionStore
from enclave_common.crypto import Pseudonymizer
from enclave_common.service import failure_answer
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from enclave_gateway.access import AccessRecorder, Unaudited, page_of
from enclave_gateway.auth_first import AuthenticatedBodyRoute, AuthenticatedFirst
from enclave_gateway.grants_api import (
    GRANTS_PAGE_MAX,
    PATIENT_KEY_PATTERN,
    PatientId,
    as_stored,
    grant_view,
    invalid_answer,
)

#: A page of the listing holds at most this many restrictions (and this many by default).
RESTRICTIONS_PAGE_MAX: Final = 1000

#: The 503 of a restriction whose event Kafka refused (then "; retry later").
RESTRICTION_UNRECORDED: Final = (
    "the patient is not restricted: the restriction could not be recorded in the audit trail"
)
#: The 503 of a lifting whose event Kafka refused (then "; retry later").
LIFT_UNRECORDED: Final = (
    "the restriction stays in effect: its lifting could not be recorded in the audit trail"
)


class LiftRequest(BaseModel):
    """An admin's lifting of a restriction: why (kept with the restriction's history, never in events)."""

    model_config = ConfigDict(extra="forbid")

    justification: str = Field(
        description="10 to 500 characters: why the restriction ends, never the patient"
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
    grants: GrantStore,
    recorder: AccessRecorder,
    pseudonymizer: Pseudonymizer,
) -> APIRouter:
    router = APIRouter(tags=["access"], route_class=AuthenticatedBodyRoute)
    manage = Action.MANAGE_RESTRICTIONS
    record = recorder.record_change

    async def second_event(
        request: Request, principal: Principal, key: str, status: int, detail: str
    ) -> None:
        """A second event of a request whose change was recorded and then not made as recorded (or not
        known to be): it says what happened, with the answer the request gets."""
        await recorder.record_change_if_possible(request, principal, manage, status, key, detail)

    async def justified(
        request: Request, principal: Principal, key: str, text: str, refused: str
    ) -> str | JSONResponse:
        """``text`` as a justification, or the 422 that refuses it, recorded as ``<refused>:<code>``."""
        try:
            return check_justification(text, InvalidRestrictionError)
        except InvalidRestrictionError as exc:
            await record(request, principal, manage, 422, key, f"{refused}:{exc.code}")
            return invalid_answer(exc)

    async def state_after(tenant: str, key: str) -> Restriction | str | None:
        """The patient's restriction after a write that failed (it may still have been applied), or
        ``"unknown"`` when the store does not answer that either."""
        try:
            return await restrictions.get(tenant, key)
        except Exception:
            return "unknown"

    @router.post(
        "/api/v1/restrictions",
        status_code=201,
        summary="Restrict a patient: its PHI then needs break-glass, even for clinicians (admin)",
        responses={
            200: {"description": "the patient was restricted already (this request is recorded too)"},
            201: {"description": "restricted; `active_grants` lists the grants and sessions still in effect"},
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
        async with recorder.change_failure_recorded(request, principal, manage, key):
            return await set_restriction(request, principal, body, key)

    async def set_restriction(
        request: Request, principal: Principal, body: RestrictionRequest, key: str
    ) -> JSONResponse:
        await guard.check_resource(request, principal, manage, Resource(principal.tenant, key))
        justification = await justified(request, principal, key, body.justification, "restriction_refused")
        if isinstance(justification, JSONResponse):
            return justification
        existing = await restrictions.get(principal.tenant, key)
        confirmed = await restrictions.confirm(existing) if existing is not None else None
        if confirmed is not None:
            # Its revision is raised first: a lifting being recorded meanwhile then removes nothing.
            await record(
                request, principal, manage, 200, key, f"patient_restricted_already {_in_effect(confirmed)}"
            )
            return JSONResponse(restriction_view(confirmed))
        now = as_stored(datetime.now(UTC))
        new = Restriction(
            tenant=principal.tenant,
            patient_key=key,
            justification=justification,
            restricted_by=principal.subject,
            restricted_at=now,
        )
        # What stays allowed: an admin's grant or an open session is not ended by a restriction; those
        # in effect now or later are named, for the admin to revoke.
        staying = await grants.list(
            principal.tenant, GrantQuery(patient_key=key, unexpired_at=now), limit=GRANTS_PAGE_MAX + 1
        )
        more = len(staying) > GRANTS_PAGE_MAX
        staying = staying[:GRANTS_PAGE_MAX]
        made = f"restricted_at={now.isoformat()}"
        try:
            await record(
                request,
                principal,
                manage,
                201,
                key,
                f"patient_restricted {made} active_grants={len(staying)}{'+' if more else ''}",
                RESTRICTION_UNRECORDED,
            )
        except Unaudited:
            # Refused, yet Kafka may still deliver it: a second event says nothing was made.
            await second_event(
                request, principal, key, 503, f"restriction_not_stored {made} cause=access_unrecorded"
            )
            raise
        try:
            other = await restrictions.restrict(new)
        except Exception as exc:
            state = await state_after(principal.tenant, key)
            if not (isinstance(state, Restriction) and state.restricted_at == now):
                status, code = failure_answer(exc)
                what = "restriction_state_unknown" if state == "unknown" else "restriction_not_stored"
                await second_event(request, principal, key, status, f"{what} {made} cause={code}")
                raise
            other = None  # stored although the store's answer was lost
        if other is not None:
            # Another admin's restriction, made at the same moment: in effect, and this one not made.
            await second_event(
                request,
                principal,
                key,
                200,
                f"restriction_not_stored {made} cause=restricted_already {_in_effect(other)}",
            )
            return JSONResponse(restriction_view(other))
        return JSONResponse(
            {
                **restriction_view(new),
                "active_grants": [grant_view(g) for g in staying],
                "active_grants_truncated": more,
            },
            status_code=201,
        )

    @router.post(
        "/api/v1/restrictions/{patient_key}/lift",
        summary="Lift a patient's restriction, saying why (admin)",
        responses={
            403: {
                "description": "not an admin, or an admin whose own reads the restriction holds back "
                "(`separation_of_duties`: also a clinician); another admin must lift it"
            },
            404: {"description": "no restriction on this patient_key in your tenant"},
            409: {"description": "restricted again while this lifting was recorded: it stays restricted"},
            422: {"description": "invalid"},
        },
    )
    async def lift(
        body: LiftRequest,
        request: Request,
        patient_key: str = Path(pattern=PATIENT_KEY_PATTERN, description="the restriction's patient_key"),
        principal: Principal = Depends(AuthenticatedFirst(guard, manage)),
    ) -> JSONResponse:
        async with recorder.change_failure_recorded(request, principal, manage, patient_key):
            return await lift_restriction(request, principal, patient_key, body)

    async def lift_restriction(
        request: Request, principal: Principal, key: str, body: LiftRequest
    ) -> JSONResponse:
        existing = await restrictions.get(principal.tenant, key)
        # No restriction (also a key of another tenant: it names nothing here): the app's one 404,
        # recorded by the guard as any absent resource is.
        resource = Resource(principal.tenant, key) if existing is not None else None
        await guard.check_resource(request, principal, manage, resource)
        assert existing is not None and resource is not None
        if (refusal := guard.policy.check_lift(principal)) is not None:
            await guard.refuse(request, principal, refusal, resource)
        justification = await justified(request, principal, key, body.justification, "lift_refused")
        if isinstance(justification, JSONResponse):
            return justification
        lifting = f"restriction_lifted {_in_effect(existing)}"
        try:
            await record(request, principal, manage, 200, key, lifting, LIFT_UNRECORDED)
        except Unaudited:
            await second_event(
                request,
                principal,
                key,
                503,
                f"restriction_not_lifted {_in_effect(existing)} cause=access_unrecorded",
            )
            raise
        lifted_at = as_stored(datetime.now(UTC))
        state: Restriction | str | None = None
        try:
            lifted = await restrictions.lift(
                existing, lifted_by=principal.subject, lifted_at=lifted_at, justification=justification
            )
            if lifted is None:
                # Not removed as it was read: lifted by another request (fine), or restricted again.
                state = await restrictions.get(principal.tenant, key)
        except Exception as exc:
            state = await state_after(principal.tenant, key)
            if state is not None:  # still restricted, or not known: the answer (503) and an event say so
                status, code = failure_answer(exc)
                what = "restriction_state_unknown" if state == "unknown" else "restriction_not_lifted"
                await second_event(
                    request, principal, key, status, f"{what} {_in_effect(existing)} cause={code}"
                )
                raise
            # None: removed, although the store's answer was lost.
        if isinstance(state, Restriction):
            # Restricted again, or confirmed to an admin, while this lifting was recorded: it stays.
            await second_event(
                request,
                principal,
                key,
                409,
                f"restriction_not_lifted {_in_effect(existing)} cause=restricted_again {_in_effect(state)}",
            )
            return JSONResponse(
                {
                    "status": 409,
                    "error": "restricted_again",
                    "message": "the patient was restricted again, or its restriction confirmed by another "
                    "request, while this lifting was recorded: it stays restricted (GET /api/v1/restrictions)",
                },
                status_code=409,
            )
        return JSONResponse(
            {
                **restriction_view(existing),
                "restricted": False,
                "lifted_by": principal.subject,
                "lifted_at": lifted_at.isoformat(),
            }
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

        async def page_of_restrictions() -> JSONResponse:
            found = await restrictions.list(principal.tenant, limit=limit + 1, after=after)
            page, next_after = page_of(found, limit, lambda r: r.patient_key)
            return JSONResponse(
                {"restrictions": [restriction_view(r) for r in page], "next_after": next_after}
            )

        return await recorder.disclosed(request, authorized, Action.READ_RESTRICTIONS, page_of_restrictions())

    return router
