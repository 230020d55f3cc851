"""Internals of ``streaming.feed`` (import that module, not these): the in-process feed and its ring
buffers (``memory``), the relay that carries a feed between processes over a transport (``relay``),
and the two transports, Kafka (``kafka``) and the in-cluster broadcaster actor (``broadcast``).

The feed's vocabulary lives here so that every internal module shares it without importing the
public module that imports them."""

from __future__ import annotations

from typing import Literal

Topic = Literal["predictions", "enrichments"]
TOPICS: tuple[str, ...] = ("predictions", "enrichments")


def check_topic(topic: str) -> None:
    """Raise ``ValueError`` naming the feed's topics when ``topic`` is not one of them."""
    if topic not in TOPICS:
        raise ValueError(f"unknown feed topic {topic!r}; the live feed has {', '.join(TOPICS)}")
