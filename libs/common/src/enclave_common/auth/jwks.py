"""Where the identity provider's signing keys come from: a JWKS URL or a local document.

Key parsing is pyjwt's (:class:`jwt.PyJWK`). Written here by hand, because pyjwt's own
``PyJWKClient`` is synchronous and refetches on every unknown ``kid``: an async cache that
refreshes when a token names a ``kid`` it has not seen (so key rotation at the IdP just works)
but at most once per ``min_refresh_interval`` (so a flood of tokens with invented kids cannot
hammer the IdP), and that keeps serving the keys it has when the IdP is briefly unreachable.
Symmetric (``oct``) keys, encryption keys and keys for algorithms outside the allow-list are
never loaded, which is half of the defence against algorithm confusion (tokens.py is the other).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from enclave_common.auth.errors import KeySourceUnavailable
from enclave_common.errors import ConfigurationError
from enclave_common.logging import get_logger

_log = get_logger(__name__)

MAX_JWKS_BYTES = 512 * 1024


class KeySource(Protocol):
    """Finds the verification key a token's ``kid`` names."""

    async def key_for(self, kid: str) -> PyJWK | None:
        """The key, or None when the source (after any refresh it allows itself) has no such kid.
        Raises :class:`KeySourceUnavailable` when it has no keys at all to look in."""
        ...


def parse_jwks(document: Any, *, algorithms: Collection[str]) -> dict[str, PyJWK]:
    """The usable signature keys of a JWKS document, by kid. Keys without kid, for encryption,
    symmetric, unparseable or for an algorithm outside ``algorithms`` are skipped."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError('a JWKS document is a JSON object with a "keys" array')
    keys: dict[str, PyJWK] = {}
    for entry in document["keys"]:
        if not isinstance(entry, Mapping):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid or kid in keys:
            continue
        if entry.get("use", "sig") != "sig" or entry.get("kty") == "oct":
            continue
        try:
            key = PyJWK(dict(entry))
        except PyJWTError:
            continue
        if key.algorithm_name in algorithms:
            keys[kid] = key
    return keys


class StaticKeySource:
    """Keys from a JWKS given once (a dict, or a file such as the dev issuer's ``jwks.json``)."""

    def __init__(self, keys: Mapping[str, PyJWK]) -> None:
        self._keys = dict(keys)

    @classmethod
    def from_jwks(cls, document: Mapping[str, Any], *, algorithms: Collection[str]) -> StaticKeySource:
        try:
            keys = parse_jwks(document, algorithms=algorithms)
        except ValueError as exc:
            raise ConfigurationError(f"JWKS is not usable: {exc}") from None
        if not keys:
            raise ConfigurationError(
                f"JWKS holds no signature key with a kid for the allowed algorithms {sorted(algorithms)}"
            )
        return cls(keys)

    @classmethod
    def from_file(cls, path: str | Path, *, algorithms: Collection[str]) -> StaticKeySource:
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"JWKS file {path} cannot be read as JSON ({type(exc).__name__})"
            ) from None
        return cls.from_jwks(document, algorithms=algorithms)

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    async def key_for(self, kid: str) -> PyJWK | None:
        return self._keys.get(kid)


class RemoteKeySource:
    """Keys fetched from the IdP's ``jwks_uri`` and cached.

    A cached set older than ``max_age`` seconds, or a kid not in the cache, triggers a refetch,
    but never more than one attempt per ``min_refresh_interval`` seconds whatever the traffic;
    concurrent misses share one fetch. A failed fetch keeps the previous keys.
    """

    def __init__(
        self,
        url: str,
        *,
        algorithms: Collection[str],
        client: httpx.AsyncClient | None = None,
        max_age: float = 3600.0,
        min_refresh_interval: float = 30.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not url.startswith(("https://", "http://")):
            raise ConfigurationError(f"JWKS URL must be http(s); got scheme of {url.split(':', 1)[0]!r}")
        self.url = url
        self._algorithms = frozenset(algorithms)
        self._client = client
        self._max_age = max_age
        self._min_refresh_interval = min_refresh_interval
        self._timeout = timeout
        self._clock = clock
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._lock = asyncio.Lock()
        self.fetch_count = 0

    async def key_for(self, kid: str) -> PyJWK | None:
        if not (self._fresh() and kid in self._keys):
            await self._refresh(kid)
        if self._fetched_at is None:
            raise KeySourceUnavailable("the identity provider's signing keys could not be fetched")
        return self._keys.get(kid)

    def _fresh(self) -> bool:
        return self._fetched_at is not None and self._clock() - self._fetched_at < self._max_age

    async def _refresh(self, kid: str) -> None:
        async with self._lock:
            if self._fresh() and kid in self._keys:
                return  # another request refreshed while this one waited
            now = self._clock()
            if self._last_attempt is not None and now - self._last_attempt < self._min_refresh_interval:
                return
            self._last_attempt = now
            try:
                keys = await self._fetch()
            except (httpx.HTTPError, ValueError) as exc:
                _log.warning(
                    "jwks_fetch_failed", url=self.url, error=type(exc).__name__, detail=str(exc)[:200]
                )
                return
            self._keys = keys
            self._fetched_at = now

    async def _fetch(self) -> dict[str, PyJWK]:
        self.fetch_count += 1
        if self._client is not None:
            response = await self._client.get(self.url, timeout=self._timeout)
        else:
            async with httpx.AsyncClient(follow_redirects=False) as client:
                response = await client.get(self.url, timeout=self._timeout)
        response.raise_for_status()
        if len(response.content) > MAX_JWKS_BYTES:
            raise ValueError(f"JWKS response larger than {MAX_JWKS_BYTES} bytes")
        keys = parse_jwks(response.json(), algorithms=self._algorithms)
        if not keys:
            raise ValueError("JWKS response holds no usable signature key")
        return keys
