"""Per-tenant ingestion rate limits (api.ratelimit) over the limits library's in-process storage:
the bucket each tenant's settings state, refusals with Retry-After, and no silent fail-open."""

from __future__ import annotations

import asyncio
import socket

import pytest

from api.ratelimit import TenantRateLimiter, window_item
from rtml.errors import RtmlError
from rtml.schemas import Refusal
from rtml.settings import ApiSettings, RateLimit


@pytest.mark.parametrize(
    ("rate", "burst", "amount", "seconds"),
    [(50_000, 100_000, 100_000, 2), (10, 10, 10, 1), (0.01, 10, 10, 1000), (1000, 500, 1000, 1)],
)
def test_a_token_bucket_becomes_a_window_of_its_burst_at_its_rate(rate, burst, amount, seconds):
    item = window_item(RateLimit(events_per_second=rate, burst=burst))
    assert (item.amount, item.multiples) == (amount, seconds)


def _limiter(**settings) -> TenantRateLimiter:
    return TenantRateLimiter(ApiSettings(**settings))


def test_a_tenant_over_its_limit_is_refused_with_retry_after_and_others_are_not():
    limiter = _limiter(rate_limits={"small": RateLimit(events_per_second=0.01, burst=10)}, default_rate_limit=None)

    async def run():
        await limiter.take("small", 6)
        await limiter.take("small", 4)
        with pytest.raises(Refusal) as refused:
            await limiter.take("small", 1)
        await limiter.take("anyone-else", 10_000)  # no limit for them
        return refused.value

    refusal = asyncio.run(run())
    assert refusal.status == 429 and refusal.retry_after_s >= 1 and "'small'" in refusal.reason


def test_a_batch_larger_than_the_burst_is_a_413_not_an_endless_429():
    limiter = _limiter(default_rate_limit=RateLimit(events_per_second=5, burst=5))
    with pytest.raises(Refusal) as refused:
        asyncio.run(limiter.take("t", 6))
    assert refused.value.status == 413 and "burst of 5" in refused.value.reason


def test_a_storage_that_does_not_answer_is_a_503_not_a_pass():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    limiter = _limiter(rate_limit_storage=f"redis://127.0.0.1:{closed_port}")
    with pytest.raises(Refusal) as refused:
        asyncio.run(limiter.take("t", 1))
    assert refused.value.status == 503 and refused.value.retry_after_s


def test_an_unusable_storage_fails_at_start_naming_the_setting():
    with pytest.raises(RtmlError, match="api.rate_limit_storage"):
        _limiter(rate_limit_storage="bogus://somewhere")
