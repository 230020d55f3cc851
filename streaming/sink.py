"""The stream's lakehouse writer: one Ray actor that every consumer of a pipeline hands its rows to.

One writer per table for all consumers means one Iceberg commit per table per flush instead of one
per consumer batch, and no commit races between consumers. ``write`` returns when all of a
batch's rows are durable; consumers keep scoring meanwhile and checkpoint once it returns. A write
that fails raises a ``JudgedFailure`` that says whether it may pass later (judged here, where the
error's cause chain is whole; Ray sends an exception to the consumer without it), so that the
consumer rewinds and retries only what can pass.

The batch's predictions go to the live feed (``streaming.feed``) as they arrive, before they are
durable: subscribers see a prediction as soon as it is scored rather than after the next commit
(``lakehouse.writer_flush_seconds``). The price is that a live view may see an event twice (same
event id, a new prediction id) when a failed write makes the consumer re-score it; the lakehouse
keeps it once. The feed queues and returns: the write never waits for it.

Each batch's predictions are recorded in the audit trail, one entry per tenant (who: the stream's
sink; which rows: their count and up to ``AUDITED_IDS`` prediction ids), durable with the rows.
An entry's id is made of the tenant and the batch's event ids, and its time is the batch's newest
event time, so a replayed batch finds its entry and is recorded once.

Once a batch is durable, its anomalous predictions (the consumer's final decisions) and the newest
event time it scored per tenant go to the pipeline's anomaly listener (the app's agent graph), which
returns at once: explaining never holds up the write. A batch re-scored after a failed write is
handed on again; the agent graph files the same event under the same incident.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os

import pyarrow as pa
import pyarrow.compute as pc

from observability import tracing
from rtml.schemas import Prediction
from rtml.settings import Settings
from streaming.arrow_ipc import from_ipc
from streaming.failures import JudgedFailure, passes_later
from streaming.feed import open_feed, prediction_items
from streaming.scoring import AnomalyListener

TABLES = ("events", "features", "predictions")
AUDITED_IDS = 100
SINK_NICENESS = 10
log = logging.getLogger(__name__)


class LakehouseSink:
    """Run as a Ray actor (``ray.remote(LakehouseSink)``); async, so that writes of many consumers
    wait side by side."""

    def __init__(self, settings: Settings, listener: AnomalyListener | None = None):
        from lakehouse import Lakehouse

        # Commits come in bursts of CPU work that only have to keep up, not be quick; on a busy
        # machine they should not delay scoring, which the stream's latency is made of. Should the
        # sink fall behind, back-pressure slows the consumers.
        os.nice(SINK_NICENESS)
        tracing.configure(settings, "rtml-sink")
        self._lake = Lakehouse.open(settings)
        self._writers = {table: self._lake.writer(table) for table in (*TABLES, "audit")}
        self._feed = open_feed(settings)
        self._listener = listener

    async def write(self, tables: dict[str, bytes], traces: dict[str, tracing.Carrier] | None = None) -> dict[str, int]:
        """Append each table's rows (Arrow IPC, ``streaming.arrow_ipc``) idempotently; returns the
        rows submitted per table once durable; publishes the predictions on the live feed first.
        ``traces``: the carriers of the batch's traced events by event id (a span
        "rtml.lakehouse.write" each, until durable; the anomalies among them reach the listener
        with the spans' carriers)."""
        with tracing.stage("rtml.lakehouse.write", traces or {}) as written:
            submitted = await self._append(tables)
        if self._listener is not None and "predictions" in submitted:
            self._tell_listener(submitted["predictions"], written)
        return {name: rows.num_rows for name, rows in submitted.items()}

    async def _append(self, tables: dict[str, bytes]) -> dict[str, pa.Table]:
        """The rows of ``tables`` once durable (``write``), by table."""
        try:
            submitted = {name: rows for name, rows in ((name, from_ipc(data)) for name, data in tables.items()) if rows.num_rows}
            if "predictions" in submitted:
                self._feed.publish("predictions", prediction_items(submitted["predictions"]))
                audit = _audit_entries(submitted["predictions"])
            writes = [self._writers[name].submit(rows) for name, rows in submitted.items()]
            if "predictions" in submitted:
                writes.append(self._writers["audit"].submit(audit))
            await asyncio.gather(*map(asyncio.wrap_future, writes))
        except Exception as error:
            raise JudgedFailure(f"{type(error).__name__}: {error}", passes_later(error)) from error
        return submitted

    def _tell_listener(self, predictions: pa.Table, traces: dict[str, tracing.Carrier]) -> None:
        try:
            watermarks = predictions.group_by("tenant").aggregate([("event_time", "max")])
            newest = dict(zip(watermarks.column("tenant").to_pylist(), watermarks.column("event_time_max").to_pylist()))
            anomalous = predictions.filter(pc.equal(predictions.column("is_anomaly"), True))
            items = [Prediction.model_validate(item) for item in prediction_items(anomalous)] if anomalous.num_rows else []
            traced = {item.event_id: traces[item.event_id] for item in items if item.event_id in traces}
            self._listener.notify(items, newest, traced)
        except Exception:  # explaining is on top of the record, never a reason to fail a write
            log.exception("lakehouse sink: could not hand a batch's anomalies to the listener")

    def pid(self) -> int:
        return os.getpid()

    async def close(self) -> None:
        """Write what is buffered and stop. A write that failed earlier was reported to the consumer
        waiting for it, which read those events again, so it is only logged here."""
        for name, writer in self._writers.items():
            try:
                await asyncio.to_thread(writer.close)
            except Exception as error:  # see above: nothing unreported is lost
                log.warning("lakehouse sink: the %s writer reported a failed write while closing: %s", name, error)
        await asyncio.to_thread(self._feed.close)


def _audit_entries(predictions: pa.Table) -> list[dict]:
    """The audit entries of one batch of predictions: one per tenant, keyed by its event ids."""
    from lakehouse.api import audit_record

    entries = []
    for tenant in pc.unique(predictions["tenant"]).to_pylist():
        rows = predictions.filter(pc.equal(predictions["tenant"], tenant))
        event_ids = sorted(rows["event_id"].to_pylist())
        digest = hashlib.sha256("\0".join([tenant, *event_ids]).encode()).hexdigest()[:32]
        entry = audit_record(
            "stream sink",
            "predictions.write",
            "predictions",
            rows.num_rows,
            details={"tenant": tenant, "rows": rows["prediction_id"].to_pylist()[:AUDITED_IDS]},
            audit_id=f"batch-{digest}",
        )
        entries.append({**entry, "at": pc.max(rows["event_time"]).as_py()})
    return entries
