"""Token revocation: an admin ends every token a subject of its tenant holds now, before they expire.

A revocation names a subject and an instant: tokens issued (``iat``) at or before it, or up to the
clock skew the verifier tolerates after it (its leeway, 30 s: an identity provider whose clock runs
ahead stamps a token issued before the revocation with a later ``iat``), are refused with 401
``revoked``; tokens issued later are accepted, so the person signs in again and goes on, unless the
identity provider no longer lets it (a stolen token, an employee who left: disable the account there,
then revoke here). A token without ``iat`` cannot be told apart and is refused once its subject has a
revocation. A revocation lapses after the retention (``retention``, at least the longest lifetime of
the tokens the identity provider issues): every token it could refuse has expired by then.

The access guard checks every request against :class:`RevokedTokens`, an in-memory map refreshed from
the :class:`TokenRevocationStore`: in the gateway the one its route writes (the replica that stores a
revocation applies it at once; the others within their refresh interval), in the audit service the
one its consumer writes from the revocations it records (enclave_audit.token_revocations). Written by hand: revocation by issue
time is a server's own state, no JWT library keeps it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog

from enclave_common.auth.roles import Principal

log = structlog.get_logger("enclave.auth")


@dataclass(frozen=True, slots=True)
class TokenRevocation:
    """The tokens of ``subject`` in ``tenant`` issued at or before ``revoked_before`` are refused."""

    tenant: str
    subject: str
    revoked_before: datetime
    revoked_by: str
    #: Why (kept with the revocation, never put in events or logs, as for grants).
    justification: str


class TokenRevocationStore(Protocol):
    """Where revocations live: one per tenant and subject, the latest instant kept."""

    async def revoke(self, revocation: TokenRevocation) -> None:
        """Store ``revocation``; a subject revoked already keeps the later of the two instants."""
        ...

    async def since(self, cutoff: datetime) -> Sequence[TokenRevocation]:
        """Every subject's revocation after ``cutoff``, of every tenant (what :class:`RevokedTokens`
        holds; older ones have lapsed)."""
        ...


class InMemoryTokenRevocationStore:
    """:class:`TokenRevocationStore` in a dict: for tests and as the reference semantics."""

    def __init__(self) -> None:
        self._revocations: dict[tuple[str, str], TokenRevocation] = {}

    async def revoke(self, revocation: TokenRevocation) -> None:
        key = (revocation.tenant, revocation.subject)
        held = self._revocations.get(key)
        if held is None or held.revoked_before < revocation.revoked_before:
            self._revocations[key] = revocation

    async def since(self, cutoff: datetime) -> Sequence[TokenRevocation]:
        return [r for r in self._revocations.values() if r.revoked_before > cutoff]


class RevokedTokens:
    """The revocations in effect, in memory, for the check every request makes (no database read on
    the request path). :meth:`refresh` reads them all from the store; :meth:`note` applies one this
    replica stored, at once."""

    def __init__(
        self,
        store: TokenRevocationStore,
        *,
        skew: timedelta = timedelta(seconds=30),
        retention: timedelta = timedelta(hours=24),
    ) -> None:
        self.store = store
        self.skew = skew
        self.retention = retention
        self._before: dict[tuple[str, str], datetime] = {}
        #: When the last refresh succeeded (None before the first).
        self.refreshed_at: datetime | None = None

    def revoked_before(self, principal: Principal) -> datetime | None:
        """The revocation that refuses ``principal``'s token, or None when it is not revoked."""
        before = self._before.get((principal.tenant, principal.subject))
        if before is None:
            return None
        if principal.issued_at is None or principal.issued_at <= before + self.skew:
            return before
        return None

    def age_seconds(self, now: datetime) -> float:
        """Seconds since the last successful refresh (infinite before the first): what a replica that
        cannot read the store may be missing of the other replicas' revocations."""
        return float("inf") if self.refreshed_at is None else (now - self.refreshed_at).total_seconds()

    def age_now(self) -> float:
        """:meth:`age_seconds` now: what a service's ``..._token_revocations_age_seconds`` gauge reads."""
        return self.age_seconds(datetime.now(UTC))

    def note(self, revocation: TokenRevocation) -> None:
        key = (revocation.tenant, revocation.subject)
        held = self._before.get(key)
        if held is None or held < revocation.revoked_before:
            self._before[key] = revocation.revoked_before

    async def refresh(self, now: datetime) -> int:
        """Read the revocations within the retention from the store, and drop those that lapsed (a
        revocation is never withdrawn, so what this replica noted meanwhile is kept); how many are
        held."""
        cutoff = now - self.retention
        found = await self.store.since(cutoff)
        self._before = {key: at for key, at in self._before.items() if at > cutoff}
        for revocation in found:
            self.note(revocation)
        self.refreshed_at = now
        return len(self._before)

    async def refresh_forever(self, interval_s: float) -> None:
        """:meth:`refresh` every ``interval_s`` (each read bounded by the source's own timeout); one
        that fails keeps what is held and is logged: revocations are never withdrawn, so what is held
        stays true, only a newer one waits."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh(datetime.now(UTC))
            except Exception as exc:
                log.warning(
                    "token revocations could not be read; newer ones wait for the next read",
                    error=type(exc).__name__,
                )
