"""HTTP routes: DICOMweb STOW-RS, the upload API, status and results from the read model."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import partial
from typing import Annotated, Any

import structlog
from enclave_common.auth import Action, Principal, RateLimiter, Resource
from enclave_common.auth.fastapi import AccessGuard, Authorized
from enclave_common.crypto import Pseudonymizer
from enclave_common.errors import TransientError
from enclave_common.events import answered_outcome
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.requests import ClientDisconnect

from enclave_gateway.access import AccessRecorder, Unaudited, access_recorded, page_of, unrecorded_failure
from enclave_gateway.admission import TooManyUploads
from enclave_gateway.auth_first import AuthenticatedBodyRoute, AuthenticatedFirst
from enclave_gateway.grants_api import PatientId
from enclave_gateway.handoff import KafkaUnavailable, SpoolUnavailable
from enclave_gateway.metrics import GatewayMetrics
from enclave_gateway.multipart import RequestBodyError, UnsupportedMediaTypeError
from enclave_gateway.readmodel import RANK, ReadModel, analysis_id_of, latest_analysis_of, status_of
from enclave_gateway.stow import (
    STOW_RESPONSE_TYPES,
    FailedInstance,
    StoredInstance,
    build_stow_response,
    negotiate,
    request_error_body,
    stow_status,
)
from enclave_gateway.uploads import ClientClosedRequest, UploadNotRecorded, UploadProcessor, UploadResult
from enclave_gateway.validation import uid_is_valid

log = structlog.get_logger("enclave.gateway")

UPLOAD_FORM_FIELDS = frozenset({"file", "files", "files[]", "file[]"})


class AccessUnrecorded(TransientError):
    """An upload whose instances were all handed off (ingest stores them) and whose access event
    Kafka then did not take: answered 503 with its own code, since unlike ``kafka_unavailable``
    something was accepted downstream, and a resend is what completes the record."""

    code = "access_unrecorded"


#: An access event of a request the server cancelled (its graceful-shutdown timeout) claims the 500
#: the gateway then answers (``request_cancelled``, :class:`~enclave_gateway.access.RequestIdHeader`).
CANCELLED_STATUS = 500


def _unavailable(exc: TransientError) -> JSONResponse:
    return JSONResponse(
        {"status": 503, "error": exc.code, "message": str(exc)},
        status_code=503,
        headers={"Retry-After": "10"},
    )


def build_router(
    *,
    guard: AccessGuard,
    uploads: UploadProcessor,
    read_model: ReadModel,
    recorder: AccessRecorder,
    pseudonymizer: Pseudonymizer,
    public_base_url: str,
    metrics: GatewayMetrics,
    patient_key_limiter: RateLimiter | None = None,
) -> APIRouter:
    router = APIRouter()

    async def refused(
        request: Request, principal: Principal, exc: TransientError, result: UploadResult | None = None
    ) -> None:
        """Record an upload answered 503 for a cause of the gateway's own (its spool, its database).
        ``rejected`` when nothing of it was handed off (the spool, before any instance was queued);
        ``error`` when the database did not record it, since its instances may have been handed off
        already and ingest stores them, or when the spool failed while earlier instances were queued
        to Kafka already."""
        handed_off = result is not None and result.handed_off > 0
        await recorder.record(
            request,
            principal=principal,
            action="upload",
            outcome="error" if isinstance(exc, UploadNotRecorded) or handed_off else "rejected",
            status=503,
            target=_upload_target(result),
            detail=exc.code,
        )

    async def record_cancelled(request: Request, principal: Principal, result: UploadResult | None) -> None:
        """Record an upload the server cancels (its graceful-shutdown timeout): its instances may be
        handed off already, so it is recorded, as the 500 it gets, before the cancellation goes on."""
        await recorder.record_despite_cancel(
            request,
            principal=principal,
            action="upload",
            outcome="error",
            status=CANCELLED_STATUS,
            target=_upload_target(result),
            detail="request_cancelled",
        )

    async def receive(
        request: Request, principal: Principal, study: str | None, form: bool
    ) -> UploadResult | JSONResponse:
        try:
            _check_request_line(request, study, stow=not form)
            try:
                return await uploads.receive(
                    request.headers.get("content-type"),
                    request.stream(),
                    tenant=principal.tenant,
                    expected_study_uid=study,
                    form_fields=UPLOAD_FORM_FIELDS if form else None,
                )
            except ClientDisconnect:
                # Refused like any other body (its sealed instances were discarded, nothing was
                # handed off) and recorded; the answer goes nowhere, but the request metrics and
                # the access log count it as 499, not as a 500.
                raise ClientClosedRequest(
                    "the client closed the connection before the request body ended; nothing of "
                    "the request was kept, send it again"
                ) from None
        except SpoolUnavailable as exc:
            log.error("upload refused: the spool could not be written", code=exc.code, exc_info=exc)
            metrics.refused(exc.code)
            await refused(request, principal, exc)
            return _unavailable(exc)
        except RequestBodyError as exc:
            await recorder.record(
                request,
                principal=principal,
                action="upload",
                outcome="rejected",
                status=exc.status_code,
                detail=exc.code,
            )
            return JSONResponse(request_error_body(exc), status_code=exc.status_code)

    async def hand_off(
        request: Request, principal: Principal, result: UploadResult, status: int
    ) -> JSONResponse | None:
        """Hand off the accepted instances of a body that was read, then record the upload's one
        access event with the answer it gets (``status``: 200, 202, or 409 when none was accepted and
        nothing is handed off); None when that answer stands, else the 503 that replaces it. The
        hand-off's own events (``upload.received`` per instance, ``upload.completed``) are audited
        too, so an instance handed off before its access event failed is still in the audit trail.
        A cancellation (the server's graceful-shutdown timeout) during either is recorded first."""
        try:
            return await publish_and_record(request, principal, result, status)
        except asyncio.CancelledError:
            await record_cancelled(request, principal, result)
            raise

    async def publish_and_record(
        request: Request, principal: Principal, result: UploadResult, status: int
    ) -> JSONResponse | None:
        try:
            if result.accepted:
                await uploads.publish(result, tenant=principal.tenant, actor=principal.subject)
        except KafkaUnavailable as exc:
            uploads.discard(result)
            # One chunk's acknowledgement may have timed out, or one record been refused, while the
            # access topic works and earlier instances were handed off (ingest stores them). Not
            # waited for: with Kafka down it would hold the 503 for a second publish timeout.
            recorder.record_in_background(
                request,
                principal=principal,
                action="upload",
                outcome="error",
                status=503,
                target=_upload_target(result),
                detail=exc.code,
            )
            return _unavailable(exc)
        except (UploadNotRecorded, SpoolUnavailable) as exc:
            uploads.discard(result)
            if isinstance(exc, SpoolUnavailable):
                metrics.refused(exc.code)
            await refused(request, principal, exc, result)
            return _unavailable(exc)
        try:
            await recorder.record(
                request,
                principal=principal,
                action="upload",
                outcome="success" if result.accepted else "rejected",
                status=status,
                target=_upload_target(result),
                detail=_upload_detail(result),
            )
        except Unaudited:
            if not result.accepted:
                raise  # nothing was handed off: Kafka's 503, "retry later", says it all
            log.error(
                "an upload was handed off but its access event was not published", upload_id=result.upload_id
            )
            return _unavailable(
                AccessUnrecorded(
                    "The instances were handed off and will be stored, but the gateway could not "
                    "record this upload in the audit trail, so it is not confirmed: send it again "
                    "later (an instance sent again is stored once)"
                )
            )
        return None

    async def settled(
        request: Request, principal: Principal, upload: Callable[[], Awaitable[JSONResponse]]
    ) -> JSONResponse:
        """The answer of ``upload``, run in one of the gateway's upload slots. Without a free slot the
        upload is refused before its body is read: 503 ``too_many_uploads`` with ``Retry-After``,
        recorded as a rejected upload. An upload that ends in an exception before its access event
        was recorded (a dependency that did not answer, a bug) is recorded with the answer the
        exception gets (503, 500), and one the server cancels with the 500 it then gets."""
        try:
            with uploads.slots.hold():
                return await upload()
        except TooManyUploads as exc:
            log.warning("upload refused: every upload slot is held", limit=uploads.slots.limit)
            metrics.refused(exc.code)
            await recorder.record(
                request,
                principal=principal,
                action="upload",
                outcome="rejected",
                status=503,
                detail=exc.code,
            )
            return _unavailable(exc)
        except Exception as exc:
            if (answer := unrecorded_failure(request, exc)) is not None:
                status, code = answer
                await recorder.record(
                    request,
                    principal=principal,
                    action="upload",
                    outcome=answered_outcome(status),
                    status=status,
                    detail=code,
                )
            raise
        except asyncio.CancelledError:
            if not access_recorded(request):
                await record_cancelled(request, principal, None)
            raise

    async def stow(request: Request, auth: Authorized, study: str | None) -> JSONResponse:
        outcome = await receive(request, auth.principal, study, form=False)
        if isinstance(outcome, JSONResponse):
            return outcome
        stored = [StoredInstance.from_info(p.info) for p in outcome.accepted]
        failed = [FailedInstance.from_failure(p.failure) for p in outcome.failed]
        status = stow_status(stored, failed)
        failure = await hand_off(request, auth.principal, outcome, status)
        if failure is not None:
            return failure
        body = build_stow_response(f"{public_base_url.rstrip('/')}/dicomweb", stored, failed, study)
        # The type the Accept header prefers: application/json when application/dicom+json is declined.
        media_type = request.state.response_media_type
        return JSONResponse(body, status_code=status, media_type=media_type, headers=_upload_headers(outcome))

    upload = guard.require(Action.UPLOAD)

    @router.post(
        "/dicomweb/studies",
        tags=["dicomweb"],
        summary="STOW-RS: store instances (multipart/related; type=application/dicom, or application/dicom)",
        responses={
            200: {"description": "all stored"},
            202: {"description": "some stored"},
            409: {"description": "none stored"},
        },
    )
    async def stow_studies(request: Request, auth: Authorized = Depends(upload)) -> JSONResponse:
        return await settled(request, auth.principal, partial(stow, request, auth, None))

    @router.post("/dicomweb/studies/{study}", tags=["dicomweb"], summary="STOW-RS into one study")
    async def stow_study(study: str, request: Request, auth: Authorized = Depends(upload)) -> JSONResponse:
        return await settled(request, auth.principal, partial(stow, request, auth, study))

    @router.post(
        "/api/v1/imaging/upload",
        tags=["imaging"],
        summary="Upload DICOM files (multipart/form-data, field 'file' or 'files'): imaging id per instance",
    )
    async def upload_files(request: Request, auth: Authorized = Depends(upload)) -> JSONResponse:
        return await settled(request, auth.principal, partial(store_files, request, auth))

    async def store_files(request: Request, auth: Authorized) -> JSONResponse:
        outcome = await receive(request, auth.principal, None, form=True)
        if isinstance(outcome, JSONResponse):
            return outcome
        status = 200 if not outcome.failed else (202 if outcome.accepted else 409)
        failure = await hand_off(request, auth.principal, outcome, status)
        if failure is not None:
            return failure
        body: dict[str, Any] = {
            "upload_id": outcome.upload_id,
            "accepted": [
                {
                    "imaging_id": p.sealed.instance_upload_id,
                    "part": p.index,
                    "filename": p.filename,
                    "sop_instance_uid": p.info.sop_instance_uid,
                    "status": "received",
                    "size": p.info.size,
                    "sha256": p.info.sha256,
                }
                for p in outcome.accepted
            ],
            "rejected": [
                {
                    "part": p.index,
                    "filename": p.filename,
                    "failure_reason": int(p.failure.reason_code),
                    "problem": p.failure.problem,
                    "message": p.failure.message,
                }
                for p in outcome.failed
            ],
        }
        return JSONResponse(body, status_code=status, headers=_upload_headers(outcome))

    # The read routes decide who may read before FastAPI checks the path and query
    # (:class:`AuthenticatedFirst`), then look the data up, make the resource decision and read the
    # answer, and record the request's one access event with it before sending it
    # (:meth:`AccessRecorder.disclose`). A lookup the database does not answer, before or after the
    # decision, is recorded as the 503 it gets.
    reads = APIRouter(route_class=AuthenticatedBodyRoute)

    disclosed = recorder.disclosed

    # Before the instance routes: /api/v1/imaging/{imaging_id}/analysis would otherwise take the
    # patient query of a PatientID "analysis". ``:path`` because a PatientID may hold '/', which the
    # client sends as %2F and the server decodes before routing.
    @reads.get(
        "/api/v1/imaging/patient/{patient_id:path}",
        tags=["imaging"],
        summary="Instances of one patient (own tenant)",
        dependencies=[Depends(_no_trailing_slash)],
        response_model=dict[str, Any],
    )
    async def by_patient(
        patient_id: Annotated[
            str,
            Path(
                min_length=1,
                max_length=64,
                description=(
                    "the PatientID (0010,0020) as uploaded: an LO value, at most 64 characters, "
                    "percent-encoded as one path segment ('/' as %2F, '\\' as %5C, '%' as %25, "
                    "'?' as %3F, '#' as %23)"
                ),
            ),
        ],
        request: Request,
        principal: Principal = Depends(AuthenticatedFirst(guard, Action.QUERY_PATIENT)),
        limit: InstancesPerPage = PATIENT_PAGE_MAX,
        after: AfterImagingId = None,
    ) -> JSONResponse:
        patient_id = patient_id.strip()  # DICOM pads values with spaces; uploads are keyed without them
        if not patient_id:
            raise RequestValidationError(
                [
                    {
                        "loc": ("path", "patient_id"),
                        "msg": "a PatientID, not only spaces",
                        "type": "value_error",
                    }
                ]
            )
        key = pseudonymizer.pseudonym(principal.tenant, "patient", patient_id)
        authorized = await guard.check_resource(
            request, principal, Action.QUERY_PATIENT, Resource(tenant=principal.tenant, patient_key=key)
        )

        async def page_of_instances() -> JSONResponse:
            docs = await read_model.for_patient(principal.tenant, key, limit + 1, after)
            page, next_after = page_of(docs, limit, _doc_id)
            return _json(
                {
                    "patient_key": key,
                    "instances": [_status_view(d) for d in page],
                    # More instances follow: ask again with ``after`` set to this.
                    "next_after": next_after,
                }
            )

        return await disclosed(request, authorized, Action.QUERY_PATIENT, page_of_instances())

    async def instance(
        request: Request, principal: Principal, action: Action, imaging_id: str
    ) -> tuple[Authorized, dict[str, Any]]:
        """The instance's record and the decision on it (404, recorded, if there is none)."""
        doc = await read_model.get(imaging_id)
        resource = (
            Resource(tenant=doc["tenant"], patient_key=doc.get("patient_key"), study_key=doc.get("study_key"))
            if doc is not None
            else None
        )
        authorized = await guard.check_resource(request, principal, action, resource)
        assert doc is not None
        return authorized, doc

    @reads.get(
        "/api/v1/imaging/{imaging_id}",
        tags=["imaging"],
        summary="Status of one instance",
        response_model=dict[str, Any],
    )
    async def status(
        imaging_id: str,
        request: Request,
        principal: Principal = Depends(AuthenticatedFirst(guard, Action.READ_STATUS)),
    ) -> JSONResponse:
        # One lookup: until the twentieth session the guard read the record and the route read it again.
        authorized, doc = await instance(request, principal, Action.READ_STATUS, imaging_id)

        async def view() -> JSONResponse:
            return _json(_status_view(doc))

        return await disclosed(request, authorized, Action.READ_STATUS, view())

    @reads.get(
        "/api/v1/uploads/{upload_id}",
        tags=["imaging"],
        summary="Status of one upload's instances, counted by status (own tenant)",
        response_model=dict[str, Any],
        responses={404: {"description": "no upload of your tenant has this id, or none of it was accepted"}},
    )
    async def upload_status(
        request: Request,
        upload_id: str = Path(
            pattern=IMAGING_ID_PATTERN,
            description="the upload's id: `upload_id` of the form upload's answer, or the `Upload-Id` "
            "header of a STOW-RS answer",
        ),
        principal: Principal = Depends(AuthenticatedFirst(guard, Action.READ_STATUS)),
        limit: InstancesPerPage = PATIENT_PAGE_MAX,
        after: AfterImagingId = None,
    ) -> JSONResponse:
        # Decided before anything is read: a caregiver's grant names one patient, not an upload (404).
        resource = Resource(tenant=principal.tenant, upload_id=upload_id)
        authorized = await guard.check_resource(request, principal, Action.READ_STATUS, resource)
        # The tenant's own records only: another tenant's upload id reads as one that does not exist.
        statuses = await read_model.upload_statuses(principal.tenant, upload_id)
        if not statuses:
            await guard.check_resource(request, principal, Action.READ_STATUS, None)  # 404, recorded

        async def view() -> JSONResponse:
            # Every status named, 0 when none is in it.
            counts = dict.fromkeys(RANK, 0) | Counter(status_of(doc) for doc in statuses)
            docs = await read_model.upload_page(principal.tenant, upload_id, limit + 1, after)
            page, next_after = page_of(docs, limit, _doc_id)
            return _json(
                {
                    "upload_id": upload_id,
                    "instances_total": len(statuses),
                    "counts": counts,
                    "instances": [_status_view(d) for d in page],
                    "next_after": next_after,
                }
            )

        return await disclosed(request, authorized, Action.READ_STATUS, view())

    @reads.get(
        "/api/v1/imaging/{imaging_id}/analysis",
        tags=["imaging"],
        summary="Analysis results of an instance's series",
    )
    async def analysis(
        imaging_id: str,
        request: Request,
        principal: Principal = Depends(AuthenticatedFirst(guard, Action.READ_RESULTS_PHI)),
    ) -> JSONResponse:
        authorized, doc = await instance(request, principal, Action.READ_RESULTS_PHI, imaging_id)

        async def results() -> JSONResponse:
            analysis_id = analysis_id_of(doc)
            result = await read_model.analysis(analysis_id) if analysis_id else None
            if result is None:
                return _json(_no_analysis_view(imaging_id, doc))
            return _json(_analysis_view(imaging_id, result))

        return await disclosed(request, authorized, Action.READ_RESULTS_PHI, results())

    @reads.post(
        "/api/v1/patient-keys",
        tags=["access"],
        summary="The patient key of a patient id, to query the audit trail for that patient (auditor, admin)",
        response_model=dict[str, Any],
    )
    async def patient_key(
        body: PatientKeyRequest,
        request: Request,
        principal: Principal = Depends(AuthenticatedFirst(guard, Action.QUERY_PATIENT_KEY)),
    ) -> JSONResponse:
        # The id comes in the body, not the URL: URLs reach proxies' logs. A key is answered for any
        # id; with the audit trail, though, a key tells whether someone is a patient, so lookups are
        # limited per principal (and the audit service alerts on many: many_patient_keys).
        if (
            patient_key_limiter is not None
            and not (verdict := patient_key_limiter.acquire(principal.rate_limit_key)).allowed
        ):
            await recorder.record(
                request,
                principal=principal,
                action=str(Action.QUERY_PATIENT_KEY),
                outcome="rejected",
                status=429,
                detail="patient_key_lookups_limited",
            )
            limit = patient_key_limiter.limit.burst
            raise HTTPException(
                429,
                detail={
                    "code": "rate_limited",
                    "message": f"too many patient keys looked up: at most {limit} at once, then {limit} "
                    f"per hour, per principal; retry after {verdict.retry_after_seconds}s",
                },
                headers={"Retry-After": str(verdict.retry_after_seconds)},
            )
        key = pseudonymizer.pseudonym(principal.tenant, "patient", body.patient_id)
        authorized = await guard.check_resource(
            request, principal, Action.QUERY_PATIENT_KEY, Resource(tenant=principal.tenant, patient_key=key)
        )

        async def answer() -> JSONResponse:
            return _json({"patient_key": key, "tenant": principal.tenant})

        return await disclosed(request, authorized, Action.QUERY_PATIENT_KEY, answer())

    @reads.get(
        "/api/v1/research/analyses",
        tags=["research"],
        summary="De-identified analysis results of your tenant (researcher, clinician)",
        response_model=dict[str, Any],
    )
    async def research_analyses(
        request: Request,
        principal: Principal = Depends(AuthenticatedFirst(guard, Action.READ_RESULTS_DEID)),
        limit: int = Query(
            PATIENT_PAGE_MAX, ge=1, le=PATIENT_PAGE_MAX, description="analyses per page (at most 1000)"
        ),
        after: str | None = Query(
            None,
            pattern=ANALYSIS_ID_PATTERN,
            description="the previous page's `next_after`: the page starts after this analysis id",
        ),
    ) -> JSONResponse:
        authorized = await guard.check_resource(
            request, principal, Action.READ_RESULTS_DEID, Resource(tenant=principal.tenant)
        )

        async def page_of_analyses() -> JSONResponse:
            docs = await read_model.analyses_of(principal.tenant, limit + 1, after)
            page, next_after = page_of(docs, limit, _doc_id)
            return _json({"analyses": [_research_view(d) for d in page], "next_after": next_after})

        return await disclosed(request, authorized, Action.READ_RESULTS_DEID, page_of_analyses())

    router.include_router(reads)

    return router


#: A page of the patient query holds at most this many instances (and this many by default).
PATIENT_PAGE_MAX = 1000
#: Analysis ids: ``an-`` and the analysis service's digest of the series and its members.
ANALYSIS_ID_PATTERN = r"^an-[0-9a-f]{32}$"
#: Imaging ids are UUIDs (UUIDv7) in their canonical lowercase form.
IMAGING_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
#: The page size of a listing of instances (the patient query, an upload's instances).
InstancesPerPage = Annotated[
    int, Query(ge=1, le=PATIENT_PAGE_MAX, description="instances per page (at most 1000)")
]
#: Where a page of instances starts.
AfterImagingId = Annotated[
    str | None,
    Query(
        pattern=IMAGING_ID_PATTERN,
        description="the previous page's `next_after`: the page starts after this imaging id",
    ),
]


class PatientKeyRequest(BaseModel):
    """A patient id whose tenant-scoped pseudonym the caller asks for."""

    model_config = ConfigDict(extra="forbid")

    patient_id: PatientId


def _doc_id(doc: dict[str, Any]) -> str:
    return str(doc["_id"])


def _json(body: dict[str, Any]) -> JSONResponse:
    """A read's answer rendered as FastAPI would render the route's return value, before its access
    event is recorded: a value that cannot be rendered fails the read (500, recorded so) instead of
    failing after a record that claims 200."""
    return JSONResponse(jsonable_encoder(body))


def _upload_headers(result: UploadResult) -> dict[str, str]:
    """``Upload-Id`` on an upload's answer when some instance was accepted: the id its status is read
    by (``GET /api/v1/uploads/{upload_id}``), which a STOW-RS answer's body (PS3.18) cannot carry."""
    return {"Upload-Id": result.upload_id} if result.accepted else {}


def _upload_target(result: UploadResult | None) -> str | None:
    """An upload's access event names the upload (``upload:<upload_id>``, the correlation id of its
    events downstream), so the audit trail files the record under it; None when the body was refused
    before the upload had an id."""
    return f"upload:{result.upload_id}" if result is not None else None


def _upload_detail(result: UploadResult) -> str:
    """What the upload's answer says in counts and problem codes (each code once); never a value."""
    detail = f"accepted={len(result.accepted)} rejected={len(result.failed)}"
    problems = ",".join(dict.fromkeys(part.failure.problem for part in result.failed))
    return f"{detail} problems={problems}" if problems else detail


def _status_view(doc: dict[str, Any]) -> dict[str, Any]:
    latest = latest_analysis_of(doc)
    return {
        "imaging_id": doc["_id"],
        "status": status_of(doc),
        "reason_code": doc.get("reason_code"),
        "reason": doc.get("reason"),
        "upload_id": doc.get("upload_id"),
        "study_key": doc.get("study_key"),
        "series_key": doc.get("series_key"),
        "duplicate": doc.get("duplicate"),
        "analysis_id": latest.analysis_id if latest else None,
        # The series' latest analysis, for roles that may not read its results: an instance stays
        # ``deidentified`` when the analysis of its series failed, and this says so and why.
        "analysis_status": latest.outcome if latest else None,
        "analysis_reason_code": latest.reason_code if latest else None,
        "received_at": _iso(doc.get("received_at")),
        "updated_at": _iso(doc.get("updated_at")),
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


#: The seed's field names map onto the analysis service's measures.
SEED_FIELDS = {
    "hippocampal_volume_total": "hippocampal_volume_total",
    "cortical_thickness_mean": "cortical_thickness_mean",
}


def _no_analysis_view(imaging_id: str, doc: dict[str, Any]) -> dict[str, Any]:
    """No analysis covers the instance yet: ``pending`` while it can still be analysed, ``not_analysed``
    once it failed or was quarantined (no de-identified copy, so no analysis will ever include it;
    until the fourteenth session this said ``pending`` forever)."""
    instance_status = status_of(doc)
    view: dict[str, Any] = {"imaging_id": imaging_id, "status": "pending", "instance_status": instance_status}
    if instance_status in ("failed", "quarantined"):
        view["status"] = "not_analysed"
        view["reason"] = (
            f"the instance was {instance_status} before it was de-identified, so no analysis includes it; "
            f"its status (GET /api/v1/imaging/{imaging_id}) says why"
        )
    return {**view, "analysis": None}


def _research_view(doc: dict[str, Any]) -> dict[str, Any]:
    """One analysis without anything that leads to an identified instance: no imaging ids, no report
    objects (they are rendered per study), only the series' pseudonymous key, the measures and QC
    computed on the de-identified series, and a failure's reason (which names no value)."""
    return {**_results(doc), "series_key": doc.get("series_key"), "recorded_at": doc.get("recorded_at")}


def _analysis_view(imaging_id: str, doc: dict[str, Any]) -> dict[str, Any]:
    return {"imaging_id": imaging_id, **_results(doc), "reports": doc.get("reports", [])}


def _results(doc: dict[str, Any]) -> dict[str, Any]:
    """What an analysis found, as both views show it."""
    measures = doc.get("measures") or {}
    return {
        "analysis_id": doc["_id"],
        "status": doc.get("status"),
        "reason_code": doc.get("reason_code"),
        "reason": doc.get("reason"),
        "measures": measures,
        "unavailable_reasons": doc.get("reasons", {}),
        "qc": doc.get("qc"),
        **{seed: measures.get(name) for seed, name in SEED_FIELDS.items()},
    }


def _no_trailing_slash(request: Request) -> None:
    """A route ending in ``{...:path}`` takes every path below it, including one that ends in '/'.
    Such a path is refused as on every other route (404 ``no_such_route``, before the token is read):
    the '/' as sent, not the decoded one, so an identifier ending in '/' is still sent as %2F."""
    raw = request.scope.get("raw_path") or request.scope["path"].encode()
    if raw.endswith(b"/"):
        raise HTTPException(
            404,
            detail={
                "code": "no_such_route",
                "message": (
                    "no route takes this path; the routes are listed in /openapi.json (paths do not "
                    "end in '/'; an identifier that ends in '/' is sent with it as %2F)"
                ),
            },
        )


class _BadStudyUid(RequestBodyError):
    code = "bad_study_uid"


class _NotAcceptable(RequestBodyError):
    """PS3.18 10.5: a STOW-RS request whose Accept admits no response media type the origin sends."""

    code = "not_acceptable"
    status_code = 406


def _check_request_line(request: Request, study: str | None, *, stow: bool) -> None:
    """Request-level refusals decided before the body is read (found by API hunts): a compressed
    body was answered as a body without its boundary, an unknown encoding was read as if plain, a
    study UID in the URL that is no UID failed every instance one by one after the whole body, and a
    STOW-RS request whose Accept admits no JSON got JSON."""
    if stow:
        accept = ", ".join(request.headers.getlist("accept")) or None  # repeated lines are one list
        request.state.response_media_type = negotiate(accept, STOW_RESPONSE_TYPES)
        if request.state.response_media_type is None:
            raise _NotAcceptable(
                "the STOW-RS response is sent as application/dicom+json (or application/json) and "
                "the Accept header admits neither; application/dicom+xml is not offered"
            )
    encoding = (request.headers.get("content-encoding") or "").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {encoding[:40]!r} is not supported: send the body uncompressed "
            "(a Deflated Explicit VR Little Endian transfer syntax is accepted inside a part)"
        )
    if study is not None and not uid_is_valid(study):
        raise _BadStudyUid(
            "the StudyInstanceUID in the URL is not a UID: digits and dots, at most 64 characters, "
            "no leading zero in a component (e.g. 1.2.840.113619.2.1)"
        )
