"""Tracing (OpenTelemetry): one trace per sampled event, from where it enters rtml to its enrichment.

    tracing.configure(settings, "rtml-consumer")            # once per process, at its start
    carrier = tracing.start_event("rtml.ingest", {"rtml.tenant": "acme", ...})  # None: not sampled
    headers = tracing.to_kafka_headers(carrier)              # the carrier travels with the record
    carrier = tracing.from_kafka_headers(record_headers)      # ... and is read where it is consumed
    with tracing.stage("rtml.consume", carriers, {"rtml.batch_size": 512}) as children:
        handle.score.remote(request_with(children))           # the next hop continues each trace

Sampling is decided once, where an event enters rtml without a trace (an HTTP request; a record a
producer wrote straight into Kafka, at the DataRouter): ``observability.trace_sample_ratio`` of
them. From then on it is parent-based: only a sampled event has a carrier (``Carrier``: the W3C
``traceparent``/``tracestate`` fields, ``opentelemetry.propagate``), and a hop continues exactly
the traces whose carriers it was handed. A batch's events are sampled by their ids
(``sampled_positions``), so the API and the DataRouter agree on each event; an unsampled event
costs one checksum where it enters and nothing after; a batch stage without carriers does nothing.

A batch stage (``stage``) records one span per carrier, each the child of its carrier's span, at
most ``observability.max_traces_per_batch`` of them (the rest end there, counted on the spans in
``rtml.traces_dropped``); it yields the new spans' carriers, for the next hop.

Export: spans go over OTLP/HTTP to ``observability.otlp_endpoint`` in batches (flushed at process
exit); with no endpoint there is no exporter, and with no span processor at all (no endpoint, none
added by ``add_span_processor``) tracing is off: nothing is sampled. The process's spans carry the
resource attribute ``service.name`` given to ``configure``.

Span attributes name what the span is about: ``rtml.tenant``, ``rtml.entity``, ``rtml.event_id``
(the tokenized values the stream carries, never personal data), ``rtml.model``,
``rtml.batch_size``, and on an event's first span ``rtml.source``.
"""

from __future__ import annotations

import atexit
import random
import threading
import zlib
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Status, StatusCode

from rtml.settings import Settings

Carrier = dict[str, str]
Attributes = Mapping[str, str | int | float | bool]

TENANT = "rtml.tenant"
ENTITY = "rtml.entity"
EVENT_ID = "rtml.event_id"
MODEL = "rtml.model"
BATCH_SIZE = "rtml.batch_size"
TRACES_DROPPED = "rtml.traces_dropped"
SOURCE = "rtml.source"  # where an event's trace began: "http" (the ingestion API) or "log" (the DataRouter)
TRACEPARENT = "traceparent"
# The OTLP exporter's batches leave at most this long after their first span (short, so that a
# trace is complete at the collector soon after the event's enrichment).
EXPORT_DELAY_MS = 500
_TRACE_ID_LOW_BITS = TraceIdRatioBased.TRACE_ID_LIMIT


class _EntryTraceIds(RandomIdGenerator):
    """Random ids, except that the root span of an event's trace gets the trace id its sampling was
    decided from (``_begin``), so that the provider's ratio sampler agrees with that decision."""

    def __init__(self) -> None:
        self._chosen = threading.local()

    def choose_next(self, trace_id: int) -> None:
        self._chosen.trace_id = trace_id

    def generate_trace_id(self) -> int:
        chosen = getattr(self._chosen, "trace_id", None)
        if chosen is None:
            return super().generate_trace_id()
        self._chosen.trace_id = None
        return chosen


