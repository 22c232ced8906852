"""Routes with a JSON body that authenticate and check the caller's role before the body is parsed.

FastAPI reads and parses a route's declared body before it resolves the route's dependencies, so
before the access guard: a caller without a token had its JSON parsed, and a body that was not JSON
answered 422 with what the API expects instead of 401 (or 403 for a role that may not call the
route). A route of :class:`AuthenticatedBodyRoute` whose principal comes from an
:class:`AuthenticatedFirst` dependency makes that decision first, then FastAPI reads, parses and
validates the body as it would (the same 422), and the route's OpenAPI document still names the body
schema. The body's size is bounded before either, by the common body limit (413).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from enclave_common.auth import Action, Principal
from enclave_common.auth.fastapi import AccessGuard
from fastapi import Request, Response
from fastapi.routing import APIRoute


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


class AuthenticatedBodyRoute(APIRoute):
    """An API route whose :class:`AuthenticatedFirst` dependencies decide before FastAPI reads and
    parses the request body (FastAPI's documented extension point: a wrapped route handler)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        read_body_and_answer = super().get_route_handler()
        first = [d.call for d in self.dependant.dependencies if isinstance(d.call, AuthenticatedFirst)]
        if not first:
            return read_body_and_answer

        async def authenticated_first(request: Request) -> Response:
            for dependency in first:
                await dependency.decide(request)
            return await read_body_and_answer(request)

        return authenticated_first
