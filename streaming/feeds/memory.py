"""The in-process feed, and the ring buffer that every part of the feed keeps its items in.

A ``Ring`` keeps the newest ``capacity`` entries of one stream, numbered 1, 2, ... in append order.
Readers take nothing out: each keeps its own cursor (the number of the last entry it has read) and
reads what follows it. So a slow reader holds up neither the writers nor the other readers, and
memory stays bounded whatever the readers do: one that falls more than ``capacity`` entries behind
finds its oldest unread entries gone, goes on from the oldest one kept and counts what it missed.

Appends come from any thread (a publisher, a relay's reader thread) under the ring's lock; a reader
waiting on an asyncio loop registers a future, which an append resolves through that loop's
``call_soon_threadsafe``. A reader registers only after finding nothing new under the same lock that
appends take, so no append slips between its look and its wait.

``MemoryFeed`` keeps one ring per (topic, tenant) that somebody follows: ``publish`` appends each
item to its tenant's ring (items of a tenant nobody follows here are not kept), and a subscription
is a cursor into its ring that starts at the ring's end, so it sees what is published from then on,
in the order it was appended. The ring goes when its last subscription does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Any

from rtml.errors import RtmlError
from rtml.settings import StreamingSettings
from streaming.feeds import check_topic

log = logging.getLogger(__name__)
# Counts of dropped items are logged at most this often per place that drops, so a subscriber that
# is always behind, or a feed that is down for an hour, logs a line every few seconds, not per item.
DROP_LOG_EVERY_S = 10.0


class DropLog:
    """Counts dropped items and logs the count (``message % count``) at most every
    ``DROP_LOG_EVERY_S``: at once for the first drop, then what gathered meanwhile."""

    def __init__(self, message: str):
        self._message = message
        self._lock = threading.Lock()
        self._count = 0
        self._logged_at = float("-inf")

    def add(self, count: int) -> None:
        with self._lock:
            self._count += count
            now = time.monotonic()
            if now - self._logged_at < DROP_LOG_EVERY_S:
                return
            count, self._count, self._logged_at = self._count, 0, now
        log.warning(self._message, count)


class Ring:
    """The newest ``capacity`` entries of one stream, each a value with the time it was published
    (see the module docstring)."""

    def __init__(self, capacity: int):
        self._entries: deque[tuple[float, Any]] = deque(maxlen=capacity)
        self.last = 0  # the number of the newest entry; 0 before the first
        self._lock = threading.Lock()
        self._watchers: list[asyncio.Future] = []

    def append(self, values: Sequence[Any], stamp: float) -> None:
        """Append ``values``, published at ``stamp`` (``time.time()``), and wake the readers waiting."""
        if not values:
            return
        with self._lock:
            self._entries.extend((stamp, value) for value in values)
            self.last += len(values)
            watchers, self._watchers = self._watchers, []
        for future in watchers:
            wake(future)

    def read(self, after: int) -> tuple[list[Any], int, int]:
        """``(values, last, missed)``: the values of the entries numbered after ``after``, oldest
        first, the number of the last of them, and how many entries after ``after`` are no longer
        kept."""
        with self._lock:
            oldest = self.last - len(self._entries) + 1
            missed = max(0, oldest - 1 - after)
            values = [value for _, value in islice(reversed(self._entries), max(0, self.last - max(after, oldest - 1)))]
            last = self.last
        values.reverse()
        return values, last, missed

    def before(self, since: float) -> int:
        """The number of the last entry published before ``since``: every entry after it was
        published at ``since`` or later (as far as this ring still keeps entries)."""
        with self._lock:
            number = self.last
            for stamp, _ in reversed(self._entries):
                if stamp < since:
                    break
                number -= 1
            return number

    def watch(self, after: int) -> asyncio.Future | None:
        """A future of the running loop that an append after entry ``after`` resolves; None when
        there already is one."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.last > after:
                return None
            future = loop.create_future()
            self._watchers.append(future)
            return future

    def unwatch(self, future: asyncio.Future) -> None:
        with self._lock:
            if future in self._watchers:
                self._watchers.remove(future)

    async def wait(self, after: int, timeout_s: float) -> None:
        """Return once there is an entry after ``after``, or after ``timeout_s``."""
        future = self.watch(after)
        if future is None:
            return
        try:
            await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            pass
        finally:
            self.unwatch(future)


