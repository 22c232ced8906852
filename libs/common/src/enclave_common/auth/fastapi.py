"""FastAPI glue: ``Depends(guard.require(action))`` authenticates, rate-limits and authorizes.

Status codes: 401 with ``WWW-Authenticate: Bearer`` (RFC 6750: ``error="invalid_token"`` and an
``error_description`` when a token was sent and refused), 403 when the principal's roles never
allow the action (or the record needs break-glass), 404 for another tenant's resource or a
patient the principal holds no grant on (indistinguishable from a genuine 404), 429 with
``Retry-After``, 503 when the identity provider's keys cannot be had. Every outcome, allowed or
not, is passed to ``on_decision`` so the gateway can emit its ``access`` audit event; if the hook
raises, the request fails (an access that cannot be audited does not happen).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import NoReturn, Protocol

from fastapi import HTTPException, Request
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import request_params_to_args
from fastapi.exceptions import RequestValidationError

from enclave_common.auth.actions import Action
from enclave_common.auth.errors import AuthenticationError, AuthFailure, KeySourceUnavailable
from enclave_common.auth.grants import GrantStore
from enclave_common.auth.policy import (
    DEFAULT_POLICY,
    NOT_FOUND_MESSAGE,
    AccessPolicy,
    Decision,
    Outcome,
    Resource,
)
from enclave_common.auth.ratelimit import RateLimiter
from enclave_common.auth.restrictions import RestrictionStore
from enclave_common.auth.roles import Principal
from enclave_common.auth.token_revocations import RevokedTokens
from enclave_common.auth.tokens import TokenVerifier


@dataclass(frozen=True, slots=True)
class AccessResult:
    """What happened to one request, for the audit event.

    ``kind`` is ``allow``, ``forbidden``, ``not_found``, ``unauthenticated``, ``rate_limited``,
    ``unavailable`` or ``invalid_request`` (allowed, but a parameter is invalid: answered 422); ``reason`` a machine code (an :class:`AuthFailure` value, a decision reason
    such as ``other_tenant`` or ``no_grant``, ``rate_limited``). ``break_glass`` True means the
    caller must raise a security alert.
    """

    kind: str
    reason: str
    decision: Decision | None = None
    resource: Resource | None = None

    @property
    def break_glass(self) -> bool:
        return self.decision is not None and self.decision.break_glass


class DecisionHook(Protocol):
    def __call__(
        self,
        principal: Principal | None,
        action: Action,
        outcome: AccessResult,
        status: int,
        request: Request,
    ) -> Awaitable[None] | None: ...


ResourceResolver = Callable[[Request], Awaitable[Resource | None]]
"""Looks up what the request targets (e.g. by path parameter in the read model); None = no such thing."""


@dataclass(frozen=True, slots=True)
class Authorized:
    """What a route receives: who is calling, and the decision (check ``decision.break_glass``)."""

    principal: Principal
    decision: Decision
    resource: Resource | None = None


def _utcnow() -> datetime:
    return datetime.now(UTC)


_FLAT = "_enclave_dependants"


def _dependants(route: object) -> list[Dependant]:
    """The route's dependant and all its sub-dependants, each once (the list is kept on the route)."""
    found: list[Dependant] | None = getattr(route, _FLAT, None)
    if found is None:
        found, stack = [], [getattr(route, "dependant", None)]
        while stack:
            dependant = stack.pop()
            if isinstance(dependant, Dependant) and not any(d is dependant for d in found):
                found.append(dependant)
                stack.extend(dependant.dependencies)
        if route is not None:
            setattr(route, _FLAT, found)
    return found


def parameter_errors(request: Request, action: Action | None = None) -> list[object]:
    """FastAPI's validation errors for the request's path, query, header and cookie parameters.

    FastAPI runs a route's dependencies (this guard) before it validates the route's own
    parameters, so without this check a call answered 422 would be recorded as an allowed access
    (found by an API hunt). Uses FastAPI's own validation, on the same fields."""
    errors: list[object] = []
    dependants = _dependants(request.scope.get("route"))
    for dependant in dependants:
        for fields, received in (
            (dependant.path_params, request.path_params),
            (dependant.query_params, request.query_params),
            (dependant.header_params, request.headers),
            (dependant.cookie_params, request.cookies),
        ):
            if fields:
                errors.extend(e for e in request_params_to_args(fields, received)[1] if e not in errors)
    if (unknown := unknown_query_parameters(request, dependants, action)) is not None:
        errors.append(unknown)
    return errors


#: Methods whose routes' query parameters are filters: a misspelt one would silently widen the answer.
_READ_METHODS = frozenset({"GET", "HEAD"})
#: Writes that ignore query parameters they do not take: uploads, whose DICOM clients may add their own
#: (refusing them would refuse the data).
_WRITES_IGNORING_QUERY = frozenset({Action.UPLOAD})


