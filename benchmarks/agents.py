"""`rtml bench agents`: anomaly handed to the explainer -> enrichment stored, on the embedded backends.

The demo's graph and documents are loaded into a fresh home's embedded backends (kuzu, tantivy with
wordllama); the explainer runs as in ``rtml agents explain`` (search and graph in threads, the
template reasoner, the log as the only alert channel, the lakehouse ``enrichments`` writer). At a
fixed rate, one anomaly of a demo sensor that opens a new incident each time (event times more than
``agents.incident_gap_s`` apart) is handed to ``Explainer.observe``; the latency is from that call
to the enrichment being durable in the lakehouse. It leaves out what comes before the hand-over in
the app: the stream sink's own commit and the Serve call to the AgentGraph.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from rich.console import Console

from benchmarks.results import machine, write_section

SENSORS = [("acme", f"pump-{i}") for i in range(1, 5)] + [("globex", f"turbine-{i}") for i in range(1, 5)]
T0 = datetime(2024, 6, 1, tzinfo=timezone.utc)


def main(rate: float, seconds: float, write: bool, console: Console) -> None:
    from agents.data import seed_demo
    from agents.workers import GraphWorker, SearchWorker, in_threads, open_explainer
    from rtml.schemas import Prediction
    from rtml.settings import Settings

    logging.getLogger("agents.backends.alerts").setLevel(logging.ERROR)  # the log channel would print every alert
    home = Path(tempfile.mkdtemp(prefix="rtml-bench-agents-"))
    try:
        settings = Settings(home=home)
        seed_demo(settings)
        stored: dict[str, float] = {}
        search, graph = in_threads(SearchWorker(settings), GraphWorker(settings))
        explainer, close = open_explainer(settings, search, graph, on_stored=lambda row: stored.setdefault(row["details"]["incident"]["incident_id"], time.monotonic()))
        gap = timedelta(seconds=settings.agents.incident_gap_s + 1)
        handed: dict[str, float] = {}

        async def offer() -> None:
            count = int(rate * seconds)
            start = time.monotonic()
            for number in range(count):
                tenant, entity = SENSORS[number % len(SENSORS)]
                anomaly = Prediction(
                    event_id=f"{entity}-{number}", tenant=tenant, entity=entity, event_time=T0 + gap * number,
                    scores={"detector": 0.95}, ensemble_score=0.2, is_anomaly=True, model_versions={},
                )  # fmt: skip
                now = time.monotonic()
                for incident_id in await explainer.observe([anomaly], {}, wall_s=time.time()):
                    handed.setdefault(incident_id, now)
                await asyncio.sleep(max(0.0, start + (number + 1) / rate - time.monotonic()))
            await explainer.drain()

        with console.status(f"offering {rate:g} new incidents/s for {seconds:g} s"):
            asyncio.run(offer())
        close()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    latencies = np.array([stored[i] - handed[i] for i in handed if i in stored]) * 1000.0
    rows = [
        ("incidents offered / stored", f"{len(handed)} / {len(latencies)}"),
        ("handed -> stored p50", f"{np.percentile(latencies, 50):.0f} ms"),
        ("handed -> stored p99", f"{np.percentile(latencies, 99):.0f} ms"),
        ("handed -> stored max", f"{latencies.max():.0f} ms"),
    ]
    for name, value in rows:
        console.print(f"{name:28s} {value}")
    if write:
        table = "\n".join(f"| {name} | {value} |" for name, value in rows)
        write_section(
            "agents",
            f"""## Agents: anomaly -> enrichment stored (embedded backends)

`rtml bench agents --rate {rate:g} --seconds {seconds:g} --write` ({machine()}). Each anomaly opens a new
incident of a demo sensor and runs the whole graph (tantivy + wordllama search, kuzu graph, template
reasoner, log alert); the latency is from `Explainer.observe` to the enrichment being durable in the
lakehouse (its writer batches for `lakehouse.writer_flush_seconds` = 1 s). Target: p99 <= 2 s.

| measure | value |
|---|---|
{table}
""",
        )