class _State:
    """This process's tracing set-up (``configure``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: tuple | None = None  # the settings the provider was made from
        self.provider: TracerProvider | None = None
        self.tracer: trace.Tracer | None = None
        self.ids = _EntryTraceIds()
        self.added: list[SpanProcessor] = []  # by add_span_processor, kept across re-configuration
        self.exporter: BatchSpanProcessor | None = None  # the OTLP exporter's, when an endpoint is set
        self.ratio = 0.0
        # Sampling bound on a trace id's low 64 bits (TraceIdRatioBased's); 0 while tracing is off.
        self.bound = 0
        self.max_per_batch = 8


_state = _State()


def configure(settings: Settings, service: str) -> None:
    """Set up this process's tracing from ``settings.observability``: a tracer provider with
    resource ``service.name = service``, the sampler ``ParentBased(TraceIdRatioBased(ratio))``,
    and an OTLP/HTTP exporter (batched, flushed at exit) when ``otlp_endpoint`` is set.
    Idempotent: a second call with the same settings does nothing (the first service name stays);
    one with other tracing settings replaces the provider (after flushing it), keeping the span
    processors added by ``add_span_processor``."""
    observed = settings.observability
    key = (observed.trace_sample_ratio, observed.otlp_endpoint, tuple(sorted(observed.otlp_headers.items())), observed.max_traces_per_batch)
    with _state.lock:
        if _state.key == key:
            return
        if _state.provider is None:
            atexit.register(_shut_down)
        previous = _state.exporter
        # Not shut down on its own at exit: _shut_down does, for whichever provider is current then.
        provider = TracerProvider(
            resource=Resource.create({SERVICE_NAME: service}),
            sampler=ParentBased(TraceIdRatioBased(observed.trace_sample_ratio)),
            id_generator=_state.ids,
            shutdown_on_exit=False,
        )
        _state.exporter = None
        if observed.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=observed.otlp_endpoint, headers=dict(observed.otlp_headers))
            _state.exporter = BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS)
            provider.add_span_processor(_state.exporter)
        for processor in _state.added:
            provider.add_span_processor(processor)
        _state.provider, _state.tracer, _state.key = provider, provider.get_tracer("rtml"), key
        _state.ratio = observed.trace_sample_ratio
        _state.max_per_batch = observed.max_traces_per_batch
        _update_bound()
    if previous is not None:  # the replaced exporter sends what it holds; the added processors go on
        previous.shutdown()


def _shut_down() -> None:
    """At exit: export what is left and stop."""
    provider = _state.provider
    if provider is not None:
        provider.shutdown()


def add_span_processor(processor: SpanProcessor) -> None:
    """Send this process's spans to ``processor`` as well (tests: a ``SimpleSpanProcessor`` over an
    ``InMemorySpanExporter``). Call it after ``configure``; tracing is on from then on even
    without an OTLP endpoint."""
    with _state.lock:
        if _state.provider is None:
            raise RuntimeError("tracing is not configured in this process: call observability.tracing.configure(settings, service) first")
        _state.added.append(processor)
        _state.provider.add_span_processor(processor)
        _update_bound()


def force_flush(timeout_s: float = 5.0) -> bool:
    """Export the spans that have ended so far now, waiting at most ``timeout_s``; False when
    they did not all leave in time."""
    provider = _state.provider
    return True if provider is None else provider.force_flush(int(timeout_s * 1000))


def _update_bound() -> None:
    """Sample only while some processor receives spans: with none, a sampled event would cost
    spans that go nowhere."""
    on = _state.exporter is not None or bool(_state.added)
    _state.bound = TraceIdRatioBased.get_bound_for_rate(_state.ratio) if on else 0


# where an event enters ---------------------------------------------------------------------------


def start_event(name: str, attributes: Attributes) -> Carrier | None:
    """Decide whether an event entering rtml without a trace (an HTTP request's event; a record
    written straight into Kafka) is traced: a random trace id against the sampling ratio, before
    anything else is built. When it is, record its root span (``name``, ``attributes``; ended at
    once: it marks the moment the event entered) and return the span's carrier; None when not."""
    bound = _state.bound
    if not bound:
        return None
    trace_id = random.getrandbits(128)
    if trace_id & _TRACE_ID_LOW_BITS >= bound or not trace_id:
        return None
    return _begin(name, attributes, trace_id)


def start_events(name: str, event_ids: Sequence[str], attributes: Callable[[int], Attributes], traced: Container[int] = ()) -> dict[int, Carrier]:
    """``start_event`` for a batch of events, by their ids: an event is sampled when its id's
    CRC-32 falls in the ratio's share of the range (``sampled_positions``), so that every place
    deciding for the same event decides alike: an event the API left unsampled is not drawn again
    where the DataRouter reads it from the log. Only the sampled events' attributes
    (``attributes(position)``) and root spans are made; events at a position in ``traced`` (they
    came with a trace) are left out. Returns each sampled event's carrier by its position."""
    bound = _state.bound
    if not bound or not len(event_ids):
        return {}
    chosen = sampled_positions(event_ids, bound / (_TRACE_ID_LOW_BITS + 1))
    # A trace id whose low 64 bits are below the bound: what start_event's draw gives a sampled event.
    return {
        position: _begin(name, attributes(position), random.getrandbits(64) << 64 | random.randrange(bound))
        for position in chosen
        if position not in traced
    }


