"""The HTTP formats of ``POST /v1/predict``: request bodies in, response bodies out.

Requests (the tenant and data type may also come as query parameters ``tenant``/``data_type``):

- JSON (``application/json``), one window::

      {"tenant": "acme", "window": [0.1, ...], "entity": "pump-1", "event_id": "e1",
       "event_time": "2026-03-01T12:00:00Z", "data_type": "metric"}

  or a batch: ``"windows": [[...], ...]`` with optional ``entities``/``event_ids``/``event_times``
  lists (one per window) or one ``entity`` for all. Image frames are ``[height][width]`` lists.
- NumPy (``application/x-npy``): the body is one ``.npy`` array ``[n, window_length]`` (or
  ``[n, height, width]``), float; ``tenant`` (and ``entity``) are query parameters. No JSON at all
  on the way in: the fastest form.
- Arrow IPC stream (``application/vnd.apache.arrow.stream``): a table with a list-of-float column
  ``window`` and optional ``entity``, ``event_id``, ``event_time``, ``subject`` columns.

Responses are JSON. One window: ``{"prediction_id", "tenant", "ensemble_score", "is_anomaly",
"scores": {"name@version": s}, "model_versions": {"name": "version"}, "weights": {...}}``. A JSON
batch: ``{"tenant", "model_versions", "weights", "predictions": [{"prediction_id",
"ensemble_score", "is_anomaly", "scores"}, ...]}``. A binary batch gets the same content as columns
(``prediction_ids``, ``ensemble_scores``, ``is_anomaly``, ``scores: {key: [...]}``), which encode
without a loop over windows.

Every refusal is ``{"error": reason}`` with a 4xx/5xx status; nothing here raises anything but
``rtml.schemas.Refusal``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
from pydantic import TypeAdapter, ValidationError

from rtml.schemas import DataType, EntityId, EventId, Refusal, ScoreRequest, ScoreResult, SubjectId, TenantId, UtcDatetime, micros

JSON = "application/json"
NPY = "application/x-npy"
ARROW_STREAM = "application/vnd.apache.arrow.stream"
# The kernel's field types (rtml.schemas) check every field a request names about its events.
_TENANT = TypeAdapter(TenantId)
_ENTITIES = TypeAdapter(list[EntityId])
_EVENT_IDS = TypeAdapter(list[EventId])
_TIMES = TypeAdapter(list[UtcDatetime])
_SUBJECTS = TypeAdapter(list[SubjectId | None])
_SCORED_DATA_TYPES = (DataType.METRIC.value, DataType.IMAGE.value)
_SINGLE_KEYS = {"tenant", "data_type", "window", "entity", "event_id", "event_time", "subject"}
_BATCH_KEYS = {"tenant", "data_type", "windows", "entity", "entities", "event_ids", "event_times", "subjects"}


def parse_predict(body: bytes, content_type: str, query: Mapping[str, str], max_windows: int) -> tuple[ScoreRequest, str]:
    """The request in ``body``, and the response shape it asks for (``"single"``, ``"rows"`` or
    ``"columns"``)."""
    media_type = content_type.split(";")[0].strip().lower() or JSON
    if media_type == JSON:
        request, shape = _from_json(body, query)
    elif media_type == NPY:
        request, shape = _from_npy(body, query), "columns"
    elif media_type == ARROW_STREAM:
        request, shape = _from_arrow(body, query), "columns"
    else:
        raise Refusal(415, f"unsupported content type {media_type!r}; send {JSON}, {NPY} or {ARROW_STREAM}")
    if len(request) == 0:
        raise Refusal(400, "no windows to score")
    if len(request) > max_windows:
        raise Refusal(413, f"{len(request)} windows in one request; the limit is {max_windows}, split the batch")
    return request, shape


def _checked(adapter: TypeAdapter, value: Any, name: str, expected: str) -> Any:
    """``value`` validated by a kernel type, or a 400 naming the field, what it should be and why."""
    try:
        return adapter.validate_python(value)
    except ValidationError as error:
        problem = error.errors(include_url=False)[0]
        where = "".join(f"[{part}]" for part in problem["loc"])
        raise Refusal(400, f"'{name}'{where} must be {expected}: {problem['msg']}") from None


def _tenant(value: Any) -> str:
    return _checked(_TENANT, value, "tenant", "1-64 characters of letters, digits, '_', '.' or '-'")


def _data_type(value: Any) -> str:
    value = DataType.METRIC.value if value is None else value
    if value not in _SCORED_DATA_TYPES:
        raise Refusal(400, f"'data_type' must be one of {list(_SCORED_DATA_TYPES)} to be scored, not {value!r}")
    return value


def _windows(values: Any, what: str) -> np.ndarray:
    try:
        windows = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise Refusal(400, f"{what} must be equally long lists of numbers") from None
    if windows.ndim < 2 or windows.shape[1] == 0:
        raise Refusal(400, f"{what} must hold windows (lists of numbers), got an array of shape {list(windows.shape)}")
    if not np.isfinite(windows).all():
        raise Refusal(400, f"{what} contain NaN or infinite values; drop or fill them before scoring")
    return windows


def _per_window(adapter: TypeAdapter, values: Any, count: int, name: str, expected: str) -> list | None:
    """An optional list with one value per window, each checked by its kernel type."""
    if values is None:
        return None
    if not isinstance(values, list) or len(values) != count:
        raise Refusal(400, f"'{name}' must be a list of {count} {expected}, one per window")
    return _checked(adapter, values, name, f"a list of {expected}")


def _from_json(body: bytes, query: Mapping[str, str]) -> tuple[ScoreRequest, str]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise Refusal(400, f"the body is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise Refusal(400, "the body must be a JSON object with 'tenant' and 'window' or 'windows'")
    single = "window" in document
    if single == ("windows" in document):
        raise Refusal(400, "give either 'window' (one window) or 'windows' (a list of windows)")
    unknown = set(document) - (_SINGLE_KEYS if single else _BATCH_KEYS)
    if unknown:
        raise Refusal(400, f"unknown field(s) {sorted(unknown)}; see the predict request format")
    tenant = _tenant(document.get("tenant", query.get("tenant")))
    data_type = _data_type(document.get("data_type", query.get("data_type")))
    if single:
        windows = _windows([document["window"]], "'window'")
        plural = {name: [document[name]] if name in document else None for name in ("entity", "event_id", "event_time", "subject")}
        entities, event_ids, event_times, subjects = (
            plural["entity"],
            plural["event_id"],
            plural["event_time"],
            plural["subject"],
        )
    else:
        windows = _windows(document["windows"], "'windows'")
        entities = [document["entity"]] * len(windows) if "entity" in document else document.get("entities")
        event_ids, event_times, subjects = document.get("event_ids"), document.get("event_times"), document.get("subjects")
    count = len(windows)
    request = ScoreRequest(
        tenant=tenant,
        windows=windows,
        data_type=data_type,
        entities=_per_window(_ENTITIES, entities, count, "entity" if single else "entities", "entity names"),
        event_ids=_per_window(_EVENT_IDS, event_ids, count, "event_id" if single else "event_ids", "event ids"),
        event_times_us=_micros(_per_window(_TIMES, event_times, count, "event_time" if single else "event_times", "ISO 8601 times")),
        subjects=_per_window(_SUBJECTS, subjects, count, "subject" if single else "subjects", "subject ids or nulls"),
    )
    return request, "single" if single else "rows"


def _from_npy(body: bytes, query: Mapping[str, str]) -> ScoreRequest:
    tenant = _tenant(query.get("tenant"))
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise Refusal(400, f"the body is not a .npy array: {error}") from None
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise Refusal(400, f"the .npy array must hold numbers, not {array.dtype}")
    windows = _windows(array, "the .npy windows")
    entity = query.get("entity")
    return ScoreRequest(
        tenant=tenant,
        windows=windows,
        data_type=_data_type(query.get("data_type")),
        entities=[entity] * len(windows) if entity else None,
    )


def _from_arrow(body: bytes, query: Mapping[str, str]) -> ScoreRequest:
    tenant = _tenant(query.get("tenant"))
    try:
        table = pa.ipc.open_stream(body).read_all()
    except (pa.ArrowInvalid, OSError) as error:
        raise Refusal(400, f"the body is not an Arrow IPC stream: {error}") from None
    if "window" not in table.column_names:
        raise Refusal(400, f"the Arrow table needs a 'window' column (list of floats); it has {table.column_names}")
    column = table["window"].combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type)):
        raise Refusal(400, f"the 'window' column must be a list of floats, not {column.type}")
    if column.null_count:
        raise Refusal(400, f"{column.null_count} window(s) are null")
    lengths = np.unique(column.value_lengths().to_numpy(zero_copy_only=False))
    if len(lengths) != 1:
        raise Refusal(400, f"every window must have the same length; got lengths {lengths.tolist()[:5]}")
    try:
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    except (pa.ArrowInvalid, TypeError, ValueError):
        raise Refusal(400, f"the 'window' values must be numbers, not {column.type.value_type}") from None
    windows = _windows(values.reshape(len(column), int(lengths[0])), "the Arrow windows")
    return ScoreRequest(
        tenant=tenant,
        windows=windows,
        data_type=_data_type(query.get("data_type")),
        entities=_arrow_column(table, "entity", _ENTITIES, "entity names"),
        event_ids=_arrow_column(table, "event_id", _EVENT_IDS, "event ids"),
        event_times_us=_micros(_arrow_times(table)),
        subjects=_arrow_column(table, "subject", _SUBJECTS, "subject ids or nulls"),
    )


def _micros(times: list[datetime] | None) -> np.ndarray | None:
    return None if times is None else np.fromiter((micros(moment) for moment in times), np.int64, len(times))


def _arrow_column(table: pa.Table, name: str, adapter: TypeAdapter, expected: str) -> list | None:
    if name not in table.column_names:
        return None
    return _per_window(adapter, table[name].to_pylist(), table.num_rows, name, expected)


def _arrow_times(table: pa.Table) -> list[datetime] | None:
    if "event_time" in table.column_names and not pa.types.is_timestamp(table["event_time"].type):
        raise Refusal(400, f"the 'event_time' column must hold timestamps, not {table['event_time'].type}")
    return _arrow_column(table, "event_time", _TIMES, "timestamps")


def encode_result(request: ScoreRequest, result: ScoreResult, shape: str) -> bytes:
    if shape == "single":
        document: dict[str, Any] = {
            "prediction_id": result.prediction_ids[0],
            "tenant": request.tenant,
            "ensemble_score": float(result.ensemble_scores[0]),
            "is_anomaly": bool(result.is_anomaly[0]),
            "scores": {key: float(scores[0]) for key, scores in result.scores.items()},
            "model_versions": result.model_versions,
            "weights": result.weights,
        }
    elif shape == "rows":
        ensemble = result.ensemble_scores.tolist()
        anomalies = result.is_anomaly.tolist()
        per_model = {key: scores.tolist() for key, scores in result.scores.items()}
        document = {
            "tenant": request.tenant,
            "model_versions": result.model_versions,
            "weights": result.weights,
            "predictions": [
                {
                    "prediction_id": prediction_id,
                    "ensemble_score": ensemble[index],
                    "is_anomaly": anomalies[index],
                    "scores": {key: values[index] for key, values in per_model.items()},
                }
                for index, prediction_id in enumerate(result.prediction_ids)
            ],
        }
    else:
        document = {
            "tenant": request.tenant,
            "model_versions": result.model_versions,
            "weights": result.weights,
            "prediction_ids": result.prediction_ids,
            "ensemble_scores": result.ensemble_scores,
            "is_anomaly": result.is_anomaly,
            "scores": result.scores,
        }
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)


def encode_refusal(refusal: Refusal) -> bytes:
    return orjson.dumps({"error": refusal.reason})
