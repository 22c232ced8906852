"""Restricted patients: a hospital's confidentiality flag on one patient of its tenant.

A restricted patient's PHI (its results, the patient query) is not read by the tenant's
clinicians on their role alone: each of them must open a break-glass session on that patient first,
and every read under it raises a security alert (:mod:`enclave_common.auth.policy`, rule 6). This is
what hospitals do for their own staff, public figures and other patients at risk ("VIP" or
"confidential" patients). An admin's explicit patient grant to a caregiver still allows what it
names: the restriction narrows what a role gives, not what an admin granted one person.

A restriction is kept server-side, keyed by the patient's tenant-scoped pseudonym (never the patient
id), and takes effect on the next request. Lifting it removes it; its history is the audit trail's
(each change is an ``access.recorded`` event of action ``manage_restrictions``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Restriction:
    """``patient_key`` of ``tenant`` is restricted since ``restricted_at``, by ``restricted_by``."""

    tenant: str
    patient_key: str
    justification: str
    restricted_by: str
    restricted_at: datetime


class RestrictionStore(Protocol):
    """Where restrictions live. Every method is scoped by tenant."""

    async def restrict(self, restriction: Restriction) -> Restriction | None:
        """Store ``restriction``; None if stored, else the restriction already in effect on that
        patient (left unchanged)."""
        ...

    async def lift(self, tenant: str, patient_key: str) -> Restriction | None:
        """Remove the restriction on that patient of ``tenant``: the one removed, or None if there was
        none."""
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
        self._lock = asyncio.Lock()

    async def restrict(self, restriction: Restriction) -> Restriction | None:
        async with self._lock:
            key = (restriction.tenant, restriction.patient_key)
            if (existing := self._restrictions.get(key)) is not None:
                return existing
            self._restrictions[key] = restriction
            return None

    async def lift(self, tenant: str, patient_key: str) -> Restriction | None:
        async with self._lock:
            return self._restrictions.pop((tenant, patient_key), None)

    async def get(self, tenant: str, patient_key: str) -> Restriction | None:
        return self._restrictions.get((tenant, patient_key))

    async def list(self, tenant: str, *, limit: int, after: str | None = None) -> Sequence[Restriction]:
        mine = sorted(
            (r for (t, k), r in self._restrictions.items() if t == tenant and (after is None or k > after)),
            key=lambda r: r.patient_key,
        )
        return mine[:limit]
