"""prometheus-client: the metrics of a driver-side process, in its default registry."""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from observability.backends import MetricSpec

name = "prometheus"


class _Instrument:
    def __init__(self, spec: MetricSpec):
        if spec.kind == "counter":
            # prometheus-client appends _total itself.
            self._metric = Counter(spec.name.removesuffix("_total"), spec.help, spec.labels, registry=REGISTRY)
        elif spec.kind == "gauge":
            self._metric = Gauge(spec.name, spec.help, spec.labels, registry=REGISTRY)
        else:
            self._metric = Histogram(spec.name, spec.help, spec.labels, buckets=spec.buckets, registry=REGISTRY)
        self._labelled = bool(spec.labels)

    def _child(self, labels: dict[str, str]):
        return self._metric.labels(**labels) if self._labelled else self._metric

    def inc(self, amount: float, labels: dict[str, str]) -> None:
        self._child(labels).inc(amount)

    def set(self, value: float, labels: dict[str, str]) -> None:
        self._child(labels).set(value)

    def observe(self, value: float, labels: dict[str, str]) -> None:
        self._child(labels).observe(value)


def instrument(spec: MetricSpec) -> _Instrument:
    return _Instrument(spec)
