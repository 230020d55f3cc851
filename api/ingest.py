"""The ingestion core: events of an HTTP request in, each handed on durably or rejected with its reason.

    ingestor = Ingestor.open(settings)        # or Ingestor(settings, log_writer, lambda: lake.writer("events"))
    result = ingestor.ingest_documents("acme", parse_json_body(body, content_type))
    result = ingestor.ingest_frame("acme", {"entity": "cam-1", "event_time": "...", "frame_shape": "16x16"}, frame)

Validation is the kernel's, once per request (``rtml.schemas.validate_events``), and a bad event
never costs the good ones: each is reported by its position in the request (``Rejected``). The
caller's tenant scopes the write: an event without ``tenant`` gets the caller's, one naming
another tenant is rejected. An event without ``event_id`` gets a fresh one (returned in
``Ingested.event_ids``), so that it can be found later; only events sent with their own ids are
safe to send twice, since a retry of the others gets new ids.

Routing is the DataRouter's rule (``streaming.routes`` by data type):

- ``stream``: appended to the event log (``streaming.eventlog``), keyed ``tenant/entity``, as the
  document itself re-encoded as JSON with its tenant and event id filled in, or for an image as a
  binary frame with the headers the DataRouter decodes, so that a consumer reads exactly the event
  that was validated here. The consumer lands it in ``events`` too when
  ``streaming.land_stream_events`` is on.
- ``batch``: appended to the lakehouse ``events`` table (the writer's ``submit(rows).result()``,
  idempotent by ``(tenant, event id)``).

PII is tokenized first (``security.pii``), before validation and before anything is handed on: the
log, the lakehouse and the consumers only ever see tokens. The token vault
(``security.tokenvault``) stores the accepted events' tokens before the log append or lakehouse
write, so no token is stored anywhere without its vault entry.

Both ``ingest_*`` return only once everything accepted is durable (the log's ``append`` returned,
the lakehouse write is done); if the vault, the log or the lakehouse cannot take it now they raise
``Refusal(503, reason, retry_after_s)``, and the client sends the request again. Thread-safe: the
Ingress calls them from several worker threads at once.

Metrics: every event of a request is counted once, by the caller's tenant: accepted ones in
``rtml_ingested_events_total`` per path once they are durable, refused ones in
``rtml_ingest_rejected_events_total`` per cause, a bounded word (``Rejected.cause``; a request
refused as a whole counts its events under its status's cause, ``counting_refusals``).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import orjson

from lakehouse.writer import BatchingWriter
from observability import metrics, tracing
from rtml.schemas import DataType, Event, Refusal, ScoreRequest, validate_events
from rtml.settings import Settings
from security.pii import Tokenizer, VaultEntry
from security.tokenvault import TokenVault
from streaming.eventlog import EventLogUnavailable, EventLogWriter, LogRecord, open_event_log_writer
from streaming.failures import passes_later
from streaming.router import DataRouter, event_columns, frame_array, frame_headers
from streaming.sources.kafka import record_key

JSON_TYPES = ("application/json", "application/x-ndjson")
# Why events were refused, as rtml_ingest_rejected_events_total counts them (the reason text is the client's).
INVALID = "invalid"  # not an event, or not a valid one
FORBIDDEN = "forbidden"  # another tenant's event
TOO_LARGE = "too_large"
RATE_LIMITED = "rate_limited"
UNAVAILABLE = "unavailable"  # a store could not take them now (503: sent again later)


@dataclass
class Rejected:
    index: int  # the event's position in the request
    reason: str
    cause: str = INVALID  # INVALID or FORBIDDEN


@dataclass
class Ingested:
    accepted: int  # events handed on durably
    rejected: list[Rejected]  # each bad event with its position in the request and why
    event_ids: list[str | None]  # per position in the request: the id stored (None where rejected)


@dataclass(frozen=True)
class Unparsed:
    """An NDJSON line that is not JSON, in place of its document: it is rejected with ``reason``."""

    reason: str


def parse_json_body(body: bytes, content_type: str) -> list[Any]:
    """The documents of a request body: ``application/json`` (one object, or an array of them) or
    ``application/x-ndjson`` (one per non-empty line; a line that is not JSON becomes an
    ``Unparsed`` at its position, and the other lines go on). Raises ``Refusal`` 415 for another
    content type and 400 for a JSON body that cannot be read or is neither an object nor an array."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type not in JSON_TYPES:
        raise Refusal(415, f"content type {content_type or '(none)'!r} is not accepted here: send {' or '.join(JSON_TYPES)}")
    if not body.strip():
        raise Refusal(400, "the body is empty: send one event object, an array of them, or NDJSON (one object per line)")
    if media_type == "application/x-ndjson":
        return [_ndjson_line(line) for line in body.splitlines() if line.strip()]
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise Refusal(400, f"the body is not valid JSON ({error}): send one event object or an array of them") from None
    if isinstance(document, dict):
        return [document]
    if isinstance(document, list):
        return document
    raise Refusal(400, f"the body is a JSON {type(document).__name__}: send one event object or an array of them")


