"""What a principal may ask to do: the rows of the access policy."""

from __future__ import annotations

from enum import StrEnum


class Action(StrEnum):
    """One protected operation. ``phi`` marks reads that reveal protected health information."""

    UPLOAD = "upload"
    READ_STATUS = "read_status"
    READ_RESULTS_PHI = "read_results_phi"
    READ_RESULTS_DEID = "read_results_deid"
    QUERY_PATIENT = "query_patient"
    READ_LINKAGE = "read_linkage"
    AUDIT_QUERY = "audit_query"
    AUDIT_VERIFY = "audit_verify"
    AUDIT_EXPORT = "audit_export"
    READ_GRANTS = "read_grants"
    MANAGE_GRANTS = "manage_grants"
    READ_RESTRICTIONS = "read_restrictions"
    MANAGE_RESTRICTIONS = "manage_restrictions"
    #: A patient id's tenant-scoped pseudonym (``patient_key``), to query the audit trail for one
    #: patient (an accounting of who accessed its records): the id is the caller's, the key opaque.
    QUERY_PATIENT_KEY = "query_patient_key"
    #: End every token one subject of the tenant holds now (enclave_common.auth.token_revocations).
    REVOKE_TOKENS = "revoke_tokens"
    MANAGE_KEYS = "manage_keys"
    BREAK_GLASS = "break_glass"

    @property
    def phi(self) -> bool:
        return self in _PHI_ACTIONS


_PHI_ACTIONS = frozenset({Action.READ_RESULTS_PHI, Action.QUERY_PATIENT, Action.READ_LINKAGE})

BREAK_GLASS_ACTIONS: frozenset[Action] = _PHI_ACTIONS
"""What an open break-glass session covers for its one patient."""
