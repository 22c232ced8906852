"""The FastAPI guard: status codes, headers, bodies and the audit hook, through real HTTP requests."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from enclave_common.auth import (
    DEFAULT_POLICY,
    Action,
    InMemoryGrantStore,
    Principal,
    RateLimit,
    RateLimiter,
    Resource,
    Role,
    StaticKeySource,
    TokenRules,
    TokenVerifier,
)
from enclave_common.auth.dev_issuer import DEV_AUDIENCE, DEV_ISSUER, DevIssuer
from enclave_common.auth.fastapi import AccessGuard, AccessResult, Authorized
from enclave_common.auth.jwks import RemoteKeySource
from fastapi import Depends, FastAPI, Query, Request

RECORDS = {
    "img-a": Resource("hospital-a", "pt-a"),
    "img-b": Resource("hospital-b", "pt-b"),
    "img-restricted": Resource("hospital-a", "pt-r", restricted=True),
}


@dataclass
class Hook:
    calls: list[tuple[Principal | None, Action, AccessResult, int]] = field(default_factory=list)

    async def __call__(
        self,
        principal: Principal | None,
        action: Action,
        outcome: AccessResult,
        status: int,
        request: Request,
    ) -> None:
        assert request.url.path.startswith("/")
        self.calls.append((principal, action, outcome, status))

    @property
    def last(self) -> tuple[Principal | None, Action, AccessResult, int]:
        return self.calls[-1]


def build_app(guard: AccessGuard) -> FastAPI:
    app = FastAPI()

    async def lookup(request: Request) -> Resource | None:
        return RECORDS.get(request.path_params["imaging_id"])

    @app.get("/imaging/{imaging_id}/results")
    async def results(
        imaging_id: str,
        access: Authorized = Depends(guard.require(Action.READ_RESULTS_PHI, lookup)),
        page_size: int = Query(default=10, ge=1, le=100),
    ) -> dict[str, Any]:
        return {"id": imaging_id, "break_glass": access.decision.break_glass, "basis": access.decision.basis}

    @app.get("/imaging/{imaging_id}/status")
    async def status(
        imaging_id: str,
        request: Request,
        principal: Principal = Depends(guard.require_principal(Action.READ_STATUS)),
    ) -> dict[str, Any]:
        access = await guard.check_resource(request, principal, Action.READ_STATUS, RECORDS.get(imaging_id))
        return {"id": imaging_id, "basis": access.decision.basis}

    @app.get("/forgot-the-lookup")
    async def forgot(access: Authorized = Depends(guard.require(Action.READ_RESULTS_PHI))) -> dict[str, str]:
        return {"subject": access.principal.subject}

    @app.post("/upload")
    async def upload(access: Authorized = Depends(guard.require(Action.UPLOAD))) -> dict[str, str]:
        return {"tenant": access.principal.tenant}

    return app


@dataclass
class Harness:
    client: httpx.AsyncClient
    hook: Hook
    grants: InMemoryGrantStore
    dev: DevIssuer

    def token(self, roles: list[str], tenant: str = "hospital-a", subject: str = "alice", **kw: Any) -> str:
        return self.dev.mint(subject=subject, tenant=tenant, roles=roles, **kw)

    async def get(self, path: str, token: str | None = None, **headers: str) -> httpx.Response:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return await self.client.get(path, headers=headers)


def http(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def make_harness(dev: DevIssuer, **guard_kwargs: Any) -> Harness:
    rules = TokenRules(issuer=DEV_ISSUER, audience=DEV_AUDIENCE)
    verifier = TokenVerifier(rules, StaticKeySource.from_jwks(dev.jwks(), algorithms=rules.algorithms))
    hook, grants = Hook(), InMemoryGrantStore()
    guard = AccessGuard(verifier, grants=grants, on_decision=hook, **guard_kwargs)
    return Harness(http(build_app(guard)), hook, grants, dev)


@pytest.fixture
def h(issuer: DevIssuer) -> Harness:
    return make_harness(issuer)


async def test_missing_token_is_a_bare_bearer_challenge(h: Harness) -> None:
    response = await h.get("/imaging/img-a/results")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="enclave"'
    assert response.json()["detail"]["code"] == "missing_token"
    principal, action, outcome, status = h.hook.last
    assert (principal, action, outcome.kind, outcome.reason, status) == (
        None,
        Action.READ_RESULTS_PHI,
        "unauthenticated",
        "missing_token",
        401,
    )


async def test_wrong_scheme_is_invalid_request(h: Harness) -> None:
    response = await h.get("/imaging/img-a/results", Authorization="Basic YWxpY2U6c2VjcmV0")
    assert response.status_code == 401
    assert 'error="invalid_request"' in response.headers["www-authenticate"]


async def test_refused_token_gets_invalid_token_without_echo(h: Harness) -> None:
    expired = h.token(["clinician"], now=datetime.now(UTC) - timedelta(hours=3))
    response = await h.get("/imaging/img-a/results", expired)
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="enclave", error="invalid_token", error_description="')
    assert "expired" in challenge
    assert response.json()["detail"]["code"] == "expired"
    for part in expired.split("."):
        assert part not in response.text
        assert part not in challenge
    assert h.hook.last[2].reason == "expired"


async def test_clinician_reads_own_tenant(h: Harness) -> None:
    response = await h.get("/imaging/img-a/results", h.token(["clinician"]))
    assert response.status_code == 200
    assert response.json() == {"id": "img-a", "break_glass": False, "basis": "role"}
    principal, _, outcome, status = h.hook.last
    assert principal is not None
    assert principal.subject == "alice"
    assert (outcome.kind, status, outcome.resource) == ("allow", 200, RECORDS["img-a"])


async def test_an_allowed_call_answered_422_is_recorded_as_rejected_not_allowed(h: Harness) -> None:
    # FastAPI runs the guard before it validates the route's own parameters.
    response = await h.get("/imaging/img-a/results?page_size=500", h.token(["clinician"]))
    assert response.status_code == 422
    assert [(c[2].kind, c[3]) for c in h.hook.calls] == [("invalid_request", 422)]
    assert h.hook.last[2].resource == RECORDS["img-a"]
    assert (await h.get("/imaging/img-a/results?page_size=5", h.token(["clinician"]))).status_code == 200
    assert (h.hook.last[2].kind, h.hook.last[3]) == ("allow", 200)
    refused = await h.get("/imaging/img-a/results?page_size=500", h.token(["researcher"]))
    assert (refused.status_code, h.hook.last[2].kind) == (403, "forbidden")  # a refusal stays a refusal


async def test_other_tenant_is_indistinguishable_from_absent(h: Harness) -> None:
    token = h.token(["clinician"])
    other, absent = (
        await h.get("/imaging/img-b/results", token),
        await h.get("/imaging/img-zzz/results", token),
    )
    assert other.status_code == absent.status_code == 404
    assert other.json() == absent.json()
    assert other.headers.get("content-length") == absent.headers.get("content-length")
    assert [c[2].reason for c in h.hook.calls] == ["other_tenant", "not_found"]


async def test_role_without_the_action_is_forbidden_before_lookup(h: Harness) -> None:
    token = h.token(["researcher"])
    own, other = await h.get("/imaging/img-a/results", token), await h.get("/imaging/img-b/results", token)
    assert own.status_code == other.status_code == 403
    assert own.json() == other.json()
    assert own.json()["detail"]["code"] == "role_not_permitted"
    assert h.hook.last[2].kind == "forbidden"
    assert h.hook.last[3] == 403


async def test_caregiver_reads_only_under_an_active_grant(h: Harness) -> None:
    token = h.token(["caregiver"], subject="carol")
    assert (await h.get("/imaging/img-a/results", token)).status_code == 404
    admin = Principal("root", "hospital-a", frozenset({Role.ADMIN}))
    now = datetime.now(UTC)
    grant = DEFAULT_POLICY.new_patient_grant(
        admin,
        grantee="carol",
        patient_key="pt-a",
        actions=[Action.READ_RESULTS_PHI],
        not_before=now - timedelta(minutes=1),
        expires_at=now + timedelta(hours=1),
        justification="parent of a minor patient",
        now=now,
    )
    await h.grants.create(grant)
    response = await h.get("/imaging/img-a/results", token)
    assert response.status_code == 200
    assert response.json()["basis"] == "grant"
    assert h.hook.last[2].decision is not None
    assert h.hook.last[2].decision.grant_id == grant.grant_id
    await h.grants.revoke(grant.grant_id, tenant="hospital-a", revoked_by="root", now=datetime.now(UTC))
    assert (await h.get("/imaging/img-a/results", token)).status_code == 404


async def test_restricted_record_needs_break_glass_and_reports_it(h: Harness) -> None:
    token = h.token(["clinician"], subject="dr-who")
    refused = await h.get("/imaging/img-restricted/results", token)
    assert refused.status_code == 403
    assert refused.json()["detail"] == {
        "code": "break_glass_required",
        "message": refused.json()["detail"]["message"],
        "break_glass_available": True,
    }
    clinician = Principal("dr-who", "hospital-a", frozenset({Role.CLINICIAN}))
    session = DEFAULT_POLICY.open_break_glass(
        clinician, patient_key="pt-r", justification="patient unconscious in the ER", now=datetime.now(UTC)
    )
    await h.grants.create(session)
    allowed = await h.get("/imaging/img-restricted/results", token)
    assert allowed.status_code == 200
    assert allowed.json()["break_glass"] is True
    assert h.hook.last[2].break_glass


async def test_upload_is_a_collection_action(h: Harness) -> None:
    ok = await h.client.post("/upload", headers={"Authorization": f"Bearer {h.token(['uploader'])}"})
    assert ok.status_code == 200
    assert ok.json() == {"tenant": "hospital-a"}
    refused = await h.client.post("/upload", headers={"Authorization": f"Bearer {h.token(['clinician'])}"})
    assert refused.status_code == 403


async def test_rate_limit_per_principal_with_retry_after(issuer: DevIssuer) -> None:
    h = make_harness(issuer, limiter=RateLimiter(RateLimit(burst=2, per_second=0.1)))
    alice, bob = h.token(["clinician"]), h.token(["clinician"], subject="bob")
    assert [(await h.get("/imaging/img-a/results", alice)).status_code for _ in range(3)] == [200, 200, 429]
    limited = await h.get("/imaging/img-a/results", alice)
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 10
    assert h.hook.last[2].kind == "rate_limited"
    assert h.hook.last[3] == 429
    assert (await h.get("/imaging/img-a/results", bob)).status_code == 200


async def test_failed_authentications_are_limited_per_client(issuer: DevIssuer) -> None:
    h = make_harness(issuer, auth_failure_limiter=RateLimiter(RateLimit(burst=3, per_second=0.01)))
    statuses = [(await h.get("/imaging/img-a/results", "not-a-token")).status_code for _ in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    # Still a failed authentication, with its code: the audit service codes it as a failed login and
    # counts it (until the twenty-fourth session recorded rate_limited, coded as the action asked for).
    assert (h.hook.last[2].kind, h.hook.last[2].reason, h.hook.last[3]) == (
        "unauthenticated",
        "malformed",
        429,
    )
    assert "retry-after" in (await h.get("/imaging/img-a/results", "x")).headers


async def test_identity_provider_outage_is_503(issuer: DevIssuer) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("down", request=request)

    rules = TokenRules(issuer=DEV_ISSUER, audience=DEV_AUDIENCE)
    keys = RemoteKeySource(
        "https://idp.example/jwks",
        algorithms=rules.algorithms,
        client=httpx.AsyncClient(transport=httpx.MockTransport(down)),
    )
    hook = Hook()
    client = http(build_app(AccessGuard(TokenVerifier(rules, keys), on_decision=hook)))
    token = issuer.mint(subject="alice", tenant="hospital-a", roles=["clinician"])
    response = await client.get("/imaging/img-a/results", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert hook.last[2].kind == "unavailable"


async def test_a_failing_audit_hook_fails_the_request(issuer: DevIssuer) -> None:
    rules = TokenRules(issuer=DEV_ISSUER, audience=DEV_AUDIENCE)
    verifier = TokenVerifier(rules, StaticKeySource.from_jwks(issuer.jwks(), algorithms=rules.algorithms))

    def broken(*_: object) -> None:
        raise ConnectionError("audit sink down")

    client = http(build_app(AccessGuard(verifier, on_decision=broken)))
    token = issuer.mint(subject="alice", tenant="hospital-a", roles=["clinician"])
    with pytest.raises(ConnectionError):
        await client.get("/imaging/img-a/results", headers={"Authorization": f"Bearer {token}"})


async def test_two_phase_route_reports_once_per_request(h: Harness) -> None:
    uploader = h.token(["uploader"])
    assert (await h.get("/imaging/img-a/status", uploader)).json() == {"id": "img-a", "basis": "role"}
    assert (await h.get("/imaging/img-b/status", uploader)).status_code == 404
    assert (await h.get("/imaging/img-a/status", h.token(["auditor"]))).status_code == 403
    assert [(c[2].kind, c[2].reason, c[3]) for c in h.hook.calls] == [
        ("allow", "role", 200),
        ("not_found", "other_tenant", 404),
        ("forbidden", "role_not_permitted", 403),
    ]


async def test_route_without_lookup_never_lets_a_grant_only_principal_through(h: Harness) -> None:
    assert (await h.get("/forgot-the-lookup", h.token(["clinician"]))).status_code == 200
    refused = await h.get("/forgot-the-lookup", h.token(["caregiver"], subject="carol"))
    assert refused.status_code == 403
    assert refused.json()["detail"]["code"] == "resource_required"
