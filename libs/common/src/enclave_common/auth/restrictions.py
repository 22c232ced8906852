"""Restricted patients: a hospital's confidentiality flag on one patient of its tenant.

A restricted patient's PHI (its results, the patient query) is not read by the tenant's
clinicians on their role alone: each of them must open a break-glass session on that patient first,
and every read under it raises a security alert (:mod:`enclave_common.auth.policy`, rule 6). This is
what hospitals do for their own staff, public figures and other patients at risk ("VIP" or
"confidential" patients). An admin's explicit patient grant to a caregiver still allows what it
names: the restriction narrows what a role gives, not what an admin granted one person.

A restriction is kept server-side, keyed by the patient's tenant-scoped pseudonym (never the patient
id), and takes effect on the next request. Lifting it moves it to the store's history, with who lifted
it and when (the justification is kept there, never put in events); each change is also an
``access.recorded`` event of action ``manage_restrictions``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from enclave_common.errors import TransientError


@dataclass(frozen=True, slots=True)
class Restriction:
    """``patient_key`` of ``tenant`` is restricted since ``restricted_at``, by ``restricted_by``."""

    tenant: str
    patient_key: str
    justification: str
    restricted_by: str
    restricted_at: datetime
    #: Raised each time a request finds the patient restricted already (:meth:`RestrictionStore.confirm`):
    #: a lifting that read an earlier revision removes nothing, so a restriction an admin was just told
    #: is in effect is not lifted under it.
    revision: int = 0


class RestrictionContended(TransientError):
    """A patient's restriction changed under a write several times in a row: try again (503)."""

    code = "restriction_contended"


@dataclass(frozen=True, slots=True)
class LiftedRestriction:
    """A restriction that was lifted, as the store's history keeps it."""

    restriction: Restriction
    lifted_by: str
    lifted_at: datetime
    #: Why it was lifted (10 to 500 characters, like every justification; never put in events).
    justification: str


class RestrictionStore(Protocol):
    """Where restrictions live. Every method is scoped by tenant."""

    async def restrict(self, restriction: Restriction) -> Restriction | None:
        """Store ``restriction``; None if stored, else the restriction already in effect on that
        patient (left unchanged)."""
        ...

    async def confirm(self, restriction: Restriction) -> Restriction | None:
        """``restriction`` with its revision raised, if it is still in effect (else None)."""
        ...

    async def lift(
        self, restriction: Restriction, *, lifted_by: str, lifted_at: datetime, justification: str
    ) -> Restriction | None:
        """Remove ``restriction`` (that one at that revision: not one made or confirmed after it),
        keeping it in the history with who lifted it, when and why: the one removed, or None if it was no
        longer in effect as it was. Repeating a lift that failed part-way is safe."""
        ...

    async def get(self, tenant: str, patient_key: str) -> Restriction | None:
        """The restriction on that patient of ``tenant``, or None (always None for another tenant's)."""
        ...

    async def list(self, tenant: str, *, limit: int, after: str | None = None) -> Sequence[Restriction]:
        """At most ``limit`` restrictions of ``tenant`` in patient-key order, after ``after`` if given."""
        ...


class InMemoryRestrictionStore:
    """A :class:`RestrictionStore` in a dict: tests, and single-process development."""

    def __init__(self) -> None:
        self._restrictions: dict[tuple[str, str], Restriction] = {}
        self.history: list[LiftedRestriction] = []
        self._lock = asyncio.Lock()

    async def restrict(self, restriction: Restriction) -> Restriction | None:
        async with self._lock:
            key = (restriction.tenant, restriction.patient_key)
            if (existing := self._restrictions.get(key)) is not None:
                return existing
            self._restrictions[key] = restriction
            return None

    async def confirm(self, restriction: Restriction) -> Restriction | None:
        async with self._lock:
            key = (restriction.tenant, restriction.patient_key)
            current = self._restrictions.get(key)
            if current is None or current.restricted_at != restriction.restricted_at:
                return None
            self._restrictions[key] = replace(current, revision=current.revision + 1)
            return self._restrictions[key]

    async def lift(
        self, restriction: Restriction, *, lifted_by: str, lifted_at: datetime, justification: str
    ) -> Restriction | None:
        async with self._lock:
            key = (restriction.tenant, restriction.patient_key)
            if self._restrictions.get(key) != restriction:
                return None
            self.history.append(LiftedRestriction(restriction, lifted_by, lifted_at, justification))
            return self._restrictions.pop(key)

    async def get(self, tenant: str, patient_key: str) -> Restriction | None:
        return self._restrictions.get((tenant, patient_key))

    async def list(self, tenant: str, *, limit: int, after: str | None = None) -> Sequence[Restriction]:
        mine = sorted(
            (r for (t, k), r in self._restrictions.items() if t == tenant and (after is None or k > after)),
            key=lambda r: r.patient_key,
        )
        return mine[:limit]
