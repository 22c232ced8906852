"""JWKS key sources: parsing, caching, refresh on rotation, throttling, outage behaviour."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from enclave_common.auth import (
    AuthenticationError,
    AuthFailure,
    KeySourceUnavailable,
    RemoteKeySource,
    StaticKeySource,
    TokenRules,
    TokenVerifier,
    parse_jwks,
)
from enclave_common.auth.dev_issuer import DEV_AUDIENCE, DEV_ISSUER, DevIssuer
from enclave_common.errors import ConfigurationError

URL = "https://idp.hospital-a.example/jwks"
ALGS = ("ES256", "RS256")


class FakeIdP:
    """Serves a JWKS through httpx.MockTransport and counts requests; can be taken down."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        self.jwks = jwks
        self.requests = 0
        self.down = False
        self.status = 200

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.down:
            raise httpx.ConnectError("idp unreachable", request=request)
        return httpx.Response(self.status, json=self.jwks)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handler))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def remote(idp: FakeIdP, clock: Clock, **kwargs: Any) -> RemoteKeySource:
    return RemoteKeySource(URL, algorithms=ALGS, client=idp.client(), clock=clock, **kwargs)


def test_parse_jwks_keeps_only_usable_signature_keys(issuer: DevIssuer) -> None:
    es, rs = issuer.jwks()["keys"]
    document = {
        "keys": [
            es,
            {**rs, "use": "enc", "kid": "encryption-key"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac-key", "alg": "HS256"},
            {**es, "kid": ""},
            {key: value for key, value in rs.items() if key != "kid"},
            {"kty": "EC", "crv": "P-256", "x": "broken", "y": "broken", "kid": "broken"},
            {**rs, "kid": "rs-as-ps", "alg": "PS256"},
            "not-a-key",
            {**rs, "kid": es["kid"]},
        ]
    }
    keys = parse_jwks(document, algorithms=ALGS)
    assert set(keys) == {es["kid"]}
    assert keys[es["kid"]].algorithm_name == "ES256"


@pytest.mark.parametrize("document", [[], {}, {"keys": {}}, "keys"])
def test_parse_jwks_rejects_non_jwks(document: Any) -> None:
    with pytest.raises(ValueError, match="keys"):
        parse_jwks(document, algorithms=ALGS)


def test_static_source_needs_a_usable_key() -> None:
    with pytest.raises(ConfigurationError, match="no signature key"):
        StaticKeySource.from_jwks({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}, algorithms=ALGS)


async def test_static_source_from_the_dev_issuer_file(issuer: DevIssuer, tmp_path: Path) -> None:
    path = issuer.save(tmp_path / "keys")
    source = StaticKeySource.from_file(path, algorithms=ALGS)
    assert source.kids == {k.kid for k in issuer.keys}
    assert await source.key_for("nope") is None
    with pytest.raises(ConfigurationError, match="cannot be read"):
        StaticKeySource.from_file(tmp_path / "missing.json", algorithms=ALGS)


async def test_remote_source_caches_known_kids(issuer: DevIssuer) -> None:
    idp, clock = FakeIdP(issuer.jwks()), Clock()
    source = remote(idp, clock)
    kid = issuer.current("ES256").kid
    for _ in range(50):
        assert (await source.key_for(kid)) is not None
        clock.now += 10
    assert idp.requests == 1


async def test_unknown_kids_refetch_at_most_once_per_interval(issuer: DevIssuer) -> None:
    idp, clock = FakeIdP(issuer.jwks()), Clock()
    source = remote(idp, clock, min_refresh_interval=30)
    await source.key_for(issuer.current("ES256").kid)
    for n in range(200):
        assert await source.key_for(f"bogus-{n}") is None
    assert idp.requests == 1, "a flood of invented kids must not reach the IdP"
    clock.now += 31
    assert await source.key_for("bogus-again") is None
    assert await source.key_for("bogus-and-again") is None
    assert idp.requests == 2


async def test_concurrent_misses_share_one_fetch(issuer: DevIssuer) -> None:
    idp, clock = FakeIdP(issuer.jwks()), Clock()
    source = remote(idp, clock)
    kid = issuer.current("RS256").kid
    keys = await asyncio.gather(*(source.key_for(kid) for _ in range(20)))
    assert all(k is not None for k in keys)
    assert idp.requests == 1


async def test_rotation_new_kid_is_fetched_and_verifies() -> None:
    """The IdP rotates: tokens signed by the new key verify after one refetch; old tokens still do."""
    dev = DevIssuer.generate(["ES256"])
    idp, clock = FakeIdP(dev.jwks()), Clock()
    rules = TokenRules(issuer=DEV_ISSUER, audience=DEV_AUDIENCE)
    verifier = TokenVerifier(rules, remote(idp, clock, min_refresh_interval=30))
    old_token = dev.mint(subject="alice", tenant="hospital-a", roles=["clinician"])
    assert (await verifier.verify_bearer(old_token)).subject == "alice"

    dev.rotate("ES256")
    new_token = dev.mint(subject="alice", tenant="hospital-a", roles=["clinician"])
    with pytest.raises(AuthenticationError) as caught:
        await verifier.verify_bearer(new_token)
    assert caught.value.failure is AuthFailure.UNKNOWN_KID, "the IdP has not published the new key yet"
    assert idp.requests == 1, "a miss within min_refresh_interval of the last fetch is not refetched"

    idp.jwks = dev.jwks()
    clock.now += 31
    assert (await verifier.verify_bearer(new_token)).subject == "alice"
    assert (await verifier.verify_bearer(old_token)).subject == "alice"
    assert idp.requests == 2


async def test_stale_cache_is_refreshed_and_kept_when_the_idp_is_down(issuer: DevIssuer) -> None:
    idp, clock = FakeIdP(issuer.jwks()), Clock()
    source = remote(idp, clock, max_age=3600, min_refresh_interval=30)
    kid = issuer.current("ES256").kid
    await source.key_for(kid)
    clock.now += 3601
    idp.down = True
    assert await source.key_for(kid) is not None, "stale keys keep serving during an IdP outage"
    assert idp.requests == 2
    idp.down = False
    clock.now += 31
    await source.key_for(kid)
    assert idp.requests == 3
    clock.now += 10
    await source.key_for(kid)
    assert idp.requests == 3, "fresh again: no fetch"


@pytest.mark.parametrize("failure", ["down", "status", "empty", "not-json"])
async def test_no_keys_ever_fetched_is_unavailable_not_unauthenticated(
    issuer: DevIssuer, failure: str
) -> None:
    idp, clock = FakeIdP(issuer.jwks()), Clock()
    if failure == "down":
        idp.down = True
    elif failure == "status":
        idp.status = 500
    elif failure == "empty":
        idp.jwks = {"keys": []}
    else:
        idp.jwks = "<html>"  # type: ignore[assignment]
    source = remote(idp, clock)
    with pytest.raises(KeySourceUnavailable):
        await source.key_for(issuer.current("ES256").kid)


async def test_oversized_jwks_is_refused(issuer: DevIssuer) -> None:
    big = {"keys": issuer.jwks()["keys"], "padding": "x" * (600 * 1024)}
    source = remote(FakeIdP(big), Clock())
    with pytest.raises(KeySourceUnavailable):
        await source.key_for(issuer.current("ES256").kid)


def test_remote_source_needs_an_http_url() -> None:
    with pytest.raises(ConfigurationError, match="http"):
        RemoteKeySource("file:///etc/jwks.json", algorithms=ALGS)


def test_jwks_written_by_the_dev_issuer_is_public_only(issuer: DevIssuer, tmp_path: Path) -> None:
    path = issuer.save(tmp_path / "k")
    document = json.loads(path.read_text())
    assert all(set(k) <= {"kty", "crv", "x", "y", "n", "e", "kid", "alg", "use"} for k in document["keys"])
    assert not any("d" in k for k in document["keys"])
