"""The FHIR routes answer their errors as FHIR R4 OperationOutcome resources (valid per
``fhir.resources``, with R4's required IssueType and IssueSeverity), keeping the status and the
headers a client acts on; every other route, and every success, is answered as before. Until the
twenty-fourth session the FHIR routes answered the services' common error shape, which a FHIR client
(an ITI-81 audit consumer) cannot read.

Through the service's real HTTP app (its exception handlers build the bodies) and the real guard."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from enclave_audit.api import access_hook, build_router
from enclave_audit.fhir import FHIR_JSON, validate_fhir
from enclave_audit.fhir_errors import ERROR_SYSTEM, OperationOutcomeErrors, operation_outcome
from enclave_common.auth import StaticKeySource, TokenRules, TokenVerifier
from enclave_common.auth.dev_issuer import DEV_AUDIENCE, DEV_ISSUER, DevIssuer
from enclave_common.auth.fastapi import AccessGuard
from enclave_common.service import ServiceRuntime
from enclave_common.settings import BaseServiceSettings
from pymongo.errors import ServerSelectionTimeoutError

from .conftest import chained_records
from .test_audit_access_answers import OPERATOR, PLANTED, Trail, context_over

SEARCH = "/audit/fhir/AuditEvent"


@pytest.fixture
def trail() -> Trail:
    return Trail(chained_records(5))


@pytest.fixture
async def client(trail: Trail) -> AsyncIterator[httpx.AsyncClient]:
    issuer = DevIssuer.generate(["ES256"])
    rules = TokenRules(issuer=DEV_ISSUER, audience=DEV_AUDIENCE)
    verifier = TokenVerifier(rules, StaticKeySource.from_jwks(issuer.jwks(), algorithms=rules.algorithms))
    guard = AccessGuard(verifier, on_decision=access_hook(trail))  # type: ignore[arg-type]
    runtime = ServiceRuntime(BaseServiceSettings(service_name="audit-test"))
    app = runtime.http_app(
        title="audit", routers=[build_router(context_over(trail), guard)], start_runtime=False
    )
    app.add_middleware(OperationOutcomeErrors)  # as main.create_app does
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://audit") as http:
        http.headers["Authorization"] = (
            f"Bearer {issuer.mint(subject='aud-1', tenant=OPERATOR, roles=['auditor'])}"
        )
        yield http


def outcome_of(answer: httpx.Response, status: int, issue_type: str, code: str) -> dict[str, Any]:
    """The answer's OperationOutcome, checked: valid R4, the status, one first issue naming the code."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == FHIR_JSON
    assert int(answer.headers["content-length"]) == len(answer.content)
    body = answer.json()
    validate_fhir(body)
    first = body["issue"][0]
    assert (first["severity"], first["code"]) == ("error", issue_type)
    assert first["details"]["coding"] == [{"system": ERROR_SYSTEM, "code": code}]
    assert first["diagnostics"]
    return body


async def test_an_absent_id_is_a_not_found_outcome(client) -> None:
    answer = await client.get(f"{SEARCH}/no-such-record")
    outcome_of(answer, 404, "not-found", "not_found")


async def test_a_search_it_cannot_apply_is_an_invalid_outcome_saying_what_it_takes(client) -> None:
    answer = await client.get(SEARCH, params={"date": "yesterday"})
    body = outcome_of(answer, 400, "invalid", "bad_search")
    assert "prefix" in body["issue"][0]["diagnostics"]


async def test_each_problem_of_a_422_is_an_issue_naming_the_parameter(client) -> None:
    answer = await client.get(SEARCH, params={"_count": "0", "patinet": PLANTED})
    body = outcome_of(answer, 422, "invalid", "invalid_request")
    expressions = [issue.get("expression") for issue in body["issue"][1:]]
    assert ["query._count"] in expressions and ["query"] in expressions
    assert PLANTED not in answer.text


async def test_no_token_is_a_login_outcome_with_the_challenge_kept(client) -> None:
    request = client.build_request("GET", SEARCH)
    del request.headers["Authorization"]
    answer = await client.send(request)
    outcome_of(answer, 401, "login", "missing_token")
    assert answer.headers["www-authenticate"].startswith("Bearer")


async def test_a_silent_database_is_a_transient_outcome_with_retry_after(client, trail) -> None:
    trail.failure = ServerSelectionTimeoutError(PLANTED)
    answer = await client.get(SEARCH)
    outcome_of(answer, 503, "transient", "dependency_unavailable")
    assert answer.headers["retry-after"]
    assert PLANTED not in answer.text


async def test_a_failure_no_handler_answered_is_an_exception_outcome(client, trail) -> None:
    """A bug (here a read raising ValueError): the service's outermost handler would answer it outside
    the middleware, in the common shape (found by review)."""
    trail.failure = ValueError(PLANTED)
    answer = await client.get(SEARCH)
    outcome_of(answer, 500, "exception", "internal_error")
    assert PLANTED not in answer.text


async def test_a_head_of_an_error_answers_the_fhir_type_without_a_body(client) -> None:
    """Every route answers HEAD like GET: the body is dropped before the middleware sees it, so the
    Content-Length of the common shape's body must not be sent (found by review)."""
    answer = await client.head(f"{SEARCH}/no-such-record")
    assert answer.status_code == 404 and answer.content == b""
    assert answer.headers["content-type"] == FHIR_JSON and "content-length" not in answer.headers


async def test_answers_that_are_no_fhir_error_are_unchanged(client) -> None:
    found = await client.get(SEARCH)
    assert found.status_code == 200 and found.json()["resourceType"] == "Bundle"
    other = await client.get("/audit/events", params={"cursor": "nope"})
    assert other.status_code == 400 and other.json()["detail"]["code"] == "bad_cursor"


def test_a_body_of_another_shape_still_gives_a_valid_outcome() -> None:
    validate_fhir(operation_outcome(500, {"status": 500, "error": "internal_error", "message": "failed"}))
    validate_fhir(operation_outcome(418, {}))
