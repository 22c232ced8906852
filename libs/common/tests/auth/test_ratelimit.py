"""Token-bucket rate limit per principal."""

from __future__ import annotations

import pytest
from enclave_common.auth import RateLimit, RateLimiter
from enclave_common.errors import ConfigurationError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refused_with_retry_after() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimit(burst=5, per_second=0.5), clock=clock)
    verdicts = [limiter.acquire("alice") for _ in range(6)]
    assert [v.allowed for v in verdicts] == [True] * 5 + [False]
    assert [v.remaining for v in verdicts[:5]] == [4, 3, 2, 1, 0]
    assert verdicts[5].retry_after_seconds == 2
    clock.now = 1.0
    refused = limiter.acquire("alice")
    assert not refused.allowed
    assert refused.retry_after_seconds == 1
    clock.now = 2.0
    assert limiter.acquire("alice").allowed
    assert not limiter.acquire("alice").allowed


def test_refill_is_capped_at_the_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimit(burst=3, per_second=10), clock=clock)
    for _ in range(3):
        limiter.acquire("alice")
    clock.now = 3600
    assert [limiter.acquire("alice").allowed for _ in range(4)] == [True, True, True, False]


def test_principals_have_separate_buckets() -> None:
    limiter = RateLimiter(RateLimit(burst=1, per_second=0.1), clock=Clock())
    assert limiter.acquire("hospital-a\x1falice").allowed
    assert not limiter.acquire("hospital-a\x1falice").allowed
    assert limiter.acquire("hospital-b\x1falice").allowed
    assert limiter.acquire("hospital-a\x1fbob").allowed


def test_memory_is_bounded_by_evicting_the_least_recently_used() -> None:
    limiter = RateLimiter(RateLimit(burst=1, per_second=0.001), max_principals=3, clock=Clock())
    for who in ("a", "b", "c"):
        limiter.acquire(who)
    assert not limiter.acquire("a").allowed  # a is now most recent
    limiter.acquire("d")  # evicts b
    assert len(limiter) == 3
    assert not limiter.acquire("a").allowed
    assert not limiter.acquire("c").allowed
    assert limiter.acquire("b").allowed, "an evicted bucket starts full again"


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimit(burst=1, per_second=100), clock=clock)
    limiter.acquire("alice")
    verdict = limiter.acquire("alice")
    assert (verdict.allowed, verdict.retry_after_seconds) == (False, 1)


@pytest.mark.parametrize(("burst", "rate"), [(0, 1), (5, 0), (5, -1)])
def test_nonsense_limits_are_refused(burst: float, rate: float) -> None:
    with pytest.raises(ConfigurationError):
        RateLimit(burst=burst, per_second=rate)
