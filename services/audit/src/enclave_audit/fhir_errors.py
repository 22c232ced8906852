"""Error answers of the FHIR routes (``/audit/fhir/...``) as FHIR R4 OperationOutcome resources.

A FHIR client (an IHE RESTful ATNA audit consumer, ITI-81) reads an error as an OperationOutcome
(FHIR R4 http.html, "a server SHOULD return an OperationOutcome"); until the twenty-fourth session these
routes answered the services' common shape (``{"detail": {"code", "message", "problems"}}``), which
such a client cannot read. The answer keeps its status and headers (``WWW-Authenticate``,
``Retry-After``); the body becomes ``application/fhir+json``:

- one issue for the error: ``severity`` ``error``, ``code`` the FHIR IssueType of the status (400 and
  422 ``invalid``, 401 ``login``, 403 ``forbidden``, 404 ``not-found``, 413 ``too-costly``, 429
  ``throttled``, 503 ``transient``, other 5xx ``exception``), ``details.coding`` the service's own
  code (system ``urn:enclave:error``, what the other routes answer as ``detail.code``) and
  ``diagnostics`` its message;
- one more issue per problem of a 422 (``expression``: the parameter, ``diagnostics``: what is wrong).

A failure no handler answered is answered here too (500 ``exception``, ``internal_error``) and
raised on, for the service's own handler to log and record. A HEAD's error answers the FHIR type
without a length: its body was dropped before it got here.

Written by hand as a small ASGI middleware: it rewrites only bodies the service's own handlers built
(JSON, under 64 KiB); no FHIR library for Python does this for a FastAPI app.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from enclave_audit.fhir import FHIR_JSON

FHIR_PATHS: Final = "/audit/fhir/"
ERROR_SYSTEM: Final = "urn:enclave:error"
#: A body past this is not the service's error shape: passed on as it is.
_MAX_ERROR_BODY: Final = 64 * 1024
_ISSUE_TYPE: Final[Mapping[int, str]] = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    408: "timeout",
    413: "too-costly",
    422: "invalid",
    429: "throttled",
    431: "too-long",
    503: "transient",
}
#: A failure no handler answered (the service's outermost handler would answer it outside this
#: middleware, in the common shape).
_INTERNAL_ERROR: Final = {
    "detail": {"code": "internal_error", "message": "the audit service failed on this request (it is logged)"}
}


#: The OpenAPI description of the FHIR routes' error answers (``responses=`` of their routes).
OUTCOME_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    status: {
        "description": f"{description}: a FHIR R4 OperationOutcome, the service's code in "
        f"issue[0].details.coding[0].code ({ERROR_SYSTEM})",
        "content": {
            FHIR_JSON: {
                "schema": {
                    "type": "object",
                    "required": ["resourceType", "issue"],
                    "properties": {
                        "resourceType": {"const": "OperationOutcome"},
                        "issue": {"type": "array", "items": {"type": "object"}, "minItems": 1},
                    },
                }
            }
        },
    }
    for status, description in (
        (400, "a search it cannot apply (bad_search)"),
        (401, "no valid bearer token (WWW-Authenticate)"),
        (403, "a role that may not query the trail"),
        (404, "no record with this id is visible to you"),
        (422, "a request that does not match the API: one more issue per problem"),
        (503, "a dependency did not answer, or the query its time limit (Retry-After)"),
    )
}


def operation_outcome(status: int, body: Mapping[str, Any]) -> dict[str, Any]:
    """The OperationOutcome for an error answer ``status`` with the service's ``body``."""
    detail = body.get("detail")
    detail = detail if isinstance(detail, Mapping) else {}
    code = str(detail.get("code") or f"http_{status}")
    message = str(detail.get("message") or body.get("message") or "")
    issue_type = _ISSUE_TYPE.get(status, "exception" if status >= 500 else "processing")
    issues: list[dict[str, Any]] = [
        _issue(
            issue_type, message, details={"coding": [{"system": ERROR_SYSTEM, "code": code}], "text": code}
        )
    ]
    for problem in detail.get("problems") or ():
        if isinstance(problem, Mapping):
            field = str(problem.get("field") or "").strip()
            issues.append(
                _issue(issue_type, str(problem.get("problem") or ""), expression=[field] if field else None)
            )
    return {"resourceType": "OperationOutcome", "issue": issues}


def _issue(issue_type: str, diagnostics: str, **elements: Any) -> dict[str, Any]:
    """One issue; FHIR has no empty strings or lists: an element without a value is left out."""
    issue = {"severity": "error", "code": issue_type, "diagnostics": diagnostics.strip(), **elements}
    return {name: value for name, value in issue.items() if value}


class OperationOutcomeErrors:
    """ASGI middleware: an error answer (4xx, 5xx) under ``/audit/fhir/`` whose body is the service's
    JSON is answered as an OperationOutcome; every other answer passes unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(FHIR_PATHS):
            await self.app(scope, receive, send)
            return
        head = scope.get("method") == "HEAD"
        held: Message | None = None
        started = False
        chunks: list[bytes] = []

        async def forward(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def rewrite(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                if message["status"] >= 400 and _is_json(message):
                    held = message  # sent with the rewritten body
                    return
                await forward(message)
                return
            if held is None or message["type"] != "http.response.body":
                await forward(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False) and sum(map(len, chunks)) <= _MAX_ERROR_BODY:
                return
            start, body, more = held, b"".join(chunks), message.get("more_body", False)
            held = None
            if head and not body and not more:
                # HEAD: the body was dropped before it got here (HeadAsGet); its length is unknown.
                start = _with_fhir_headers(start, None)
            elif not more:
                try:
                    parsed = json.loads(body)
                except ValueError:
                    parsed = None
                if isinstance(parsed, dict):
                    body = json.dumps(operation_outcome(start["status"], parsed)).encode()
                    start = _with_fhir_headers(start, len(body))
            await forward(start)
            await forward({"type": "http.response.body", "body": body, "more_body": more})

        try:
            await self.app(scope, receive, rewrite)
        except Exception:
            # Answered here, as an OperationOutcome; re-raised so that the service's outermost handler
            # logs and records it (it sends nothing once an answer started).
            if not started:
                body = b"" if head else json.dumps(operation_outcome(500, _INTERNAL_ERROR)).encode()
                start = {"type": "http.response.start", "status": 500, "headers": []}
                await forward(_with_fhir_headers(start, None if head else len(body)))
                await forward({"type": "http.response.body", "body": body, "more_body": False})
            raise


def _is_json(start: Message) -> bool:
    return any(
        name.lower() == b"content-type" and value.split(b";")[0].strip() == b"application/json"
        for name, value in start.get("headers", ())
    )


def _with_fhir_headers(start: Message, length: int | None) -> Message:
    """``start`` answering ``application/fhir+json`` of ``length`` bytes (no Content-Length: unknown)."""
    headers = [
        (name, value)
        for name, value in start.get("headers", ())
        if name.lower() not in (b"content-type", b"content-length")
    ]
    headers.append((b"content-type", FHIR_JSON.encode()))
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {**start, "headers": headers}
