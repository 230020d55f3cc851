"""The in-cluster live feed (the embedded default): one broadcaster actor per app.

The broadcaster is a named, detached async Ray actor (``rtml-feed-<serving.app_name>`` in the
``rtml`` namespace, so that the stream's actors, Serve replicas and drivers of any job find the
same one; no CPU of its own) that keeps the newest ``streaming.feed_buffer_items`` items of each
topic in a ``Ring``. Publishers send it what their outbox gathered, one call at a time (the
relay's sender waits for each), so a publisher's items keep their order even though an async
actor may run the calls of one caller out of order. A process's reader long-polls it:
``next(topic, incarnation, after, since, timeout_s)`` answers with the entries after ``after`` as
soon as there are any, or with none after ``timeout_s``; a reader's first call has no cursor yet
and starts at the first entry published at ``since`` or later.

If the actor dies, Ray restarts it (or the next lookup creates it) empty, under a new incarnation
id; a reader whose cursor belongs to an older incarnation then reads the new one from its start,
which holds only items published since.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from itertools import groupby

from rtml.errors import RtmlError
from streaming.feeds import TOPICS
from streaming.feeds.memory import DropLog, Ring
from streaming.feeds.relay import Entry

NAMESPACE = "rtml"
# How long one long poll waits for new items before it answers with none (and the reader asks again).
LONG_POLL_S = 5.0
# How long a call to the broadcaster may take beyond that before the caller gives up and retries.
CALL_TIMEOUT_S = 30.0


class Broadcaster:
    """The actor (see the module docstring)."""

    def __init__(self, capacity: int):
        self._incarnation = uuid.uuid4().hex
        self._rings = {topic: Ring(capacity) for topic in TOPICS}

    async def publish(self, entries: list[Entry]) -> None:
        for (topic, stamp), run in groupby(entries, key=lambda entry: (entry.topic, entry.stamp)):
            self._rings[topic].append([entry.item for entry in run], stamp)

    async def next(self, topic: str, incarnation: str | None, after: int, since: float, timeout_s: float) -> tuple[str, list[dict], int, int]:
        """``(incarnation, items, last, missed)``: the items after ``after`` (see the module
        docstring), the cursor to ask with next time, and how many items the caller missed
        because it fell more than the ring's capacity behind."""
        ring = self._rings[topic]
        if incarnation != self._incarnation:
            after = ring.before(since) if incarnation is None else 0
        await ring.wait(after, timeout_s)
        items, last, missed = ring.read(after)
        return self._incarnation, items, last, missed


class BroadcastTransport:
    def __init__(self, name: str, capacity: int):
        self._name, self._capacity = name, capacity
        self._lock = threading.Lock()  # the sender and the readers share one handle
        self._actor = None

    def actor(self):
        """The broadcaster's handle, creating the actor if nobody has yet."""
        import ray

        with self._lock:
            if self._actor is None:
                if not ray.is_initialized():
                    raise RtmlError(
                        "the in-cluster live feed needs a connection to the Ray cluster (ray.init()) in this process; "
                        "or set RTML_STREAMING__SOURCE=kafka to carry the feed over Kafka"
                    )
                self._actor = (
                    ray.remote(Broadcaster)
                    .options(name=self._name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0, max_restarts=-1)
                    .remote(self._capacity)
                )
            return self._actor

    def call(self, method: str, *args, timeout_s: float):
        """``actor.<method>(*args)``, waited for; a broadcaster that died is looked up again next time."""
        import ray

        actor = self.actor()
        try:
            return ray.get(getattr(actor, method).remote(*args), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            with self._lock:
                if self._actor is actor:
                    self._actor = None
            raise

    def send(self, pending: deque[Entry]) -> None:
        self.call("publish", list(pending), timeout_s=CALL_TIMEOUT_S)
        pending.clear()

    def follow(self, topic: str, since: float) -> BroadcastFollower:
        return BroadcastFollower(self, topic, since)

    def close(self) -> None:
        pass  # the broadcaster serves the whole app; it outlives any one feed


class BroadcastFollower:
    def __init__(self, transport: BroadcastTransport, topic: str, since: float):
        self._transport, self._topic, self._since = transport, topic, since
        self._incarnation: str | None = None
        self._after = 0
        self._missed = DropLog(f"this process's live-feed reader of {topic} fell behind the broadcaster and skipped %d item(s)")

    def fetch(self) -> list[dict]:
        self._incarnation, items, self._after, missed = self._transport.call(
            "next", self._topic, self._incarnation, self._after, self._since, LONG_POLL_S, timeout_s=LONG_POLL_S + CALL_TIMEOUT_S
        )
        if missed:
            self._missed.add(missed)
        return items

    def close(self) -> None:
        pass
