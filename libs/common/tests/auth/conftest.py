from __future__ import annotations

import pytest
from enclave_common.auth import StaticKeySource, TokenRules, TokenVerifier
from enclave_common.auth.dev_issuer import DEV_AUDIENCE, DEV_ISSUER, DevIssuer


@pytest.fixture(scope="session")
def issuer() -> DevIssuer:
    """One ES256 and one RS256 key for the whole run (RSA generation is the slow part)."""
    return DevIssuer.generate()


@pytest.fixture
def rules() -> TokenRules:
    return TokenRules(issuer=DEV_ISSUER, audience=DEV_AUDIENCE)


@pytest.fixture
def verifier(issuer: DevIssuer, rules: TokenRules) -> TokenVerifier:
    return TokenVerifier(rules, StaticKeySource.from_jwks(issuer.jwks(), algorithms=rules.algorithms))
