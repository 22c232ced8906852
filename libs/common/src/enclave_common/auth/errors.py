"""Errors of identity and access.

Every message here may be returned to an HTTP client: it names what was wrong and what is
accepted, and never quotes the token, a claim value or a key id taken from the request.
"""

from __future__ import annotations

from enum import StrEnum

from enclave_common.errors import EnclaveError, TransientError


class AuthFailure(StrEnum):
    """Machine codes of :class:`AuthenticationError` (stable: audit events and clients key on them)."""

    MISSING_TOKEN = "missing_token"  # noqa: S105 - a code, not a secret
    MALFORMED = "malformed"
    ALG_NOT_ALLOWED = "alg_not_allowed"
    UNKNOWN_KID = "unknown_kid"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    MISSING_CLAIM = "missing_claim"
    #: Issued at or before its subject's revocation (enclave_common.auth.token_revocations).
    REVOKED = "revoked"


class AuthenticationError(EnclaveError):
    """A bearer token was missing or could not be trusted: the request is answered 401."""

    code = "authentication_failed"

    def __init__(self, failure: AuthFailure, message: str) -> None:
        super().__init__(message, code=failure.value)
        self.failure = failure


class KeySourceUnavailable(TransientError):
    """The identity provider's keys could not be fetched and none are cached: answer 503, not 401."""

    code = "jwks_unavailable"


class InvalidGrantError(EnclaveError):
    """A grant or break-glass request was refused at validation (bad window, actions, justification)."""

    code = "invalid_grant"


class InvalidTokenRevocationError(EnclaveError):
    """A token revocation was refused at validation (its justification)."""

    code = "invalid_revocation"


class InvalidRestrictionError(EnclaveError):
    """A patient restriction was refused at validation (its justification)."""

    code = "invalid_restriction"
