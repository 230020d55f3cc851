"""A feed between processes: the same relay over either transport (Kafka, the broadcaster actor).

    publish ──> outbox ──> sender thread ──> transport.send ─┐   (any process)
                                                             │
    subscribe <── local MemoryFeed <── reader thread per topic <── transport.follow(topic, since)

Publishing puts the items into a bounded outbox and returns: the caller (a stream's sink, a Serve
replica) never waits on the network and never sees its errors. One sender thread per feed takes
whatever gathered and sends it in order, retrying with back-off while the transport is away; the
outbox keeps the newest ``capacity`` items meanwhile and counts what it drops, since subscribers
are live views and the lakehouse is the record.

Subscribing follows the process's local ``MemoryFeed`` (its cursor is taken first), and the first
subscription of a topic starts that topic's one reader thread, which asks the transport for
everything published from that moment on (by publish time: every item carries the ``time.time()``
of its ``publish`` call, so an item published after ``subscribe`` returned is never missed, to
within the clock difference between the two hosts) and delivers it to the local feed, which fans it
out to the subscribers of each tenant. The reader runs until the feed is closed; a subscriber that
goes away only releases its local cursor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from tenacity import RetryCallState, RetryError, Retrying, retry_if_exception_type, stop_when_event_set, wait_random_exponential

from streaming.feeds import check_topic
from streaming.feeds.memory import DropLog, MemoryFeed, Subscription

log = logging.getLogger(__name__)
# The longest pause between two attempts to reach a transport that is away.
RETRY_MAX_S = 10.0
# How long ``close`` waits for the sender to hand on what is queued.
CLOSE_TIMEOUT_S = 5.0


class Entry(NamedTuple):
    """One published item on its way: its topic, the item and the time it was published."""

    topic: str
    item: dict
    stamp: float


class Follower(Protocol):
    def fetch(self) -> list[dict]:
        """The next items of the topic, oldest first, waiting a short while (at most seconds) for
        some; an empty list when none came. Raises when the transport is away (retried)."""

    def close(self) -> None: ...


class Transport(Protocol):
    def send(self, pending: deque[Entry]) -> None:
        """Hand on the entries of ``pending`` in order, removing each from the left once it is
        sent; what is left when it raises is sent again later. Called from one thread only."""

    def follow(self, topic: str, since: float) -> Follower:
        """A follower of ``topic`` from the first item published at ``since`` or later."""

    def close(self) -> None:
        """Send what is buffered (briefly) and release the connections."""


class Outbox:
    """What ``publish`` handed over and the sender has not taken yet: at most ``capacity`` items;
    beyond that the oldest go, counted."""

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._entries: deque[Entry] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._dropped = DropLog("the live feed is behind or away: dropped %d published item(s) (subscribers are live views; the lakehouse keeps every row)")

    def put(self, topic: str, items: Sequence[dict], stamp: float) -> None:
        with self._ready:
            if self._closed:
                return
            self._entries.extend(Entry(topic, item, stamp) for item in items)
            dropped = max(0, len(self._entries) - self._capacity)
            for _ in range(dropped):
                self._entries.popleft()
            self._ready.notify()
        if dropped:
            self._dropped.add(dropped)

    def take(self) -> deque[Entry] | None:
        """Everything queued, once there is something; None once closed and empty."""
        with self._ready:
            self._ready.wait_for(lambda: self._entries or self._closed)
            if not self._entries:
                return None
            taken, self._entries = self._entries, deque()
            return taken

    def drop(self, count: int) -> None:
        self._dropped.add(count)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()


class RelayFeed:
    """A ``Feed`` whose publishers and subscribers may be in different processes (see the module
    docstring). Nothing connects before the first publish or subscribe."""

    def __init__(self, transport: Transport, capacity: int):
        self._transport = transport
        self._local = MemoryFeed(capacity)
        self._outbox = Outbox(capacity)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sender: threading.Thread | None = None
        self._readers: dict[str, threading.Thread] = {}

    def publish(self, topic: str, items: Sequence[dict]) -> None:
        """Queue ``items`` for every subscribing process and return at once; never raises."""
        try:
            check_topic(topic)
        except ValueError as error:
            log.error("%s; dropped %d item(s) published on it", error, len(items))
            return
        try:  # the contract: whatever goes wrong here must not reach the scoring path
            if not items or self._closed.is_set():
                return
            self._outbox.put(topic, items, time.time())
            if self._sender is None:
                with self._lock:
                    if self._sender is None and not self._closed.is_set():
                        self._sender = _start(self._send, "rtml-feed-sender")
        except Exception:
            log.exception("the live feed could not take %d item(s) for %r; dropped them", len(items), topic)

    def subscribe(self, topic: str, tenant: str) -> Subscription:
        """``tenant``'s items published on ``topic`` from now on, in publish order per publisher."""
        subscription = self._local.subscribe(topic, tenant)  # first: the reader's items come after its cursor
        since = time.time()
        with self._lock:
            if topic not in self._readers and not self._closed.is_set():
                self._readers[topic] = _start(lambda: self._read(topic, since), f"rtml-feed-reader-{topic}")
        return subscription

    def close(self) -> None:
        """End the subscriptions, hand on what is queued (for up to ``CLOSE_TIMEOUT_S``) and
        disconnect. Reader threads stop at their next fetch."""
        self._closed.set()
        self._outbox.close()
        self._local.close()
        with self._lock:
            sender = self._sender
        if sender is None:
            self._transport.close()
        else:  # the sender owns the transport's connection and closes it when it is done
            sender.join(CLOSE_TIMEOUT_S)

    def _retrying(self, what: str) -> Retrying:
        """Retry with back-off until the call passes or the feed is closed."""
        return Retrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_random_exponential(multiplier=0.2, max=RETRY_MAX_S),
            stop=stop_when_event_set(self._closed),
            sleep=self._closed.wait,
            before_sleep=_log_retry(what),
        )

    def _send(self) -> None:
        retrying = self._retrying("sending to the live feed")
        try:
            while (pending := self._outbox.take()) is not None:
                try:
                    retrying(self._transport.send, pending)
                except RetryError:  # closed while the transport was away
                    self._outbox.drop(len(pending))
        finally:
            self._transport.close()

    def _read(self, topic: str, since: float) -> None:
        retrying = self._retrying(f"reading the live feed's {topic}")
        try:
            follower = retrying(self._transport.follow, topic, since)
        except RetryError:
            return
        try:
            while not self._closed.is_set():
                items = retrying(follower.fetch)
                if items:
                    self._local.publish(topic, items)
        except RetryError:
            pass  # closed while the transport was away
        finally:
            follower.close()


def _log_retry(what: str):
    """A tenacity ``before_sleep`` that logs what failed and when it is tried again."""

    def before_sleep(state: RetryCallState) -> None:
        log.warning("%s failed (%s); trying again in %.1fs", what, state.outcome.exception(), state.next_action.sleep)

    return before_sleep


def _start(target, name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread
