"""A JWKS read from a file, lazily and again whenever the file changes (key rotation without restart),
and the one function services use to build their token verifier from settings."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from jwt import PyJWK

from enclave_common.auth.errors import KeySourceUnavailable
from enclave_common.auth.jwks import KeySource, RemoteKeySource, StaticKeySource
from enclave_common.auth.tokens import TokenRules, TokenVerifier
from enclave_common.errors import ConfigurationError


class FileKeySource:
    def __init__(self, path: Path, *, algorithms: Collection[str]) -> None:
        self._path = path
        self._algorithms = algorithms
        self._mtime: float | None = None
        self._source: StaticKeySource | None = None

    async def key_for(self, kid: str) -> PyJWK | None:
        try:
            mtime = self._path.stat().st_mtime
        except OSError as exc:
            raise KeySourceUnavailable("the configured JWKS file cannot be read") from exc
        if self._source is None or mtime != self._mtime:
            self._source = StaticKeySource.from_file(self._path, algorithms=self._algorithms)
            self._mtime = mtime
        return await self._source.key_for(kid)


def build_verifier(
    *, issuer: str, audience: str, jwks_url: str | None, jwks_file: Path | None, environment: str
) -> TokenVerifier:
    rules = TokenRules(issuer=issuer, audience=audience)
    source: KeySource
    if jwks_url:
        source = RemoteKeySource(jwks_url, algorithms=rules.algorithms)
    elif jwks_file is not None:
        source = FileKeySource(jwks_file, algorithms=rules.algorithms)
    else:
        if environment not in ("dev", "test"):
            raise ConfigurationError("set an OIDC JWKS URL (or file) to verify bearer tokens")
        source = StaticKeySource({})
    return TokenVerifier(rules, source)
