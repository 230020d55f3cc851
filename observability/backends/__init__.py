"""Where a process's metrics go: one small interface, two implementations.

``prometheus`` (prometheus-client's default registry, served over HTTP by the process itself):
driver-side processes, the CLI, tests. ``ray`` (``ray.util.metrics``, exported by each node's
metrics agent, shown in the Ray dashboard): Ray actors and Serve replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    kind: Kind
    name: str  # as Prometheus shows it; counters end in _total
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms: the upper bounds (without +Inf)


class Instrument(Protocol):
    """One metric family in one process; ``labels`` has a value for each of the spec's labels."""

    def inc(self, amount: float, labels: dict[str, str]) -> None: ...

    def set(self, value: float, labels: dict[str, str]) -> None: ...

    def observe(self, value: float, labels: dict[str, str]) -> None: ...


class Backend(Protocol):
    name: str

    def instrument(self, spec: MetricSpec) -> Instrument: ...
