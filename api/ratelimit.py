"""Per-tenant rate limits on ingestion, shared by every Ingress replica through the ``limits``
library's storage (``api.rate_limit_storage``: ``memory://`` in one process, ``redis://host:port``
for a limit that holds across replicas and nodes).

A tenant's limit is a token bucket as settings state it: ``events_per_second`` refill and a
``burst``. ``limits`` has no token-bucket strategy; its sliding-window counter over a window of
``burst / events_per_second`` seconds (whole seconds, at least one: the library's granularity)
admits ``events_per_second`` x window events per window, which is the bucket's long-run rate and
its burst. It keeps two counters per tenant in the storage, so a batch of 500 events costs one
storage round trip, not 500.

Events are counted as they arrive, before validation: a tenant sending bad events is limited too.
Over the limit, ``take`` raises ``Refusal(429)`` with the seconds until the window admits the batch
(``Retry-After``); a batch larger than the whole burst can never pass and is a 413 saying so; a
storage that does not answer is a 503, so that the limit never fails open silently. Each 429
counts in ``rtml_rate_limited_requests_total`` of its tenant.
"""

from __future__ import annotations

import logging
import math
import time

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from observability import metrics
from rtml.errors import RtmlError
from rtml.schemas import Refusal
from rtml.settings import ApiSettings, RateLimit

log = logging.getLogger(__name__)


def window_item(limit: RateLimit) -> RateLimitItem:
    """The sliding window that stands for ``limit``'s token bucket (see the module docstring)."""
    seconds = max(1, round(limit.burst / limit.events_per_second))
    return RateLimitItemPerSecond(max(1, round(limit.events_per_second * seconds)), seconds)


class TenantRateLimiter:
    def __init__(self, settings: ApiSettings):
        self._settings = settings
        self._storage_uri = settings.rate_limit_storage
        self._limiter: SlidingWindowCounterRateLimiter | None = None
        self._items: dict[str, RateLimitItem | None] = {}
        self._connected()  # a storage that cannot be used fails the replica's start, naming the setting

    def item(self, tenant: str) -> RateLimitItem | None:
        """The tenant's window, or None when it has no limit."""
        if tenant not in self._items:
            limit = self._settings.rate_limits.get(tenant, self._settings.default_rate_limit)
            self._items[tenant] = window_item(limit) if limit is not None else None
        return self._items[tenant]

    async def take(self, tenant: str, events: int) -> None:
        """Count ``events`` of ``tenant`` against its limit; raise a ``Refusal`` if they are over it."""
        item = self.item(tenant)
        if item is None or events <= 0:
            return
        if events > item.amount:
            raise Refusal(
                413, f"{events} events in one request exceed tenant {tenant!r}'s burst of {item.amount} events; send smaller batches"
            )
        limiter = self._connected()
        try:
            if await limiter.hit(item, "events", tenant, cost=events):
                return
            stats = await limiter.get_window_stats(item, "events", tenant)
        except Exception as error:  # the storage's own errors differ per backend
            log.error("the rate-limit storage %s does not answer: %s", _redacted(self._storage_uri), error)
            raise Refusal(503, "rate limits cannot be checked right now; retry later", 1.0) from None
        retry_after = max(1.0, math.ceil(stats.reset_time - time.time()))
        metrics.RATE_LIMITED.labels(tenant=tenant).inc()
        raise Refusal(429, f"tenant {tenant!r} is over its rate limit of {item.amount} events per {item.multiples} s; retry later", retry_after)

    def _connected(self) -> SlidingWindowCounterRateLimiter:
        if self._limiter is None:
            uri = self._storage_uri if self._storage_uri.startswith("async+") else f"async+{self._storage_uri}"
            # limits' async Redis storage defaults to the coredis client; rtml depends on redis-py.
            options = {"implementation": "redispy"} if uri.startswith("async+redis") else {}
            try:
                self._limiter = SlidingWindowCounterRateLimiter(storage_from_string(uri, **options))
            except Exception as error:  # an unknown scheme, a missing client library
                raise RtmlError(f"api.rate_limit_storage {_redacted(uri)!r} cannot be used: {error}; give memory:// or redis://host:port") from error
        return self._limiter


def _redacted(uri: str) -> str:
    """A storage URI without its password, for logs."""
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}" if "@" in rest else uri
