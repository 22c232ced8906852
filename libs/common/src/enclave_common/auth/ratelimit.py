"""Per-principal token-bucket rate limit.

Written by hand (a dozen lines of arithmetic; the libraries that exist are tied to one web
framework or to Redis). The buckets live in this process: with N gateway replicas a principal
may make up to N times the configured rate. That is accepted because the limit protects each
replica from one noisy client, not a global quota; a shared store would be needed for that.
Memory is bounded: past ``max_principals`` buckets the least recently used is dropped (it is
almost always a full, idle bucket, so dropping it forgives nothing).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from enclave_common.errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``burst`` requests at once, refilled at ``per_second`` requests per second."""

    burst: float
    per_second: float

    def __post_init__(self) -> None:
        if self.burst < 1 or self.per_second <= 0:
            raise ConfigurationError("a rate limit needs burst >= 1 and per_second > 0")


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    remaining: int
    retry_after_seconds: int
    """Whole seconds until the request would be allowed (0 when allowed); the Retry-After value."""


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by principal (``Principal.rate_limit_key``), or by client address for
    failed authentications."""

    def __init__(
        self,
        limit: RateLimit,
        *,
        max_principals: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self._max = max_principals
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, key: str, cost: float = 1.0) -> RateDecision:
        """Take ``cost`` tokens from ``key``'s bucket if it holds them."""
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = _Bucket(tokens=self.limit.burst, updated=now)
                self._buckets[key] = bucket
                if len(self._buckets) > self._max:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                elapsed = max(0.0, now - bucket.updated)
                bucket.tokens = min(self.limit.burst, bucket.tokens + elapsed * self.limit.per_second)
                bucket.updated = now
            if bucket.tokens >= cost:
                bucket.tokens -= cost
                return RateDecision(True, int(bucket.tokens), 0)
            wait = (cost - bucket.tokens) / self.limit.per_second
            return RateDecision(False, 0, max(1, math.ceil(wait)))

    def __len__(self) -> int:
        return len(self._buckets)
