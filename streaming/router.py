"""The DataRouter: raw records in, validated columnar events out, each sent down its data type's path.

Paths (``streaming.routes``, by ``DataType``): ``stream`` events are windowed and scored now
(``metric`` values by the series models, ``image`` frames by the image model); ``batch`` events
only land in the lakehouse ``events`` table for later jobs. Stream events land there too when
``streaming.land_stream_events`` is on, so that training can read the raw series.

Payloads
    JSON: an object with ``rtml.schemas.Event``'s fields (``event_id``, ``tenant``, ``entity``,
    ``data_type``, ``event_time``, ``value``, ``attributes``, ``subject``). ``event_time`` is ISO
    8601 (no offset means UTC) or a number of seconds since the Unix epoch; ``value`` may be a
    numeric string (CSV replays). A record without ``event_id`` gets ``<partition>@<offset>``, so a
    replay of it gets the same id again.

    Binary frame (Kafka header ``content-type: application/x-rtml-frame``): the record's value is
    the raw frame, row-major; the event's fields are the JSON object in header ``rtml-event``, whose
    ``attributes`` give ``frame_shape`` (``[height, width]``) and ``frame_dtype`` (``"uint8"``,
    scaled to [0, 1], or ``"float32"``). ``data_type`` is ``image``.

Anything that does not fit becomes a dead letter with the reason; the valid records of the same
batch go on. Checks run column by column over the batch, not field by field per record.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa

from rtml.errors import RtmlError
from rtml.schemas import DataType, Event
from streaming.sources.base import SourceBatch

Path = Literal["stream", "batch"]
FRAME_CONTENT_TYPE = b"application/x-rtml-frame"
FRAME_DTYPES = {"uint8": np.uint8, "float32": np.float32}
EVENT_FIELDS = frozenset(Event.model_fields)
_TENANT = re.compile(Event.model_fields["tenant"].metadata[-1].pattern)
NO_TIME = np.iinfo(np.int64).min


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


class DataRouter:
    def __init__(self, routes: Mapping[str, Path], land_stream_events: bool):
        unknown = set(routes) - {t.value for t in DataType}
        if unknown:
            raise RtmlError(f"streaming.routes names unknown data type(s) {sorted(unknown)}; known: {[t.value for t in DataType]}")
        if routes.get(DataType.RECORD.value) == "stream":
            raise RtmlError("record events have no model to score them: route them to 'batch'")
        self.routes = {t.value: routes.get(t.value, "batch") for t in DataType}
        self.land_stream_events = land_stream_events

    def route(self, batch: SourceBatch, partition_names: Sequence[str]) -> RoutedBatch:
        headers = batch.headers or [None] * len(batch)
        decoded = [_decode(payload, header) for payload, header in zip(batch.payloads, headers)]
        documents = [document for document, _, _ in decoded]
        reasons: list[str | None] = [reason for _, _, reason in decoded]
        frames = [frame for _, frame, _ in decoded]
        columns = _columns(documents, reasons, frames, batch, partition_names)

        valid = np.array([reason is None for reason in reasons], dtype=bool)
        images = [_frame_array(document, frame) if ok and frame is not None else None for document, frame, ok in zip(documents, frames, valid)]
        for i, image in enumerate(images):
            if isinstance(image, str):
                reasons[i], valid[i] = image, False
        events = columns.take(np.flatnonzero(valid))
        events_images = [image for image, ok in zip(images, valid) if ok]
        path = np.array([self.routes[t] for t in events.data_type], dtype=object) if len(events) else np.empty(0, object)
        stream = path == "stream"
        is_image = events.data_type == DataType.IMAGE.value
        frame_rows = np.flatnonzero(stream & is_image)
        landed = np.ones(len(events), bool) if self.land_stream_events else ~stream
        bad = np.flatnonzero(~valid)
        return RoutedBatch(
            metrics=events.take(np.flatnonzero(stream & (events.data_type == DataType.METRIC.value))),
            frames=events.take(frame_rows),
            images=[events_images[i] for i in frame_rows],
            landed=events.take(np.flatnonzero(landed)),
            dead=DeadLetters(
                batch.partitions[bad],
                batch.offsets[bad],
                [_as_bytes(batch.payloads[i]) for i in bad],
                [reasons[i] for i in bad],
            ),
        )


def _decode(payload: object, headers: Mapping[str, bytes] | None) -> tuple[Any, bytes | None, str | None]:
    """(the event's fields, a binary frame or None, why the record is unusable or None)."""
    if headers and headers.get("content-type") == FRAME_CONTENT_TYPE:
        if "rtml-event" not in headers:
            return None, None, "binary frame without an rtml-event header naming its tenant, entity and time"
        document, _, reason = _decode(headers["rtml-event"], None)
        return document, bytes(payload), reason  # type: ignore[arg-type]
    if isinstance(payload, Mapping):
        return payload, None, None
    try:
        document = orjson.loads(payload)  # type: ignore[arg-type]
    except (orjson.JSONDecodeError, TypeError) as error:
        return None, None, f"not valid JSON: {error}"
    if not isinstance(document, dict):
        return None, None, f"a JSON {type(document).__name__} where an event object was expected"
    return document, None, None


def _columns(
    documents: list[Any],
    reasons: list[str | None],
    frames: list[bytes | None],
    batch: SourceBatch,
    partition_names: Sequence[str],
) -> EventColumns:
    """Every field as a column; ``reasons`` gets the first problem of each record that has one."""
    empty: dict = {}
    docs = [document if reason is None else empty for document, reason in zip(documents, reasons)]

    def column(name: str) -> list[Any]:
        return [document.get(name) for document in docs]

    def reject(bad: Sequence[bool] | np.ndarray, why: str) -> None:
        for i in np.flatnonzero(bad):
            if reasons[i] is None:
                reasons[i] = why

    reject([not document.keys() <= EVENT_FIELDS for document in docs], "unknown field(s); an event has only " + ", ".join(sorted(EVENT_FIELDS)))
    tenant = column("tenant")
    good_tenants = {t for t in set(filter(lambda t: isinstance(t, str), tenant)) if _TENANT.fullmatch(t) and len(t) <= 64}
    reject([t not in good_tenants if isinstance(t, str) else True for t in tenant], "tenant missing or not 1-64 letters, digits, '_', '.', '-'")
    entity = column("entity")
    reject([not (isinstance(e, str) and 0 < len(e) <= 256) for e in entity], "entity missing or not a string of 1-256 characters")
    event_id = column("event_id")
    reject([not (i is None or (isinstance(i, str) and 0 < len(i) <= 128)) for i in event_id], "event_id is not a string of 1-128 characters")
    event_id = [
        i if i is not None else f"{partition_names[p]}@{o}" for i, p, o in zip(event_id, batch.partitions, batch.offsets)
    ]
    data_type = ["metric" if t is None else t for t in column("data_type")]
    known_types = {t.value for t in DataType}
    reject([t not in known_types if isinstance(t, str) else True for t in data_type], f"data_type must be one of {sorted(known_types)}")
    times = event_times_us(column("event_time"))
    reject(times == NO_TIME, "event_time missing or not ISO 8601 / seconds since the epoch")
    value, value_given = _floats(column("value"))
    reject(value_given & ~np.isfinite(value), "value is not a finite number")
    is_metric = np.array([t == DataType.METRIC.value for t in data_type], dtype=bool)
    reject(is_metric & ~value_given, "a metric event needs a value")
    is_image = np.array([t == DataType.IMAGE.value for t in data_type], dtype=bool)
    reject(is_image & np.array([f is None for f in frames], dtype=bool), "image events must arrive as binary frames")
    attributes = column("attributes")
    reject([not (a is None or isinstance(a, dict)) for a in attributes], "attributes must be a JSON object")
    subject = column("subject")
    reject([not (s is None or (isinstance(s, str) and len(s) <= 256)) for s in subject], "subject must be a string of at most 256 characters")
    return EventColumns(
        event_id=_objects(event_id),
        tenant=_objects(tenant),
        entity=_objects(entity),
        data_type=_objects(data_type),
        event_time_us=times,
        value=np.where(value_given, value, np.nan),
        attributes=_objects([_json_text(a) for a in attributes]),
        subject=_objects(subject),
        payload=_objects(frames),
        partition=batch.partitions.astype(np.int32),
        offset=batch.offsets.astype(np.int64),
        available_at=batch.available_at.astype(np.float64),
    )


def _objects(items: list[Any]) -> np.ndarray:
    """A 1-D object array, even when items are themselves lists (bad input)."""
    return np.fromiter(items, dtype=object, count=len(items))


def event_times_us(raw: list[Any]) -> np.ndarray:
    """Microseconds since the epoch; ``NO_TIME`` where missing or unreadable."""
    result = np.full(len(raw), NO_TIME, dtype=np.int64)
    numeric = np.array([isinstance(t, (int, float)) and not isinstance(t, bool) for t in raw], dtype=bool)
    text = np.array([isinstance(t, str) for t in raw], dtype=bool)
    if numeric.any():
        seconds = np.array([raw[i] for i in np.flatnonzero(numeric)], dtype=np.float64)
        inside = np.isfinite(seconds) & (np.abs(seconds) < 9e12)  # within what microseconds in int64 can hold
        result[np.flatnonzero(numeric)[inside]] = np.round(seconds[inside] * 1e6).astype(np.int64)
    if text.any():
        parsed = pd.to_datetime(pd.Series([raw[i] for i in np.flatnonzero(text)]), utc=True, format="ISO8601", errors="coerce")
        result[np.flatnonzero(text)] = parsed.dt.as_unit("us").to_numpy(dtype="datetime64[us]").astype(np.int64)
    return result


def _floats(raw: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(values as float64, whether each was given); unreadable values come back as NaN."""
    given = np.array([v is not None and v != "" for v in raw], dtype=bool)
    try:
        if any(isinstance(v, bool) for v in raw):
            raise ValueError("booleans are not values")
        values = np.array([v if g else np.nan for v, g in zip(raw, given)], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.array([_float_or_nan(v) for v in raw], dtype=np.float64)
    return values, given


def _float_or_nan(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        return np.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan


def _json_text(attributes: Any) -> str | None:
    return orjson.dumps(attributes, option=orjson.OPT_SORT_KEYS, default=str).decode() if isinstance(attributes, dict) and attributes else None


def _frame_array(document: Mapping[str, Any], frame: bytes) -> np.ndarray | str:
    """The frame as float32 [height, width] in [0, 1], or why it cannot be read."""
    attributes = document.get("attributes") or {}
    shape, dtype = attributes.get("frame_shape"), attributes.get("frame_dtype", "uint8")
    if dtype not in FRAME_DTYPES:
        return f"frame_dtype must be one of {sorted(FRAME_DTYPES)}"
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        return "a binary frame needs attributes.frame_shape = [height, width]"
    data = np.frombuffer(frame, dtype=FRAME_DTYPES[dtype])
    if data.size != shape[0] * shape[1]:
        return f"the frame has {data.size} values, not {shape[0]} x {shape[1]}"
    image = data.reshape(shape).astype(np.float32)
    return image / 255.0 if dtype == "uint8" else image


def _as_bytes(payload: object) -> bytes:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    return orjson.dumps(payload, default=str)
