"""Routes with a JSON body that authenticate and check the caller's role before the body is parsed.

FastAPI reads and parses a route's declared body before it resolves the route's dependencies, so
before the access guard: a caller without a token had its JSON parsed, and a body that was not JSON
answered 422 with what the API expects instead of 401 (or 403 for a role that may not call the
route). A route of :class:`AuthenticatedBodyRoute` whose principal comes from an
:class:`AuthenticatedFirst` dependency makes that decision first, then FastAPI reads, parses and
validates the body as it would (the same 422), and the route's OpenAPI document still names the body
schema. The body's size is bounded before either, by the common body limit (413).

A request the role check let through and that then ends without an access event (its body refused
422 or 400, or the route failing) is reported to the guard's hook with the answer it gets, so it is
recorded like any other refused request: the body's content is never part of the report. A body the
common body limit refused (413, 408) is reported with that answer, not as the client leaving (499),
which is what the route sees after the refusal. The grant routes without a body (``GET`` and
``DELETE /api/v1/grants/{grant_id}``) use the same dependency, so a grant id that does not match the
API (422) or a grant store that did not answer the lookup (503) is recorded too. So do the read
routes (status, analysis, the patient query, the research listing): a path or query parameter the API
refuses (422) and a lookup the gateway's database does not answer (503) are recorded with that answer.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from enclave_common.auth import Action, Principal
from enclave_common.auth.fastapi import AccessGuard, AccessResult
from enclave_common.cancellation import finish_despite_cancel
from fastapi import Request, Response
from fastapi.routing import APIRoute

from enclave_gateway.access import Unaudited, access_recorded, unrecorded_failure

log = structlog.get_logger("enclave.gateway")


class AuthenticatedFirst:
    """A dependency giving the principal that may attempt ``action`` (as
    ``AccessGuard.require_principal``: authenticated, rate-limited, its roles allow the action; each
    refusal reported to the guard's hook and answered 401, 403, 429 or 503). On an
    :class:`AuthenticatedBodyRoute` that decision is made before the body is read, and this returns
    it; on another route it is made here, when FastAPI resolves the dependency."""

    def __init__(self, guard: AccessGuard, action: Action) -> None:
        self.guard = guard
        self.action = action
        self._key = f"principal_before_body_{action}"

    async def decide(self, request: Request) -> None:
        """Authenticate and check the role now, before anything reads the body."""
        setattr(request.state, self._key, await self.guard.principal_for(request, self.action))

    async def __call__(self, request: Request) -> Principal:
        decided: Principal | None = getattr(request.state, self._key, None)
        return decided if decided is not None else await self.guard.principal_for(request, self.action)

    async def report_unrecorded(self, request: Request, exc: Exception) -> None:
        """Report a request that :meth:`decide` let through and that ``exc`` ended before any access
        event of it was recorded (FastAPI's 422 of a body that does not parse or match, a dependency
        that did not answer) to the guard's hook, as the answer ``exc`` gets: ``invalid_request``
        (``rejected``) below 500, an error from 500. Only the status and a code are reported."""
        principal: Principal | None = getattr(request.state, self._key, None)
        answer = unrecorded_failure(request, exc)
        if principal is None or self.guard.on_decision is None or answer is None:
            return
        status, code = answer
        kind = "invalid_request" if status < 500 else "error"
        reported = self.guard.on_decision(principal, self.action, AccessResult(kind, code), status, request)
        if inspect.isawaitable(reported):
            await reported

    async def report_cancelled(self, request: Request) -> None:
        """Report a request :meth:`decide` let through that the server cancelled (its graceful-shutdown
        timeout) before any access event of it was recorded, as the 500 ``request_cancelled`` the
        gateway then answers: shielded from a further cancellation, at most
        :data:`RECORD_ON_CANCEL_S`; if Kafka does not take it, the answer stands."""
        principal: Principal | None = getattr(request.state, self._key, None)
        if principal is None or self.guard.on_decision is None or access_recorded(request):
            return
        reported = self.guard.on_decision(
            principal, self.action, AccessResult("error", "request_cancelled"), 500, request
        )
        if not inspect.isawaitable(reported):
            return
        try:
            await finish_despite_cancel(reported)
        except (TimeoutError, Unaudited):
            log.error("a cancelled request's access event was not recorded", action=str(self.action))


class AuthenticatedBodyRoute(APIRoute):
    """An API route whose :class:`AuthenticatedFirst` dependencies decide before FastAPI reads and
    parses the request body (FastAPI's documented extension point: a wrapped route handler).

    The route's own ``dependencies`` (the decorator's, not its parameters') are checks of the request
    line that take the request only, such as a path that must not end in '/': they run before the
    decision, as on a route without this class, so such a path is refused before the token is read."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        read_body_and_answer = super().get_route_handler()
        first = [d.call for d in self.dependant.dependencies if isinstance(d.call, AuthenticatedFirst)]
        if not first:
            return read_body_and_answer
        request_line_checks = [d.dependency for d in self.dependencies if d.dependency is not None]
        for check in request_line_checks:
            if list(inspect.signature(check).parameters) != ["request"]:
                raise TypeError(f"{self.path}: a request-line check takes the request only, not {check}")

        async def authenticated_first(request: Request) -> Response:
            for check in request_line_checks:
                checked = check(request)
                if inspect.isawaitable(checked):
                    await checked
            for dependency in first:
                await dependency.decide(request)
            try:
                return await read_body_and_answer(request)
            except Exception as exc:
                await first[0].report_unrecorded(request, exc)
                raise
            except asyncio.CancelledError:
                await first[0].report_cancelled(request)
                raise

        return authenticated_first
