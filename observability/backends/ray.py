"""``ray.util.metrics``: the metrics of Ray actors and Serve replicas. Each node's metrics agent
exports them (with Ray's ``ray_`` prefix, which the scrape configuration strips from rtml's names,
``observability.scrape``) and the Ray dashboard shows them.

Ray's metrics agent stops exporting a gauge that has not been set for a while, where a
prometheus-client gauge keeps its last value until it changes. rtml's gauges are state (a
model's weight, a table's small files) that may stay unchanged for hours, so this backend sets
every gauge again to its last value every ``GAUGE_REFRESH_S`` (one thread per process).
"""

from __future__ import annotations

import threading

from ray.util import metrics as ray_metrics

from observability.backends import MetricSpec

name = "ray"
GAUGE_REFRESH_S = 5.0

_gauges: list[_Instrument] = []
_gauges_lock = threading.Lock()
_refresher: threading.Thread | None = None


class _Instrument:
    def __init__(self, spec: MetricSpec):
        self._last: dict[tuple[tuple[str, str], ...], float] = {}
        if spec.kind == "counter":
            self._metric = ray_metrics.Counter(spec.name, spec.help, tag_keys=spec.labels)
        elif spec.kind == "gauge":
            self._metric = ray_metrics.Gauge(spec.name, spec.help, tag_keys=spec.labels)
            _keep_fresh(self)
        else:
            self._metric = ray_metrics.Histogram(spec.name, spec.help, boundaries=list(spec.buckets), tag_keys=spec.labels)

    def inc(self, amount: float, labels: dict[str, str]) -> None:
        if amount > 0:  # Ray's counters refuse zero and negative increments
            self._metric.inc(float(amount), labels)

    def set(self, value: float, labels: dict[str, str]) -> None:
        self._last[tuple(labels.items())] = float(value)
        self._metric.set(float(value), labels)

    def observe(self, value: float, labels: dict[str, str]) -> None:
        self._metric.observe(float(value), labels)

    def set_again(self) -> None:
        for labels, value in list(self._last.items()):
            self._metric.set(value, dict(labels))


def _keep_fresh(gauge: _Instrument) -> None:
    global _refresher
    with _gauges_lock:
        _gauges.append(gauge)
        if _refresher is None:
            _refresher = threading.Thread(target=_refresh_forever, name="rtml-gauges", daemon=True)
            _refresher.start()


def _refresh_forever() -> None:
    stop = threading.Event()  # never set: the thread ends with the process
    while not stop.wait(GAUGE_REFRESH_S):
        with _gauges_lock:
            gauges = list(_gauges)
        for gauge in gauges:
            gauge.set_again()


def instrument(spec: MetricSpec) -> _Instrument:
    return _Instrument(spec)
