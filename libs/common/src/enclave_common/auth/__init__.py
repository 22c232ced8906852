"""Identity and access: bearer-token verification, roles, the access policy, grants, patient
restrictions, rate limits.

The FastAPI dependency lives in :mod:`enclave_common.auth.fastapi`, the MongoDB stores in
:mod:`enclave_common.auth.grants_mongo` and :mod:`enclave_common.auth.restrictions_mongo`, and the
development token issuer in :mod:`enclave_common.auth.dev_issuer`; they are not imported here.
"""

from enclave_common.auth.actions import BREAK_GLASS_ACTIONS, Action
from enclave_common.auth.errors import (
    AuthenticationError,
    AuthFailure,
    InvalidGrantError,
    InvalidRestrictionError,
    InvalidTokenRevocationError,
    KeySourceUnavailable,
)
from enclave_common.auth.grants import Grant, GrantKind, GrantQuery, GrantStore, InMemoryGrantStore
from enclave_common.auth.jwks import KeySource, RemoteKeySource, StaticKeySource, parse_jwks
from enclave_common.auth.policy import (
    DEFAULT_POLICY,
    POLICY,
    AccessPolicy,
    Basis,
    Decision,
    Outcome,
    Resource,
    Scope,
    render_policy_table,
)
from enclave_common.auth.ratelimit import RateDecision, RateLimit, RateLimiter
from enclave_common.auth.restrictions import (
    InMemoryRestrictionStore,
    LiftedRestriction,
    Restriction,
    RestrictionStore,
)
from enclave_common.auth.roles import Principal, Role
from enclave_common.auth.token_revocations import (
    InMemoryTokenRevocationStore,
    RevokedTokens,
    TokenRevocation,
    TokenRevocationStore,
)
from enclave_common.auth.tokens import TokenRules, TokenVerifier

__all__ = [
    "BREAK_GLASS_ACTIONS",
    "DEFAULT_POLICY",
    "POLICY",
    "AccessPolicy",
    "Action",
    "AuthFailure",
    "AuthenticationError",
    "Basis",
    "Decision",
    "Grant",
    "GrantKind",
    "GrantQuery",
    "GrantStore",
    "InMemoryGrantStore",
    "InMemoryRestrictionStore",
    "InMemoryTokenRevocationStore",
    "InvalidGrantError",
    "InvalidRestrictionError",
    "InvalidTokenRevocationError",
    "KeySource",
    "KeySourceUnavailable",
    "LiftedRestriction",
    "Outcome",
    "Principal",
    "RateDecision",
    "RateLimit",
    "RateLimiter",
    "RemoteKeySource",
    "Resource",
    "Restriction",
    "RestrictionStore",
    "RevokedTokens",
    "Role",
    "Scope",
    "StaticKeySource",
    "TokenRevocation",
    "TokenRevocationStore",
    "TokenRules",
    "TokenVerifier",
    "parse_jwks",
    "render_policy_table",
]
