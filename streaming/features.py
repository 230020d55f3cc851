"""The stream's feature set: which aggregates, over which windows, under which version name.

A feature row is one final window of one series: ``vector`` holds ``AGGREGATES`` in order. The
version names the definition (aggregates, window size, slide, lateness), so rows computed under
other settings never mix with these in the ``features`` table, and models name the version they
were trained on (``ModelVersion.feature_set_version``).
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from rtml.settings import Settings
from streaming.windowing import AGGREGATES, MICROS, ClosedWindows, WindowSpec

FEATURE_SET = "stream-aggregates-v1"


def window_spec(settings: Settings) -> WindowSpec:
    streaming = settings.streaming
    return WindowSpec.from_seconds(
        streaming.window_seconds, streaming.slide_seconds, streaming.allowed_lateness_seconds, settings.models.window_length
    )


def feature_set_version(spec: WindowSpec) -> str:
    return (
        f"{FEATURE_SET}:{','.join(AGGREGATES)}:size={spec.size_us / MICROS:g}s"
        f":slide={spec.slide_us / MICROS:g}s:lateness={spec.lateness_us / MICROS:g}s"
    )


def feature_rows(closed: ClosedWindows, version: str) -> pa.Table:
    """Rows for the ``features`` table (their ``feature_id`` is derived by the lakehouse)."""
    count = len(closed)
    tenant_entity = [key.split("/", 1) for key in closed.keys]
    timestamp = pa.timestamp("us", tz="UTC")
    return pa.table(
        {
            "tenant": pa.array([pair[0] for pair in tenant_entity], pa.string()),
            "entity": pa.array([pair[1] for pair in tenant_entity], pa.string()),
            "window_start": pa.array(closed.start_us, timestamp),
            "window_end": pa.array(closed.end_us, timestamp),
            "feature_set_version": pa.array([version] * count, pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(closed.values.ravel(), pa.float64()), len(AGGREGATES)).cast(
                pa.list_(pa.float64())
            ),
            "created_at": pa.array(np.full(count, int(datetime.now(timezone.utc).timestamp() * MICROS)), timestamp),
            "subject": pa.array(closed.subjects, pa.string()),
        }
    )