async def read_body(request: Any, limit: int, setting: str) -> bytes:
    """The body of an HTTP request (starlette's ``Request``), refused with ``Refusal`` 413 beyond
    ``limit`` bytes (``setting`` names the knob): told by its Content-Length before it is read, or
    as soon as a body sent without one grows past the limit."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Refusal(413, _too_large(f"{declared} bytes", limit, setting))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refusal(413, _too_large(f"more than {limit} bytes", limit, setting))
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: str, limit: int, setting: str) -> str:
    return f"the request body has {size}; the limit is {limit} bytes ({setting}): split it into smaller requests"


def _ndjson_line(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError as error:
        return Unparsed(f"not valid JSON: {error}")


class Ingestor:
    """What ``POST /v1/events`` and ``/v1/events/binary`` do with a parsed request (module
    docstring). ``events_writer`` opens the lakehouse ``events`` writer, on the first batch-path
    event. ``first_hop`` is the process's tokenizer and token vault (default: its own), so that an
    erasure in the same process empties the caches ingestion fills. The Ingestor owns the log, the
    writer and a first hop of its own: ``close`` closes them."""

    def __init__(self, settings: Settings, log: EventLogWriter, events_writer: Callable[[], BatchingWriter], first_hop: PiiFirstHop | None = None):
        self._routes = DataRouter(settings.streaming.routes, settings.streaming.land_stream_events).routes
        self._owns_first_hop = first_hop is None
        self._pii = first_hop or PiiFirstHop(settings)
        self._log = log
        self._open_writer = events_writer
        self._writer: BatchingWriter | None = None
        self._writer_lock = threading.Lock()
        self._retry_after_s = settings.serving.retry_after_s
        self._lakehouse_timeout_s = settings.serving.request_timeout_s

    @classmethod
    def open(cls, settings: Settings, first_hop: PiiFirstHop | None = None) -> Ingestor:
        """An Ingestor over the configured event log (``open_event_log_writer``) and the lakehouse's
        ``events`` table (connected on the first batch-path event)."""

        def events_writer() -> BatchingWriter:
            from lakehouse import Lakehouse

            return Lakehouse.open(settings).writer("events")

        return cls(settings, open_event_log_writer(settings), events_writer, first_hop)

    def ingest_documents(self, tenant: str, documents: list[Any]) -> Ingested:
        """Validate, route and durably hand on every good document (JSON events: ``parse_json_body``)."""
        reasons: list[tuple[str, str] | None] = [None] * len(documents)  # (reason, cause)
        candidates: list[int] = []
        scoped: list[dict] = []
        found: list[list[VaultEntry]] = []
        for i, document in enumerate(documents):
            reason = (document.reason, INVALID) if isinstance(document, Unparsed) else _scope_problem(document, tenant)
            if reason is None:
                candidates.append(i)
                tokenized = self._pii.tokenizer.tokenize(tenant, document if "tenant" in document else {**document, "tenant": tenant})
                scoped.append(tokenized.document)
                found.append(tokenized.entries)
            reasons[i] = reason
        events, problems = validate_events(scoped)
        stream: list[LogRecord] = []
        streamed: list[Event] = []  # the events of ``stream``
        batch: list[Event] = []
        entries: list[VaultEntry] = []
        event_ids: list[str | None] = [None] * len(documents)
        for i, document, event, problem, event_entries in zip(candidates, scoped, events, problems, found):
            if event is None:
                reasons[i] = (problem, INVALID)
            elif event.data_type is DataType.IMAGE:
                reasons[i] = ("image events must arrive as binary frames (POST /v1/events/binary)", INVALID)
            else:
                event_ids[i] = event.event_id
                entries += event_entries
                if self._routes[event.data_type.value] == "stream":
                    value = orjson.dumps({**document, "event_id": event.event_id})
                    stream.append(LogRecord(record_key(event.tenant, event.entity), value))
                    streamed.append(event)
                else:
                    batch.append(event)
        self._pii.store(tenant, entries)
        self._hand_on(tenant, _traced(stream, streamed), batch, [None] * len(batch))
        rejected = [Rejected(i, *reason) for i, reason in enumerate(reasons) if reason is not None]
        _count_rejected(tenant, rejected)
        return Ingested(len(stream) + len(batch), rejected, event_ids)

    def ingest_frame(self, tenant: str, fields: Mapping[str, str], frame: bytes) -> Ingested:
        """One binary event: ``frame`` is the body, ``fields`` the event's fields as text (from
        the request's headers): ``entity``, ``event_time``, optionally ``tenant``, ``event_id``,
        ``subject``, ``data_type`` (``image``, the default, or ``record``, whose body lands as the
        row's payload), ``attributes`` (a JSON object), and for an image ``frame_shape``
        (``"HxW"``, ``"H,W"`` or ``"[H, W]"``) and ``frame_dtype`` (``uint8`` or ``float32``),
        which join the attributes. An image's body must hold exactly ``H x W`` values of its dtype."""
        document, reason = _frame_document(fields)
        cause = INVALID
        if reason is None and (scope_problem := _scope_problem(document, tenant)) is not None:
            reason, cause = scope_problem
        event: Event | None = None
        if reason is None:
            document.setdefault("tenant", tenant)
            tokenized = self._pii.tokenizer.tokenize(tenant, document)
            document = tokenized.document
            (event,), (reason,) = validate_events([document])
        if event is not None and event.data_type is DataType.IMAGE and isinstance(problem := frame_array(event.attributes, frame), str):
            reason = problem
        if reason is not None or event is None:
            rejected = [Rejected(0, reason or "not an event", cause)]
            _count_rejected(tenant, rejected)
            return Ingested(0, rejected, [None])
        entries = tokenized.entries
        if event.data_type is DataType.RECORD:  # a free-form body; an image's pixels are not text
            frame, body_entries = self._pii.tokenizer.tokenize_bytes(bytes(frame), tokenized.subject_token)
            entries = entries + body_entries
        self._pii.store(tenant, entries)
        if self._routes[event.data_type.value] == "stream":
            fields_header = {**document, "event_id": event.event_id, "attributes": event.attributes}
            record = LogRecord(record_key(event.tenant, event.entity), bytes(frame), frame_headers(fields_header))
            self._hand_on(tenant, _traced([record], [event]), [], [])
        else:
            self._hand_on(tenant, [], [event], [bytes(frame)])
        return Ingested(1, [], [event.event_id])

    def _hand_on(self, tenant: str, stream: list[LogRecord], batch: list[Event], payloads: list[bytes | None]) -> None:
        """Append ``stream`` to the log and ``batch`` (with their payloads) to ``events``, side by
        side; return once both are durable (and counted per path), or raise ``Refusal(503)``."""
        landing = None
        if batch:
            rows = event_columns(batch, payloads, np.zeros(len(batch)), np.zeros(len(batch)), np.zeros(len(batch))).events_table()
            landing = self._events_writer().submit(rows)
        try:
            self._log.append(tenant, stream)
        except EventLogUnavailable as error:
            raise Refusal(503, str(error), self._retry_after_s) from error
        if landing is not None:
            try:
                landing.result(timeout=self._lakehouse_timeout_s)
            except Exception as error:
                if not (isinstance(error, TimeoutError) or passes_later(error)):
                    raise
                raise Refusal(
                    503,
                    f"the lakehouse did not store the batch-path events within {self._lakehouse_timeout_s:g} s "
                    f"({type(error).__name__}: {error}); send the request again later",
                    self._retry_after_s,
                ) from error
        for path, events in (("stream", stream), ("batch", batch)):
            if events:
                metrics.INGESTED.labels(tenant=tenant, path=path).inc(len(events))

    def _events_writer(self) -> BatchingWriter:
        with self._writer_lock:
            if self._writer is None:
                self._writer = self._open_writer()
            return self._writer

    def close(self) -> None:
        """Close the log and the token vault, and write what is buffered for ``events`` and close its writer."""
        self._log.close()
        if self._owns_first_hop:
            self._pii.close()
        with self._writer_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None


def _traced(records: list[LogRecord], events: list[Event]) -> list[LogRecord]:
    """``records`` (one per event of ``events``), the sampled events' with their trace's carrier in
    their headers: each traced event's trace begins here (``observability.tracing``), and the
    DataRouter continues it from the log."""
    begun = tracing.start_events(
        "rtml.ingest",
        [event.event_id for event in events],
        lambda i: {tracing.TENANT: events[i].tenant, tracing.ENTITY: events[i].entity, tracing.EVENT_ID: events[i].event_id, tracing.SOURCE: "http"},
    )
    for i, carrier in begun.items():
        records[i] = replace(records[i], headers=(*records[i].headers, *tracing.to_kafka_headers(carrier)))
    return records


def _scope_problem(document: Any, tenant: str) -> tuple[str, str] | None:
    """Why a document cannot be one of the caller's events before validation, and its cause: not
    an object (``INVALID``), or another tenant's (``FORBIDDEN``)."""
    if not isinstance(document, dict):
        return f"a JSON {type(document).__name__} where an event object was expected", INVALID
    named = document.get("tenant", tenant)
    if named != tenant:
        return f"tenant {named!r} is not the caller's tenant {tenant!r}", FORBIDDEN
    return None


def _count_rejected(tenant: str, rejected: list[Rejected]) -> None:
    for cause, count in Counter(refused.cause for refused in rejected).items():
        metrics.INGEST_REJECTED.labels(tenant=tenant, reason=cause).inc(count)


@contextmanager
def counting_refusals(tenant: str, events: int) -> Iterator[None]:
    """Around the handling of a parsed request of ``events`` events: a ``Refusal`` of the whole
    request counts them all in ``rtml_ingest_rejected_events_total`` under its status's cause
    (``refusal_cause``), and goes on up to the answer."""
    try:
        yield
    except Refusal as refusal:
        metrics.INGEST_REJECTED.labels(tenant=tenant, reason=refusal_cause(refusal.status)).inc(events)
        raise


def refusal_cause(status: int) -> str:
    """The cause word of a request refused with HTTP ``status``."""
    causes = {403: FORBIDDEN, 413: TOO_LARGE, 429: RATE_LIMITED}
    return causes.get(status, UNAVAILABLE if status >= 500 else INVALID)


def _frame_document(fields: Mapping[str, str]) -> tuple[dict[str, Any], str | None]:
    """The event's document from a binary request's text fields, or why they cannot make one."""
    document: dict[str, Any] = {"data_type": DataType.IMAGE.value, **fields}
    if document["data_type"] == DataType.METRIC.value:
        return document, "a metric event carries its value, not a binary body: send it as JSON (POST /v1/events)"
    attributes: Any = {}
    if "attributes" in document:
        try:
            attributes = orjson.loads(document["attributes"])
        except orjson.JSONDecodeError as error:
            return document, f"attributes: not valid JSON ({error})"
        if not isinstance(attributes, dict):
            return document, "attributes: must be a JSON object"
    for name in ("frame_shape", "frame_dtype"):
        if name in document:
            text = document.pop(name)
            attributes[name] = _frame_shape(text) if name == "frame_shape" else text
    if attributes:
        document["attributes"] = attributes
    return document, None


def _frame_shape(text: str) -> list[int] | str:
    """``"HxW"``, ``"H,W"`` or ``"[H, W]"`` as ``[H, W]``; anything else as it is, for the frame
    check to name."""
    parts = text.strip().strip("[]").replace("x", ",").split(",")
    try:
        return [int(part) for part in parts]
    except ValueError:
        return text


class PiiFirstHop:
    """Tokenization where rtml first holds a request's data (``security.pii``), and the token vault
    that must hold every token before anything carrying it is handed on. Thread-safe; the vault is
    opened on first use."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self.tokenizer = Tokenizer(settings)
        self._vault: TokenVault | None = None
        self._lock = threading.Lock()
        self._retry_after_s = settings.serving.retry_after_s

    @property
    def vault(self) -> TokenVault:
        """The token vault (opened now if it was not)."""
        with self._lock:
            if self._vault is None:
                self._vault = TokenVault.open(self._settings)
            return self._vault

    def store(self, tenant: str, entries: list[VaultEntry]) -> None:
        """Keep ``entries`` in the token vault, or raise ``Refusal(503)`` when it cannot take them now."""
        if not entries:
            return
        try:
            self.vault.store(tenant, entries)
        except Exception as error:
            if not passes_later(error):
                raise
            raise Refusal(
                503, f"the token vault cannot store this request's tokens now ({type(error).__name__}); send the request again later", self._retry_after_s
            ) from error

    def score_request(self, request: ScoreRequest) -> ScoreRequest:
        """``request`` with its entities, event ids and subjects tokenized as an event's would be
        (their vault entries stored first)."""
        if request.entities is None and request.event_ids is None and request.subjects is None:
            return request
        size = len(request)
        columns = {"entity": request.entities, "event_id": request.event_ids, "subject": request.subjects}
        entries: list[VaultEntry] = []
        tokenized: dict[str, list] = {name: [] for name, values in columns.items() if values is not None}
        for i in range(size):
            document = {name: values[i] for name, values in columns.items() if values is not None and values[i] is not None}
            result = self.tokenizer.tokenize(request.tenant, document)
            entries += result.entries
            for name in tokenized:
                tokenized[name].append(result.document.get(name, columns[name][i]))
        self.store(request.tenant, entries)
        return replace(request, entities=tokenized.get("entity"), event_ids=tokenized.get("event_id"), subjects=tokenized.get("subject"))

    def close(self) -> None:
        if self._vault is not None:
            self._vault.close()
