"""The DataRouter: raw records in, validated columnar events out, each sent down its data type's path.

Paths (``streaming.routes``, by ``DataType``): ``stream`` events are windowed and scored now
(``metric`` values by the series models, ``image`` frames by the image model); ``batch`` events
only land in the lakehouse ``events`` table for later jobs. Stream events land there too when
``streaming.land_stream_events`` is on, so that training can read the raw series.

Payloads
    JSON: an object with ``rtml.schemas.Event``'s fields (``event_id``, ``tenant``, ``entity``,
    ``data_type``, ``event_time``, ``value``, ``attributes``, ``subject``), validated by the
    kernel (``rtml.schemas.validate_events``: ``event_time`` ISO 8601, no offset meaning UTC, or
    seconds since the Unix epoch; ``value`` a finite JSON number). A record without ``event_id``
    gets ``<partition>@<offset>``, so a replay of it gets the same id again.

    Binary frame (Kafka header ``content-type: application/x-rtml-frame``): the record's value is
    the raw frame, row-major; the event's fields are the JSON object in header ``rtml-event``, whose
    ``attributes`` give ``frame_shape`` (``[height, width]``) and ``frame_dtype`` (``"uint8"``,
    scaled to [0, 1], or ``"float32"``). ``data_type`` is ``image``.

Anything that does not fit becomes a dead letter with the reason (the field and what is wrong with
it); the valid records of the same batch go on. The batch is validated in one pydantic-core call.

PII: a router given a ``security.pii.Tokenizer`` tokenizes every record before validation (records
that came through the API are tokenized already, and tokenizing again changes nothing), so nothing
downstream sees the original: the events' fields, a record event's body, and dead letters (an
event document re-encoded as JSON with its tokens; a record that is not JSON, or a record event's
body, with its findings replaced; an image's pixels as they are). ``RoutedBatch.vault_entries``
holds what the token vault must keep, per tenant, before any of it is stored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, Literal

import numpy as np
import orjson
import pyarrow as pa

from observability import tracing
from rtml.errors import RtmlError
from rtml.schemas import TENANT_PATTERN, DataType, Event, validate_events
from security.pii import Tokenizer, VaultEntry
from streaming.sources.base import SourceBatch

Path = Literal["stream", "batch"]
FRAME_CONTENT_TYPE = b"application/x-rtml-frame"
FRAME_DTYPES = {"uint8": np.uint8, "float32": np.float32}
_TENANT = re.compile(TENANT_PATTERN)


@dataclass
class EventColumns:
    """Validated events, one numpy array per field, in arrival order."""

    event_id: np.ndarray  # object
    tenant: np.ndarray  # object
    entity: np.ndarray  # object
    data_type: np.ndarray  # object
    event_time_us: np.ndarray  # int64
    value: np.ndarray  # float64, NaN where the event has none
    attributes: np.ndarray  # object: JSON text or None
    subject: np.ndarray  # object
    payload: np.ndarray  # object: the frame's bytes or None
    partition: np.ndarray  # int32
    offset: np.ndarray  # int64
    available_at: np.ndarray  # float64, wall-clock seconds

    def __len__(self) -> int:
        return len(self.event_id)

    def take(self, rows: np.ndarray) -> EventColumns:
        return EventColumns(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @property
    def keys(self) -> np.ndarray:
        """The series key of each event: ``tenant/entity`` (tenants cannot contain a slash)."""
        return self.tenant + "/" + self.entity

    def events_table(self) -> pa.Table:
        """Rows for the lakehouse ``events`` table."""
        value = pa.array(self.value, pa.float64(), mask=np.isnan(self.value))
        return pa.table(
            {
                "event_id": pa.array(self.event_id, pa.string()),
                "tenant": pa.array(self.tenant, pa.string()),
                "entity": pa.array(self.entity, pa.string()),
                "data_type": pa.array(self.data_type, pa.string()),
                "event_time": pa.array(self.event_time_us, pa.timestamp("us", tz="UTC")),
                "value": value,
                "attributes": pa.array(self.attributes, pa.string()),
                "payload": pa.array(self.payload, pa.binary()),
                "subject": pa.array(self.subject, pa.string()),
            }
        )


@dataclass
class DeadLetters:
    partition: np.ndarray  # int32
    offset: np.ndarray  # int64
    payload: list[bytes]
    reason: list[str]

    def __len__(self) -> int:
        return len(self.reason)


@dataclass
class RoutedBatch:
    metrics: EventColumns  # stream path: windowed and scored by the series models
    frames: EventColumns  # stream path: scored by the image model (``payload`` holds the frame)
    images: list[np.ndarray]  # float32 [height, width] per row of ``frames``
    landed: EventColumns  # to append to the ``events`` table now
    dead: DeadLetters
    # What the token vault must hold before any of the above is stored, per tenant ("" for records
    # that name no valid tenant); empty without a tokenizer.
    vault_entries: dict[str, list[VaultEntry]] = field(default_factory=dict)
    # The traced events' carriers by event id (observability.tracing): sampled events only.
    traces: dict[str, tracing.Carrier] = field(default_factory=dict)


class DataRouter:
    """Routes batches of raw records (module docstring). ``tokenizer``: PII is tokenized before
    anything else happens; None only where the records cannot hold any (benchmarks, tests)."""

    def __init__(self, routes: Mapping[str, Path], land_stream_events: bool, tokenizer: Tokenizer | None = None):
        unknown = set(routes) - {t.value for t in DataType}
        if unknown:
            raise RtmlError(f"streaming.routes names unknown data type(s) {sorted(unknown)}; known: {[t.value for t in DataType]}")
        if routes.get(DataType.RECORD.value) == "stream":
            raise RtmlError("record events have no model to score them: route them to 'batch'")
        self.routes = {t.value: routes.get(t.value, "batch") for t in DataType}
        self.land_stream_events = land_stream_events
        self._tokenizer = tokenizer

    def route(self, batch: SourceBatch, partition_names: Sequence[str]) -> RoutedBatch:
        headers = batch.headers or [None] * len(batch)
        decoded = [_decode(payload, header) for payload, header in zip(batch.payloads, headers)]
        documents = [document for document, _, _ in decoded]
        reasons: list[str | None] = [reason for _, _, reason in decoded]
        frames = [frame for _, frame, _ in decoded]
        entries: dict[str, list[VaultEntry]] = {}
        if self._tokenizer is not None:
            self._tokenize(documents, frames, entries)
        events, events_images = _events(documents, reasons, frames, batch, partition_names)
        path = np.array([self.routes[t] for t in events.data_type], dtype=object) if len(events) else np.empty(0, object)
        stream = path == "stream"
        is_image = events.data_type == DataType.IMAGE.value
        frame_rows = np.flatnonzero(stream & is_image)
        landed = np.ones(len(events), bool) if self.land_stream_events else ~stream
        bad = np.array([i for i, reason in enumerate(reasons) if reason is not None], dtype=np.int64)
        return RoutedBatch(
            metrics=events.take(np.flatnonzero(stream & (events.data_type == DataType.METRIC.value))),
            frames=events.take(frame_rows),
            images=[events_images[i] for i in frame_rows],
            landed=events.take(np.flatnonzero(landed)),
            dead=DeadLetters(
                batch.partitions[bad],
                batch.offsets[bad],
                [self._dead_payload(batch.payloads[i], documents[i], frames[i], entries) for i in bad.tolist()],
                [reasons[i] for i in bad],
            ),
            vault_entries=entries,
            traces=_traces(events, batch, headers),
        )

    def _tokenize(self, documents: list[Any], frames: list[bytes | None], entries: dict[str, list[VaultEntry]]) -> None:
        """Replace each decoded document by its tokenized self, and a record event's body by its
        tokenized bytes, in place; their vault entries go to ``entries`` by tenant."""
        tokenizer = self._tokenizer
        for i, document in enumerate(documents):
            if document is None:
                continue
            document = dict(document)  # a file replay's records may be other mappings
            tenant = _tenant_of(document)
            tokenized = tokenizer.tokenize(tenant, document)
            documents[i] = tokenized.document
            entries.setdefault(tenant, []).extend(tokenized.entries)
            frame = frames[i]
            if frame is not None and document.get("data_type") == DataType.RECORD.value:
                frames[i], found = tokenizer.tokenize_bytes(frame, tokenized.subject_token)
                entries[tenant].extend(found)

    def _dead_payload(self, payload: object, document: Any, frame: bytes | None, entries: dict[str, list[VaultEntry]]) -> bytes:
        """What a dead letter keeps of its record: the record itself, or with a tokenizer its
        tokenized form (module docstring)."""
        if self._tokenizer is None:
            return _as_bytes(payload)
        if frame is not None:
            return frame  # a record event's body tokenized by _tokenize, or an image's pixels
        if document is not None:
            try:
                return orjson.dumps(document, default=str)
            except orjson.JSONEncodeError:  # e.g. nested beyond what orjson writes: scan it as text below
                pass
        redacted, found = self._tokenizer.tokenize_bytes(_as_bytes(payload))
        entries.setdefault("", []).extend(found)
        return redacted


def _traces(events: EventColumns, batch: SourceBatch, headers: Sequence[Mapping[str, bytes] | None]) -> dict[str, tracing.Carrier]:
    """The carriers of the batch's traced events, by event id: a record's own (its headers: the API
    sampled it), and for the records that arrived without one a trace begun here for the sampled
    share. Sampling is decided by the event id, as the API decides it, so an event the API left
    unsampled stays so and one written straight into the log is sampled at the same ratio."""
    traces: dict[str, tracing.Carrier] = {}
    carried: set[int] = set()  # rows of events that came with a trace
    for record in [i for i, header in enumerate(headers) if header and tracing.TRACEPARENT in header]:
        found = np.flatnonzero((events.partition == batch.partitions[record]) & (events.offset == batch.offsets[record]))
        carrier = tracing.from_kafka_headers(headers[record])
        if len(found) and carrier is not None:
            traces[events.event_id[found[0]]] = carrier
            carried.add(int(found[0]))
    begun = tracing.start_events(
        "rtml.ingest",
        events.event_id,
        lambda row: {tracing.TENANT: events.tenant[row], tracing.ENTITY: events.entity[row], tracing.EVENT_ID: events.event_id[row], tracing.SOURCE: "log"},
        carried,
    )
    traces.update((events.event_id[row], carrier) for row, carrier in begun.items())
    return traces


def _decode(payload: object, headers: Mapping[str, bytes] | None) -> tuple[Any, bytes | None, str | None]:
    """(the event's fields, a binary frame or None, why the record is unusable or None)."""
    if headers and headers.get("content-type") == FRAME_CONTENT_TYPE:
        if "rtml-event" not in headers:
            return None, None, "binary frame without an rtml-event header naming its tenant, entity and time"
        document, _, reason = _decode(headers["rtml-event"], None)
        return document, bytes(payload), reason  # type: ignore[arg-type]
    if not isinstance(payload, (bytes, bytearray, memoryview, str)):  # already decoded (file replays)
        return (payload, None, None) if isinstance(payload, Mapping) else (None, None, f"a {type(payload).__name__} where an event object was expected")
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError as error:
        return None, None, f"not valid JSON: {error}"
    if not isinstance(document, dict):
        return None, None, f"a JSON {type(document).__name__} where an event object was expected"
    return document, None, None


def _events(
    documents: list[Any],
    reasons: list[str | None],
    frames: list[bytes | None],
    batch: SourceBatch,
    partition_names: Sequence[str],
) -> tuple[EventColumns, list[np.ndarray | None]]:
    """The records that are valid events (validated by the kernel's ``validate_events``) as
    columns, with their decoded frames (None for non-frames); ``reasons`` gets why each other record
    is not one. A record without ``event_id`` gets ``<partition>@<offset>``, the same on every replay."""
    candidates = [i for i, reason in enumerate(reasons) if reason is None]
    named = [
        documents[i] if "event_id" in documents[i] else {**documents[i], "event_id": f"{partition_names[batch.partitions[i]]}@{batch.offsets[i]}"}
        for i in candidates
    ]
    validated, problems = validate_events(named)
    for i, problem in zip(candidates, problems):
        reasons[i] = problem
    kept = [(i, event) for i, event in zip(candidates, validated) if event is not None]
    rows = np.array([i for i, _ in kept], dtype=np.int64)
    events = [event for _, event in kept]
    columns = event_columns(events, [frames[i] for i in rows.tolist()], batch.partitions[rows], batch.offsets[rows], batch.available_at[rows])
    # What only the record's transport can tell: image events come as frames, and frames must read.
    images: list[np.ndarray | None] = [None] * len(events)
    usable = np.ones(len(events), dtype=bool)
    for position, row in enumerate(rows.tolist()):
        if frames[row] is not None:
            image = frame_array(events[position].attributes, frames[row])
            if isinstance(image, str):
                reasons[row], usable[position] = image, False
            else:
                images[position] = image
        elif events[position].data_type is DataType.IMAGE:
            reasons[row], usable[position] = "image events must arrive as binary frames", False
    keep = np.flatnonzero(usable)
    return columns.take(keep), [images[p] for p in keep.tolist()]


def event_columns(
    events: Sequence[Event], payloads: Sequence[bytes | None], partitions: np.ndarray, offsets: np.ndarray, available_at: np.ndarray
) -> EventColumns:
    """Validated events as columns, with each one's binary payload (a frame, or None) and where it
    came from (for the stream's records: partition position, offset, log time)."""
    return EventColumns(
        event_id=_objects([event.event_id for event in events]),
        tenant=_objects([event.tenant for event in events]),
        entity=_objects([event.entity for event in events]),
        data_type=_objects([event.data_type.value for event in events]),
        event_time_us=_micros([event.event_time for event in events]),
        value=np.array([event.value for event in events], dtype=np.float64),  # None becomes NaN
        attributes=_objects([_json_text(event.attributes) for event in events]),
        subject=_objects([event.subject for event in events]),
        payload=_objects(list(payloads)),
        partition=np.asarray(partitions).astype(np.int32),
        offset=np.asarray(offsets).astype(np.int64),
        available_at=np.asarray(available_at).astype(np.float64),
    )


def _micros(times: list[datetime]) -> np.ndarray:
    """UTC datetimes as int64 microseconds since the epoch, converted by Arrow in one call."""
    return pa.array(times, pa.timestamp("us", tz="UTC")).to_numpy(zero_copy_only=False).view(np.int64)


def _objects(items: list[Any]) -> np.ndarray:
    """A 1-D object array, even when items are themselves lists."""
    return np.fromiter(items, dtype=object, count=len(items))


def _json_text(attributes: Any) -> str | None:
    return orjson.dumps(attributes, option=orjson.OPT_SORT_KEYS, default=str).decode() if isinstance(attributes, dict) and attributes else None


def frame_headers(fields: Mapping[str, Any]) -> tuple[tuple[str, bytes], ...]:
    """The headers of a binary frame record whose event fields are ``fields`` (module docstring)."""
    return (("content-type", FRAME_CONTENT_TYPE), ("rtml-event", orjson.dumps(fields, default=str)))


def frame_array(attributes: Mapping[str, Any], frame: bytes) -> np.ndarray | str:
    """The frame as float32 [height, width] in [0, 1], or why it cannot be read."""
    shape, dtype = attributes.get("frame_shape"), attributes.get("frame_dtype", "uint8")
    if dtype not in FRAME_DTYPES:
        return f"frame_dtype must be one of {sorted(FRAME_DTYPES)}"
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        return "a binary frame needs attributes.frame_shape = [height, width]"
    itemsize = np.dtype(FRAME_DTYPES[dtype]).itemsize
    if len(frame) % itemsize:
        return f"the frame has {len(frame)} bytes, not a whole number of {dtype} values ({itemsize} bytes each)"
    data = np.frombuffer(frame, dtype=FRAME_DTYPES[dtype])
    if data.size != shape[0] * shape[1]:
        return f"the frame has {data.size} values, not {shape[0]} x {shape[1]}"
    image = data.reshape(shape).astype(np.float32)
    return image / 255.0 if dtype == "uint8" else image


def _tenant_of(document: Mapping[str, Any]) -> str:
    """The record's tenant if it names a valid one, else "" (the vault's rows need a tenant)."""
    tenant = document.get("tenant")
    return tenant if isinstance(tenant, str) and len(tenant) <= 64 and _TENANT.fullmatch(tenant) is not None else ""


def _as_bytes(payload: object) -> bytes:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    return orjson.dumps(payload, default=str)
