"""Patient-scoped grants and break-glass sessions, and where they are kept.

A grant lets one subject of one tenant perform some actions on one patient's records for a
bounded time (the seed's "caregiver with explicit permission"). A break-glass session is the
same shape opened by a clinician for themselves, with a justification, and every read under it
raises a security alert. Both are stored server-side (never in the token) so that revocation
takes effect on the next request. Who may create which is decided in
:mod:`enclave_common.auth.policy`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from enclave_common.auth.actions import Action


class GrantKind(StrEnum):
    PATIENT = "patient"
    """Created by an admin for a caregiver."""
    BREAK_GLASS = "break_glass"
    """Opened by a clinician for themselves in an emergency."""


@dataclass(frozen=True, slots=True)
class Grant:
    """Permission for ``grantee`` to perform ``actions`` on one patient of one tenant, in a window.

    ``patient_key`` is the tenant-scoped keyed-HMAC pseudonym of the patient, never the patient id.
    Datetimes are timezone-aware; the window is ``not_before <= now < expires_at``.
    """

    grant_id: str
    kind: GrantKind
    grantee: str
    tenant: str
    patient_key: str
    actions: frozenset[Action]
    not_before: datetime
    expires_at: datetime
    justification: str
    created_by: str
    created_at: datetime
    revoked_at: datetime | None = None
    revoked_by: str | None = None
    #: False from a revocation until its access event is acknowledged: a revocation whose event Kafka
    #: refused (its DELETE answered 503) is in effect but not yet in the audit trail, and is recorded
    #: by the next DELETE of the grant. True for every grant revoked before the field existed.
    revocation_recorded: bool = True

    def is_active(self, now: datetime) -> bool:
        """True while inside the window and not revoked (revocation is effective from its instant)."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return False
        return self.not_before <= now < self.expires_at

    def covers(self, *, subject: str, tenant: str, patient_key: str, action: Action, now: datetime) -> bool:
        """Whether this grant permits ``subject`` to do ``action`` on that patient at ``now``."""
        return (
            self.grantee == subject
            and self.tenant == tenant
            and self.patient_key == patient_key
            and action in self.actions
            and self.is_active(now)
        )


@dataclass(frozen=True, slots=True)
class GrantQuery:
    """Which grants a listing selects; a field left None selects any."""

    kind: GrantKind | None = None
    grantee: str | None = None
    patient_key: str | None = None
    #: Only the grants in effect at this instant (in their window and not revoked).
    active_at: datetime | None = None
    #: Only the grants in effect at this instant or later (not revoked, not expired by then).
    unexpired_at: datetime | None = None

    def selects(self, grant: Grant) -> bool:
        return (
            (self.kind is None or grant.kind is self.kind)
            and (self.grantee is None or grant.grantee == self.grantee)
            and (self.patient_key is None or grant.patient_key == self.patient_key)
            and (self.active_at is None or (grant.revoked_at is None and grant.is_active(self.active_at)))
            and (
                self.unexpired_at is None
                or (grant.revoked_at is None and grant.expires_at > self.unexpired_at)
            )
        )


class GrantStore(Protocol):
    """Where grants live. Implementations must scope every lookup by tenant."""

    async def create(self, grant: Grant) -> None:
        """Store a new grant; ``grant_id`` is unique."""
        ...

    async def revoke(self, grant_id: str, *, tenant: str, revoked_by: str, now: datetime) -> bool:
        """Revoke a grant of ``tenant``, its revocation not yet recorded (``revocation_recorded``
        False); False when there is no such unrevoked grant in that tenant."""
        ...

    async def mark_revocation_recorded(self, grant_id: str, *, tenant: str) -> None:
        """Note that the revocation of ``grant_id`` is in the audit trail."""
        ...

    async def unrecorded_revocations(self, *, before: datetime, limit: int) -> Sequence[Grant]:
        """Revoked grants, of every tenant, whose revocation is not recorded and happened before
        ``before``: at most ``limit``, oldest first. The one lookup across tenants: the gateway's own
        sweep uses it (``enclave_gateway.revocations``), never a request."""
        ...

    async def get(self, grant_id: str, *, tenant: str) -> Grant | None:
        """One grant of ``tenant`` (None for another tenant's grant: tenants never see each other)."""
        ...

    async def active_for(self, subject: str, tenant: str, patient_key: str, now: datetime) -> Sequence[Grant]:
        """Grants and break-glass sessions of ``subject`` on that patient that are active at ``now``."""
        ...

    async def list(
        self, tenant: str, query: GrantQuery, *, limit: int, after: str | None = None
    ) -> Sequence[Grant]:
        """At most ``limit`` grants and sessions of ``tenant`` that ``query`` selects, in ``grant_id``
        order (UUIDv7: the order they were made in), after ``after`` if given."""
        ...


class InMemoryGrantStore:
    """A :class:`GrantStore` in a dict: tests, and single-process development."""

    def __init__(self) -> None:
        self._grants: dict[str, Grant] = {}
        self._lock = asyncio.Lock()

    async def create(self, grant: Grant) -> None:
        async with self._lock:
            if grant.grant_id in self._grants:
                raise ValueError("a grant with this grant_id already exists; grant ids must be unique")
            self._grants[grant.grant_id] = grant

    async def revoke(self, grant_id: str, *, tenant: str, revoked_by: str, now: datetime) -> bool:
        async with self._lock:
            grant = self._grants.get(grant_id)
            if grant is None or grant.tenant != tenant or grant.revoked_at is not None:
                return False
            self._grants[grant_id] = replace(
                grant, revoked_at=now, revoked_by=revoked_by, revocation_recorded=False
            )
            return True

    async def mark_revocation_recorded(self, grant_id: str, *, tenant: str) -> None:
        async with self._lock:
            grant = self._grants.get(grant_id)
            if grant is not None and grant.tenant == tenant:
                self._grants[grant_id] = replace(grant, revocation_recorded=True)

    async def unrecorded_revocations(self, *, before: datetime, limit: int) -> Sequence[Grant]:
        unrecorded = [
            g
            for g in self._grants.values()
            if g.revoked_at is not None and g.revoked_at < before and not g.revocation_recorded
        ]
        return sorted(unrecorded, key=lambda g: g.revoked_at or before)[:limit]

    async def get(self, grant_id: str, *, tenant: str) -> Grant | None:
        grant = self._grants.get(grant_id)
        return grant if grant is not None and grant.tenant == tenant else None

    async def list(
        self, tenant: str, query: GrantQuery, *, limit: int, after: str | None = None
    ) -> Sequence[Grant]:
        found = (
            g
            for g in self._grants.values()
            if g.tenant == tenant and (after is None or g.grant_id > after) and query.selects(g)
        )
        return sorted(found, key=lambda g: g.grant_id)[:limit]

    async def active_for(self, subject: str, tenant: str, patient_key: str, now: datetime) -> Sequence[Grant]:
        return [
            g
            for g in self._grants.values()
            if g.grantee == subject
            and g.tenant == tenant
            and g.patient_key == patient_key
            and g.is_active(now)
        ]
