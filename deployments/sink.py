"""``PredictionSink``: the lakehouse writer for predictions, in a process of its own.

The router hands it each scored batch's rows and does not wait; the sink queues them on a
background ``lakehouse`` batching writer that commits every ``lakehouse.writer_flush_seconds`` or
``writer_batch_rows`` rows. Iceberg commits hold the GIL for tens of milliseconds (manifest reads
and writes); here they cannot stall the router's event loop and so cannot show in its latency.
"""

from __future__ import annotations

import pyarrow as pa
from ray import serve

from deployments.store import LakehouseStore
from rtml.settings import Settings


@serve.deployment
class PredictionSink:
    def __init__(self, settings: Settings):
        self._store = LakehouseStore(settings)

    async def write(self, rows: pa.Table) -> None:
        """Queue the rows; they are durable within the writer's flush interval."""
        self._store.write_predictions(rows)

    def __del__(self) -> None:  # Serve's graceful shutdown: write what is queued
        self._store.close()
