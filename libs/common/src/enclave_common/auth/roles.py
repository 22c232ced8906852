"""Roles and the authenticated principal.

Roles come from the identity provider (a token claim); what each role may do is the access
policy's business (:mod:`enclave_common.auth.policy`), not this module's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class Role(StrEnum):
    """Roles of design.md, plus ``caregiver`` for principals whose only access is patient grants."""

    UPLOADER = "uploader"
    """Service account of a hospital system: uploads studies, reads their status."""
    CLINICIAN = "clinician"
    """Reads PHI results of its own tenant; may break the glass."""
    RESEARCHER = "researcher"
    """Reads de-identified results only."""
    AUDITOR = "auditor"
    """The audit API, and at the gateway only a patient id's key (to query the trail); no PHI."""
    ADMIN = "admin"
    """Keys, grants, patient restrictions, token revocations; no PHI, and no grant can give an admin PHI."""
    CAREGIVER = "caregiver"
    """Nothing by default: reads one patient's results only while an admin's grant is active."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as established by a verified bearer token.

    ``roles`` holds only roles Enclave knows; others the identity provider sends are dropped
    (and kept in ``ignored_roles`` for diagnostics, never for decisions).
    """

    subject: str
    tenant: str
    roles: frozenset[Role]
    issuer: str = ""
    token_id: str | None = None
    expires_at: datetime | None = None
    #: The token's ``iat``, when it has one (token revocation compares it).
    issued_at: datetime | None = None
    ignored_roles: frozenset[str] = field(default_factory=frozenset)

    def has_role(self, role: Role) -> bool:
        return role in self.roles

    @property
    def rate_limit_key(self) -> str:
        """The identity a rate limit counts against: one subject within one tenant."""
        return f"{self.tenant}\x1f{self.subject}"