def unknown_query_parameters(
    request: Request, dependants: list[Dependant], action: Action | None = None
) -> dict[str, object] | None:
    """A validation error when a request is sent a query parameter its route does not take, FastAPI
    ignoring those:

    - a read that takes query parameters (filters, paging): ``?patinet=...`` answered every record as
      if it were one patient's (until the twenty-second session); a read that takes none ignores
      extra ones (a cache-busting ``?_=...``);
    - a write (a grant, a restriction, a token revocation, a break-glass session, a patient-key
      lookup): ``?dry_run=true`` made the change for real (until the twenty-fourth session); uploads
      (``action`` upload) ignore them, as before.

    The error names the parameters the route takes, never the ones sent (a name may be anything)."""
    known = {field.alias for dependant in dependants for field in dependant.query_params}
    if set(request.query_params) <= known:
        return None
    if request.method in _READ_METHODS:
        if not known:
            return None
    elif action is None or action in _WRITES_IGNORING_QUERY:
        return None
    takes = f"it takes: {', '.join(sorted(known))}" if known else "it takes none"
    return {
        "type": "value_error",
        "loc": ("query",),
        "msg": f"a query parameter this route does not take; {takes}",
        "input": None,
    }


class AccessGuard:
    """Holds the verifier, policy, grant and restriction stores, rate limiters and audit hook of one app."""

    def __init__(
        self,
        verifier: TokenVerifier,
        *,
        policy: AccessPolicy = DEFAULT_POLICY,
        grants: GrantStore | None = None,
        restrictions: RestrictionStore | None = None,
        revoked_tokens: RevokedTokens | None = None,
        limiter: RateLimiter | None = None,
        auth_failure_limiter: RateLimiter | None = None,
        on_decision: DecisionHook | None = None,
        realm: str = "enclave",
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.verifier = verifier
        self.policy = policy
        self.grants = grants
        self.restrictions = restrictions
        self.revoked_tokens = revoked_tokens
        self.limiter = limiter
        self.auth_failure_limiter = auth_failure_limiter
        self.on_decision = on_decision
        self.realm = realm
        self.clock = clock

    def require(
        self, action: Action, resource: ResourceResolver | None = None
    ) -> Callable[[Request], Awaitable[Authorized]]:
        """A dependency making the whole decision for ``action``.

        With ``resource`` (a lookup of the record the request targets) the decision covers tenant
        isolation, grants and break-glass. Without it the action is treated as a collection action
        (``upload``, ``audit_verify``, ...): allowed only by a ``tenant`` cell of the table, so a
        grant-only principal is never let through by a route that forgot its lookup.
        """

        async def dependency(request: Request) -> Authorized:
            principal = await self.principal_for(request, action)
            if resource is None:
                decision = self.policy.decide(principal, action, None, (), self.clock())
                await self._conclude(request, principal, action, decision, None)
                return Authorized(principal, decision)
            return await self.check_resource(request, principal, action, await resource(request))

        return dependency

    def require_principal(self, action: Action) -> Callable[[Request], Awaitable[Principal]]:
        """A dependency that authenticates, rate-limits and refuses (403) principals whose roles never
        allow ``action``, for routes that look the record up themselves: such a route MUST then
        call :meth:`check_resource`, which makes the decision and reports it to the hook."""

        async def dependency(request: Request) -> Principal:
            return await self.principal_for(request, action)

        return dependency

    async def principal_for(self, request: Request, action: Action) -> Principal:
        """Authenticate, rate-limit, and apply the role check (failures reported and raised)."""
        principal = await self.authenticate(request, action)
        await self._rate_limit(request, principal, action)
        decision = self.policy.check_action(principal, action)
        if not decision.allowed:
            await self._conclude(request, principal, action, decision, None)
        return principal

    async def authenticate(self, request: Request, action: Action) -> Principal:
        """The verified principal of ``request``, or HTTPException 401/429/503 (reported to the hook)."""
        header = request.headers.get("authorization")
        if header is None:
            await self._refuse_authentication(request, action, AuthFailure.MISSING_TOKEN, None)
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            await self._refuse_authentication(
                request,
                action,
                AuthFailure.MALFORMED,
                'Authorization must be "Bearer <token>"',
                error="invalid_request",
            )
        try:
            principal = await self.verifier.verify_bearer(token.strip())
        except AuthenticationError as exc:
            await self._refuse_authentication(request, action, exc.failure, str(exc))
        except KeySourceUnavailable as exc:
            await self._report(None, action, AccessResult("unavailable", exc.code), 503, request)
            raise HTTPException(
                503,
                detail={"code": exc.code, "message": "identity provider keys are unavailable; retry later"},
                headers={"Retry-After": "5"},
            ) from None
        if (
            self.revoked_tokens is not None
            and (before := self.revoked_tokens.revoked_before(principal)) is not None
        ):
            await self._refuse_authentication(
                request,
                action,
                AuthFailure.REVOKED,
                f"this token was revoked by an administrator of your organisation (tokens issued at or "
                f"before {before.isoformat(timespec='seconds')}); sign in again for a new one",
                principal=principal,
            )
        return principal

    async def check_resource(
        self, request: Request, principal: Principal, action: Action, resource: Resource | None
    ) -> Authorized:
        """The resource-level decision (``resource=None``: the lookup found nothing -> 404). A
        restriction on the resource's patient is looked up here when it could matter
        (:meth:`AccessPolicy.restriction_matters`); the returned ``Authorized`` carries it."""
        if resource is None:
            decision = Decision(Outcome.NOT_FOUND, action, "not_found", NOT_FOUND_MESSAGE)
        else:
            if (
                self.restrictions is not None
                and self.policy.restriction_matters(principal, action, resource)
                and await self.restrictions.get(resource.tenant, resource.patient_key or "") is not None
            ):
                resource = replace(resource, restricted=True)
            decision = await self.policy.authorize(principal, action, resource, self.grants, self.clock())
        await self._conclude(request, principal, action, decision, resource)
        return Authorized(principal, decision, resource)

    async def refuse(
        self, request: Request, principal: Principal, decision: Decision, resource: Resource | None
    ) -> NoReturn:
        """Refuse a request on a rule the route applies (a FORBIDDEN ``decision`` the policy made,
        such as :meth:`AccessPolicy.check_lift`): recorded and answered as the guard's own refusals."""
        if decision.allowed:
            raise ValueError("refuse() takes a decision that does not allow")
        await self._conclude(request, principal, decision.action, decision, resource)
        raise AssertionError("_conclude raises for a decision that does not allow")  # pragma: no cover

    async def _conclude(
        self,
        request: Request,
        principal: Principal,
        action: Action,
        decision: Decision,
        resource: Resource | None,
    ) -> None:
        if decision.allowed and (errors := parameter_errors(request, action)):
            result = AccessResult("invalid_request", "invalid_request", decision, resource)
            await self._report(principal, action, result, 422, request)
            raise RequestValidationError(errors)
        result = AccessResult(decision.outcome.value, decision.reason, decision, resource)
        await self._report(principal, action, result, decision.status_code, request)
        if decision.outcome is Outcome.NOT_FOUND:
            raise HTTPException(404, detail={"code": "not_found", "message": NOT_FOUND_MESSAGE})
        if decision.outcome is Outcome.FORBIDDEN:
            detail: dict[str, object] = {"code": decision.reason, "message": decision.message}
            if decision.break_glass_available:
                detail["break_glass_available"] = True
            raise HTTPException(403, detail=detail)

    async def _rate_limit(self, request: Request, principal: Principal, action: Action) -> None:
        if self.limiter is None:
            return
        verdict = self.limiter.acquire(principal.rate_limit_key)
        if verdict.allowed:
            return
        await self._report(principal, action, AccessResult("rate_limited", "rate_limited"), 429, request)
        raise HTTPException(
            429,
            detail={
                "code": "rate_limited",
                "message": f"too many requests; retry after {verdict.retry_after_seconds}s",
            },
            headers={"Retry-After": str(verdict.retry_after_seconds)},
        )

    async def _refuse_authentication(
        self,
        request: Request,
        action: Action,
        failure: AuthFailure,
        message: str | None,
        *,
        error: str = "invalid_token",
        principal: Principal | None = None,
    ) -> NoReturn:
        """401 (429 past the failure limit), recorded ``unauthenticated`` with the failure's code; with
        ``principal`` (a verified token that is refused: revoked) the record names who it was. Past the
        limit too: a failed authentication answered 429 is still one, which the audit service codes
        as a failed login and its brute-force rule counts (until the twenty-fourth session it was
        recorded ``rate_limited``, coded as the action it asked for, and not counted)."""
        if self.auth_failure_limiter is not None:
            client = request.client.host if request.client else "unknown"
            verdict = self.auth_failure_limiter.acquire(f"auth-failure\x1f{client}")
            if not verdict.allowed:
                await self._report(
                    principal, action, AccessResult("unauthenticated", failure.value), 429, request
                )
                raise HTTPException(
                    429,
                    detail={"code": "rate_limited", "message": "too many failed authentications"},
                    headers={"Retry-After": str(verdict.retry_after_seconds)},
                )
        await self._report(principal, action, AccessResult("unauthenticated", failure.value), 401, request)
        if message is None:
            challenge = f'Bearer realm="{self.realm}"'
            detail = {"code": failure.value, "message": "a bearer token is required"}
        else:
            safe = message.replace("\\", "/").replace('"', "'")
            challenge = f'Bearer realm="{self.realm}", error="{error}", error_description="{safe}"'
            detail = {"code": failure.value, "message": message}
        raise HTTPException(401, detail=detail, headers={"WWW-Authenticate": challenge})

    async def _report(
        self, principal: Principal | None, action: Action, result: AccessResult, status: int, request: Request
    ) -> None:
        if self.on_decision is None:
            return
        returned = self.on_decision(principal, action, result, status, request)
        if inspect.isawaitable(returned):
            await returned
