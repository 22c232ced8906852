"""Bearer token verification: OIDC access tokens (JWT) signed by the tenant's identity provider.

Signature and registered-claim checks are pyjwt's. What is decided here: an allow-list of
asymmetric algorithms read from configuration, never from the token (so ``alg: none`` and
HS256-signed-with-the-public-key are refused before any key is touched); the key is chosen by
``kid`` and must itself be of the token's algorithm; iss, aud, exp, nbf and iat are checked
with a small leeway; the tenant and roles come from configurable claims. Every failure is an
:class:`AuthenticationError` whose message can go back to the client: it never echoes the
token or anything read from it.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from jwt import exceptions as jwt_errors

from enclave_common.auth.errors import AuthenticationError, AuthFailure
from enclave_common.auth.jwks import KeySource
from enclave_common.auth.roles import Principal, Role
from enclave_common.errors import ConfigurationError

ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
DEFAULT_ALGORITHMS = ("ES256", "RS256")
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_KID_CHARS = 256
_MAX_SUBJECT_CHARS = 256
_KNOWN_ROLES = {r.value: r for r in Role}


@dataclass(frozen=True, slots=True)
class TokenRules:
    """What a token must satisfy. ``tenant_claim``/``roles_claim`` may be a claim name (also a URL
    such as ``https://enclave.example/tenant``) or a dotted path (``realm_access.roles``)."""

    issuer: str
    audience: str
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway_seconds: int = 30
    tenant_claim: str = "tenant"
    roles_claim: str = "roles"
    require_roles_claim: bool = True
    max_token_bytes: int = 8192

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience:
            raise ConfigurationError("token rules need an issuer and an audience")
        refused = sorted(set(self.algorithms) - ASYMMETRIC_ALGORITHMS)
        if refused or not self.algorithms:
            raise ConfigurationError(
                f"token algorithms {refused or '[]'} are not accepted; "
                f"choose from the asymmetric {sorted(ASYMMETRIC_ALGORITHMS)}"
            )
        if not 0 <= self.leeway_seconds <= 300:
            raise ConfigurationError("leeway_seconds must be between 0 and 300")


def _fail(failure: AuthFailure, message: str) -> AuthenticationError:
    return AuthenticationError(failure, message)


@dataclass(frozen=True, slots=True)
class _Verified:
    principal: Principal
    kid: str
    key: Any
    usable_until: float  # exp + leeway: the instant pyjwt would start refusing the token


class TokenVerifier:
    """Turns a bearer token into a :class:`Principal`, or raises :class:`AuthenticationError`.

    A token that verified is remembered (at most ``cache_size`` tokens, least recently used first
    out), so a client sending the same token with every request pays for the signature once. A
    remembered token is accepted only while it has not expired (exp plus the leeway, as pyjwt
    decides) and while its ``kid`` still resolves to the very key that verified it: a key removed
    or replaced in the JWKS stops its tokens at the key source's next refresh, as before.
    """

    def __init__(
        self,
        rules: TokenRules,
        keys: KeySource,
        *,
        cache_size: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rules = rules
        self.keys = keys
        self._cache: OrderedDict[str, _Verified] = OrderedDict()
        self._cache_size = cache_size
        self._clock = clock

    async def _remembered(self, token: str) -> Principal | None:
        verified = self._cache.get(token)
        if verified is None:
            return None
        if self._clock() > verified.usable_until or await self.keys.key_for(verified.kid) is not verified.key:
            self._cache.pop(token, None)
            return None
        self._cache.move_to_end(token)
        return verified.principal

    def _remember(
        self, token: str, kid: str, key: Any, claims: Mapping[str, Any], principal: Principal
    ) -> None:
        if self._cache_size <= 0:
            return
        self._cache[token] = _Verified(principal, kid, key, float(claims["exp"]) + self.rules.leeway_seconds)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def verify_bearer(self, token: str) -> Principal:
        """Verify ``token`` (the part after ``Bearer ``). Raises :class:`AuthenticationError`, or
        :class:`~enclave_common.auth.errors.KeySourceUnavailable` when no keys can be had."""
        rules = self.rules
        if not token or len(token) > rules.max_token_bytes or not token.isascii():
            raise _fail(AuthFailure.MALFORMED, f"token is not a JWT of at most {rules.max_token_bytes} bytes")
        remembered = await self._remembered(token)
        if remembered is not None:
            return remembered
        try:
            header = jwt.get_unverified_header(token)
        except jwt_errors.PyJWTError:
            raise _fail(AuthFailure.MALFORMED, "token is not a well-formed JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in rules.algorithms:
            raise _fail(
                AuthFailure.ALG_NOT_ALLOWED,
                f"token algorithm is not accepted; accepted: {', '.join(rules.algorithms)}",
            )
        if "crit" in header:
            raise _fail(AuthFailure.MALFORMED, "token header has critical extensions; none are supported")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > _MAX_KID_CHARS:
            raise _fail(AuthFailure.MALFORMED, "token header must name its signing key (kid)")
        key = await self.keys.key_for(kid)
        if key is None:
            raise _fail(
                AuthFailure.UNKNOWN_KID, "token is signed by a key the identity provider does not publish"
            )
        if key.algorithm_name != alg:
            raise _fail(AuthFailure.ALG_NOT_ALLOWED, "token algorithm does not match its signing key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=rules.audience,
                issuer=rules.issuer,
                leeway=rules.leeway_seconds,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt_errors.PyJWTError as exc:
            raise _map_error(exc, rules) from None
        principal = self._principal(claims)
        self._remember(token, kid, key, claims, principal)
        return principal

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        rules = self.rules
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > _MAX_SUBJECT_CHARS:
            raise _fail(
                AuthFailure.MALFORMED, f"token sub must be a string of 1 to {_MAX_SUBJECT_CHARS} characters"
            )
        tenant = claim_at(claims, rules.tenant_claim)
        if tenant is None:
            raise _fail(AuthFailure.MISSING_CLAIM, f"token lacks the {rules.tenant_claim!r} claim")
        if not isinstance(tenant, str) or not TENANT_PATTERN.match(tenant):
            raise _fail(
                AuthFailure.MALFORMED,
                f"token {rules.tenant_claim!r} claim must match {TENANT_PATTERN.pattern}",
            )
        raw_roles = claim_at(claims, rules.roles_claim)
        if raw_roles is None:
            if rules.require_roles_claim:
                raise _fail(AuthFailure.MISSING_CLAIM, f"token lacks the {rules.roles_claim!r} claim")
            raw_roles = []
        if isinstance(raw_roles, str):
            raw_roles = raw_roles.split()
        if not isinstance(raw_roles, list) or not all(isinstance(r, str) for r in raw_roles):
            raise _fail(
                AuthFailure.MALFORMED,
                f"token {rules.roles_claim!r} claim must be a list of strings or a space-separated string",
            )
        roles = frozenset(_KNOWN_ROLES[r] for r in raw_roles if r in _KNOWN_ROLES)
        ignored = frozenset(r for r in raw_roles if r not in _KNOWN_ROLES)
        jti = claims.get("jti")
        try:
            expires_at = datetime.fromtimestamp(int(claims["exp"]), tz=UTC)
            iat = claims.get("iat")
            issued_at = datetime.fromtimestamp(int(iat), tz=UTC) if iat is not None else None
        except (OverflowError, OSError, ValueError, TypeError):
            raise _fail(
                AuthFailure.MALFORMED, "token exp and iat must be times before the year 10000"
            ) from None
        return Principal(
            subject=subject,
            tenant=tenant,
            roles=roles,
            issuer=rules.issuer,
            token_id=jti if isinstance(jti, str) else None,
            expires_at=expires_at,
            issued_at=issued_at,
            ignored_roles=ignored,
        )


def claim_at(claims: Mapping[str, Any], name: str) -> Any:
    """The claim called ``name``, or, when there is none and the name has dots, the value at that
    dotted path (``realm_access.roles``). None when absent."""
    if name in claims:
        return claims[name]
    if "." not in name:
        return None
    node: Any = claims
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _map_error(exc: jwt_errors.PyJWTError, rules: TokenRules) -> AuthenticationError:
    """pyjwt's exception -> our code and a client-safe message (pyjwt's text is not passed on)."""
    if isinstance(exc, jwt_errors.ExpiredSignatureError):
        return _fail(AuthFailure.EXPIRED, "token has expired")
    if isinstance(exc, jwt_errors.ImmatureSignatureError):
        return _fail(AuthFailure.NOT_YET_VALID, "token is not valid yet (nbf or iat in the future)")
    if isinstance(exc, jwt_errors.InvalidAudienceError):
        return _fail(AuthFailure.WRONG_AUDIENCE, f"token audience must include {rules.audience!r}")
    if isinstance(exc, jwt_errors.InvalidIssuerError):
        return _fail(AuthFailure.WRONG_ISSUER, f"token issuer must be {rules.issuer!r}")
    if isinstance(exc, jwt_errors.MissingRequiredClaimError):
        return _fail(AuthFailure.MISSING_CLAIM, f"token lacks the required {exc.claim!r} claim")
    if isinstance(exc, jwt_errors.InvalidSignatureError):
        return _fail(AuthFailure.BAD_SIGNATURE, "token signature does not verify")
    if isinstance(exc, jwt_errors.InvalidAlgorithmError):
        return _fail(AuthFailure.ALG_NOT_ALLOWED, "token algorithm is not accepted for its key")
    return _fail(AuthFailure.MALFORMED, "token is not a well-formed JWT with valid claims")