def wake(future: asyncio.Future) -> None:
    """Resolve ``future`` on its own loop, from any thread."""
    try:
        future.get_loop().call_soon_threadsafe(_resolve, future)
    except RuntimeError:
        pass  # its loop is closed: nobody waits any more


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Subscription:
    """One subscriber's view of a ring: an async iterator of the values appended after it began.
    ``aclose`` (or ``close``, from any thread) ends it, a waiting ``__anext__`` included; one that
    is dropped without either is released when it is garbage-collected."""

    def __init__(self, ring: Ring, release: Callable[[], None], what: str):
        self._ring = ring
        self._after = ring.last
        self._pending: deque[Any] = deque()
        self._closed = False
        self._waiting: asyncio.Future | None = None
        self._missed = DropLog(f"a live-feed subscriber of {what} fell behind and skipped %d item(s)")
        self._release = weakref.finalize(self, release)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Any:
        while not self._pending:
            if self._closed:
                raise StopAsyncIteration
            values, self._after, missed = self._ring.read(self._after)
            if missed:
                self._missed.add(missed)
            self._pending.extend(values)
            if values:
                break
            future = self._ring.watch(self._after)
            if future is not None:
                self._waiting = future
                try:
                    await future
                finally:
                    self._waiting = None
                    self._ring.unwatch(future)
        return self._pending.popleft()

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._pending.clear()
        self._release()
        waiting = self._waiting
        if waiting is not None:
            wake(waiting)


@dataclass
class _Followed:
    ring: Ring
    subscriptions: int = 0


class MemoryFeed:
    """A feed within one process (see the module docstring): what single-process callers and
    tests use, and where relayed feeds deliver. Thread-safe; subscriptions may be iterated on
    any asyncio loop. Items are handed to every subscriber as they are, not copied: read, don't
    mutate them. ``capacity`` bounds each subscriber's backlog."""

    def __init__(self, capacity: int = StreamingSettings().feed_buffer_items):
        self.capacity = capacity
        # Reentrant: a subscription that is garbage-collected releases its ring under this lock,
        # and collection may run while this very thread holds it.
        self._lock = threading.RLock()
        self._rings: dict[str, dict[str, _Followed]] = defaultdict(dict)
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._closed = False

    def publish(self, topic: str, items: Iterable[dict]) -> None:
        """Append each item to the ring of its ``item["tenant"]``, if anybody here follows that one."""
        followed = self._rings.get(topic)
        if not followed:
            return
        by_ring: dict[Ring, list[dict]] = defaultdict(list)
        for item in items:
            entry = followed.get(item.get("tenant")) if isinstance(item, dict) else None
            if entry is not None:
                by_ring[entry.ring].append(item)
        stamp = time.time()
        for ring, values in by_ring.items():
            ring.append(values, stamp)

    def subscribe(self, topic: str, tenant: str) -> Subscription:
        """The items of ``tenant`` published on ``topic`` from now on, in publish order."""
        check_topic(topic)
        with self._lock:
            if self._closed:
                raise RtmlError("this live feed is closed; open another one (streaming.feed.open_feed)")
            entry = self._rings[topic].get(tenant)
            if entry is None:
                entry = self._rings[topic][tenant] = _Followed(Ring(self.capacity))
            entry.subscriptions += 1
            subscription = Subscription(entry.ring, partial(self._release, topic, tenant, entry), f"{topic} of tenant {tenant!r}")
            self._subscriptions.add(subscription)
        return subscription

    def _release(self, topic: str, tenant: str, entry: _Followed) -> None:
        with self._lock:
            entry.subscriptions -= 1
            if entry.subscriptions == 0 and self._rings[topic].get(tenant) is entry:
                del self._rings[topic][tenant]

    def close(self) -> None:
        """End every subscription; later publishes are dropped, later subscribes refused."""
        with self._lock:
            self._closed = True
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription.close()
