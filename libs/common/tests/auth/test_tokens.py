"""JWT attacks and claim handling of TokenVerifier.verify_bearer."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from enclave_common.auth import (
    AuthenticationError,
    AuthFailure,
    Role,
    StaticKeySource,
    TokenRules,
    TokenVerifier,
)
from enclave_common.auth.dev_issuer import DEV_AUDIENCE, DEV_ISSUER, DevIssuer
from enclave_common.errors import ConfigurationError


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segments(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    head, body, sig = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return (
        json.loads(base64.urlsafe_b64decode(pad(head))),
        json.loads(base64.urlsafe_b64decode(pad(body))),
        sig,
    )


def forge(
    header: dict[str, Any],
    payload: dict[str, Any],
    signature: bytes | None = None,
    secret: bytes | None = None,
) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if secret is not None:
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature or b'')}"


async def refused(verifier: TokenVerifier, token: str, failure: AuthFailure) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as caught:
        await verifier.verify_bearer(token)
    assert caught.value.failure is failure, str(caught.value)
    assert caught.value.code == failure.value
    message = str(caught.value)
    for part in token.split("."):
        if len(part) > 8:
            assert part not in message, "the error message must never echo the token"
    return caught.value


def mint(dev: DevIssuer, **overrides: Any) -> str:
    kwargs: dict[str, Any] = {"subject": "alice", "tenant": "hospital-a", "roles": ["clinician"]}
    kwargs.update(overrides)
    return dev.mint(**kwargs)


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
async def test_valid_token_gives_the_principal(issuer: DevIssuer, verifier: TokenVerifier, alg: str) -> None:
    token = mint(issuer, alg=alg, roles=["clinician", "researcher", "billing"], ttl_seconds=600)
    principal = await verifier.verify_bearer(token)
    assert principal.subject == "alice"
    assert principal.tenant == "hospital-a"
    assert principal.roles == {Role.CLINICIAN, Role.RESEARCHER}
    assert principal.ignored_roles == {"billing"}
    assert principal.issuer == DEV_ISSUER
    assert principal.token_id == segments(token)[1]["jti"]
    assert principal.expires_at is not None
    assert abs(principal.expires_at - (datetime.now(UTC) + timedelta(seconds=600))) < timedelta(seconds=5)
    # iat, for token revocation (enclave_common.auth.token_revocations)
    assert principal.issued_at == datetime.fromtimestamp(segments(token)[1]["iat"], tz=UTC)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_is_rejected(issuer: DevIssuer, verifier: TokenVerifier, alg: str) -> None:
    header, payload, _ = segments(mint(issuer))
    await refused(verifier, forge({**header, "alg": alg}, payload), AuthFailure.ALG_NOT_ALLOWED)


async def test_alg_header_missing_is_rejected(issuer: DevIssuer, verifier: TokenVerifier) -> None:
    header, payload, _ = segments(mint(issuer))
    header.pop("alg")
    await refused(verifier, forge(header, payload, b"x"), AuthFailure.ALG_NOT_ALLOWED)


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
@pytest.mark.parametrize("secret_form", ["pem", "jwk", "der"])
async def test_hs256_signed_with_the_public_key_is_rejected(
    issuer: DevIssuer, verifier: TokenVerifier, alg: str, secret_form: str
) -> None:
    key = issuer.current(alg)
    public = key.private_key.public_key()
    secret = {
        "pem": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "der": public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "jwk": json.dumps(key.public_jwk()).encode(),
    }[secret_form]
    header, payload, _ = segments(mint(issuer, alg=alg, roles=["admin"]))
    token = forge({**header, "alg": "HS256"}, payload, secret=secret)
    await refused(verifier, token, AuthFailure.ALG_NOT_ALLOWED)


def test_symmetric_algorithms_cannot_be_configured() -> None:
    for algorithms in (("HS256",), ("ES256", "HS512"), ("none",), ()):
        with pytest.raises(ConfigurationError, match="asymmetric"):
            TokenRules(issuer=DEV_ISSUER, audience=DEV_AUDIENCE, algorithms=algorithms)


async def test_allowed_alg_with_a_key_of_another_type_is_rejected(
    issuer: DevIssuer, verifier: TokenVerifier
) -> None:
    """RS256 header pointing at the EC key (and the reverse): the key decides, not the header."""
    for signing_alg, other in (("ES256", "RS256"), ("RS256", "ES256")):
        header, payload, sig = segments(mint(issuer, alg=signing_alg))
        token = forge(
            {**header, "alg": other}, payload, base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
        )
        await refused(verifier, token, AuthFailure.ALG_NOT_ALLOWED)


async def test_alg_outside_a_narrower_allow_list_is_rejected(issuer: DevIssuer) -> None:
    rules = TokenRules(issuer=DEV_ISSUER, audience=DEV_AUDIENCE, algorithms=("ES256",))
    verifier = TokenVerifier(rules, StaticKeySource.from_jwks(issuer.jwks(), algorithms=rules.algorithms))
    assert (await verifier.verify_bearer(mint(issuer, alg="ES256"))).subject == "alice"
    await refused(verifier, mint(issuer, alg="RS256"), AuthFailure.ALG_NOT_ALLOWED)


async def test_unknown_kid_is_rejected(verifier: TokenVerifier) -> None:
    stranger = DevIssuer.generate(["ES256"])
    await refused(verifier, mint(stranger), AuthFailure.UNKNOWN_KID)


async def test_missing_kid_is_rejected(issuer: DevIssuer, verifier: TokenVerifier) -> None:
    header, payload, sig = segments(mint(issuer))
    header.pop("kid")
    await refused(verifier, forge(header, payload, b"sig"), AuthFailure.MALFORMED)


async def test_expired_token_is_rejected_beyond_the_leeway(
    issuer: DevIssuer, verifier: TokenVerifier
) -> None:
    now = datetime.now(UTC)
    await refused(verifier, mint(issuer, now=now - timedelta(hours=2), ttl_seconds=3600), AuthFailure.EXPIRED)
    await refused(
        verifier, mint(issuer, now=now - timedelta(seconds=100), ttl_seconds=60), AuthFailure.EXPIRED
    )
    within_leeway = mint(issuer, now=now - timedelta(seconds=70), ttl_seconds=60)
    assert (await verifier.verify_bearer(within_leeway)).subject == "alice"


async def test_nbf_in_the_future_is_rejected(issuer: DevIssuer, verifier: TokenVerifier) -> None:
    now = datetime.now(UTC)
    token = mint(issuer, now=now, not_before=now + timedelta(minutes=10))
    await refused(verifier, token, AuthFailure.NOT_YET_VALID)
    slightly_early = mint(issuer, now=now, not_before=now + timedelta(seconds=10))
    assert (await verifier.verify_bearer(slightly_early)).subject == "alice"


async def test_iat_in_the_future_is_rejected(issuer: DevIssuer, verifier: TokenVerifier) -> None:
    token = mint(issuer, now=datetime.now(UTC) + timedelta(hours=1))
    await refused(verifier, token, AuthFailure.NOT_YET_VALID)


async def test_wrong_issuer_is_rejected(issuer: DevIssuer, verifier: TokenVerifier) -> None:
    error = await refused(verifier, mint(issuer, issuer="https://evil.example"), AuthFailure.WRONG_ISSUER)
    assert DEV_ISSUER in str(error)
    assert "evil" not in str(error)


async def test_wrong_audience_is_rejected(issuer: DevIssuer, verifier: TokenVerifier) -> None:
    await refused(verifier, mint(issuer, audience="another-api"), AuthFailure.WRONG_AUDIENCE)


async def test_audience_list_containing_ours_is_accepted(issuer: DevIssuer, verifier: TokenVerifier) -> None:
    token = mint(issuer, extra_claims={"aud": ["another-api", DEV_AUDIENCE]})
    assert (await verifier.verify_bearer(token)).tenant == "hospital-a"
    await refused(verifier, mint(issuer, extra_claims={"aud": ["a", "b"]}), AuthFailure.WRONG_AUDIENCE)


async def test_tampered_payload_is_rejected(issuer: DevIssuer, verifier: TokenVerifier) -> None:
    for alg in ("ES256", "RS256"):
        token = mint(issuer, alg=alg, roles=["researcher"])
        head, body, sig = token.split(".")
        payload = segments(token)[1]
        payload["roles"] = ["admin"]
        tampered = f"{head}.{b64(json.dumps(payload).encode())}.{sig}"
        await refused(verifier, tampered, AuthFailure.BAD_SIGNATURE)
        payload["roles"], payload["tenant"] = ["researcher"], "hospital-b"
        await refused(
            verifier, f"{head}.{b64(json.dumps(payload).encode())}.{sig}", AuthFailure.BAD_SIGNATURE
        )


async def test_tampered_signature_is_rejected_before_claims(
    issuer: DevIssuer, verifier: TokenVerifier
) -> None:
    expired = mint(issuer, now=datetime.now(UTC) - timedelta(hours=3))
    head, body, sig = expired.split(".")
    flipped = sig[:-4] + ("AAAA" if sig[-4:] != "AAAA" else "BBBB")
    await refused(verifier, f"{head}.{body}.{flipped}", AuthFailure.BAD_SIGNATURE)


@pytest.mark.parametrize("claim", ["sub", "exp", "iss", "aud"])
async def test_missing_registered_claim_is_rejected(
    issuer: DevIssuer, verifier: TokenVerifier, claim: str
) -> None:
    """Minted with the claim, then re-signed without it by the genuine key."""
    token = mint(issuer)
    payload = segments(token)[1]
    payload.pop(claim)
    import jwt

    key = issuer.current("ES256")
    resigned = jwt.encode(payload, key.private_key, algorithm="ES256", headers={"kid": key.kid})
    await refused(verifier, resigned, AuthFailure.MISSING_CLAIM)


async def test_missing_tenant_or_roles_is_rejected(issuer: DevIssuer, verifier: TokenVerifier) -> None:
    error = await refused(verifier, mint(issuer, tenant=None), AuthFailure.MISSING_CLAIM)
    assert "'tenant'" in str(error)
    error = await refused(verifier, mint(issuer, roles_claim="groups"), AuthFailure.MISSING_CLAIM)
    assert "'roles'" in str(error)


@pytest.mark.parametrize("tenant", ["", "hospital a", "../b", "x" * 65, "-lead"])
async def test_malformed_tenant_is_rejected(issuer: DevIssuer, verifier: TokenVerifier, tenant: str) -> None:
    await refused(verifier, mint(issuer, extra_claims={"tenant": tenant}), AuthFailure.MALFORMED)


async def test_roles_must_be_strings(issuer: DevIssuer, verifier: TokenVerifier) -> None:
    await refused(verifier, mint(issuer, extra_claims={"roles": [1, 2]}), AuthFailure.MALFORMED)
    await refused(verifier, mint(issuer, extra_claims={"roles": {"clinician": True}}), AuthFailure.MALFORMED)


async def test_roles_as_space_separated_string(issuer: DevIssuer, verifier: TokenVerifier) -> None:
    principal = await verifier.verify_bearer(mint(issuer, extra_claims={"roles": "auditor admin"}))
    assert principal.roles == {Role.AUDITOR, Role.ADMIN}


async def test_configurable_claim_names(issuer: DevIssuer) -> None:
    rules = TokenRules(
        issuer=DEV_ISSUER,
        audience=DEV_AUDIENCE,
        tenant_claim="https://enclave.example/tenant",
        roles_claim="realm_access.roles",
    )
    verifier = TokenVerifier(rules, StaticKeySource.from_jwks(issuer.jwks(), algorithms=rules.algorithms))
    token = issuer.mint(
        subject="bob",
        tenant="hospital-b",
        tenant_claim="https://enclave.example/tenant",
        roles=[],
        roles_claim="unused",
        extra_claims={"realm_access": {"roles": ["auditor"]}},
    )
    principal = await verifier.verify_bearer(token)
    assert (principal.tenant, principal.roles) == ("hospital-b", {Role.AUDITOR})
    await refused(verifier, mint(issuer), AuthFailure.MISSING_CLAIM)


async def test_roles_claim_may_be_optional(issuer: DevIssuer) -> None:
    rules = TokenRules(issuer=DEV_ISSUER, audience=DEV_AUDIENCE, require_roles_claim=False)
    verifier = TokenVerifier(rules, StaticKeySource.from_jwks(issuer.jwks(), algorithms=rules.algorithms))
    principal = await verifier.verify_bearer(mint(issuer, roles_claim="groups"))
    assert principal.roles == frozenset()


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "a.b", "a.b.c", "é.é.é", "x" * 9000, "eyJhbGciOiJFUzI1NiJ9.e30", "....."],
)
async def test_malformed_tokens_are_rejected(verifier: TokenVerifier, token: str) -> None:
    await refused(verifier, token, AuthFailure.MALFORMED)


async def test_critical_header_extensions_are_rejected(issuer: DevIssuer, verifier: TokenVerifier) -> None:
    import jwt

    key = issuer.current("ES256")
    payload = segments(mint(issuer))[1]
    token = jwt.encode(payload, key.private_key, algorithm="ES256", headers={"kid": key.kid, "crit": ["exp"]})
    await refused(verifier, token, AuthFailure.MALFORMED)


# -- the verified-token cache


class CountingKeys(StaticKeySource):
    """A static key source that can drop a key (as a JWKS refresh after a rotation would)."""

    def drop(self, kid: str) -> None:
        self._keys.pop(kid)


def counting_decode(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import jwt

    calls: list[str] = []
    original = jwt.decode

    def decode(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return original(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", decode)
    return calls


async def test_a_verified_token_is_not_verified_again(
    issuer: DevIssuer, rules: TokenRules, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = counting_decode(monkeypatch)
    verifier = TokenVerifier(rules, StaticKeySource.from_jwks(issuer.jwks(), algorithms=rules.algorithms))
    token = mint(issuer)
    first = await verifier.verify_bearer(token)
    assert await verifier.verify_bearer(token) is first
    assert decoded == [token]
    other = mint(issuer, subject="bob")
    assert (await verifier.verify_bearer(other)).subject == "bob"
    assert decoded == [token, other]


async def test_a_remembered_token_stops_at_its_expiry(
    issuer: DevIssuer, rules: TokenRules, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = counting_decode(monkeypatch)
    now = [datetime.now(UTC).timestamp()]
    verifier = TokenVerifier(
        rules, StaticKeySource.from_jwks(issuer.jwks(), algorithms=rules.algorithms), clock=lambda: now[0]
    )
    token = mint(issuer, ttl_seconds=60)
    await verifier.verify_bearer(token)
    now[0] += 60 + rules.leeway_seconds - 1
    await verifier.verify_bearer(token)
    assert len(decoded) == 1, "still within exp + leeway: served from memory"
    now[0] += 2
    await verifier.verify_bearer(token)  # past it by the cache's clock: verified by pyjwt again
    assert len(decoded) == 2


async def test_a_remembered_token_stops_when_its_key_leaves_the_jwks(
    issuer: DevIssuer, rules: TokenRules
) -> None:
    keys = CountingKeys(StaticKeySource.from_jwks(issuer.jwks(), algorithms=rules.algorithms)._keys)
    verifier = TokenVerifier(rules, keys)
    token = mint(issuer)
    await verifier.verify_bearer(token)
    keys.drop(segments(token)[0]["kid"])
    await refused(verifier, token, AuthFailure.UNKNOWN_KID)


async def test_the_cache_holds_at_most_cache_size_tokens(
    issuer: DevIssuer, rules: TokenRules, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = counting_decode(monkeypatch)
    verifier = TokenVerifier(
        rules, StaticKeySource.from_jwks(issuer.jwks(), algorithms=rules.algorithms), cache_size=2
    )
    a, b, c = (mint(issuer, subject=name) for name in "abc")
    for token in (a, b, a, c):  # c evicts b, the least recently used
        await verifier.verify_bearer(token)
    assert decoded == [a, b, c]
    await verifier.verify_bearer(a)
    await verifier.verify_bearer(b)
    assert decoded == [a, b, c, b]


async def test_an_exp_past_the_year_9999_is_refused_not_a_crash(
    issuer: DevIssuer, verifier: TokenVerifier
) -> None:
    """A signed token with ``exp`` 1e30: building the principal's expiry overflowed (a 500 on every
    protected route of the gateway and the audit service; found by an API hunt)."""
    await refused(verifier, mint(issuer, extra_claims={"exp": 10**30}), AuthFailure.MALFORMED)