def sampled_positions(event_ids: Sequence[str], ratio: float) -> list[int]:
    """Positions of the events ``ratio`` samples, decided by each id alone (its CRC-32 against
    ``ratio`` of 2**32): about 0.3 us per event, and the same answer wherever it is asked."""
    if ratio >= 1.0:
        return list(range(len(event_ids)))
    limit = int(ratio * 2**32)
    return [i for i, event_id in enumerate(event_ids) if zlib.crc32(str(event_id).encode()) < limit]


def _begin(name: str, attributes: Attributes, trace_id: int) -> Carrier:
    """Record the root span of a sampled event's trace, with ``trace_id``; its carrier."""
    _state.ids.choose_next(trace_id)
    span = _state.tracer.start_span(name, context=otel_context.Context(), attributes=dict(attributes))
    span.end()
    return _carrier_of(span)


# hops --------------------------------------------------------------------------------------------


@contextmanager
def stage(name: str, carriers: Any, attributes: Attributes | None = None, start_time_ns: int | None = None) -> Iterator[Any]:
    """A batch stage of the sampled events whose ``carriers`` it was handed: one span ``name`` per
    carrier (child of the carrier's span, with ``attributes``), open for the block, at most
    ``max_traces_per_batch`` (the others' traces end here, counted in ``rtml.traces_dropped``).
    ``carriers`` is a list, or a mapping from event id to carrier (each span then also gets
    ``rtml.event_id``); the block gets the new spans' carriers in the same form, for the next hop.
    The first span is the current one in the block (log lines and nested spans name it). An
    exception leaving the block marks every span as failed. ``start_time_ns`` backdates the spans
    (``time.time_ns()`` taken where the stage's work began, before its carriers were known).

    No carriers: yields an empty list (or mapping) and does nothing else. In a process whose
    tracing is not configured the carriers go on unchanged, so the traces continue downstream."""
    keyed = isinstance(carriers, Mapping)
    if not carriers:
        yield {} if keyed else []
        return
    tracer = _state.tracer
    if tracer is None:
        yield dict(carriers) if keyed else list(carriers)
        return
    items = list(carriers.items()) if keyed else list(enumerate(carriers))
    limit = _state.max_per_batch
    common = dict(attributes or {})
    if len(items) > limit:
        common[TRACES_DROPPED] = len(items) - limit
        items = items[:limit]
    spans = []
    for key, carrier in items:
        span_attributes = {**common, EVENT_ID: str(key)} if keyed else common
        spans.append((key, tracer.start_span(name, context=propagate.extract(carrier), attributes=span_attributes, start_time=start_time_ns)))
    children = {key: _carrier_of(span) for key, span in spans}
    token = otel_context.attach(trace.set_span_in_context(spans[0][1]))
    try:
        yield children if keyed else list(children.values())
    except BaseException as error:
        for _, span in spans:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        raise
    finally:
        otel_context.detach(token)
        for _, span in spans:
            span.end()


def current() -> list[Carrier]:
    """The carrier of the span that is current here (a ``stage``'s first span, in its block), as a
    list for ``stage``; empty where none is recording."""
    span = trace.get_current_span()
    return [_carrier_of(span)] if span.is_recording() else []


def _carrier_of(span: trace.Span) -> Carrier:
    carrier: Carrier = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


# Kafka records ----------------------------------------------------------------------------------


def to_kafka_headers(carrier: Carrier | None) -> list[tuple[str, bytes]]:
    """A carrier as Kafka record headers (the embedded log keeps them the same way); none for None."""
    return [(field, value.encode()) for field, value in carrier.items()] if carrier else []


def from_kafka_headers(headers: Mapping[str, bytes] | Sequence[tuple[str, bytes]] | None) -> Carrier | None:
    """The carrier a record's headers hold (as kafka-python gives them, or as ``SourceBatch.headers``
    holds them), or None when the record's event is not traced."""
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    fields = propagate.get_global_textmap().fields
    carrier = {field: bytes(value).decode() for field, value in pairs if field in fields}
    return carrier if TRACEPARENT in carrier else None
